//! The agent's counters and gauges: the `metrics` file at the mount root
//! and, with `--metrics-bind-address`, the same on HTTP `/metrics`.
//!
//! One set per process (the agent serves one backend), kept in a static so
//! that the places that count need one line each and no handle passed
//! around. Counting is a few atomic adds; rendering builds a registry of the
//! live families plus the gauges read from the registry of operations at
//! that moment, so a scrape costs no backend work (no API request).
//!
//! Formats: the endpoint serves OpenMetrics 1.0 text as `prometheus-client`
//! encodes it (what Prometheus scrapes natively). The file serves the same
//! series in the Prometheus 0.0.4 text format, the one node_exporter's
//! textfile collector reads (a site copies the file into its directory):
//! given OpenMetrics, a 0.0.4 parser takes every counter for an untyped
//! `_total` family beside an empty counter one. The two differ only in
//! spelling: counters' HELP/TYPE carry the `_total`, and there is no
//! `# UNIT` or `# EOF` line. The snapshot read (fresh at offset 0) keeps the
//! file whole without an end marker.
//!
//! Who sees what: the per-user families (label `user`, the uid) appear only
//! in root's read of the file, as only root may see every user's operations
//! (control-fs "Who sees what"). Other readers and the HTTP endpoint get
//! the aggregates only.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use fuse_ctl::{Caller, Content, Errno, FileKind, FileOps, NodeId, Owner};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::agent::{errno_name, Agent, Rejection};
use crate::op::{Operation, Outcome, State, Status};

/// Create latency buckets, in seconds: a create costs about a millisecond
/// locally, an API round trip or two on Kubernetes, and up to
/// `--request-timeout` (10 s) on a file system that does not answer.
const CREATE_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The errnos a create may fail with (control-fs "Rejections"), shown at 0
/// from the start so that a rate over them needs no "absent" special case.
const ERRNOS: [&str; 9] = [
    "EINVAL",
    "EEXIST",
    "ENOENT",
    "EPERM",
    "EACCES",
    "ENOSPC",
    "EAGAIN",
    "ETIMEDOUT",
    "EIO",
];

const STATES: [State; 5] = [
    State::Pending,
    State::Starting,
    State::Running,
    State::Cancelling,
    State::Completed,
];

