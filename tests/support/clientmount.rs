//! Helpers for the clientmountd tests: loop devices, recording stand-in
//! commands, the daemon process and status files. Every helper that changes
//! the machine undoes it in `Drop`, so a failing assertion still cleans up.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The `clientmountd` built next to this test executable, or
/// `$CLIENTMOUNTD_BIN` (the benchmark measures a release build without
/// building the whole test crate in release).
pub fn clientmountd_bin() -> PathBuf {
    match std::env::var_os("CLIENTMOUNTD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => super::bin("clientmountd"),
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over a sparse image file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    /// `mkfs`: e.g. `Some(&["mkfs.xfs", "-q"])`, or `None` for a raw device.
    pub fn new(dir: &Path, name: &str, mkfs: Option<&[&str]>) -> LoopDev {
        let image = dir.join(format!("{name}.img"));
        // mkfs.xfs refuses file systems below 300 MiB; the file is sparse.
        fs::File::create(&image)
            .and_then(|f| f.set_len(320 << 20))
            .expect("image file");
        let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&image));
        let loopdev = LoopDev {
            dev: PathBuf::from(dev),
        };
        if let Some(mkfs) = mkfs {
            run_ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&loopdev.dev));
        }
        loopdev
    }

    pub fn rdev(&self) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let rdev = fs::metadata(&self.dev).expect("stat loop").rdev();
        (libc::major(rdev), libc::minor(rdev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Lazily unmounts every mount still at these paths on drop.
#[derive(Default)]
pub struct MountGuard {
    paths: Vec<PathBuf>,
}

impl MountGuard {
    pub fn watch(&mut self, path: &Path) {
        self.paths.push(path.to_path_buf());
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        for p in &self.paths {
            while mount_at(p).is_some() {
                let ok = Command::new("umount")
                    .arg("-l")
                    .arg(p)
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    break;
                }
            }
        }
    }
}

/// One `/proc/self/mountinfo` line, the fields tests look at.
#[derive(Debug, Clone)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    pub fstype: String,
    pub source: String,
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount at `path` (stacked mounts give several).
pub fn mounts_at(path: &Path) -> Vec<Mount> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let path = path.to_str().expect("utf8 path");
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if unescape_mountinfo(f.get(4)?) != path {
                return None;
            }
            let (ma, mi) = f.get(2)?.split_once(':')?;
            Some(Mount {
                major: ma.parse().ok()?,
                minor: mi.parse().ok()?,
                fstype: r.first()?.to_string(),
                source: r.get(1).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

pub fn mount_at(path: &Path) -> Option<Mount> {
    mounts_at(path).pop()
}

/// One test's scratch tree: `spec/` (the spec directory), `bin/` (the
/// recording stand-ins of [`lvm_stubs`]), `mapper/` (where activated LVs
/// appear), `map/` (the stand-ins' LV map), `mnt/`, `nvme/`, and the logs.
pub struct Scratch {
    pub tmp: tempfile::TempDir,
}

impl Scratch {
    pub fn new(prefix: &str) -> Scratch {
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        for d in ["spec", "bin", "mapper", "map", "mnt", "nvme"] {
            fs::create_dir_all(tmp.path().join(d)).expect("scratch dir");
        }
        let s = Scratch { tmp };
        lvm_stubs(&s.bin(), &s.cmdlog(), &s.p("map"), &s.p("mapper"));
        s
    }
    pub fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    pub fn spec(&self) -> PathBuf {
        self.p("spec")
    }
    pub fn bin(&self) -> PathBuf {
        self.p("bin")
    }
    pub fn cmdlog(&self) -> PathBuf {
        self.p("commands.log")
    }
    /// The commands the stand-ins recorded, in order.
    pub fn commands(&self) -> Vec<String> {
        read_lines(&self.cmdlog())
    }
    /// An xfs loop device named `name`, mapped as `vg/lv` for the LVM
    /// stand-ins, with the mount path `mnt` under this tree watched.
    pub fn xfs_lv(&self, name: &str, mnt: &str, vg: &str, lv: &str) -> XfsLv {
        let dev = LoopDev::new(self.tmp.path(), name, Some(&["mkfs.xfs", "-q"]));
        let mnt = self.p(mnt);
        let mut guard = MountGuard::default();
        guard.watch(&mnt);
        map_lv(&self.p("map"), vg, lv, &dev.dev);
        XfsLv { dev, mnt, guard }
    }
    /// A stand-in `cmd` that only records its arguments in [`Self::cmdlog`].
    pub fn recording_stub(&self, cmd: &str) {
        let log = self.cmdlog();
        stub(
            &self.bin(),
            cmd,
            &format!("echo \"{cmd} $*\" >> '{}'", log.display()),
        );
    }
    /// The daemon flags that point it at this tree's devices.
    pub fn device_args(&self) -> Vec<String> {
        [
            "--device-dir",
            self.p("mapper").to_str().expect("utf-8 path"),
            "--device-wait",
            "5s",
            "--nvme-dir",
            self.p("nvme").to_str().expect("utf-8 path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// What [`Scratch::xfs_lv`] made. Bound with `let XfsLv { dev, mnt, guard }`
/// the guard drops first: unmount, then detach.
pub struct XfsLv {
    pub dev: LoopDev,
    pub mnt: PathBuf,
    pub guard: MountGuard,
}

/// Write an executable stand-in script `name` into `bin`.
pub fn stub(bin: &Path, name: &str, body: &str) {
    fs::create_dir_all(bin).expect("stub dir");
    let path = bin.join(name);
    crate::write_executable(&path, format!("#!/bin/bash\n{body}\n").as_bytes());
}

/// Recording `lvchange`/`vgchange`/`nvme` stand-ins, and `lvs`/`vgs`
/// stand-ins that answer from the same state. `lvchange --activate y*
/// VG/LV` makes `<devdir>/<dm name>` a symlink to the device named in
/// `<map>/<VG>/<LV>` (as device-mapper would create the node), `--activate
/// n` removes it. The state: a VG exists when `<map>/<VG>` does, an LV when
/// `<map>/<VG>/<LV>` does, and it is active when its node in `<devdir>`
/// exists. `lvs`/`vgs` calls go to `<log>.queries`, not to `log`.
///
/// Scripting: a file `<map>/.fail-<command>` makes `vgchange`/`lvchange`
/// print its text on stderr and exit 5. The `nvme` stand-in answers
/// `nvme list ...` with `<map>/.nvme/list-<N>.json` for its N-th call
/// (else `<map>/.nvme/list.json`, else no devices), and runs the executable
/// `<map>/.nvme/on-rescan` on each `nvme ns-rescan`.
pub fn lvm_stubs(bin: &Path, log: &Path, map: &Path, devdir: &Path) {
    let queries = log.with_extension("queries");
    let (log, map_s, dev_s, q) = (
        log.display(),
        map.display(),
        devdir.display(),
        queries.display(),
    );
    fs::create_dir_all(map.join(".nvme")).expect("nvme script dir");
    let fail = |cmd: &str| {
        format!("[ -f '{map_s}/.fail-{cmd}' ] && {{ cat '{map_s}/.fail-{cmd}' >&2; exit 5; }}\n")
    };
    stub(
        bin,
        "vgchange",
        &format!(
            "echo \"vgchange $*\" >> '{log}'\n{}exit 0",
            fail("vgchange")
        ),
    );
    stub(
        bin,
        "lvchange",
        &format!(
            r#"echo "lvchange $*" >> '{log}'
{fail}vglv="$3"; vg="${{vglv%%/*}}"; lv="${{vglv#*/}}"
node='{dev_s}'/"${{vg//-/--}}-${{lv//-/--}}"
case "$2" in
  y|ys|ey|sy) ln -sfn "$(cat '{map_s}'/"$vg"/"$lv")" "$node" ;;
  n) rm -f "$node" ;;
esac"#,
            fail = fail("lvchange"),
        ),
    );
    stub(
        bin,
        "vgs",
        &format!(
            r#"echo "vgs $*" >> '{q}'
sep=; printf '{{"report":[{{"vg":['
for d in '{map_s}'/*/; do
  [ -d "$d" ] || continue
  vg=$(basename "$d"); printf '%s{{"vg_name":"%s"}}' "$sep" "$vg"; sep=,
done
printf ']}}]}}\n'"#
        ),
    );
    stub(
        bin,
        "lvs",
        &format!(
            r#"echo "lvs $*" >> '{q}'
sep=; printf '{{"report":[{{"lv":['
for f in '{map_s}'/*/*; do
  [ -f "$f" ] || continue
  lv=$(basename "$f"); vg=$(basename "$(dirname "$f")")
  node='{dev_s}'/"${{vg//-/--}}-${{lv//-/--}}"
  if [ -e "$node" ]; then attr=-wi-a-----; else attr=-wi-------; fi
  printf '%s{{"vg_name":"%s","lv_name":"%s","lv_attr":"%s"}}' "$sep" "$vg" "$lv" "$attr"; sep=,
done
printf ']}}]}}\n'"#
        ),
    );
    stub(
        bin,
        "nvme",
        &format!(
            r#"echo "nvme $*" >> '{log}'
d='{map_s}/.nvme'
case "$1" in
  ns-rescan) [ -x "$d/on-rescan" ] && "$d/on-rescan" ;;
  list)
    n=$(( $(cat "$d/list-count" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$d/list-count"
    f="$d/list-$n.json"; [ -f "$f" ] || f="$d/list.json"
    if [ -f "$f" ]; then cat "$f"; else echo '{{"Devices":[]}}'; fi ;;
esac
exit 0"#
        ),
    );
}

/// `nvme list -v --output-format=json` output showing these `(NQN, NSID)`
/// namespaces.
pub fn nvme_list_json(namespaces: &[(&str, u32)]) -> String {
    let devices: Vec<serde_json::Value> = namespaces
        .iter()
        .map(|(nqn, nsid)| {
            serde_json::json!({"SubsystemNQN": nqn, "Controllers": [{"Namespaces": [
                {"NameSpace": format!("nvme0n{nsid}"), "NSID": nsid}]}]})
        })
        .collect();
    serde_json::json!({ "Devices": devices }).to_string()
}

/// Tell the lvchange stand-in which device `<vg>/<lv>` is.
pub fn map_lv(map: &Path, vg: &str, lv: &str, dev: &Path) {
    fs::create_dir_all(map.join(vg)).expect("map dir");
    fs::write(map.join(vg).join(lv), dev.display().to_string()).expect("map");
}

/// Replace `path` atomically, as the daemon's writers are expected to.
pub fn write_json(path: &Path, value: &serde_json::Value) {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(value).expect("json")).expect("write tmp");
    fs::rename(&tmp, path).expect("rename");
}

pub fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A running `clientmountd --spec-dir`. Dropping it sends SIGTERM and waits.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Start with `bin` first on PATH and the given extra arguments.
    pub fn start(spec_dir: &Path, bin: &Path, log: &Path, extra: &[&str]) -> Daemon {
        let mut args: Vec<String> = vec!["--spec-dir".into(), spec_dir.display().to_string()];
        args.extend(
            ["--node-name", "testnode", "--command-timeout", "20s"]
                .iter()
                .map(|s| s.to_string()),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        Daemon::spawn(bin, log, &args)
    }

    /// Start with `bin` first on PATH and exactly these arguments (no
    /// `--spec-dir`: the Kubernetes mode). The Kubernetes environment
    /// variables of the test process are removed so only the flags count.
    pub fn spawn(bin: &Path, log: &Path, args: &[String]) -> Daemon {
        Daemon::spawn_env(bin, log, args, &[])
    }

    /// [`Daemon::spawn`] with these environment variables set (the
    /// `NNF_*` variables of the test process are removed first).
    pub fn spawn_env(bin: &Path, log: &Path, args: &[String], envs: &[(&str, &str)]) -> Daemon {
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        // Metrics off unless the test asks: the default port is one per
        // machine, and tests run in parallel.
        let mut args = args.to_vec();
        if !args.iter().any(|a| a.starts_with("--metrics-bind-address")) {
            args.push("--metrics-bind-address=0".to_string());
        }
        let child = Command::new(clientmountd_bin())
            .args(&args)
            .env("PATH", path)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("DWS_CLIENT_MOUNT_SERVICE_TOKEN_FILE")
            .env_remove("DWS_CLIENT_MOUNT_SERVICE_CERT_FILE")
            .env_remove("KUBECONFIG")
            .env_remove("RUST_LOG")
            .env_remove("NNF_COMMAND_TIMEOUT_SECONDS")
            .env_remove("NNF_MAPPER_WAIT_TIMEOUT")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn clientmountd");
        Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then wait for the exit (killed after 30 s).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Poll `<dir>/<name>.status.json` until `pred` holds on its `status`;
/// panics with the last content and the daemon log after `timeout`.
pub fn wait_status(
    dir: &Path,
    name: &str,
    daemon: &Daemon,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let path = dir.join(format!("{name}.status.json"));
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Ok(text) = fs::read_to_string(&path) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if pred(&v["status"]) {
                    return v["status"].clone();
                }
            }
            last = text;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {}; last content:\n{last}\ndaemon log:\n{}",
                path.display(),
                daemon.log_text()
            );
        }
        sleep(Duration::from_millis(50));
    }
}

/// Wait until the daemon's log has not changed for 1.5 s (the reconciles
/// its own status writes start are over).
pub fn settle(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (daemon.log_text(), Instant::now());
    while last.1.elapsed() < Duration::from_millis(1500) {
        if Instant::now() > deadline {
            panic!("daemon did not settle; log:\n{}", daemon.log_text());
        }
        sleep(Duration::from_millis(100));
        let now = daemon.log_text();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
}

/// Poll until `cond` holds, panicking with `what` and the daemon log.
pub fn wait_until(daemon: &Daemon, timeout: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; daemon log:\n{}",
                daemon.log_text()
            );
        }
        sleep(Duration::from_millis(50));
    }
}

/// Idle figures of a process, summed over its threads.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub voluntary_ctxt_switches: u64,
    pub nonvoluntary_ctxt_switches: u64,
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub threads: u64,
}

