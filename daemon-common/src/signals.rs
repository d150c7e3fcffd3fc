//! Signals taken synchronously: blocked before any thread starts (every
//! thread inherits the mask) and taken with `sigwait` where the daemon is
//! ready for them, so a signal at any moment of start-up ends the same way.

use std::thread;

use nix::sys::signal::SigSet;
pub use nix::sys::signal::Signal;

/// A set of signals blocked in the calling thread and its later threads.
#[derive(Clone, Copy)]
pub struct Blocked(SigSet);

/// Blocks `signals` in the calling thread (call before any other thread
/// exists). The only error pthread_sigmask has is a bad `how`, which
/// SIG_BLOCK is not, so a failure here is a bug worth a panic.
pub fn block(signals: &[Signal]) -> Blocked {
    let mut set = SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set.thread_block().expect("pthread_sigmask(SIG_BLOCK)");
    Blocked(set)
}

impl Blocked {
    /// Waits for one of the blocked signals.
    pub fn wait(&self) -> Signal {
        loop {
            // sigwait fails only on a set with an invalid signal; ours
            // holds only `Signal` values, so retrying cannot spin.
            if let Ok(s) = self.0.wait() {
                return s;
            }
        }
    }

    /// A thread that takes the blocked signals one at a time and hands each
    /// to `on_signal`, ending when it returns false.
    pub fn spawn_waiter(
        self,
        mut on_signal: impl FnMut(Signal) -> bool + Send + 'static,
    ) -> thread::JoinHandle<()> {
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || while on_signal(self.wait()) {})
            .expect("spawning the signal thread")
    }
}

/// Clears the signal mask of the calling thread: for a child between fork
/// and exec, which must not inherit the daemon's blocked signals. Only
/// pthread_sigmask runs, which is async-signal-safe.
pub fn unblock_all() {
    // Cannot fail with SIG_SETMASK (see `block`); nothing to report in a child.
    let _ = SigSet::empty().thread_set_mask();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_taken_by_wait() {
        // The test thread only: raise() delivers to it, and the mask of the
        // harness's other threads is untouched.
        let blocked = block(&[Signal::SIGUSR2]);
        nix::sys::signal::raise(Signal::SIGUSR2).expect("raise");
        assert_eq!(blocked.wait(), Signal::SIGUSR2);
    }
}
