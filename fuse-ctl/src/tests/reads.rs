//! Snapshots, poll and blocking reads.

use super::*;

// ---------------------------------------------------------------------------
// Snapshots and poll
// ---------------------------------------------------------------------------

#[test]
fn a_snapshot_is_taken_at_offset_zero_and_continued_after() {
    let t = T::new();
    let value = Arc::new(Value::default());
    let snap = t.file(NodeId::ROOT, "snap", FileKind::Snapshot, value.clone());
    let fh = t.open(snap);
    // A fresh descriptor read past 0 takes a snapshot too.
    assert_eq!(t.read(fh, 6).get(), data("0\n"));
    assert_eq!(t.read(fh, 0).get(), data("value=0\n"));
    value.value.store(7, Ordering::SeqCst);
    assert_eq!(t.read(fh, 6).get(), data("0\n"), "continues the snapshot");
    assert_eq!(t.read(fh, 100).get(), data(""));
    assert_eq!(t.read(fh, 0).get(), data("value=7\n"));
    t.core.release(fh);
    assert_eq!(t.read(fh, 0).get(), err(Errno::EBADF));
    assert_eq!(t.core.poll(fh, None), Err(Errno::EBADF));
}

#[test]
fn a_snapshot_polls_ready_once_its_generation_moved_since_the_read_at_zero() {
    let t = T::new();
    let value = Arc::new(Value::default());
    let snap = t.file(NodeId::ROOT, "snap", FileKind::Snapshot, value.clone());
    let fh = t.open(snap);
    assert_eq!(t.read(fh, 0).get(), data("value=0\n"));
    let waker = Seen::default();
    assert_eq!(t.core.poll(fh, Some(waker.reply())), Ok(Events::NONE));
    // A notice while nothing changed wakes nobody.
    t.core.changed(snap);
    t.settle();
    assert_eq!(waker.get(), None);
    value.value.store(1, Ordering::SeqCst);
    t.core.changed(NodeId::ROOT);
    t.settle();
    assert_eq!(waker.get(), Some(Answer::Woken));
    let changed = Events {
        readable: true,
        changed: true,
        writable: false,
    };
    assert_eq!(t.core.poll(fh, None), Ok(changed));
    assert_eq!(t.read(fh, 3).get(), data("ue=0\n"));
    assert_eq!(t.core.poll(fh, None), Ok(changed), "a read past 0 keeps it");
    assert_eq!(t.read(fh, 0).get(), data("value=1\n"));
    assert_eq!(t.core.poll(fh, None), Ok(Events::NONE));
}

#[test]
fn a_change_notice_looks_only_at_the_handles_of_the_changed_nodes() {
    let t = T::new();
    let changed = Arc::new(Value::default());
    let other = Arc::new(Value::default());
    let a = t.file(NodeId::ROOT, "a", FileKind::Snapshot, changed.clone());
    let b = t.file(NodeId::ROOT, "b", FileKind::Snapshot, other.clone());
    let wakers: Vec<Seen> = (0..50).map(|_| Seen::default()).collect();
    for waker in &wakers {
        let fh = t.open(b);
        assert_eq!(t.core.poll(fh, Some(waker.reply())), Ok(Events::NONE));
    }
    let fh = t.open(a);
    let waker = Seen::default();
    t.core.poll(fh, Some(waker.reply())).unwrap();
    assert_eq!(t.core.handles().len(), 51);
    let before = other.generations.load(Ordering::SeqCst);
    changed.value.store(1, Ordering::SeqCst);
    t.core.changed(a);
    t.settle();
    assert_eq!(waker.get(), Some(Answer::Woken));
    assert_eq!(other.generations.load(Ordering::SeqCst), before);
    assert!(wakers.iter().all(|w| w.get().is_none()));
}

#[test]
fn a_command_file_polls_readable_and_writable() {
    let t = T::new();
    let cmd = t.root_file::<Keep>("cmd", FileKind::Command);
    let fh = t.open(cmd);
    let all = Events {
        readable: true,
        changed: false,
        writable: true,
    };
    assert_eq!(t.core.poll(fh, None), Ok(all));
}

// ---------------------------------------------------------------------------
// Blocking reads
// ---------------------------------------------------------------------------

#[test]
fn a_blocking_read_waits_until_a_change_finds_content() {
    let t = T::new();
    let gate = Arc::new(Gate::default());
    let block = t.file(NodeId::ROOT, "block", FileKind::Blocking, gate.clone());
    let fh = t.open(block);
    let waker = Seen::default();
    assert_eq!(t.core.poll(fh, Some(waker.reply())), Ok(Events::NONE));
    let readers: Vec<Seen> = (0..3).map(|_| t.read(fh, 0)).collect();
    t.settle();
    assert_eq!(t.core.pending().reads(), 3);
    assert!(readers.iter().all(|r| r.get().is_none()));
    // Ready without a notice wakes nobody; the notice completes them all.
    gate.ready.store(true, Ordering::SeqCst);
    assert_eq!(t.core.pending().reads(), 3);
    t.core.changed(block);
    t.settle();
    for r in &readers {
        assert_eq!(r.get(), data("ready\n"));
    }
    assert_eq!(waker.get(), Some(Answer::Woken));
    assert_eq!(t.core.pending().reads(), 0);
    // Its snapshot is continued at later offsets.
    assert_eq!(t.read(fh, 2).get(), data("ady\n"));
}

