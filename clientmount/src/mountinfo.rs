//! `/proc/self/mountinfo` parsing.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    /// Path inside the mounted file system that is the root of this mount
    /// (`/` except for bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undo the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse one line; `None` for a line that does not have the documented shape.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let _id = l.next()?;
    let _parent = l.next()?;
    let (major, minor) = l.next()?.split_once(':')?;
    let root = l.next()?;
    let mount_point = l.next()?;
    let mut r = right.split(' ');
    let fstype = r.next()?;
    let source = r.next().unwrap_or("");
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(unescape(root)),
        mount_point: PathBuf::from(unescape(mount_point)),
        fstype: unescape(fstype),
        source: unescape(source),
    })
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The visible (last, i.e. top of the stack) mount at `path`, if any.
pub fn mount_at<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    100 29 7:3 / /tmp/x rw,relatime shared:5 - xfs /dev/loop3 rw,attr2\n\
                    101 29 0:55 / /lus rw - lustre 10.0.0.1@tcp:/fs rw\n\
                    garbage\n";
        let e = parse(text);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].mount_point, PathBuf::from("/mnt/parent dir"));
        assert_eq!((e[0].major, e[0].minor), (98, 0));
        assert_eq!(e[0].root, PathBuf::from("/mnt1"));
        assert_eq!(e[1].fstype, "xfs");
        assert_eq!(e[1].source, "/dev/loop3");
        assert_eq!(e[2].source, "10.0.0.1@tcp:/fs");
        assert_eq!(mount_at(&e, Path::new("/tmp/x")).unwrap().minor, 3);
        assert!(mount_at(&e, Path::new("/tmp")).is_none());
    }
}
