//! Requests the core holds (blocked reads, writes answered later) and the
//! kernel's interrupts of them.
//!
//! One small lock covers the tables, so an interrupt and the registration of
//! its request never miss each other; it is held only to look up and move
//! entries, never while a handler runs or a reply is sent. An interrupt may
//! arrive before its request is registered (another dispatch thread is still
//! handling it): it is kept a while and ends the request as it registers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::handles::Handle;
use crate::reply::ReadReply;
use crate::write::WriteSlot;
use crate::{Caller, Errno, NodeId};

/// How long an interrupt for a request not registered yet is kept.
const EARLY_INTERRUPT_KEPT: Duration = Duration::from_secs(10);

/// A read waiting for its file's content.
pub(crate) struct PendingRead {
    pub handle: Arc<Handle>,
    pub caller: Caller,
    pub offset: u64,
    pub size: u32,
    /// `None` once answered. Held while the read is re-evaluated, so an
    /// interrupt waits for that and then finds it answered or still open.
    reply: Mutex<Option<Box<dyn ReadReply>>>,
}

impl PendingRead {
    pub fn new(
        handle: Arc<Handle>,
        caller: Caller,
        offset: u64,
        size: u32,
        reply: Box<dyn ReadReply>,
    ) -> Self {
        PendingRead {
            handle,
            caller,
            offset,
            size,
            reply: Mutex::new(Some(reply)),
        }
    }

    pub fn reply(&self) -> MutexGuard<'_, Option<Box<dyn ReadReply>>> {
        self.reply.lock().unwrap()
    }

    pub fn fail(&self, errno: Errno) {
        if let Some(reply) = self.reply().take() {
            reply.error(errno);
        }
    }
}

#[derive(Default)]
struct Tables {
    reads: HashMap<u64, Arc<PendingRead>>,
    reads_by_node: HashMap<NodeId, HashSet<u64>>,
    writes: HashMap<u64, Arc<WriteSlot>>,
    /// Interrupts that came before their request, by request id.
    early: HashMap<u64, Instant>,
}

impl Tables {
    fn take_read(&mut self, unique: u64) -> Option<Arc<PendingRead>> {
        let read = self.reads.remove(&unique)?;
        let node = read.handle.node;
        if let Some(of_node) = self.reads_by_node.get_mut(&node) {
            of_node.remove(&unique);
            if of_node.is_empty() {
                self.reads_by_node.remove(&node);
            }
        }
        Some(read)
    }
}

#[derive(Default)]
pub(crate) struct Pending {
    tables: Mutex<Tables>,
    interrupts: AtomicU64,
}

impl Pending {
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap()
    }

    /// Holds `read` by its request id. Gives it back when the kernel has
    /// interrupted it already (the caller answers EINTR).
    pub fn park_read(&self, unique: u64, read: PendingRead) -> Result<(), PendingRead> {
        let mut tables = self.tables();
        if tables.early.remove(&unique).is_some() {
            return Err(read);
        }
        tables
            .reads_by_node
            .entry(read.handle.node)
            .or_default()
            .insert(unique);
        tables.reads.insert(unique, Arc::new(read));
        Ok(())
    }

    /// Forgets an answered read.
    pub fn unpark_read(&self, unique: u64) {
        self.tables().take_read(unique);
    }

    /// The reads blocked on `node`, by request id.
    pub fn reads_of(&self, node: NodeId) -> Vec<(u64, Arc<PendingRead>)> {
        let tables = self.tables();
        let Some(ids) = tables.reads_by_node.get(&node) else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|id| tables.reads.get(id).map(|r| (*id, r.clone())))
            .collect()
    }

    /// Holds a write's reply by its request id. `false` when the kernel has
    /// interrupted it already.
    pub fn register_write(&self, unique: u64, slot: &Arc<WriteSlot>) -> bool {
        let mut tables = self.tables();
        if tables.early.remove(&unique).is_some() {
            return false;
        }
        tables.writes.insert(unique, slot.clone());
        true
    }

    /// Forgets an answered write.
    pub fn forget_write(&self, unique: u64) {
        self.tables().writes.remove(&unique);
    }

    /// FUSE_INTERRUPT of request `unique`: a held read, or a write its
    /// handler has not claimed, gets EINTR now.
    pub fn interrupt(&self, unique: u64) {
        self.interrupts.fetch_add(1, Ordering::SeqCst);
        let mut tables = self.tables();
        if let Some(read) = tables.take_read(unique) {
            drop(tables);
            tracing::debug!(
                op = "read",
                uid = read.caller.uid,
                pid = read.caller.pid,
                "blocked read interrupted by a signal: EINTR"
            );
            read.fail(Errno::EINTR);
        } else if let Some(slot) = tables.writes.get(&unique) {
            // A claimed write stays held: its handler's `finish` answers it.
            if let Some(reply) = slot.interrupt() {
                let caller = slot.caller;
                tables.writes.remove(&unique);
                drop(tables);
                tracing::debug!(
                    op = "write",
                    uid = caller.uid,
                    pid = caller.pid,
                    "held write interrupted by a signal: EINTR"
                );
                reply.error(Errno::EINTR);
            }
        } else {
            // Either answered already (then this is moot) or not registered
            // yet: remember it for a while.
            tables
                .early
                .retain(|_, at| at.elapsed() < EARLY_INTERRUPT_KEPT);
            tables.early.insert(unique, Instant::now());
        }
    }

    /// At unmount: every held read and unclaimed write gets EINTR rather
    /// than the EIO of a dropped reply. A claimed write is being committed
    /// and still gets its handler's answer.
    pub fn interrupt_all(&self) {
        let (reads, writes) = {
            let mut tables = self.tables();
            tables.reads_by_node.clear();
            let reads: Vec<_> = tables.reads.drain().map(|(_, r)| r).collect();
            let writes: Vec<_> = tables.writes.drain().map(|(_, w)| w).collect();
            (reads, writes)
        };
        for read in reads {
            read.fail(Errno::EINTR);
        }
        for reply in writes.iter().filter_map(|w| w.interrupt()) {
            reply.error(Errno::EINTR);
        }
    }

    pub fn reads(&self) -> usize {
        self.tables().reads.len()
    }

    pub fn writes(&self) -> usize {
        self.tables().writes.len()
    }

    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::SeqCst)
    }
}
