//! The gRPC door's own map from operation to its waiters: `Status` calls
//! with a wait time sleep here and are woken by the core's change events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Notify;

use crate::agent::Agent;
use crate::op::Operation;

/// Name → (callers waiting, their wake-up).
#[derive(Default)]
pub(super) struct Waiters(Mutex<HashMap<String, (usize, Arc<Notify>)>>);

impl Waiters {
    /// Follows the core's changes for as long as the runtime runs.
    pub(super) fn follow(self: &Arc<Self>, agent: &Agent) {
        let mut changes = agent.subscribe();
        let waiters = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let change = changes.recv().await;
                let Some(waiters) = waiters.upgrade() else {
                    return;
                };
                let map = waiters.0.lock().unwrap();
                match change {
                    Ok(name) => {
                        if let Some((_, wake)) = map.get(&*name) {
                            wake.notify_waiters();
                        }
                    }
                    // Missed some: everyone looks again.
                    Err(RecvError::Lagged(_)) => map.values().for_each(|(_, w)| w.notify_waiters()),
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    fn join(&self, name: &str) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap();
        let entry = map
            .entry(name.to_string())
            .or_insert_with(|| (0, Arc::new(Notify::new())));
        entry.0 += 1;
        entry.1.clone()
    }

    fn leave(&self, name: &str) {
        let mut map = self.0.lock().unwrap();
        if let Some(entry) = map.get_mut(name) {
            entry.0 -= 1;
            if entry.0 == 0 {
                map.remove(name);
            }
        }
    }

    /// Waits until `op` is completed: `max_wait` seconds at most when
    /// positive, for ever when negative. Ends early when the client goes
    /// away (tonic then drops this future).
    pub(super) async fn wait_completed(&self, op: &Operation, max_wait: i64) {
        if max_wait == 0 {
            return;
        }
        // Dropped unfinished when tonic drops the call: the client went away.
        struct Waiting<'a> {
            waiters: &'a Waiters,
            op: &'a Operation,
            done: bool,
        }
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.waiters.leave(&self.op.name);
                if !self.done {
                    tracing::info!(op = %self.op.name, user = self.op.uid, "Status wait ended: the client went away");
                }
            }
        }
        let wake = self.join(&op.name);
        tracing::debug!(op = %op.name, user = op.uid, max_wait, "Status waits for completion");
        let mut waiting = Waiting {
            waiters: self,
            op,
            done: false,
        };
        let completed = async {
            loop {
                // Registered before looking, so no completion slips in between.
                let notified = wake.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if op.is_completed() {
                    return;
                }
                notified.await;
            }
        };
        if max_wait > 0 {
            let _ =
                tokio::time::timeout(Duration::from_secs(max_wait.unsigned_abs()), completed).await;
        } else {
            completed.await;
        }
        waiting.done = true;
    }
}
