//! The agent core: the operation registry, the rules every backend shares
//! (names, limits, ownership, the `errors` file, retention) and the tree of
//! control files over them.
//!
//! Calls flow one way: the doors (`ctlfs`, the gRPC door) call the core;
//! the core calls its backend (`backend`); the backend reports through the
//! core's event channel (`events`).

mod admission;
mod backend;
mod create;
mod ctlfs;
mod events;
mod registry;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fuse_ctl::{ControlFs, Owner};

pub use admission::{abandoned, Input, Reply};
pub use backend::{errno_name, Backend, Prepared, Rejection, Requester, Step};
pub use events::{Change, Events, Notify};

use admission::Checking;
use ctlfs::Dirs;
use registry::Registry;

/// How many rejections the `errors` file keeps per user.
const ERRORS_KEPT: usize = 32;

pub struct AgentConfig {
    pub max_ops_per_user: usize,
    pub retention: Duration,
    /// Deadline of the checks of one request (`--request-timeout`).
    pub request_timeout: Duration,
}

pub struct Agent {
    fs: ControlFs,
    dirs: Dirs,
    registry: RwLock<Registry>,
    errors: Mutex<HashMap<u32, VecDeque<String>>>,
    checking: Mutex<HashMap<u32, Checking>>,
    backend: Arc<dyn Backend>,
    config: AgentConfig,
    /// Where requests are checked: never on a door's thread.
    rt: tokio::runtime::Handle,
    /// Status changes, for doors that wait on operations (gRPC).
    changes: tokio::sync::broadcast::Sender<Change>,
    /// Its own way into the event channel (`settle`).
    events: Notify,
}

impl Agent {
    /// The core over `backend`, which reports through `events` (see
    /// `Events::new`); `rt` runs the checks of every request (its blocking
    /// pool bounds how many threads wait on file systems).
    ///
    /// The agent lives as long as the process: the thread that takes its
    /// events holds it.
    pub fn new(
        config: AgentConfig,
        rt: tokio::runtime::Handle,
        events: Events,
        backend: Arc<dyn Backend>,
    ) -> Arc<Agent> {
        let agent = events.serve(|events| {
            Arc::new(Agent {
                // Like /tmp: everyone may write the request file, and the sticky
                // bit lets owners (only) rmdir their operations.
                fs: ControlFs::new(Owner::root(0o1777)),
                dirs: Dirs::default(),
                registry: RwLock::new(Registry::default()),
                errors: Mutex::new(HashMap::new()),
                checking: Mutex::new(HashMap::new()),
                backend,
                config,
                rt,
                changes: tokio::sync::broadcast::channel(events::CHANGES_KEPT).0,
                events,
            })
        });
        agent.install();
        agent
    }

    pub fn fs(&self) -> &ControlFs {
        &self.fs
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}