pub fn proc_sample(pid: u32) -> ProcSample {
    let mut s = ProcSample {
        voluntary_ctxt_switches: 0,
        nonvoluntary_ctxt_switches: 0,
        cpu_ticks: 0,
        rss_kib: 0,
        threads: 0,
    };
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Per thread: the process-level counters of exited threads are not
    // what an idle daemon does now.
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            s.voluntary_ctxt_switches += field(&status, "voluntary_ctxt_switches:");
            s.nonvoluntary_ctxt_switches += field(&status, "nonvoluntary_ctxt_switches:");
            s.threads += 1;
        }
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.rss_kib = field(&status, "VmRSS:");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may contain spaces.
    if let Some((_, rest)) = stat.rsplit_once(')') {
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat (index 11, 12 here).
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        s.cpu_ticks = n(11) + n(12);
    }
    s
}

/// A recording Lustre `mount` stand-in that shows whether mounts overlap in
/// time. Each call (`mount -t lustre SRC PATH`) appends `start PATH SRC NS`
/// and later `end PATH SRC NS` to `log` (NS: nanoseconds since the epoch;
/// PATH without a trailing `/`). In between it holds PATH for itself with
/// an atomic `mkdir` next to the log: a second mount of the same PATH while
/// one runs appends `overlap PATH SRC`. A mount whose PATH contains `meet`
/// waits (up to 10 s) until `meet_count` such mounts have started, which
/// only a daemon running them at the same time gets past; any other mount
/// sleeps 1 s, so that overlapping ones would be seen.
pub fn timing_mount_stub(bin: &Path, log: &Path, meet: &str, meet_count: usize) {
    let held = log.with_extension("held");
    fs::create_dir_all(&held).expect("held dir");
    stub(
        bin,
        "mount",
        &format!(
            r#"src="$3"; path="${{4%/}}"; log='{log}'
now() {{ date +%s%N; }}
echo "start $path $src $(now)" >> "$log"
mine='{held}'/"${{path//\//_}}"
ours=1
mkdir "$mine" 2>/dev/null || {{ ours=0; echo "overlap $path $src" >> "$log"; }}
case "$path" in
  *'{meet}'*)
    for _ in $(seq 200); do
      [ "$(grep -c "^start [^ ]*{meet}" "$log")" -ge {meet_count} ] && break
      sleep 0.05
    done ;;
  *) sleep 1 ;;
esac
echo "end $path $src $(now)" >> "$log"
[ "$ours" = 1 ] && rmdir "$mine"
exit 0"#,
            log = log.display(),
            held = held.display(),
        ),
    );
}

