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
    // Group databases are files (or a directory service): remember answers
    // for a minute rather than parse them on every request.
    type Cache = std::collections::HashMap<(u32, u32), (std::time::Instant, Vec<libc::gid_t>)>;
    static CACHE: std::sync::Mutex<Option<Cache>> = std::sync::Mutex::new(None);
    if let Some((at, groups)) = CACHE
        .lock()
        .unwrap()
        .get_or_insert_with(Cache::new)
        .get(&(uid, gid))
    {
        if at.elapsed() < std::time::Duration::from_secs(60) {
            return groups.clone();
        }
    }
    // Not under the lock: a directory service that does not answer holds
    // only this lookup, not every user's.
    let groups = lookup_groups(uid, gid);
    CACHE
        .lock()
        .unwrap()
        .get_or_insert_with(Cache::new)
        .insert((uid, gid), (std::time::Instant::now(), groups.clone()));
    groups
}

fn lookup_groups(uid: u32, gid: u32) -> Vec<libc::gid_t> {
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

/// Runs `f` with the calling thread's credentials switched to the user's
/// (uid, gid, supplementary groups), so the kernel judges every access it
/// makes, and switched back afterwards. Raw system calls change only the
/// calling thread, unlike glibc's wrappers which apply to the whole process;
/// the saved set-user-ID stays 0, which is what allows the way back.
pub fn as_user<T>(
    uid: u32,
    gid: u32,
    groups: &[libc::gid_t],
    f: impl FnOnce() -> T,
) -> io::Result<T> {
    /// Restores root's credentials even if `f` unwinds.
    struct Restore(&'static [libc::gid_t]);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: per-thread credential changes back to what the thread had.
            let ok = unsafe {
                libc::syscall(libc::SYS_setresuid, -1i32, 0, -1i32) == 0
                    && libc::syscall(libc::SYS_setresgid, -1i32, 0, -1i32) == 0
                    && libc::syscall(libc::SYS_setgroups, self.0.len(), self.0.as_ptr()) == 0
            };
            if !ok {
                // Serving anyone further with a user's identity would be worse.
                eprintln!(
                    "nnf-dm: cannot restore root credentials: {}",
                    io::Error::last_os_error()
                );
                std::process::abort();
            }
        }
    }
    let root_groups = root_groups();
    // SAFETY: per-thread credential changes; `groups` is valid for its length.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let restore = Restore(root_groups);
        if libc::syscall(libc::SYS_setresgid, -1i32, gid, -1i32) != 0
            || libc::syscall(libc::SYS_setresuid, -1i32, uid, -1i32) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let result = f();
        drop(restore);
        Ok(result)
    }
}

/// The agent's own supplementary groups, taken once at first use.
fn root_groups() -> &'static [libc::gid_t] {
    static GROUPS: std::sync::OnceLock<Vec<libc::gid_t>> = std::sync::OnceLock::new();
    GROUPS.get_or_init(|| {
        let mut groups = vec![0 as libc::gid_t; 256];
        // SAFETY: `groups` has room for the number of entries passed.
        let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
        groups.truncate(n.max(0) as usize);
        groups
    })
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
