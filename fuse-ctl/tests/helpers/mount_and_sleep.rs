//! The child of `clean_stale_mount_detaches_a_dead_mount` (tests/mount.rs):
//! mounts a one-file tree at the directory given as its argument, says so
//! on stdout, and sleeps until the test kills it. Not a test.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuse_ctl::{Caller, Content, ControlFs, Errno, FileKind, FileOps, NodeId, Owner};

/// What the parent waits for on our stdout.
const READY: &str = "FUSE-CTL-HELPER-MOUNTED";

/// The content the parent reads back through the mount.
struct Snap;

impl FileOps for Snap {
    fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
        Ok(Content::Ready(b"value=0000 read=0001\n".to_vec()))
    }
}

fn main() {
    let Some(mnt) = std::env::args_os().nth(1) else {
        eprintln!("usage: fuse-ctl-test-mount MOUNTPOINT");
        std::process::exit(2);
    };
    let fs = ControlFs::new(Owner::root(0o755));
    fs.add_file(
        NodeId::ROOT,
        "snap",
        Owner::root(0o444),
        FileKind::Snapshot,
        Arc::new(Snap),
    )
    .expect("adding the file");
    let _mounted = fs
        .mount(Path::new(&mnt), "fuse-ctl-helper")
        .expect("mounting");
    println!("{READY}");
    // Bounded, should the parent die without killing us.
    std::thread::sleep(Duration::from_secs(20));
}
