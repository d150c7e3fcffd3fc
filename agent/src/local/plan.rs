//! What a request runs: the native engine's worker, or the profile's
//! command with the user's options and values quoted in.

use std::path::{Path, PathBuf};

use super::LocalBackend;
use crate::op::Operation;
use crate::profiles::Profile;
use crate::request::Request;

impl LocalBackend {
    pub(super) fn plan(&self, op: &Operation, profile: &Profile, journal_fd: Option<i32>) -> Plan {
        let req = &op.request;
        if op.request.dryrun {
            return Plan {
                kind: PlanKind::Native,
                argv: Vec::new(),
                display: "true".into(),
                hostfile: None,
            };
        }
        match &profile.command {
            None => {
                let workers = if req.slots > 0 {
                    req.slots as usize
                } else {
                    self.cpus
                };
                let exe =
                    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
                let mut argv = vec![
                    exe.to_string_lossy().into_owned(),
                    "copy-worker".into(),
                    "--workers".into(),
                    workers.to_string(),
                ];
                if let Some(fd) = journal_fd {
                    argv.extend(["--journal-fd".into(), fd.to_string()]);
                }
                argv.extend([
                    "--".into(),
                    req.source.clone(),
                    op.target.to_string_lossy().into_owned(),
                ]);
                let display = argv
                    .iter()
                    .map(|a| crate::request::quote(a))
                    .collect::<Vec<_>>()
                    .join(" ");
                Plan {
                    kind: PlanKind::Native,
                    argv,
                    display,
                    hostfile: None,
                }
            }
            Some(template) => {
                let slots = if req.slots >= 0 {
                    req.slots
                } else {
                    profile.slots
                };
                let max_slots = if req.max_slots >= 0 {
                    req.max_slots
                } else {
                    profile.max_slots
                };
                let mut hostfile_line = "localhost".to_string();
                if slots > 0 {
                    hostfile_line.push_str(&format!(" slots={slots}"));
                }
                if max_slots > 0 {
                    hostfile_line.push_str(&format!(" max_slots={max_slots}"));
                }
                hostfile_line.push('\n');
                let hostfile = self.store.hostfile(&op.name);
                let command = build_command(template, req, op.uid, op.gid, &hostfile);
                Plan {
                    kind: PlanKind::Command,
                    argv: vec!["/bin/bash".into(), "-c".into(), command.clone()],
                    display: command,
                    hostfile: Some(hostfile_line),
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PlanKind {
    Native,
    Command,
}

pub(super) struct Plan {
    pub(super) kind: PlanKind,
    pub(super) argv: Vec<String>,
    pub(super) display: String,
    pub(super) hostfile: Option<String>,
}

/// Substitutes the profile's variables and inserts the user's options
/// after `dcp` and `mpirun`, as upstream does (nnf-dm
/// `internal/controller/helpers/datamovement_helpers.go` `BuildDMCommand`).
/// Unlike upstream, every substituted value is shell-quoted into exactly one
/// word and the options are split by the request grammar's quoting into
/// separate words, so a file name or an option never becomes shell code;
/// the substitution is one pass over the profile's own text, so a value
/// holding `$DEST` or `dcp` is never substituted again.
pub fn build_command(template: &str, req: &Request, uid: u32, gid: u32, hostfile: &Path) -> String {
    use crate::shellword::{quote, split_options};
    let words = |key: &str, value: &str| -> String {
        // Checked when the request was accepted; an operation recorded by an
        // older agent still runs its options as one word rather than as code.
        let words = split_options(key, value).unwrap_or_else(|_| vec![value.to_string()]);
        words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
    };
    let mut inserts: Vec<(usize, String)> = Vec::new();
    for (word, key, value) in [
        ("dcp", "dcp_options", &req.dcp_options),
        ("mpirun", "mpirun_options", &req.mpirun_options),
    ] {
        if let Some(at) = word_end(template, word) {
            let options = words(key, value);
            if !options.is_empty() {
                inserts.push((at, format!(" {options}")));
            }
        }
    }
    let variables = [
        ("$HOSTFILE", quote(&hostfile.to_string_lossy())),
        ("$UID", uid.to_string()),
        ("$GID", gid.to_string()),
        ("$SRC", quote(&req.source)),
        ("$DEST", quote(&req.destination)),
    ];
    let mut cmd = String::with_capacity(template.len() + 64);
    let mut at = 0;
    while at <= template.len() {
        for (_, text) in inserts.iter().filter(|(i, _)| *i == at) {
            cmd.push_str(text);
        }
        let Some(c) = template[at..].chars().next() else {
            break;
        };
        if let Some((name, value)) = variables
            .iter()
            .find(|(name, _)| template[at..].starts_with(name))
        {
            cmd.push_str(value);
            at += name.len();
        } else {
            cmd.push(c);
            at += c.len_utf8();
        }
    }
    cmd
}

/// Where the first `word` of the profile's text ends: a whole word, or the
/// last component of a path (`/opt/bin/dcp`).
fn word_end(cmd: &str, word: &str) -> Option<usize> {
    let bytes = cmd.as_bytes();
    let is_word_char =
        |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' || b == b'/';
    let mut start = 0;
    while let Some(found) = cmd[start..].find(word) {
        let at = start + found;
        let end = at + word.len();
        let before_ok = at == 0 || !is_word_char(bytes[at - 1]) || bytes[at - 1] == b'/';
        let after_ok = end == bytes.len() || !is_word_char(bytes[end]);
        if before_ok && after_ok {
            return Some(end);
        }
        start = end;
    }
    None
}

/// `Copied ... (NN%)` lines of dcp give the percentage.
pub fn progress_of_line(line: &str) -> Option<u8> {
    let copied = line.find("Copied")?;
    let rest = &line[copied + "Copied".len()..];
    let mut best = None;
    for (i, _) in rest.match_indices('(') {
        if i == 0 {
            continue;
        }
        let digits: String = rest[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if (1..=3).contains(&digits.len()) && rest[i + 1 + digits.len()..].starts_with("%)") {
            best = digits.parse::<u8>().ok().map(|p| p.min(100));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(source: &str, destination: &str, dcp: &str, mpirun: &str) -> Request {
        Request {
            source: source.into(),
            destination: destination.into(),
            dcp_options: dcp.into(),
            mpirun_options: mpirun.into(),
            ..Request::default()
        }
    }

    #[test]
    fn plain_values_read_as_before() {
        let req = request("/a/src", "/b/dst", "--quiet", "-x Y");
        let cmd = build_command(
            "mpirun --hostfile $HOSTFILE -u $UID -g $GID /opt/bin/dcp $SRC $DEST",
            &req,
            7,
            8,
            Path::new("/var/lib/h"),
        );
        assert_eq!(
            cmd,
            "mpirun -x Y --hostfile /var/lib/h -u 7 -g 8 /opt/bin/dcp --quiet /a/src /b/dst"
        );
    }

    #[test]
    fn every_value_is_one_word() {
        let req = request(
            "/s/we ird;touch x",
            "/d/$(id)`id`'\"\n-rf $SRC",
            "--label \"a b;c\" -v",
            "",
        );
        let cmd = build_command("dcp $SRC $DEST", &req, 0, 0, Path::new("/h"));
        assert_eq!(
            cmd,
            "dcp --label 'a b;c' -v '/s/we ird;touch x' '/d/$(id)`id`'\\''\"\n-rf $SRC'"
        );
    }

    #[test]
    fn options_never_land_inside_a_path() {
        let req = request("/x/dcp/y", "/z", "--quiet", "");
        let cmd = build_command("cp -r $SRC $DEST; dcp", &req, 0, 0, Path::new("/h"));
        assert_eq!(cmd, "cp -r /x/dcp/y /z; dcp --quiet");
    }
}
