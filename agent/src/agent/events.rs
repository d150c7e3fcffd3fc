//! The core's event channel: a backend reports here that an operation's
//! status changed, that it found an operation (listed again after a
//! restart) or that one is gone (its record deleted by someone else). It
//! never calls the core. One thread of the core takes the events in order
//! and wakes each door: the control files' readers and pollers, and
//! whoever subscribed to changes (the gRPC door's waiters).

use std::sync::{mpsc, Arc};

use super::Agent;
use crate::op::Operation;

/// Changes a slow subscriber may fall behind by before it is told it
/// lagged (and then re-checks everything it waits on).
pub(super) const CHANGES_KEPT: usize = 1024;

/// The name of an operation whose status changed.
pub type Change = Arc<str>;

enum Event {
    Changed(String),
    Found(Arc<Operation>),
    Gone(Arc<Operation>),
    /// Answered once every event sent before it was handled.
    Settled(mpsc::Sender<()>),
}

/// What a backend holds to report to the core.
#[derive(Clone)]
pub struct Notify(mpsc::Sender<Event>);

impl Notify {
    /// A poller-visible field of `op` changed (`Operation::update` said so).
    pub fn changed(&self, op: &Operation) {
        let _ = self.0.send(Event::Changed(op.name.clone()));
    }

    /// An operation that needs no checks is to be made visible: one whose
    /// record or resource outlived a restart.
    pub fn found(&self, op: Arc<Operation>) {
        let _ = self.0.send(Event::Found(op));
    }

    /// An operation's record is gone without a remove (a resource deleted
    /// by someone else): it disappears.
    pub fn gone(&self, op: Arc<Operation>) {
        let _ = self.0.send(Event::Gone(op));
    }
}

/// The channel, made before the backend so that the backend can be given
/// its `Notify`; the core takes the receiving end (`Agent::new`).
pub struct Events {
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Events {
        let (tx, rx) = mpsc::channel();
        Events { tx, rx }
    }

    pub fn notify(&self) -> Notify {
        Notify(self.tx.clone())
    }

    /// The core's own sender (for `settle`), and a thread of the core
    /// that takes the events. Not the core's runtime: removing a directory
    /// may wait for the kernel.
    pub(super) fn serve(self, agent: impl FnOnce(Notify) -> Arc<Agent>) -> Arc<Agent> {
        let Events { tx, rx } = self;
        let agent = agent(Notify(tx));
        let handler = agent.clone();
        std::thread::Builder::new()
            .name("core-events".into())
            .spawn(move || {
                for event in rx {
                    handler.handle(event);
                }
            })
            .expect("cannot start the core's event thread");
        agent
    }
}

impl Agent {
    fn handle(&self, event: Event) {
        match event {
            Event::Changed(name) => {
                // A late change of an operation already replaced under its
                // name wakes the new one's readers: they re-read and find
                // nothing new.
                if let Some(node) = self.dirs.get(&name) {
                    self.fs.changed(node);
                }
                if self.changes.receiver_count() > 0 {
                    let _ = self.changes.send(name.into());
                }
            }
            Event::Found(op) => match self.register(op.clone()) {
                Ok(()) => {
                    tracing::info!(op = %op.name, user = op.uid, "operation listed again")
                }
                Err(rejection) => tracing::warn!(
                    op = %op.name,
                    user = op.uid,
                    "cannot list the operation again: {}",
                    rejection.reason
                ),
            },
            Event::Gone(op) => {
                tracing::info!(op = %op.name, user = op.uid, "its record is gone: the operation disappears");
                self.forget(&op);
            }
            Event::Settled(done) => {
                let _ = done.send(());
            }
        }
    }

    /// Returns once every event the backend sent so far was handled (so
    /// that what its start-up found is listed before the doors open).
    pub fn settle(&self) {
        let (tx, rx) = mpsc::channel();
        if self.events.0.send(Event::Settled(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Names of operations whose status changed, from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}