/// One call of the [`timing_mount_stub`].
#[derive(Debug, Clone)]
pub struct MountRun {
    pub path: String,
    pub source: String,
    pub start: u128,
    pub end: u128,
}

/// The calls the [`timing_mount_stub`] recorded, in the order they started,
/// and its `overlap` lines. A source is one ClientMount, which may mount
/// again on a later reconcile (the stand-in leaves nothing in mountinfo),
/// but never twice at once: that panics.
pub fn mount_runs(log: &Path) -> (Vec<MountRun>, Vec<String>) {
    let mut runs: Vec<MountRun> = Vec::new();
    let mut overlaps = Vec::new();
    for line in read_lines(log) {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["start", path, src, ns] => {
                assert!(
                    !runs.iter().any(|r| r.source == *src && r.end == 0),
                    "{src} mounting twice at once: {}",
                    read_lines(log).join("\n")
                );
                runs.push(MountRun {
                    path: path.to_string(),
                    source: src.to_string(),
                    start: ns.parse().expect("start ns"),
                    end: 0,
                });
            }
            ["end", _, src, ns] => {
                let run = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.source == *src && r.end == 0)
                    .unwrap_or_else(|| panic!("end without start: {line}"));
                run.end = ns.parse().expect("end ns");
            }
            ["overlap", ..] => overlaps.push(line.clone()),
            _ => panic!("unexpected line in {}: {line}", log.display()),
        }
    }
    for r in &runs {
        assert!(r.end >= r.start, "unfinished or backwards: {r:?}");
    }
    (runs, overlaps)
}

