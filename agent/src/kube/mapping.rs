//! The pure parts of the Kubernetes backend: path matching, the
//! NnfDataMovement body, and the resource-to-status mapping
//! (README.md, "The Kubernetes backend").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nnf_api::{
    ClientMount, ClientMountInfo, NnfDataMovement, NnfDataMovementConfig, NnfDataMovementStatus,
};
use serde::Deserialize;

use crate::op::{Counters, Outcome, State, Status};
use crate::request::Request;

/// Namespace of Lustre copies.
pub const DM_NAMESPACE: &str = "nnf-dm-system";
/// Namespace of the data-movement profiles.
pub const PROFILE_NAMESPACE: &str = "nnf-system";
pub const INITIATOR_LABEL: &str = "dm.cray.hpe.com/initiator";
pub const DIRECTIVE_INDEX_LABEL: &str = "nnf.cray.hpe.com/directive_index";
pub const TEARDOWN_LABEL: &str = "nnf.cray.hpe.com/teardown_state";
pub const WORKFLOW_NAME_LABEL: &str = "dataworkflowservices.github.io/workflow.name";
pub const WORKFLOW_NAMESPACE_LABEL: &str = "dataworkflowservices.github.io/workflow.namespace";
pub const WORKFLOW_UID_LABEL: &str = "dataworkflowservices.github.io/workflow.uid";
pub const OWNER_KIND_LABEL: &str = "dataworkflowservices.github.io/owner.kind";
pub const OWNER_NAME_LABEL: &str = "dataworkflowservices.github.io/owner.name";
pub const OWNER_NAMESPACE_LABEL: &str = "dataworkflowservices.github.io/owner.namespace";
pub const OWNER_UID_LABEL: &str = "dataworkflowservices.github.io/owner.uid";
/// The annotation that ties a resource to its control-filesystem operation.
pub const OPERATION_ANNOTATION: &str = "dm.cray.hpe.com/nnf-dm-operation";

/// What the annotation holds: enough to list the operation again after a
/// restart, with its owner and its request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct OperationNote {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub request: Request,
}

/// The part of `source` below `mount` when `mount` is `source` or one of its
/// ancestors, compared by whole path components (`/mnt/a` holds `/mnt/a/x`
/// but not `/mnt/ab/x`). The result is empty or starts with `/`, and keeps
/// a trailing slash of `source`.
pub fn below<'a>(mount: &str, source: &'a str) -> Option<&'a str> {
    let mount = mount.trim_end_matches('/');
    if mount.is_empty() {
        // The root holds everything.
        return source.starts_with('/').then_some(source);
    }
    let rest = source.strip_prefix(mount)?;
    // A trailing slash stays: upstream sends `mountPath +
    // strings.TrimPrefix(source, computeMountPath)` (server_default.go
    // `findRabbitRelativeSource`), and the Rabbit's copy lays out its
    // destination by it.
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The compute mount holding `source`: the longest matching `mountPath`
/// over every ClientMount given.
pub fn compute_mount<'a>(
    mounts: &'a [ClientMount],
    source: &'a str,
) -> Option<(&'a ClientMount, &'a ClientMountInfo, &'a str)> {
    let mut best: Option<(&ClientMount, &ClientMountInfo, &str)> = None;
    for cm in mounts {
        for info in &cm.spec.mounts {
            if let Some(rest) = below(&info.mount_path, source) {
                let longer = best.is_none_or(|(_, b, _)| {
                    info.mount_path.trim_end_matches('/').len()
                        > b.mount_path.trim_end_matches('/').len()
                });
                if longer {
                    best = Some((cm, info, rest));
                }
            }
        }
    }
    best
}

/// The Rabbit's path for `rest` below its mount path.
pub fn rabbit_path(rabbit_mount: &str, rest: &str) -> String {
    let base = rabbit_mount.trim_end_matches('/');
    if rest.is_empty() {
        if base.is_empty() {
            "/".into()
        } else {
            base.into()
        }
    } else {
        format!("{base}{rest}")
    }
}

