//! Command writes, answered now or later, and their interrupts.

use super::*;

// ---------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------

#[test]
fn a_command_reply_follows_the_written_bytes() {
    let t = T::new();
    let cmd = t.root_file::<Keep>("cmd", FileKind::Command);
    let fh = t.open(cmd);
    assert_eq!(t.read(fh, 0).get(), data(""), "no reply before a write");
    assert_eq!(t.write(fh, 0, b"echo\n").1.get(), Some(Answer::Written(5)));
    assert_eq!(t.read(fh, 5).get(), data("ok uid=0\n"));
    assert_eq!(t.read(fh, 8).get(), data("uid=0\n"));
    assert_eq!(t.read(fh, 0).get(), data(""), "before the reply: nothing");
    // A failed write leaves the offset at its start: its reply is there.
    assert_eq!(t.write(fh, 14, b"bad\n").1.get(), err(Errno::EINVAL));
    assert_eq!(t.read(fh, 14).get(), data("error: bad\n"));
    assert_eq!(t.read(fh, 5).get(), data(""), "the old reply is replaced");
    // Other descriptors have their own replies.
    assert_eq!(t.read(t.open(cmd), 5).get(), data(""));
}

#[test]
fn writes_need_a_command_file_and_an_open_descriptor() {
    let t = T::new();
    let snap = t.root_file::<Value>("snap", FileKind::Snapshot);
    let block = t.root_file::<Gate>("block", FileKind::Blocking);
    for node in [snap, block] {
        assert_eq!(t.write(t.open(node), 0, b"x").1.get(), err(Errno::EACCES));
    }
    assert_eq!(t.write(9999, 0, b"x").1.get(), err(Errno::EBADF));
    assert_eq!(t.core.pending().writes(), 0);
}

#[test]
fn an_interrupt_answers_an_unclaimed_write_with_eintr() {
    let t = T::new();
    let (keep, fh) = t.open_command();
    let (unique, writer) = t.write(fh, 0, b"later\n");
    let done = keep.take();
    assert_eq!(writer.get(), None);
    assert_eq!(t.core.pending().writes(), 1);
    assert!(!done.is_interrupted());
    t.core.interrupt(unique);
    assert_eq!(writer.get(), err(Errno::EINTR));
    assert!(done.is_interrupted());
    assert!(!done.claim());
    assert_eq!(t.core.pending().writes(), 0);
    // Too late: no second answer (the fake would fail), no reply recorded.
    done.finish(Ok(()), b"late\n".to_vec());
    assert_eq!(t.read(fh, 6).get(), data(""));
    // A second interrupt of the same request is moot.
    t.core.interrupt(unique);
}

#[test]
fn a_claimed_write_is_answered_by_finish_despite_an_interrupt() {
    let t = T::new();
    let (keep, fh) = t.open_command();
    let (unique, writer) = t.write(fh, 0, b"later\n");
    let done = keep.take();
    assert!(done.claim());
    assert!(done.claim(), "a second claim is still a claim");
    t.core.interrupt(unique);
    assert_eq!(writer.get(), None);
    assert!(!done.is_interrupted());
    assert_eq!(t.core.pending().writes(), 1);
    done.finish(Err(Errno::EBUSY), b"busy\n".to_vec());
    assert_eq!(writer.get(), err(Errno::EBUSY));
    assert_eq!(t.read(fh, 0).get(), data("busy\n"));
    assert_eq!(t.core.pending().writes(), 0);
}

#[test]
fn a_write_interrupted_before_it_registered_never_reaches_its_handler() {
    let t = T::new();
    let (keep, fh) = t.open_command();
    let unique = t.next_unique();
    t.core.interrupt(unique);
    assert_eq!(
        t.write_as(unique, fh, 0, b"later\n").get(),
        err(Errno::EINTR)
    );
    assert!(keep.0.lock().unwrap().is_empty());
    assert_eq!(t.core.pending().writes(), 0);
}

#[test]
fn a_write_dropped_unanswered_is_eio_and_finish_claims_itself() {
    let t = T::new();
    let (keep, fh) = t.open_command();
    let (_, writer) = t.write(fh, 0, b"later\n");
    drop(keep.take());
    assert_eq!(writer.get(), err(Errno::EIO));
    let (unique, writer) = t.write(fh, 0, b"later\n");
    keep.take().finish(Ok(()), b"done\n".to_vec());
    assert_eq!(writer.get(), Some(Answer::Written(6)));
    assert_eq!(t.read(fh, 6).get(), data("done\n"));
    t.core.interrupt(unique);
    assert_eq!(t.core.pending().writes(), 0);
}

#[test]
fn shutdown_leaves_only_claimed_writes_to_their_handler() {
    let t = T::new();
    let keep = Arc::new(Keep::default());
    let cmd = t.file(NodeId::ROOT, "cmd", FileKind::Command, keep.clone());
    let block = t.root_file::<Gate>("block", FileKind::Blocking);
    let reader = t.read(t.open(block), 0);
    let fh = t.open(cmd);
    let (_, open_writer) = t.write(fh, 0, b"open\n");
    let open = keep.take();
    let (_, claimed_writer) = t.write(fh, 0, b"claimed\n");
    let claimed = keep.take();
    assert!(claimed.claim());
    t.core.shutdown();
    assert_eq!(reader.get(), err(Errno::EINTR));
    assert_eq!(open_writer.get(), err(Errno::EINTR));
    assert!(!open.claim());
    assert_eq!(claimed_writer.get(), None);
    claimed.finish(Ok(()), Vec::new());
    assert_eq!(claimed_writer.get(), Some(Answer::Written(8)));
    // The notifier is told to stop last.
    let mut last = None;
    while let Ok(n) = t.notices.lock().unwrap().try_recv() {
        last = Some(n);
    }
    assert!(matches!(last, Some(Notice::Stop)));
}