/// Wait until every call of the [`timing_mount_stub`] has ended and the
/// log has not changed for 1.5 s (longer than one call sleeps).
pub fn wait_mounts_settled(daemon: &Daemon, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (read_lines(log), Instant::now());
    loop {
        sleep(Duration::from_millis(100));
        let now = read_lines(log);
        if now != last.0 {
            last = (now, Instant::now());
        } else {
            let count = |w: &str| now.iter().filter(|l| l.starts_with(w)).count();
            if count("start ") == count("end ") && last.1.elapsed() > Duration::from_millis(1500) {
                return;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "mounts did not settle: {:?}\ndaemon log:\n{}",
                last.0,
                daemon.log_text()
            );
        }
    }
}

/// The first run of each source of `runs` that contains `part`.
pub fn first_runs<'a>(runs: &'a [MountRun], part: &str) -> Vec<&'a MountRun> {
    let mut firsts: Vec<&MountRun> = Vec::new();
    for r in runs.iter().filter(|r| r.source.contains(part)) {
        if !firsts.iter().any(|f| f.source == r.source) {
            firsts.push(r);
        }
    }
    firsts
}

/// All of `runs` were in progress at one moment: the last start comes
/// before the first end.
pub fn assert_all_overlap(runs: &[&MountRun]) {
    let last_start = runs.iter().map(|r| r.start).max().expect("runs");
    let first_end = runs.iter().map(|r| r.end).min().expect("runs");
    assert!(
        last_start < first_end,
        "not concurrent (last start {last_start} >= first end {first_end}): {runs:#?}"
    );
}

