//! Open file descriptors: their snapshots, command replies and poll state,
//! indexed by descriptor and by node.
//!
//! Each handle has its own lock, so callers on different descriptors never
//! wait for each other, and the table's lock is held only to find a handle.
//! A change notice looks up the handles of the changed nodes instead of
//! scanning every open one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::reply::{Events, PollWaker};
use crate::{Caller, Content, FileKind, FileOps, NodeId};

pub(crate) struct Handle {
    pub node: NodeId,
    pub ops: Arc<dyn FileOps>,
    pub kind: FileKind,
    /// Opened with `O_NONBLOCK`.
    pub nonblock: bool,
    state: Mutex<HandleState>,
}

#[derive(Default)]
pub(crate) struct HandleState {
    pub snapshot: Option<Arc<[u8]>>,
    pub generation_at_read: u64,
    /// End offset of the last write and the reply served after it.
    pub write_reply: Option<(u64, Vec<u8>)>,
    pub poll: Option<Box<dyn PollWaker>>,
}

impl Handle {
    pub fn new(node: NodeId, ops: Arc<dyn FileOps>, kind: FileKind, nonblock: bool) -> Self {
        let state = HandleState {
            generation_at_read: ops.generation(),
            ..HandleState::default()
        };
        Handle {
            node,
            ops,
            kind,
            nonblock,
            state: Mutex::new(state),
        }
    }

    /// The handle's state. Readiness is checked and a poller registered under
    /// it, and a change notice checks and takes the poller under it too, so
    /// no wake-up falls between the two.
    pub fn state(&self) -> MutexGuard<'_, HandleState> {
        self.state.lock().unwrap()
    }

    /// Keeps a fresh snapshot for the reads at later offsets.
    pub fn keep_snapshot(&self, snapshot: Arc<[u8]>, generation: u64) {
        let mut state = self.state();
        state.snapshot = Some(snapshot);
        state.generation_at_read = generation;
    }

    /// What `poll` would report now, `NONE` while nothing is ready.
    pub fn ready(&self, state: &HandleState) -> Events {
        match self.kind {
            FileKind::Snapshot => {
                if self.ops.generation() != state.generation_at_read {
                    Events {
                        readable: true,
                        changed: true,
                        writable: false,
                    }
                } else {
                    Events::NONE
                }
            }
            FileKind::Blocking => {
                // Readable once a read would not block. The caller identity
                // does not matter for readiness.
                let probe = Caller {
                    uid: 0,
                    gid: 0,
                    pid: 0,
                };
                if matches!(self.ops.read(&probe), Ok(Content::NotReady)) {
                    Events::NONE
                } else {
                    Events {
                        readable: true,
                        ..Events::NONE
                    }
                }
            }
            FileKind::Command => Events {
                readable: true,
                changed: false,
                writable: true,
            },
        }
    }
}

#[derive(Default)]
struct Table {
    by_fh: HashMap<u64, Arc<Handle>>,
    by_node: HashMap<NodeId, HashMap<u64, Arc<Handle>>>,
}

#[derive(Default)]
pub(crate) struct Handles {
    table: RwLock<Table>,
}

impl Handles {
    pub fn insert(&self, fh: u64, handle: Handle) {
        let handle = Arc::new(handle);
        let mut table = self.table.write().unwrap();
        table
            .by_node
            .entry(handle.node)
            .or_default()
            .insert(fh, handle.clone());
        table.by_fh.insert(fh, handle);
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        let mut table = self.table.write().unwrap();
        let handle = table.by_fh.remove(&fh)?;
        if let Some(of_node) = table.by_node.get_mut(&handle.node) {
            of_node.remove(&fh);
            if of_node.is_empty() {
                table.by_node.remove(&handle.node);
            }
        }
        Some(handle)
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.table.read().unwrap().by_fh.get(&fh).cloned()
    }

    /// The open handles of `node`.
    pub fn of_node(&self, node: NodeId) -> Vec<Arc<Handle>> {
        self.table
            .read()
            .unwrap()
            .by_node
            .get(&node)
            .map(|of_node| of_node.values().cloned().collect())
            .unwrap_or_default()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.read().unwrap().by_fh.len()
    }
}