const OUTCOMES: [Outcome; 4] = [
    Outcome::Success,
    Outcome::Failed,
    Outcome::Cancelled,
    Outcome::Invalid,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    backend: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    backend: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrnoLabels {
    errno: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UserLabels {
    user: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UserStateLabels {
    user: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UserErrnoLabels {
    user: String,
    errno: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    verb: String,
    group: String,
    resource: String,
    subresource: String,
    /// The HTTP status, or `error` when no answer came.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    group: String,
    resource: String,
}

type Seconds = Counter<f64, AtomicU64>;

/// Every family the agent counts into.
struct Metrics {
    backend: OnceLock<&'static str>,
    completed: Family<OutcomeLabels, Counter>,
    creates: Counter,
    rejections: Family<ErrnoLabels, Counter>,
    create_seconds: Histogram,
    copied_bytes: Counter,
    copied_files: Counter,
    user_creates: Family<UserLabels, Counter>,
    user_rejections: Family<UserErrnoLabels, Counter>,
    user_copied_bytes: Family<UserLabels, Counter>,
    user_copied_files: Family<UserLabels, Counter>,
    api_requests: Family<ApiLabels, Counter>,
    rate_limit_wait: Family<KindLabels, Seconds>,
    rate_limited: Family<KindLabels, Counter>,
}

/// When this agent started counting: completions before it are an earlier
/// life's work.
static STARTED: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

/// How far a completion's end time (the Rabbit's clock, in whole seconds on
/// the Kubernetes backend) may lie before [`STARTED`] and still count.
const CLOCK_SLACK: Duration = Duration::from_secs(2);

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics {
        backend: OnceLock::new(),
        completed: Family::default(),
        creates: Counter::default(),
        rejections: Family::default(),
        create_seconds: Histogram::new(CREATE_BUCKETS),
        copied_bytes: Counter::default(),
        copied_files: Counter::default(),
        user_creates: Family::default(),
        user_rejections: Family::default(),
        user_copied_bytes: Family::default(),
        user_copied_files: Family::default(),
        api_requests: Family::default(),
        rate_limit_wait: Family::default(),
        rate_limited: Family::default(),
    };
    for errno in ERRNOS {
        let _ = m.rejections.get_or_create(&ErrnoLabels { errno });
    }
    m
});

fn backend() -> &'static str {
    METRICS.backend.get().copied().unwrap_or("unknown")
}

fn user(uid: u32) -> UserLabels {
    UserLabels {
        user: uid.to_string(),
    }
}

/// A request was answered after its checks (`started` is when the door
/// handed it over): a create is counted and timed. Rejections are counted
/// by [`rejected`], which sees those refused before any check too.
pub fn answered(uid: u32, started: Instant, result: &Result<String, Rejection>) {
    if result.is_ok() {
        let m = &*METRICS;
        m.creates.inc();
        m.user_creates.get_or_create(&user(uid)).inc();
        m.create_seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// A request was refused (what the `errors` file records).
pub fn rejected(uid: u32, errno: Errno) {
    let m = &*METRICS;
    let errno = errno_name(errno);
    m.rejections.get_or_create(&ErrnoLabels { errno }).inc();
    let labels = UserErrnoLabels {
        user: uid.to_string(),
        errno,
    };
    m.user_rejections.get_or_create(&labels).inc();
}

/// An operation's status changed from state `before` to `now`: on its
/// completion, its outcome and what it copied are counted (once: a
/// completed operation never leaves that state). An operation that ended
/// before the agent started (the Kubernetes backend lists it again after a
/// restart, pending until its resource is read) is not counted again.
pub fn updated(op: &Operation, before: State, now: &Status) {
    if before == State::Completed || now.state != State::Completed {
        return;
    }
    if now.end_time.is_some_and(|end| end + CLOCK_SLACK < *STARTED) {
        return;
    }
    let m = &*METRICS;
    let labels = OutcomeLabels {
        backend: backend(),
        status: now.outcome.word(),
    };
    m.completed.get_or_create(&labels).inc();
    if let Some(c) = now.counters {
        m.copied_bytes.inc_by(c.bytes);
        m.copied_files.inc_by(c.files);
        m.user_copied_bytes
            .get_or_create(&user(op.uid))
            .inc_by(c.bytes);
        m.user_copied_files
            .get_or_create(&user(op.uid))
            .inc_by(c.files);
    }
}

/// Counts the Kubernetes client's requests and rate-limit waits.
struct KubeObserver;

impl kube_connect::Observer for KubeObserver {
    fn request(&self, verb: &str, t: &kube_connect::Target, code: Option<u16>) {
        let labels = ApiLabels {
            verb: verb.to_string(),
            group: t.group.clone(),
            resource: t.resource.clone(),
            subresource: t.subresource.clone(),
            code: code.map_or_else(|| "error".to_string(), |c| c.to_string()),
        };
        METRICS.api_requests.get_or_create(&labels).inc();
    }

    fn rate_limited(&self, t: &kube_connect::Target, waited: Duration) {
        let labels = KindLabels {
            group: t.group.clone(),
            resource: t.resource.clone(),
        };
        METRICS.rate_limited.get_or_create(&labels).inc();
        METRICS
            .rate_limit_wait
            .get_or_create(&labels)
            .inc_by(waited.as_secs_f64());
    }
}

/// What the Kubernetes client reports its traffic to.
pub fn kube_observer() -> Option<Arc<dyn kube_connect::Observer>> {
    Some(Arc::new(KubeObserver))
}

/// Adds the `metrics` file to the agent's root; `backend` labels the
/// operation families.
pub fn install(agent: Arc<Agent>, backend: &'static str) -> Arc<Agent> {
    let _ = METRICS.backend.set(backend);
    LazyLock::force(&STARTED);
    agent
        .fs()
        .add_file(
            NodeId::ROOT,
            "metrics",
            Owner::root(0o444),
            FileKind::Snapshot,
            Arc::new(MetricsFile(Arc::downgrade(&agent))),
        )
        .expect("the fixed names reserve `metrics`");
    agent
}

struct MetricsFile(Weak<Agent>);

impl FileOps for MetricsFile {
    fn read(&self, caller: &Caller) -> Result<Content, Errno> {
        let agent = self.0.upgrade().ok_or(Errno::EIO)?;
        let text = render(&agent, caller.is_root());
        Ok(Content::Ready(text_format(&text).into_bytes()))
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start the metrics endpoint's runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Bind(#[from] daemon_common::metrics_http::BindError),
}

/// Serves the aggregates on `addr` (none: off), on a thread and runtime of
/// its own so that scrapes never queue behind the core's request checks.
/// Binds before it returns: a busy port is a start-up error.
pub fn serve_http(
    agent: &Arc<Agent>,
    addr: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, ServeError> {
    let Some(addr) = addr else { return Ok(None) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(ServeError::Runtime)?;
    let weak = Arc::downgrade(agent);
    let render: daemon_common::metrics_http::Render = Arc::new(move || match weak.upgrade() {
        Some(agent) => render(&agent, false),
        None => "# EOF\n".to_string(),
    });
    let bound = rt.block_on(daemon_common::metrics_http::serve(addr, render))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(ServeError::Runtime)?;
    Ok(Some(bound))
}

/// Registers families as a table: `name, help[, unit] => metric;` each.
macro_rules! register {
    ($r:ident; $($name:literal, $help:literal $(, $unit:expr)? => $metric:expr;)*) => {
        $(register!(@one $r, $name, $help $(, $unit)?, $metric);)*
    };
    (@one $r:ident, $name:literal, $help:literal, $metric:expr) => {
        $r.register($name, $help, $metric)
    };
    (@one $r:ident, $name:literal, $help:literal, $unit:expr, $metric:expr) => {
        $r.register_with_unit($name, $help, $unit, $metric)
    };
}

/// The text of one scrape; `per_user` adds the families labelled `user`.
fn render(agent: &Agent, per_user: bool) -> String {
    let m = &*METRICS;
    let backend = backend();
    let mut r = Registry::with_prefix("nnf_dm");

    let ops = agent.list(0);
    let by_state: Family<StateLabels, Gauge> = Family::default();
    for state in STATES {
        let _ = by_state.get_or_create(&StateLabels {
            backend,
            state: state.word(),
        });
    }
    let user_states: Family<UserStateLabels, Gauge> = Family::default();
    for op in &ops {
        let state = op.status().state.word();
        by_state
            .get_or_create(&StateLabels { backend, state })
            .inc();
        if per_user {
            let labels = UserStateLabels {
                user: op.uid.to_string(),
                state,
            };
            user_states.get_or_create(&labels).inc();
        }
    }
    r.register(
        "operations",
        "Operations the agent holds, by backend and state",
        by_state,
    );
    for status in OUTCOMES {
        let _ = m.completed.get_or_create(&OutcomeLabels {
            backend,
            status: status.word(),
        });
    }
    register!(r;
        "operations_completed", "Operations that completed since the agent started, by status"
            => m.completed.clone();
        "creates", "Requests that created an operation (control filesystem and gRPC)"
            => m.creates.clone();
        "rejections", "Requests refused, by the errno the writer got"
            => m.rejections.clone();
        "create_duration",
        "Time from a request's arrival to its operation's creation", Unit::Seconds
            => m.create_seconds.clone();
        "copied", "Bytes copied by completed operations, as their backend reports them", Unit::Bytes
            => m.copied_bytes.clone();
        "copied_files", "Files copied by completed operations, as their backend reports them"
            => m.copied_files.clone();
    );
    if backend == "kubernetes" {
        register!(r;
            "kubernetes_requests", "Kubernetes API requests sent, by verb, resource and HTTP code"
                => m.api_requests.clone();
            "kubernetes_rate_limited_requests",
            "Kubernetes API requests that waited on the client-side rate limit"
                => m.rate_limited.clone();
            "kubernetes_rate_limit_wait",
            "Time Kubernetes API requests waited on the client-side rate limit", Unit::Seconds
                => m.rate_limit_wait.clone();
        );
    }
    if per_user {
        register!(r;
            "user_operations", "Operations the agent holds, by user (uid) and state"
                => user_states;
            "user_creates", "Requests that created an operation, by user (uid)"
                => m.user_creates.clone();
            "user_rejections", "Requests refused, by user (uid) and errno"
                => m.user_rejections.clone();
            "user_copied", "Bytes copied by completed operations, by user (uid)", Unit::Bytes
                => m.user_copied_bytes.clone();
            "user_copied_files", "Files copied by completed operations, by user (uid)"
                => m.user_copied_files.clone();
        );
    }
    let mut text = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &r);
    text
}

/// OpenMetrics text (as `prometheus-client` encodes it) in the Prometheus
/// 0.0.4 text format: a counter family `x` is `x_total` there, and `UNIT`
/// and `EOF` lines do not exist. Gauges and histograms read the same. The
/// series of a counter or gauge are sorted, so that `cat` shows them in a
/// stable order (the encoder follows hash order); a histogram's stay as
/// encoded, buckets rising.
fn text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE: held until TYPE says whether to rename.
    let mut help: Option<(&str, &str)> = None;
    let mut samples: Vec<&str> = Vec::new();
    let mut sort = false;
    let flush = |out: &mut String, samples: &mut Vec<&str>, sort: bool| {
        if sort {
            samples.sort_unstable();
        }
        for line in samples.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush(&mut out, &mut samples, sort);
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            flush(&mut out, &mut samples, sort);
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            sort = matches!(kind, "counter" | "gauge");
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
        samples.push(line);
    }
    flush(&mut out, &mut samples, sort);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_carry_total_in_the_004_format() {
        let om = "# HELP nnf_dm_creates Requests.\n# TYPE nnf_dm_creates counter\nnnf_dm_creates_total 3\n\
# HELP nnf_dm_x_seconds Time.\n# TYPE nnf_dm_x_seconds histogram\n# UNIT nnf_dm_x_seconds seconds\n\
nnf_dm_x_seconds_sum 1.5\nnnf_dm_x_seconds_count 2\nnnf_dm_x_seconds_bucket{le=\"+Inf\"} 2\n\
# HELP nnf_dm_ops Ops.\n# TYPE nnf_dm_ops gauge\nnnf_dm_ops{state=\"running\"} 1\nnnf_dm_ops{state=\"pending\"} 0\n# EOF\n";
        let text = text_format(om);
        assert_eq!(
            text,
            "# HELP nnf_dm_creates_total Requests.\n# TYPE nnf_dm_creates_total counter\nnnf_dm_creates_total 3\n\
# HELP nnf_dm_x_seconds Time.\n# TYPE nnf_dm_x_seconds histogram\n\
nnf_dm_x_seconds_sum 1.5\nnnf_dm_x_seconds_count 2\nnnf_dm_x_seconds_bucket{le=\"+Inf\"} 2\n\
# HELP nnf_dm_ops Ops.\n# TYPE nnf_dm_ops gauge\nnnf_dm_ops{state=\"pending\"} 0\nnnf_dm_ops{state=\"running\"} 1\n"
        );
    }

    #[test]
    fn the_hooks_count_aggregates_and_per_user_series() {
        answered(7, Instant::now(), &Ok("x".into()));
        rejected(7, Errno::EEXIST);
        let m = &*METRICS;
        assert!(m.creates.get() >= 1);
        assert!(
            m.user_rejections
                .get_or_create(&UserErrnoLabels {
                    user: "7".into(),
                    errno: "EEXIST"
                })
                .get()
                >= 1
        );
    }
}