/// No two of `runs` were in progress at once: ordered by start, each one
/// ends before the next starts.
pub fn assert_none_overlap(runs: &[&MountRun]) {
    let mut sorted = runs.to_vec();
    sorted.sort_by_key(|r| r.start);
    for pair in sorted.windows(2) {
        assert!(
            pair[0].end <= pair[1].start,
            "overlapping mounts of {}: {:#?}",
            pair[0].path,
            pair
        );
    }
}

/// The pinned NnfStorageProfile of the xfs-on-LVM tests: shared VG, lock
/// start/stop, activate/deactivate, mount/unmount.
pub fn pinned_xfs_profile() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "nnf.cray.hpe.com/v1alpha11",
        "kind": "NnfStorageProfile",
        "metadata": {"name": "pinned-prof", "namespace": "nnf-system"},
        "data": {"pinned": true, "xfsStorage": {
            "blockDeviceCommands": {"sharedVg": true, "computeCommands": {
                "lvChange": {"activate": "--activate y $VG_NAME/$LV_NAME",
                             "deactivate": "--activate n $VG_NAME/$LV_NAME"},
                "vgChange": {"lockStart": "--lock-start $VG_NAME", "lockStop": "--lock-stop $VG_NAME"}}},
            "fileSystemCommands": {"computeCommands": {
                "mount": "$DEVICE $MOUNT_PATH", "unmount": "$MOUNT_PATH"}}}}
    })
}

/// Whether a ClientMount status has every one of its (at least one) mounts
/// ready in `state`.
pub fn status_all_ready(status: &serde_json::Value, state: &str) -> bool {
    status["allReady"] == serde_json::json!(true)
        && status["mounts"].as_array().is_some_and(|m| {
            !m.is_empty() && m.iter().all(|e| e["state"] == serde_json::json!(state))
        })
}