/// `spec.userConfig` of a request.
pub fn user_config(request: &Request) -> NnfDataMovementConfig {
    NnfDataMovementConfig {
        dryrun: request.dryrun,
        mpirun_options: request.mpirun_options.clone(),
        dcp_options: request.dcp_options.clone(),
        log_stdout: request.log_stdout,
        store_stdout: request.store_stdout,
        slots: (request.slots >= 0).then_some(i64::from(request.slots)),
        max_slots: (request.max_slots >= 0).then_some(i64::from(request.max_slots)),
    }
}

/// The parts of an NnfDataMovement the status mapping reads.
#[derive(Debug, Default)]
pub struct DmView {
    pub cancel: bool,
    pub status: NnfDataMovementStatus,
}

impl DmView {
    pub fn of(dm: &NnfDataMovement) -> DmView {
        DmView {
            cancel: dm.spec.cancel,
            status: dm.status.clone().unwrap_or_default(),
        }
    }

    /// Finished, or cancelled before it ever started (deletable).
    pub fn finished_or_never_started(&self) -> bool {
        self.status.state.as_deref() == Some("Finished")
            || (self.cancel && self.status.start_time.is_none())
    }

    /// The status table of the spec, first match wins (rule 1, the deletion
    /// timestamp, is the caller's). Writes everything `status` shows except
    /// `message`, which is returned (the caller may add a staleness note).
    pub fn apply(&self, s: &mut Status) -> String {
        let st = &self.status;
        let started = st.start_time.is_some();
        let (state, outcome) = if st.state.as_deref() == Some("Finished") {
            let outcome = match st.status.as_deref() {
                Some("Success") => Outcome::Success,
                Some("Cancelled") => Outcome::Cancelled,
                Some("Invalid") => Outcome::Invalid,
                _ => Outcome::Failed,
            };
            (State::Completed, outcome)
        } else if self.cancel && !started {
            (State::Completed, Outcome::Cancelled)
        } else if self.cancel {
            (State::Cancelling, Outcome::Unknown)
        } else if st.status.as_deref() == Some("Invalid") {
            (State::Completed, Outcome::Invalid)
        } else if !started {
            (State::Pending, Outcome::Unknown)
        } else if st.state.as_deref() == Some("Running") {
            (State::Running, Outcome::Unknown)
        } else {
            (State::Starting, Outcome::Unknown)
        };
        s.state = state;
        s.outcome = outcome;
        s.start_time = st.start_time.as_deref().and_then(parse_rfc3339);
        s.end_time = st.end_time.as_deref().and_then(parse_rfc3339);
        if s.state == State::Completed && s.end_time.is_none() && s.outcome == Outcome::Cancelled {
            // Never ran: no end time from the Rabbit; keep ours if we had one.
            s.end_time = s.end_time.or(Some(SystemTime::now()));
        }
        s.restarts = st.restarts.unwrap_or(0).clamp(0, u32::MAX as i64) as u32;
        let cs = st.command_status.as_ref();
        let mut progress = cs.and_then(|c| c.progress).unwrap_or(0).clamp(0, 100) as u8;
        if outcome == Outcome::Success && cs.and_then(|c| c.progress).is_none() {
            progress = 100;
        }
        s.progress = progress;
        s.command = cs.and_then(|c| c.command.clone()).unwrap_or_default();
        s.last_message = cs.and_then(|c| c.last_message.clone()).unwrap_or_default();
        s.last_message_time = cs
            .and_then(|c| c.last_message_time.as_deref())
            .and_then(parse_rfc3339);
        s.counters = cs.and_then(|c| {
            let any = c.items.is_some()
                || c.directories.is_some()
                || c.files.is_some()
                || c.links.is_some()
                || c.data.is_some();
            any.then(|| Counters {
                items: c.items.unwrap_or(0).max(0) as u64,
                directories: c.directories.unwrap_or(0).max(0) as u64,
                files: c.files.unwrap_or(0).max(0) as u64,
                links: c.links.unwrap_or(0).max(0) as u64,
                bytes: c.data.as_deref().and_then(parse_bytes).unwrap_or(0),
            })
        });
        s.rate_bytes_per_second = cs
            .and_then(|c| c.rate.as_deref())
            .and_then(|r| parse_bytes(r.trim_end_matches("/s").trim_end_matches("/sec")));
        st.message.clone().unwrap_or_default()
    }
}

