//! Mounting the tree, unmounting it, and cleaning up after a crash.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::adapter::{Adapter, KernelEntries};
use crate::control::Core;

/// Mounts `core` at `mountpoint`, serving it from background threads.
pub(crate) fn mount(core: &Arc<Core>, mountpoint: &Path, fsname: &str) -> io::Result<Mounted> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype(fsname.to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    config.acl = SessionACL::All;
    // Several dispatch threads, so that a slow handler (a request that
    // waits on the disk) never stalls every other caller.
    config.n_threads = Some(4);
    let rx = core
        .take_notices()
        .ok_or_else(|| io::Error::other("the control filesystem is already mounted"))?;
    let session = match fuser::Session::new(Adapter::new(core.clone()), mountpoint, &config) {
        Ok(session) => session,
        Err(e) => {
            // Not mounted: a later attempt may still succeed.
            core.return_notices(rx);
            return Err(e);
        }
    };
    core.set_invalidator(Box::new(KernelEntries(session.notifier())));
    let notifier_core = core.clone();
    let notifier_thread = std::thread::Builder::new()
        .name("fuse-ctl-notify".into())
        .spawn(move || notifier_core.notify_loop(rx))?;
    let session = session.spawn()?;
    Ok(Mounted {
        mountpoint: mountpoint.to_path_buf(),
        session: Some(session),
        notifier_thread: Some(notifier_thread),
        core: core.clone(),
    })
}

/// A mounted control filesystem. Dropping it unmounts.
pub struct Mounted {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    notifier_thread: Option<std::thread::JoinHandle<()>>,
    core: Arc<Core>,
}

impl Mounted {
    /// Unmounts and waits for the serving threads to end. If a caller still
    /// holds a descriptor (EBUSY), aborts the connection and detaches the
    /// mount instead; the serving threads then end on their own.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        // Held readers and writers get EINTR rather than the EIO of a
        // dropped reply.
        self.core.shutdown();
        let result = match self.session.take() {
            Some(session) => match session.umount_and_join() {
                // Busy: a caller still holds a descriptor (the readers just
                // answered EINTR have not closed theirs yet, or retry). Abort
                // the connection (MNT_FORCE: every request now fails with
                // ENOTCONN, and the serving threads end) and detach it.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    umount(&self.mountpoint, libc::MNT_FORCE | libc::MNT_DETACH)
                }
                result => result,
            },
            None => Ok(()),
        };
        if let Some(thread) = self.notifier_thread.take() {
            let _ = thread.join();
        }
        result
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn umount(mountpoint: &Path, flags: libc::c_int) -> io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches a stale FUSE mount left by a crashed daemon: one whose server is
/// gone (ENOTCONN). Returns whether one was cleaned.
pub fn clean_stale_mount(mountpoint: &Path) -> io::Result<bool> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // statfs always asks the server; `stat` may be answered from the
    // attribute cache for a while after the server died.
    // SAFETY: `path` is NUL-terminated and `buf` is a writable statfs that
    // lives across the call.
    let rc = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut buf)
    };
    if rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOTCONN) {
        return Ok(false);
    }
    umount(mountpoint, libc::MNT_DETACH)?;
    Ok(true)
}
