//! SIGTERM/SIGINT taken synchronously by one thread: the daemon finishes
//! the commands in flight, starts no other, and exits.

use daemon_common::signals::{self, Signal};
use tracing::info;

const TERMINATION: [Signal; 2] = [Signal::SIGTERM, Signal::SIGINT];

/// Block the termination signals in the calling thread (call before any
/// other thread exists, so every thread inherits the mask); they are then
/// taken by [`spawn_sigwait_thread`].
pub fn block_signals() {
    signals::block(&TERMINATION);
}

/// A thread taking SIGTERM/SIGINT (blocked by [`block_signals`]) with
/// `sigwait`; `on_signal` returns false to end the thread.
pub fn spawn_sigwait_thread(mut on_signal: impl FnMut() -> bool + Send + 'static) {
    signals::block(&TERMINATION).spawn_waiter(move |sig| {
        info!(
            signal = sig as i32,
            "termination signal: finishing commands in flight"
        );
        on_signal()
    });
}
