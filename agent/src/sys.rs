//! Thin wrappers over the system calls the agent needs.

use std::ffi::CStr;
use std::io;

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
}

/// The user's name and supplementary groups (including `gid`), as login
/// would set them. A uid without a passwd entry gets just its primary group.
pub fn groups_of(uid: u32, gid: u32) -> Vec<libc::gid_t> {
    let Some(name) = user_name(uid) else {
        return vec![gid];
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: `name` is NUL-terminated, `groups` holds `count` entries.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return groups;
        }
        // Too small: `count` now says how many are needed.
        groups.resize((count as usize).max(groups.len() * 2), 0);
    }
}

fn user_name(uid: u32) -> Option<std::ffi::CString> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: passwd is plain old data; zeroed is a valid initial value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; `buf` outlives its use below.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points into `buf`, NUL-terminated.
    Some(unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned())
}

/// Runs `f` on a fresh thread whose file-system credentials are the user's
/// (uid, gid, supplementary groups), so the kernel judges every access it
/// makes. Raw system calls change only the calling thread, unlike glibc's
/// wrappers which apply to the whole process.
pub fn as_user<T: Send + 'static>(
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("as-user".into())
        .spawn(move || {
            // SAFETY: per-thread credential changes; `groups` is valid for its length.
            unsafe {
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                    || libc::syscall(libc::SYS_setresgid, -1i32, gid, -1i32) != 0
                    || libc::syscall(libc::SYS_setresuid, -1i32, uid, -1i32) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(f())
        })?
        .join()
        .map_err(|_| io::Error::other("credential thread panicked"))?
}

/// Start time of a process in clock ticks since boot (`/proc/<pid>/stat`
/// field 22): with the pid, it identifies a process across pid reuse.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Sends `signal` to process group `pgid`.
pub fn kill_group(pgid: i32, signal: libc::c_int) -> bool {
    // SAFETY: plain system call on a process group id.
    pgid > 1 && unsafe { libc::kill(-pgid, signal) } == 0
}
