//! NVMe namespace rescans, as upstream's compute node does them (nnf-sos
//! `pkg/blockdevice/nvme/nvme.go`): on some nodes the namespaces of a
//! Rabbit allocation arrive late, or linger after the Rabbit removed them,
//! unless the controllers are told to rescan.

use std::fs;
use std::path::{Path, PathBuf};

use daemon_common::error::Causes;
use tracing::{info, warn};

use crate::exec::ExecError;
use crate::mount::Config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not read {}", .dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not rescan NVMe device")]
    Rescan(#[source] ExecError),
    #[error("could not get NVMe device list")]
    List(#[source] ExecError),
    #[error("could not parse `nvme list` output")]
    Parse(#[source] serde_json::Error),
}

/// `nvme<N>` (controllers) or `nvme<N>n<M>` (namespaces) in `dir`, sorted.
fn devices(dir: &Path, namespaces: bool) -> Result<Vec<PathBuf>, Error> {
    let entries = fs::read_dir(dir).map_err(|source| Error::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("nvme")) else {
                return false;
            };
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            match rest.split_once('n') {
                Some((c, n)) => namespaces && digits(c) && digits(n),
                None => !namespaces && digits(rest),
            }
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// `nvme ns-rescan` on every controller, logging the namespaces that came
/// and went (upstream `NvmeRescanDevices`).
pub fn rescan(cfg: &Config) -> Result<(), Error> {
    let before = devices(&cfg.nvme_dir, true)?;
    for ctrl in devices(&cfg.nvme_dir, false)? {
        let cmd = format!(
            "nvme ns-rescan {}",
            crate::vars::shell_quote(&ctrl.display().to_string())
        );
        cfg.exec(&cmd).map_err(Error::Rescan)?;
    }
    let after = devices(&cfg.nvme_dir, true)?;
    let removed: Vec<String> = before
        .iter()
        .filter(|d| !after.contains(d))
        .map(|d| d.display().to_string())
        .collect();
    let added: Vec<String> = after
        .iter()
        .filter(|d| !before.contains(d))
        .map(|d| d.display().to_string())
        .collect();
    if !removed.is_empty() {
        info!(devices = ?removed, "nvme ns-rescan removed NVMe namespaces");
    }
    if !added.is_empty() {
        info!(devices = ?added, "nvme ns-rescan added NVMe namespaces");
    }
    Ok(())
}

/// Every namespace `nvme list -v --output-format=json` shows, as
/// `(subsystem NQN, NSID)` (upstream `NvmeListDevices`).
pub fn list(cfg: &Config) -> Result<Vec<(String, String)>, Error> {
    let out = cfg
        .exec("nvme list -v --output-format=json")
        .map_err(Error::List)?;
    parse_list(&out.stdout)
}

fn parse_list(text: &str) -> Result<Vec<(String, String)>, Error> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(Error::Parse)?;
    let mut found = Vec::new();
    for dev in v["Devices"].as_array().into_iter().flatten() {
        let nqn = dev["SubsystemNQN"].as_str().unwrap_or_default();
        for ctrl in dev["Controllers"].as_array().into_iter().flatten() {
            for ns in ctrl["Namespaces"].as_array().into_iter().flatten() {
                if let Some(nsid) = ns["NSID"].as_u64() {
                    found.push((nqn.to_string(), nsid.to_string()));
                }
            }
        }
    }
    Ok(found)
}

/// Which of `expected` (`deviceSerial`, `namespaceID`) are missing from
/// `present`.
pub fn missing<'a>(
    expected: &'a [(String, String)],
    present: &[(String, String)],
) -> Vec<&'a (String, String)> {
    expected
        .iter()
        .filter(|(nqn, nsid)| {
            !present
                .iter()
                .any(|(p_nqn, p_nsid)| p_nqn == nqn && p_nsid == nsid.trim())
        })
        .collect()
}

/// After an activation failed: rescan, then whether every namespace the
/// mount is made of is present now (then a quick retry may succeed).
pub fn rescan_after_failed_activation(cfg: &Config, expected: &[(String, String)]) -> bool {
    if let Err(e) = rescan(cfg) {
        warn!(error = %Causes(&e), "NVMe rescan after a failed activation failed");
        return false;
    }
    if expected.is_empty() {
        // Nothing to compare: upstream would retry every second forever.
        return false;
    }
    match list(cfg) {
        Ok(present) => {
            let gone = missing(expected, &present);
            for (nqn, nsid) in &gone {
                info!(nqn = %nqn, nsid = %nsid, "could not find expected NVMe namespace");
            }
            gone.is_empty()
        }
        Err(e) => {
            warn!(error = %Causes(&e), "NVMe namespace list failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvme_list_and_compares() {
        let text = r#"{"Devices":[{"SubsystemNQN":"nqn.a","Controllers":[
            {"Namespaces":[{"NameSpace":"nvme0n1","NSID":1},{"NameSpace":"nvme0n2","NSID":2}]}]},
            {"SubsystemNQN":"nqn.b","Controllers":[{"Namespaces":[]}]}]}"#;
        let present = parse_list(text).unwrap();
        assert_eq!(
            present,
            vec![("nqn.a".into(), "1".into()), ("nqn.a".into(), "2".into())]
        );
        let expected = vec![("nqn.a".to_string(), "2".to_string())];
        assert!(missing(&expected, &present).is_empty());
        let expected = vec![("nqn.b".to_string(), "1".to_string())];
        assert_eq!(missing(&expected, &present).len(), 1);
        assert!(parse_list("not json").is_err());
        assert_eq!(parse_list("{}").unwrap(), vec![]);
    }

    #[test]
    fn controller_and_namespace_names() {
        let dir = std::env::temp_dir().join(format!("nvme-names-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for n in [
            "nvme0",
            "nvme1",
            "nvme0n1",
            "nvme1n12",
            "nvme-fabrics",
            "nvmex",
            "nvme0n",
        ] {
            fs::write(dir.join(n), "").unwrap();
        }
        let names = |ns| -> Vec<String> {
            devices(&dir, ns)
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(false), vec!["nvme0", "nvme1"]);
        assert_eq!(names(true), vec!["nvme0n1", "nvme1n12"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
