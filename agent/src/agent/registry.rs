//! The registry: name → operation, names reserved by requests still being
//! checked, per-user counts; and what makes an operation visible or not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use fuse_ctl::{Errno, NodeId};

use crate::op::Operation;

use super::{Agent, Rejection};

#[derive(Default)]
pub(super) struct Registry {
    pub(super) ops: HashMap<String, Arc<Operation>>,
    /// Names taken by requests still being checked: name → (token, uid).
    pub(super) reserved: HashMap<String, (u64, u32)>,
    /// Operations and reservations of each user (the ENOSPC limit).
    pub(super) per_user: HashMap<u32, usize>,
    pub(super) next_token: u64,
}

impl Registry {
    pub(super) fn in_use(&self, name: &str) -> bool {
        self.ops.contains_key(name) || self.reserved.contains_key(name)
    }

    pub(super) fn release(&mut self, uid: u32) {
        if let Some(count) = self.per_user.get_mut(&uid) {
            *count = count.saturating_sub(1);
        }
    }
}

/// A name held for one request until it becomes an operation or its checks
/// return (even past their deadline: until then its record may still be
/// written, and the name must not pass to another request).
pub(super) struct Reservation {
    pub(super) name: String,
    pub(super) token: u64,
}

impl Agent {
    /// The operation `name` if `uid` may see it (its owner, or root).
    pub fn lookup(&self, uid: u32, name: &str) -> Option<Arc<Operation>> {
        let op = self.registry.read().unwrap().ops.get(name).cloned()?;
        (uid == 0 || op.uid == uid).then_some(op)
    }

    /// The operations `uid` may see, by name.
    pub fn list(&self, uid: u32) -> Vec<Arc<Operation>> {
        let mut ops: Vec<Arc<Operation>> = self
            .registry
            .read()
            .unwrap()
            .ops
            .values()
            .filter(|op| uid == 0 || op.uid == uid)
            .cloned()
            .collect();
        ops.sort_by(|a, b| a.name.cmp(&b.name));
        ops
    }

    /// Asks for cancellation; nothing happens to a completed operation.
    pub fn cancel(&self, op: &Arc<Operation>) {
        tracing::info!(op = %op.name, user = op.uid, "cancel requested");
        self.backend().cancel(op);
    }

    /// Removes a completed operation, as `rmdir` does (EBUSY until completed).
    pub fn delete(&self, uid: u32, name: &str) -> Result<(), Errno> {
        let (_, node) = self.remove_op(uid, name)?;
        if let Some(node) = node {
            self.fs.remove_now(node);
        }
        Ok(())
    }

    pub(super) fn check_limit(&self, registry: &Registry, uid: u32) -> Result<(), Rejection> {
        let count = registry.per_user.get(&uid).copied().unwrap_or(0);
        if count >= self.config.max_ops_per_user {
            return Err(Rejection::new(
                Errno::ENOSPC,
                format!(
                    "uid {uid} has {count} operations, the limit is {}: rmdir finished ones",
                    self.config.max_ops_per_user
                ),
            ));
        }
        Ok(())
    }

    /// Makes an operation visible that needs no checks (one restored from
    /// a record or a resource): registry entry and its directory.
    pub fn register(&self, op: Arc<Operation>) -> Result<(), Rejection> {
        let mut registry = self.registry.write().unwrap();
        if registry.in_use(&op.name) {
            return Err(Rejection::new(
                Errno::EEXIST,
                format!("name '{}' is in use", op.name),
            ));
        }
        self.check_limit(&registry, op.uid)?;
        self.show_op_dir(&op)?;
        registry.ops.insert(op.name.clone(), op.clone());
        *registry.per_user.entry(op.uid).or_default() += 1;
        Ok(())
    }

    /// Makes an operation disappear without asking the backend (its record
    /// is already gone, e.g. a resource deleted by someone else).
    pub fn forget(&self, op: &Operation) {
        op.removed.store(true, std::sync::atomic::Ordering::Release);
        self.unregister(op, true);
    }

    /// Forgets an operation; `now` waits until the kernel forgot it too (not
    /// allowed from a FUSE callback).
    pub(super) fn unregister(&self, op: &Operation, now: bool) {
        let mut registry = self.registry.write().unwrap();
        // Only this very operation: its name may have passed to another.
        if !registry
            .ops
            .get(&op.name)
            .is_some_and(|o| std::ptr::eq(&**o, op))
        {
            return;
        }
        registry.ops.remove(&op.name);
        registry.release(op.uid);
        let node = self.dirs.remove(&op.name);
        drop(registry);
        if let Some(node) = node {
            if now {
                self.fs.remove_now(node);
            } else {
                self.fs.remove(node);
            }
        }
    }

    /// Forgets a completed operation everywhere but in the filesystem tree.
    /// Returns the operation and its directory, which the caller removes
    /// (the rmdir hook: the library does).
    pub(super) fn remove_op(
        &self,
        uid: u32,
        name: &str,
    ) -> Result<(Arc<Operation>, Option<NodeId>), Errno> {
        let op = self
            .registry
            .read()
            .unwrap()
            .ops
            .get(name)
            .cloned()
            .ok_or(Errno::ENOENT)?;
        if uid != 0 && uid != op.uid {
            return Err(Errno::EACCES);
        }
        if !op.is_completed() {
            return Err(Errno::EBUSY);
        }
        if let Err(rejection) = self.backend().remove(&op) {
            tracing::warn!(op = %name, user = uid, "cannot remove: {}", rejection.reason);
            return Err(rejection.errno);
        }
        let mut registry = self.registry.write().unwrap();
        let mut node = None;
        if registry.ops.get(name).is_some_and(|o| Arc::ptr_eq(o, &op)) {
            registry.ops.remove(name);
            registry.release(op.uid);
            node = self.dirs.remove(name);
        }
        drop(registry);
        tracing::info!(op = %name, user = uid, "operation removed");
        Ok((op, node))
    }

    /// Removes completed operations older than the retention period.
    pub fn expire(&self) {
        let now = SystemTime::now();
        let expired: Vec<Arc<Operation>> = self
            .registry
            .read()
            .unwrap()
            .ops
            .values()
            .filter(|op| {
                let status = op.status();
                status.is_completed()
                    && status
                        .end_time
                        .and_then(|end| now.duration_since(end).ok())
                        .is_some_and(|age| age >= self.config.retention)
            })
            .cloned()
            .collect();
        for op in expired {
            if self.backend().remove(&op).is_ok() {
                self.unregister(&op, true);
                tracing::info!(op = %op.name, user = op.uid, "operation expired after the retention period");
            }
        }
    }
}
