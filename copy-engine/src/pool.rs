//! A small work-stealing-free task pool: one shared LIFO stack.
//!
//! LIFO keeps the walk depth-first, so only a handful of directories hold
//! open descriptors at any time however wide the tree is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

struct State<T> {
    tasks: Vec<T>,
    /// Tasks queued plus tasks being run: zero means all work is done.
    outstanding: usize,
}

pub struct Pool<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
}

impl<T: Send> Pool<T> {
    pub fn push_all(&self, tasks: impl IntoIterator<Item = T>) {
        let mut st = self.state.lock().unwrap();
        let before = st.tasks.len();
        st.tasks.extend(tasks);
        let added = st.tasks.len() - before;
        st.outstanding += added;
        drop(st);
        match added {
            0 => {}
            1 => self.cv.notify_one(),
            _ => self.cv.notify_all(),
        }
    }

    fn pop(&self, cancel: &AtomicBool) -> Option<T> {
        let mut st = self.state.lock().unwrap();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(t) = st.tasks.pop() {
                return Some(t);
            }
            if st.outstanding == 0 {
                return None;
            }
            // The timeout only serves to notice a cancel request, which
            // arrives without a notification.
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    fn done_one(&self) {
        let mut st = self.state.lock().unwrap();
        st.outstanding -= 1;
        if st.outstanding == 0 {
            drop(st);
            self.cv.notify_all();
        }
    }
}

/// Runs `work` on `workers` threads until no task is left or `cancel` is set.
/// Each thread gets its own scratch state from `make_state`.
pub fn run<T, S, M, W>(workers: usize, initial: Vec<T>, cancel: &AtomicBool, make_state: M, work: W)
where
    T: Send,
    M: Fn() -> S + Sync,
    W: Fn(T, &mut S, &Pool<T>) + Sync,
{
    let pool = Pool {
        state: Mutex::new(State {
            outstanding: initial.len(),
            tasks: initial,
        }),
        cv: Condvar::new(),
    };
    let worker = || {
        let mut scratch = make_state();
        while let Some(task) = pool.pop(cancel) {
            work(task, &mut scratch, &pool);
            pool.done_one();
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers.max(1) {
            s.spawn(worker);
        }
        worker();
    });
}
