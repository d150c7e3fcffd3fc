//! The mount layer: what is mounted where, device resolution, mount-point
//! creation and the external commands of a plan.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nnf_api::{ClientMountType, Servers};
use tracing::{debug, info, warn};

use crate::exec;
use crate::mountinfo::{self, MountEntry};
use crate::plan::{EntryPlan, Expected};

/// Settings shared by every reconcile.
#[derive(Debug)]
pub struct Config {
    /// `None`: commands run until they end (upstream's default).
    pub command_timeout: Option<Duration>,
    /// How long to wait for an activated block device to appear.
    pub device_wait: Duration,
    /// How long lock start waits for the volume group to appear.
    pub vg_wait: Duration,
    /// Where the NVMe controllers (`nvme<N>`) and namespaces appear (`/dev`).
    pub nvme_dir: PathBuf,
    /// `--mock`: report every entry ready without running anything.
    pub mock: bool,
    /// Where device-mapper nodes appear (`/dev/mapper`).
    pub device_dir: PathBuf,
    /// Set on SIGTERM: finish the command in flight, start no other.
    pub shutdown: AtomicBool,
    /// Where command durations are counted.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Config {
    /// Every external command goes through here, so each one's duration is
    /// in the metrics.
    pub fn exec(&self, cmdline: &str) -> Result<exec::Output, exec::ExecError> {
        let started = std::time::Instant::now();
        let result = exec::run(cmdline, self.command_timeout);
        self.metrics.command_ran(cmdline, started.elapsed());
        result
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{user}: {debug}")]
    Failed { user: String, debug: String },
    /// Lock start, LV activation or the wait for its device failed: the
    /// NVMe namespaces may not be there yet.
    #[error("{user}: {debug}")]
    Activation { user: String, debug: String },
    #[error("interrupted by daemon shutdown")]
    Interrupted,
}

fn fail(user: &str, debug: impl std::fmt::Display) -> StepError {
    StepError::Failed {
        user: user.to_string(),
        debug: format!("{user}: {debug}"),
    }
}

fn activation(e: StepError) -> StepError {
    match e {
        StepError::Failed { user, debug } => StepError::Activation { user, debug },
        other => other,
    }
}

/// `true` when `text` (an LVM command's output) says lvmlockd is not
/// running: the lock space is then already stopped (upstream
/// `VolumeGroup.LockStop` matches the same words).
fn lvmlockd_not_running(text: &str) -> bool {
    text.contains("lvmlockd process is not running")
}

/// One row of `lvs`: `(vg, lv, active)`.
fn parse_lvs(text: &str) -> Result<Vec<(String, String, bool)>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("could not parse `lvs` output: {e}"))?;
    let mut out = Vec::new();
    for report in v["report"].as_array().into_iter().flatten() {
        for lv in report["lv"].as_array().into_iter().flatten() {
            let s = |k: &str| lv[k].as_str().unwrap_or_default().to_string();
            // The fifth attribute character is the state: `a` is active.
            let active = s("lv_attr").as_bytes().get(4) == Some(&b'a');
            out.push((s("vg_name"), s("lv_name"), active));
        }
    }
    Ok(out)
}