#[test]
fn a_blocking_read_under_o_nonblock_is_eagain() {
    let t = T::new();
    let block = t.root_file::<Gate>("block", FileKind::Blocking);
    let fh = t.core.open(&ROOT, block, true).unwrap();
    assert_eq!(t.read(fh, 0).get(), err(Errno::EAGAIN));
    // O_NONBLOCK set after open, seen on the read itself.
    let fh = t.open(block);
    let seen = Seen::default();
    let req = ReadRequest {
        unique: t.next_unique(),
        fh,
        offset: 0,
        size: 100,
        nonblock: true,
    };
    t.core.read(&ROOT, req, seen.reply());
    assert_eq!(seen.get(), err(Errno::EAGAIN));
    assert_eq!(t.core.pending().reads(), 0);
}

#[test]
fn an_interrupt_ends_a_blocked_read_even_one_not_registered_yet() {
    let t = T::new();
    let gate = Arc::new(Gate::default());
    let block = t.file(NodeId::ROOT, "block", FileKind::Blocking, gate.clone());
    let fh = t.open(block);
    let unique = t.next_unique();
    let reader = t.read_as(unique, fh, 0);
    assert_eq!(t.core.pending().reads(), 1);
    t.core.interrupt(unique);
    assert_eq!(reader.get(), err(Errno::EINTR));
    assert_eq!(t.core.pending().reads(), 0);
    // The interrupt comes first (the read is still being dispatched).
    let unique = t.next_unique();
    t.core.interrupt(unique);
    assert_eq!(t.read_as(unique, fh, 0).get(), err(Errno::EINTR));
    assert_eq!(t.core.pending().reads(), 0);
    // A moot interrupt (the read was answered) harms no later read.
    gate.ready.store(true, Ordering::SeqCst);
    t.settle();
    assert_eq!(t.core.pending().interrupts(), 2);
    assert_eq!(t.read(fh, 0).get(), data("ready\n"));
}

#[test]
fn removal_hands_blocked_readers_to_their_handler() {
    let t = T::new();
    let gate = Arc::new(Gate::default());
    let dir = t.dir(NodeId::ROOT, "op", Owner::root(0o755));
    let direct = t.file(NodeId::ROOT, "wait", FileKind::Blocking, gate.clone());
    let nested = t.file(dir, "wait", FileKind::Blocking, gate.clone());
    let readers = [t.read(t.open(direct), 0), t.read(t.open(nested), 0)];
    t.settle();
    assert_eq!(t.core.pending().reads(), 2);
    gate.gone.store(true, Ordering::SeqCst);
    t.core.remove(direct);
    t.core.remove(dir);
    t.settle();
    for r in readers {
        assert_eq!(r.get(), err(Errno::ENOENT));
    }
    assert_eq!(t.core.pending().reads(), 0);
}

/// Handlers run under no lock shared between descriptors: a handler that
/// takes its time on one descriptor holds up nobody on another.
#[test]
fn a_slow_handler_does_not_hold_up_other_descriptors() {
    struct Slow {
        entered: Mutex<mpsc::Sender<()>>,
        go: Mutex<mpsc::Receiver<()>>,
    }
    impl FileOps for Slow {
        fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
            self.entered.lock().unwrap().send(()).unwrap();
            self.go
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10))
                .expect("the test never let the slow read go");
            Ok(Content::Ready(b"slow\n".to_vec()))
        }
    }
    let t = Arc::new(T::new());
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let slow = Slow {
        entered: Mutex::new(entered_tx),
        go: Mutex::new(go_rx),
    };
    let slow = t.file(NodeId::ROOT, "slow", FileKind::Snapshot, Arc::new(slow));
    let fast = t.root_file::<Value>("fast", FileKind::Snapshot);
    let slow_fh = t.open(slow);
    let fast_fh = t.open(fast);
    let reader = {
        let t = t.clone();
        std::thread::spawn(move || t.read(slow_fh, 0).get())
    };
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    // The slow read is inside its handler: everything else still answers.
    assert_eq!(t.read(fast_fh, 0).get(), data("value=0\n"));
    assert!(t.core.poll(fast_fh, None).is_ok());
    let fh = t.open(fast);
    t.core.release(fh);
    t.core.changed(fast);
    t.settle();
    assert!(t.core.lookup(&ROOT, NodeId::ROOT, "slow").is_ok());
    go.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), data("slow\n"));
}
