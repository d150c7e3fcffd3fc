//! Names, visibility, attributes and removal.

use super::*;

// ---------------------------------------------------------------------------
// The tree
// ---------------------------------------------------------------------------

#[test]
fn a_private_node_exists_only_for_its_owner_and_root() {
    let t = T::new();
    let owner = Owner {
        uid: OWNER.uid,
        gid: OWNER.gid,
        perm: 0o700,
        private: true,
    };
    let private = t.dir(NodeId::ROOT, "private", owner);
    let secret = t.file(
        private,
        "secret",
        FileKind::Snapshot,
        Arc::new(Value::default()),
    );
    t.dir(NodeId::ROOT, "public", Owner::root(0o755));
    let names = |caller: &Caller| -> Vec<String> {
        let fh = t.core.opendir(caller, NodeId::ROOT).unwrap();
        let listing = t.core.readdir(fh).unwrap();
        t.core.releasedir(fh);
        listing.iter().map(|(_, _, n)| n.to_string()).collect()
    };
    for caller in [ROOT, OWNER] {
        assert_eq!(names(&caller), [".", "..", "private", "public"]);
        let attr = t.core.lookup(&caller, NodeId::ROOT, "private").unwrap();
        assert_eq!(
            (attr.ino, attr.kind, attr.uid),
            (private, EntryKind::Dir, 4242)
        );
        assert!(t.core.opendir(&caller, private).is_ok());
        assert!(t.core.open(&caller, secret, false).is_ok());
    }
    assert_eq!(names(&OTHER), [".", "..", "public"]);
    assert_eq!(
        t.core.lookup(&OTHER, NodeId::ROOT, "private").unwrap_err(),
        Errno::ENOENT
    );
    // A cached entry reached anyway is refused.
    assert_eq!(t.core.opendir(&OTHER, private).unwrap_err(), Errno::EACCES);
    // The file itself is not private: its directory's mode guards it.
    assert!(t.core.open(&OTHER, secret, false).is_ok());
    assert_eq!(t.core.child(NodeId::ROOT, "private"), Some(private));
}

#[test]
fn adding_refuses_taken_names_and_non_directories() {
    let t = T::new();
    let file = t.root_file::<Value>("f", FileKind::Snapshot);
    let add = |parent, name: &str| {
        t.core
            .add(parent, name, Owner::root(0o755), NodeKind::dir())
    };
    assert_eq!(add(NodeId::ROOT, "f"), Err(Errno::EEXIST));
    assert_eq!(add(file, "x"), Err(Errno::ENOTDIR));
    assert_eq!(add(NodeId(9999), "x"), Err(Errno::ENOENT));
    assert_eq!(t.core.lookup(&ROOT, file, "x").unwrap_err(), Errno::ENOTDIR);
    assert_eq!(
        t.core.open(&ROOT, NodeId::ROOT, false).unwrap_err(),
        Errno::EISDIR
    );
    assert_eq!(t.core.opendir(&ROOT, file).unwrap_err(), Errno::ENOTDIR);
    assert_eq!(t.core.getattr(NodeId(9999)).unwrap_err(), Errno::ENOENT);
}

#[test]
fn setattr_accepts_only_truncating_a_command_file() {
    let t = T::new();
    let cmd = t.root_file::<Keep>("cmd", FileKind::Command);
    let snap = t.root_file::<Value>("snap", FileKind::Snapshot);
    assert_eq!(t.core.setattr(cmd, true).unwrap().ino, cmd);
    assert_eq!(t.core.setattr(cmd, false).unwrap_err(), Errno::EPERM);
    assert_eq!(t.core.setattr(snap, true).unwrap_err(), Errno::EPERM);
    assert_eq!(
        t.core.setattr(NodeId::ROOT, true).unwrap_err(),
        Errno::EPERM
    );
    assert_eq!(
        t.core.setattr(NodeId(9999), true).unwrap_err(),
        Errno::ENOENT
    );
}

#[test]
fn rmdir_goes_through_the_hook() {
    let t = T::new();
    let gone = t.dir(NodeId::ROOT, "gone", Owner::root(0o755));
    t.dir(NodeId::ROOT, "busy", Owner::root(0o755));
    t.root_file::<Value>("f", FileKind::Snapshot);
    let private = Owner {
        private: true,
        ..Owner::root(0o755)
    };
    t.dir(NodeId::ROOT, "private", private);
    assert_eq!(t.core.rmdir(&ROOT, NodeId::ROOT, "gone"), Err(Errno::EPERM));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    t.core.set_rmdir_hook(Box::new(move |caller, node, name| {
        log.lock()
            .unwrap()
            .push((caller.uid, node, name.to_string()));
        if name == "busy" {
            Err(Errno::EBUSY)
        } else {
            Ok(())
        }
    }));
    assert_eq!(t.core.rmdir(&ROOT, NodeId::ROOT, "busy"), Err(Errno::EBUSY));
    assert_eq!(t.core.rmdir(&ROOT, NodeId::ROOT, "f"), Err(Errno::ENOTDIR));
    assert_eq!(
        t.core.rmdir(&OTHER, NodeId::ROOT, "private"),
        Err(Errno::ENOENT)
    );
    assert_eq!(t.core.rmdir(&ROOT, NodeId::ROOT, "gone"), Ok(()));
    assert_eq!(t.core.child(NodeId::ROOT, "gone"), None);
    assert!(t.core.child(NodeId::ROOT, "busy").is_some());
    let busy = t.core.child(NodeId::ROOT, "busy").unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [(0, busy, "busy".to_string()), (0, gone, "gone".to_string())]
    );
}

#[test]
fn removal_invalidates_the_kernel_entry_now_or_from_the_notifier() {
    let t = T::new();
    let a = t.dir(NodeId::ROOT, "a", Owner::root(0o755));
    let b = t.dir(NodeId::ROOT, "b", Owner::root(0o755));
    let inner = t.dir(a, "inner", Owner::root(0o755));
    let kernel = Arc::new(Invalidations::default());
    t.core.set_invalidator(Box::new(kernel.clone()));
    t.core.remove_now(a);
    let seen = || kernel.0.lock().unwrap().clone();
    assert_eq!(seen(), [(NodeId::ROOT, "a".to_string())]);
    // A removed subtree is gone with its parent: nothing more to do.
    t.core.remove_now(inner);
    t.core.remove(b);
    assert_eq!(seen().len(), 1, "remove() leaves it to the notifier");
    t.settle();
    assert_eq!(
        seen(),
        [
            (NodeId::ROOT, "a".to_string()),
            (NodeId::ROOT, "b".to_string())
        ]
    );
    assert_eq!(t.core.getattr(inner).unwrap_err(), Errno::ENOENT);
    t.core.remove(NodeId::ROOT);
    assert!(t.core.getattr(NodeId::ROOT).is_ok(), "the root stays");
}