fn parse_vgs(text: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("could not parse `vgs` output: {e}"))?;
    let mut out = Vec::new();
    for report in v["report"].as_array().into_iter().flatten() {
        for vg in report["vg"].as_array().into_iter().flatten() {
            out.push(vg["vg_name"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(out)
}

/// State of the mount path compared with what the plan expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Present {
    Absent,
    Matches,
    Foreign(String),
}

/// The path as mountinfo shows it: symlinks in the parent directories
/// resolved (mountinfo paths are canonical), the last component kept.
fn canonical(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

fn rdev_of(device: &Path) -> Option<u64> {
    let md = fs::metadata(device).ok()?;
    md.file_type().is_block_device().then(|| md.rdev())
}

fn describe(e: &MountEntry) -> String {
    format!(
        "device {} ({}:{}) type {}",
        e.source, e.major, e.minor, e.fstype
    )
}

/// Whether anything is mounted at `path` (an absolute path); `true` when
/// the mount table cannot be read, so that nothing is assumed unmounted.
pub fn anything_mounted_at(path: &str) -> bool {
    let path = Path::new(path);
    if !path.is_absolute() {
        return false;
    }
    match mountinfo::read() {
        Ok(entries) => mountinfo::mount_at(&entries, &canonical(path)).is_some(),
        Err(_) => true,
    }
}

pub fn check(plan: &EntryPlan) -> Result<Present, StepError> {
    let entries = mountinfo::read().map_err(|e| fail("could not read mount table", e))?;
    let path = canonical(&plan.mount_path);
    let Some(entry) = mountinfo::mount_at(&entries, &path) else {
        return Ok(Present::Absent);
    };
    let ok = match &plan.expected {
        Expected::Lustre { source } => entry.source == *source && entry.fstype == "lustre",
        Expected::Block { device } => match rdev_of(device) {
            None => false,
            Some(rdev) if plan.mount_type == ClientMountType::None => {
                // A bind mount of a device node shows the devtmpfs numbers in
                // mountinfo; what is bound is the node itself, so compare the
                // node reached through the mount path.
                fs::metadata(&path)
                    .map(|m| m.file_type().is_block_device() && m.rdev() == rdev)
                    .unwrap_or(false)
            }
            Some(rdev) => {
                libc::major(rdev) == entry.major
                    && libc::minor(rdev) == entry.minor
                    && entry.fstype == plan.fstype
            }
        },
    };
    if ok {
        Ok(Present::Matches)
    } else {
        let want = match &plan.expected {
            Expected::Lustre { source } => format!("{source} type lustre"),
            Expected::Block { device } => format!("{} type {}", device.display(), plan.fstype),
        };
        Ok(Present::Foreign(format!(
            "unexpected mount at path {}: found {}, expected {want}",
            plan.mount_path.display(),
            describe(entry)
        )))
    }
}

pub struct Runner<'a> {
    pub cfg: &'a Config,
}

impl Runner<'_> {
    fn guard(&self) -> Result<(), StepError> {
        if self.cfg.shutdown.load(Ordering::SeqCst) {
            Err(StepError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn run(&self, step: &str, cmdline: &str) -> Result<(), StepError> {
        self.guard()?;
        info!(step, command = cmdline, "running");
        let out = self
            .cfg
            .exec(cmdline)
            .map_err(|e| fail(&format!("{step} failed"), e))?;
        debug!(step, stdout = %out.stdout.trim(), stderr = %out.stderr.trim(), "command output");
        Ok(())
    }

    /// A read-only query of the daemon's own (no profile text in it).
    fn query(&self, what: &str, cmdline: &str) -> Result<String, StepError> {
        self.guard()?;
        debug!(command = cmdline, "querying");
        self.cfg
            .exec(cmdline)
            .map(|o| o.stdout)
            .map_err(|e| fail(&format!("could not list {what}"), e))
    }

    /// Every LV the node knows (upstream `lvsListVolumes`, fewer columns).
    fn lvs(&self) -> Result<Vec<(String, String, bool)>, StepError> {
        let out = self.query(
            "logical volumes",
            "lvs --nolock --reportformat json -o vg_name,lv_name,lv_attr",
        )?;
        parse_lvs(&out).map_err(|e| fail("could not list logical volumes", e))
    }

    fn vg_exists(&self, vg: &str) -> Result<bool, StepError> {
        let out = self.query(
            "volume groups",
            "vgs --nolock --reportformat json -o vg_name",
        )?;
        let vgs = parse_vgs(&out).map_err(|e| fail("could not list volume groups", e))?;
        Ok(vgs.iter().any(|v| v == vg))
    }

    /// Wait briefly for the VG (upstream `WaitForAppearance`: 1 s unless
    /// `NNF_MAPPER_WAIT_TIMEOUT`); a VG that does not come is the usual
    /// "namespaces not attached yet", answered by a rescan and a retry.
    fn wait_for_vg(&self, vg: &str) -> Result<bool, StepError> {
        let deadline = Instant::now() + self.cfg.vg_wait;
        loop {
            if self.vg_exists(vg)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // Only while an activation is in progress.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn lock_start(&self, plan: &EntryPlan) -> Result<(), StepError> {
        let (Some(cmd), Some(lvm)) = (&plan.vg_lock_start, &plan.lvm) else {
            return Ok(());
        };
        if self.wait_for_vg(&lvm.vg)? {
            self.run("vgchange lock-start", cmd)
        } else {
            info!(vg = %lvm.vg, wait = ?self.cfg.vg_wait, "volume group did not appear: skipping lock start");
            Ok(())
        }
    }

    /// `lvchange --activate`: only when the LV exists and its activation
    /// differs from `active` (upstream `LogicalVolume.Activate` and
    /// `Deactivate`). A missing LV fails an activation and is nothing to do
    /// for a deactivation.
    fn lv_change(&self, plan: &EntryPlan, active: bool) -> Result<(), StepError> {
        let cmd = if active {
            &plan.lv_activate
        } else {
            &plan.lv_deactivate
        };
        let (Some(cmd), Some(lvm)) = (cmd, &plan.lvm) else {
            return Ok(());
        };
        let lvs = self.lvs()?;
        match lvs
            .iter()
            .find(|(vg, lv, _)| *vg == lvm.vg && *lv == lvm.lv)
        {
            None if active => Err(fail(
                "could not find logical volume",
                format!("{}/{} is not known to LVM", lvm.vg, lvm.lv),
            )),
            None => {
                info!(vg = %lvm.vg, lv = %lvm.lv, "logical volume not found: nothing to deactivate");
                Ok(())
            }
            Some((_, _, now)) if *now == active => {
                info!(vg = %lvm.vg, lv = %lvm.lv, active, "logical volume already in that state");
                Ok(())
            }
            Some(_) if active => self.run("lvchange activate", cmd),
            Some(_) => self.run("lvchange deactivate", cmd),
        }
    }

    /// Lock stop, skipped when the VG is gone or still has an active LV
    /// (upstream `VolumeGroup.LockStop`); "lvmlockd process is not running"
    /// means the lock space is already down.
    fn lock_stop(&self, plan: &EntryPlan) -> Result<(), StepError> {
        let (Some(cmd), Some(lvm)) = (&plan.vg_lock_stop, &plan.lvm) else {
            return Ok(());
        };
        if !self.vg_exists(&lvm.vg)? {
            info!(vg = %lvm.vg, "volume group not found: skipping lock stop");
            return Ok(());
        }
        let lvs = self.lvs()?;
        if let Some((_, lv, _)) = lvs.iter().find(|(vg, _, a)| *vg == lvm.vg && *a) {
            info!(vg = %lvm.vg, active_lv = %lv, "a logical volume of the group is active: skipping lock stop");
            return Ok(());
        }
        self.guard()?;
        info!(
            step = "vgchange lock-stop",
            command = cmd.as_str(),
            "running"
        );
        match self.cfg.exec(cmd) {
            Ok(_) => Ok(()),
            Err(e) if lvmlockd_not_running(&e.to_string()) => {
                info!(vg = %lvm.vg, "lvmlockd is not running: the lock space is already stopped");
                Ok(())
            }
            Err(e) => Err(fail("vgchange lock-stop failed", e)),
        }
    }

    /// `chown` of the mount root when it differs (`setPermissions`).
    fn set_owner(&self, plan: &EntryPlan) -> Result<(), StepError> {
        let Some((uid, gid)) = plan.owner else {
            return Ok(());
        };
        if let Ok(md) = fs::metadata(&plan.mount_path) {
            if (md.uid(), md.gid()) == (uid, gid) {
                return Ok(());
            }
        }
        std::os::unix::fs::chown(&plan.mount_path, Some(uid), Some(gid)).map_err(|e| {
            fail(
                "unable to set owner and group for file system",
                format!("{}: {e}", plan.mount_path.display()),
            )
        })
    }

    fn run_all(&self, step: &str, list: &[String]) -> Result<(), StepError> {
        list.iter().try_for_each(|c| self.run(step, c))
    }

    fn wait_for_device(&self, device: &Path) -> Result<(), StepError> {
        let deadline = Instant::now() + self.cfg.device_wait;
        loop {
            if rdev_of(device).is_some() {
                return Ok(());
            }
            self.guard()?;
            if Instant::now() >= deadline {
                return Err(fail(
                    "block device did not appear",
                    format!(
                        "{} is not a block device after {:?}",
                        device.display(),
                        self.cfg.device_wait
                    ),
                ));
            }
            // Only while a mount is in progress; the daemon is never idle here.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_mount_point(&self, plan: &EntryPlan) -> Result<(), StepError> {
        let path = &plan.mount_path;
        let mkdir = |p: &Path| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(p)
                .map_err(|e| {
                    fail(
                        "could not create mount point",
                        format!("{}: {e}", p.display()),
                    )
                })
        };
        if plan.target_file {
            if let Some(parent) = path.parent() {
                mkdir(parent)?;
            }
            match fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
            {
                Ok(_) => Ok(()),
                Err(e) => Err(fail(
                    "could not create mount point",
                    format!("{}: {e}", path.display()),
                )),
            }
        } else {
            mkdir(path)
        }
    }

    /// Remove the mount point after unmounting: only an empty directory or
    /// an empty regular file, so nothing a user left there is ever deleted.
    fn remove_mount_point(&self, plan: &EntryPlan) {
        let path = &plan.mount_path;
        let Ok(md) = fs::symlink_metadata(path) else {
            return;
        };
        let result = if md.is_dir() {
            fs::remove_dir(path)
        } else if md.is_file() && md.len() == 0 {
            fs::remove_file(path)
        } else {
            return;
        };
        if let Err(e) = result {
            warn!(path = %path.display(), error = %e, "could not remove mount point");
        }
    }

    fn activate(&self, plan: &EntryPlan) -> Result<(), StepError> {
        self.run_all("PreActivate", &plan.pre_activate)?;
        self.lock_start(plan).map_err(activation)?;
        self.lv_change(plan, true).map_err(activation)?;
        if let Expected::Block { device } = &plan.expected {
            self.wait_for_device(device).map_err(activation)?;
        }
        self.run_all("PostActivate", &plan.post_activate)
    }

    /// Mount one entry. `was_ready`: the status already recorded it mounted;
    /// then a mount that is still present needs nothing at all (no hooks run
    /// twice across restarts).
    pub fn mount(
        &self,
        plan: &EntryPlan,
        was_ready: bool,
        servers: Option<&Servers>,
    ) -> Result<(), StepError> {
        if was_ready && check(plan)? == Present::Matches {
            // Hooks stay skipped (they ran when it was mounted), but an
            // ownership lost since (someone's chown, a restore) comes back.
            let before = fs::metadata(&plan.mount_path)
                .map(|m| (m.uid(), m.gid()))
                .ok();
            self.set_owner(plan)?;
            if let (Some(b), Some(want)) = (before, plan.owner) {
                if b != want {
                    info!(path = %plan.mount_path.display(), uid = want.0, gid = want.1, "mount root had lost its owner: set again");
                }
            }
            return Ok(());
        }
        self.activate(plan)?;
        self.run_all("PreMount", &plan.pre_mount)?;
        match check(plan)? {
            Present::Matches => info!(path = %plan.mount_path.display(), "already mounted"),
            Present::Foreign(msg) => {
                return Err(StepError::Failed {
                    user: format!("unexpected mount at path {}", plan.mount_path.display()),
                    debug: msg,
                })
            }
            Present::Absent => match &plan.mount {
                None => {
                    info!(path = %plan.mount_path.display(), "no mount command in the profile: skipping mount")
                }
                Some(cmd) => {
                    self.guard()?;
                    self.create_mount_point(plan)?;
                    self.run("mount", cmd)?;
                    info!(path = %plan.mount_path.display(), "mounted");
                }
            },
        }
        if let Some((uid, gid)) = plan.owner {
            std::os::unix::fs::chown(&plan.mount_path, Some(uid), Some(gid)).map_err(|e| {
                fail(
                    "unable to set owner and group for file system",
                    format!("{}: {e}", plan.mount_path.display()),
                )
            })?;
        }
        if plan.write_servers {
            write_servers_file(plan, servers);
        }
        self.run_all("PostMount", &plan.post_mount)
    }

    pub fn unmount(&self, plan: &EntryPlan, was_ready: bool) -> Result<(), StepError> {
        if was_ready && check(plan)? == Present::Absent {
            return Ok(());
        }
        self.run_all("PreUnmount", &plan.pre_unmount)?;
        match check(plan)? {
            Present::Foreign(msg) => {
                return Err(StepError::Failed {
                    user: format!("unexpected mount at path {}", plan.mount_path.display()),
                    debug: msg,
                })
            }
            Present::Matches => match &plan.unmount {
                None => {
                    info!(path = %plan.mount_path.display(), "mounted but the profile has no unmount command: leaving it");
                }
                Some(cmd) => {
                    self.run("umount", cmd)?;
                    info!(path = %plan.mount_path.display(), "unmounted");
                    self.remove_mount_point(plan);
                }
            },
            Present::Absent => self.remove_mount_point(plan),
        }
        self.run_all("PostUnmount", &plan.post_unmount)?;
        self.run_all("PreDeactivate", &plan.pre_deactivate)?;
        self.lv_change(plan, false)?;
        self.lock_stop(plan)?;
        self.run_all("PostDeactivate", &plan.post_deactivate)
    }
}

/// `<mountPath>/.nnf-servers.json`: best effort, a failure is only logged
/// (in Kubernetes mode the daemon's role may not read Servers at all).
fn write_servers_file(plan: &EntryPlan, servers: Option<&Servers>) {
    let path = plan.mount_path.join(".nnf-servers.json");
    let Some(servers) = servers else {
        info!(path = %path.display(), "no Servers object for this ClientMount: not writing servers file");
        return;
    };
    let write = || -> std::io::Result<()> {
        let mut text = serde_json::to_vec(&servers.lustre_mapping())?;
        text.push(b'\n');
        let mut f = fs::File::create(&path)?;
        f.write_all(&text)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        if let Some((uid, gid)) = plan.owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        warn!(path = %path.display(), error = %e, "could not write servers file");
    }
}

#[cfg(test)]
mod lvm_tests {
    use super::*;

    #[test]
    fn lvm_reports() {
        let lvs = r#"{"report":[{"lv":[{"vg_name":"vg1","lv_name":"lv","lv_attr":"-wi-a-----"},
            {"vg_name":"vg1","lv_name":"lv2","lv_attr":"-wi-------"}]}]}"#;
        assert_eq!(
            parse_lvs(lvs).unwrap(),
            vec![
                ("vg1".into(), "lv".into(), true),
                ("vg1".into(), "lv2".into(), false)
            ]
        );
        assert_eq!(
            parse_vgs(r#"{"report":[{"vg":[{"vg_name":"a"},{"vg_name":"b"}]}]}"#).unwrap(),
            vec!["a", "b"]
        );
        assert!(parse_lvs("").is_err());
        assert!(lvmlockd_not_running(
            "  WARNING: lvmlockd process is not running.\n  Reading without shared global lock."
        ));
    }
}
