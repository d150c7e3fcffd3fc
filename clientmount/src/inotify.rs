//! A minimal blocking inotify watch on one directory (libc only).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub struct Watch {
    fd: OwnedFd,
}

#[derive(Debug)]
pub enum Change {
    /// A directory entry was created, written, moved or deleted.
    Name(String),
    /// The kernel dropped events: look at everything again.
    Overflow,
    /// The watched directory itself went away.
    Gone,
}

impl Watch {
    /// Watch `dir` for the events that mean "this file's content may have
    /// changed or it was removed": create, close-after-write, moved-to,
    /// delete, moved-from (writers replace files by rename).
    pub fn new(dir: &Path) -> io::Result<Watch> {
        // SAFETY: plain syscalls; the fd is owned immediately.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by inotify_init1 and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let mask = libc::IN_CREATE
            | libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ONLYDIR;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watch { fd })
    }

    /// Block until the next batch of events.
    pub fn read(&self) -> io::Result<Vec<Change>> {
        let mut buf = [0u8; 16 * 1024];
        let n = loop {
            // SAFETY: reading into a local buffer of the given size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut out = Vec::new();
        let mut off = 0;
        while off + header <= n {
            // SAFETY: the kernel wrote whole events; read_unaligned copes
            // with the byte buffer's alignment.
            let ev: libc::inotify_event = unsafe {
                std::ptr::read_unaligned(buf[off..].as_ptr() as *const libc::inotify_event)
            };
            let name_bytes = &buf[off + header..(off + header + ev.len as usize).min(n)];
            let name_end = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = OsStr::from_bytes(&name_bytes[..name_end]);
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                out.push(Change::Overflow);
            } else if ev.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0
            {
                out.push(Change::Gone);
            } else if !name.is_empty() {
                out.push(Change::Name(name.to_string_lossy().into_owned()));
            }
            off += header + ev.len as usize;
        }
        Ok(out)
    }
}