/// `1234`, `1.5 GiB`, `12 MB`, `3.000 KiB` (dcp's units) as bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "PB" => 1e15,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "PiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * scale).round() as u64)
}

/// An RFC 3339 time as Kubernetes writes it (`2024-01-02T03:04:05Z`,
/// optionally with a fraction or a numeric offset).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { text.get(r)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        let mut value = frac[..digits.min(9)].to_string();
        while value.len() < 9 {
            value.push('0');
        }
        nanos = value.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    if secs < 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(secs as u64, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timefmt::rfc3339;
    use serde_json::json;

    #[test]
    fn whole_components() {
        assert_eq!(below("/mnt/nnf/a", "/mnt/nnf/a/x"), Some("/x"));
        assert_eq!(below("/mnt/nnf/a/", "/mnt/nnf/a/x/y"), Some("/x/y"));
        assert_eq!(below("/mnt/nnf/a", "/mnt/nnf/a"), Some(""));
        assert_eq!(below("/mnt/nnf/a", "/mnt/nnf/ab/x"), None);
        assert_eq!(below("/mnt/nnf/a", "/mnt/nnf"), None);
        assert_eq!(below("/mnt/nnf/a", "/mnt/nnf/a/x/"), Some("/x/"));
        assert_eq!(below("/mnt/nnf/a", "/mnt/nnf/a/"), Some("/"));
        assert_eq!(rabbit_path("/rabbit/m", "/"), "/rabbit/m/");
        assert_eq!(rabbit_path("/rabbit/m/", "/x/"), "/rabbit/m/x/");
        assert_eq!(rabbit_path("/rabbit/m/", "/x"), "/rabbit/m/x");
        assert_eq!(rabbit_path("/rabbit/m", ""), "/rabbit/m");
    }

    #[test]
    fn times_and_bytes() {
        let t = parse_rfc3339("2024-02-29T12:34:56Z").unwrap();
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
        let t = parse_rfc3339("2024-02-29T12:34:56.5+01:00").unwrap();
        assert_eq!(rfc3339(t), "2024-02-29T11:34:56Z");
        assert_eq!(parse_bytes("1.5 KiB"), Some(1536));
        assert_eq!(parse_bytes("42"), Some(42));
        assert_eq!(parse_bytes("2 MB"), Some(2_000_000));
        assert_eq!(parse_bytes("x"), None);
    }

    fn mapped(obj: serde_json::Value) -> (State, Outcome) {
        let mut s = Status::default();
        let dm: NnfDataMovement = serde_json::from_value(obj).unwrap();
        DmView::of(&dm).apply(&mut s);
        (s.state, s.outcome)
    }

    #[test]
    fn status_table() {
        use Outcome::*;
        use State::*;
        let start = "2024-01-01T00:00:00Z";
        assert_eq!(mapped(json!({})), (Pending, Unknown));
        assert_eq!(
            mapped(json!({"status": {"state": "Finished", "status": "Cancelled"}})),
            (Completed, Cancelled)
        );
        assert_eq!(
            mapped(
                json!({"spec": {"cancel": true}, "status": {"state": "Finished", "status": "Success", "startTime": start}})
            ),
            (Completed, Success)
        );
        assert_eq!(
            mapped(json!({"spec": {"cancel": true}})),
            (Completed, Cancelled)
        );
        assert_eq!(
            mapped(
                json!({"spec": {"cancel": true}, "status": {"state": "Running", "startTime": start}})
            ),
            (Cancelling, Unknown)
        );
        assert_eq!(
            mapped(json!({"status": {"status": "Invalid"}})),
            (Completed, Invalid)
        );
        assert_eq!(
            mapped(json!({"status": {"state": "Starting", "startTime": start}})),
            (Starting, Unknown)
        );
        assert_eq!(
            mapped(json!({"status": {"state": "Running", "startTime": start}})),
            (Running, Unknown)
        );
        assert_eq!(
            mapped(
                json!({"status": {"state": "Finished", "status": "Failed", "startTime": start}})
            ),
            (Completed, Failed)
        );
    }
}
