//! SIGTERM/SIGINT taken synchronously by one thread: the daemon finishes
//! the commands in flight, starts no other, and exits.

use std::thread;

use tracing::info;

/// Block the termination signals in the calling thread (call before any
/// other thread exists, so every thread inherits the mask); they are then
/// taken by [`spawn_sigwait_thread`].
pub fn block_signals() {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// A thread taking SIGTERM/SIGINT (blocked by [`block_signals`]) with
/// `sigwait`; `on_signal` returns false to end the thread.
pub fn spawn_sigwait_thread(mut on_signal: impl FnMut() -> bool + Send + 'static) {
    thread::spawn(move || loop {
        // SAFETY: sigwait on the set blocked by block_signals.
        let sig = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
                continue;
            }
            sig
        };
        info!(
            signal = sig,
            "termination signal: finishing commands in flight"
        );
        if !on_signal() {
            return;
        }
    });
}
