//! The daemon's Prometheus metrics. Upstream's clientmountd serves
//! controller-runtime's registry with one metric of its own,
//! `nnf_clientmount_reconciles_total` (nnf-sos
//! `internal/controller/metrics/metrics.go`); ours has that counter under
//! the same name and adds what an operator asks first: how many
//! ClientMounts are in which state, how many reconciles failed, how long the
//! external commands take.
//!
//! Everything is kept in memory as the work happens: a scrape renders, it
//! never asks the API server or the spec directory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nnf_api::{ClientMountState, ClientMountStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    /// The state the status records (`mounted`, `unmounted`).
    state: String,
    /// Its `allReady`.
    ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    /// The program run (its base name): `mount`, `lvchange`, `nvme`...
    command: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Counter,
    clientmounts: Family<StateLabels, Gauge>,
    commands: Family<CommandLabels, Histogram, fn() -> Histogram>,
    /// What each known ClientMount's status last said: the gauge is
    /// recounted from it on every change.
    states: Mutex<HashMap<String, (ClientMountState, bool)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn command_histogram() -> Histogram {
    // 5 ms .. ~80 s: `nvme list` is milliseconds, a Lustre mount seconds.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

const STATES: [ClientMountState; 2] = [ClientMountState::Mounted, ClientMountState::Unmounted];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Counter::default();
        registry.register(
            "nnf_clientmount_reconciles",
            "Number of reconciles of ClientMount resources",
            reconciles.clone(),
        );
        let errors = Counter::default();
        registry.register(
            "nnf_clientmount_reconcile_errors",
            "Number of reconciles that ended in an error (each is retried)",
            errors.clone(),
        );
        let clientmounts = Family::<StateLabels, Gauge>::default();
        registry.register(
            "nnf_clientmount_clientmounts",
            "ClientMounts handled by this daemon, by the state and allReady of their status",
            clientmounts.clone(),
        );
        let commands = Family::<CommandLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            command_histogram,
        );
        registry.register(
            "nnf_clientmount_command_duration_seconds",
            "Duration of the external commands run, by program",
            commands.clone(),
        );
        let metrics = Metrics {
            registry,
            reconciles,
            errors,
            clientmounts,
            commands,
            states: Mutex::new(HashMap::new()),
        };
        metrics.recount(&HashMap::new());
        metrics
    }
}

impl Metrics {
    pub fn reconcile_started(&self) {
        self.reconciles.inc();
    }

    pub fn reconcile_failed(&self) {
        self.errors.inc();
    }

    /// A command ran for `took`; `cmdline` as given to bash.
    pub fn command_ran(&self, cmdline: &str, took: Duration) {
        let first = cmdline.split_whitespace().next().unwrap_or("");
        let command = first.rsplit('/').next().unwrap_or(first).to_string();
        self.commands
            .get_or_create(&CommandLabels { command })
            .observe(took.as_secs_f64());
    }

    /// The status of ClientMount `key` as persisted; `None` once it is gone.
    pub fn status(&self, key: &str, status: Option<&ClientMountStatus>) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        match status.and_then(|s| s.mounts.first().map(|m| (m.state, s.all_ready))) {
            Some(v) => {
                if states.insert(key.to_string(), v) == Some(v) {
                    return;
                }
            }
            None => {
                if states.remove(key).is_none() {
                    return;
                }
            }
        }
        self.recount(&states);
    }

    /// Forgets the ClientMounts for which `keep` says false.
    pub fn retain_statuses(&self, keep: impl Fn(&str) -> bool) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let before = states.len();
        states.retain(|k, _| keep(k));
        if states.len() != before {
            self.recount(&states);
        }
    }

    fn recount(&self, states: &HashMap<String, (ClientMountState, bool)>) {
        for state in STATES {
            for ready in [true, false] {
                let n = states.values().filter(|v| **v == (state, ready)).count();
                self.clientmounts
                    .get_or_create(&StateLabels {
                        state: state.as_str().to_string(),
                        ready: ready.to_string(),
                    })
                    .set(n as i64);
            }
        }
    }

    /// The OpenMetrics text of a scrape.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "metrics: encoding failed");
        }
        text
    }
}

/// Serves `metrics` on `addr` (`None`: `--metrics-bind-address 0`, off)
/// from the current runtime. Bound before the daemon does anything else,
/// so a busy port is a start-up error naming the address.
pub async fn serve(
    addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
) -> Result<(), daemon_common::metrics_http::BindError> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let render: daemon_common::metrics_http::Render = Arc::new(move || metrics.render());
    daemon_common::metrics_http::serve(addr, render)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nnf_api::ClientMountInfoStatus;

    fn status(state: ClientMountState, ready: bool) -> ClientMountStatus {
        ClientMountStatus {
            mounts: vec![ClientMountInfoStatus { state, ready }],
            all_ready: ready,
            error: None,
        }
    }

    #[test]
    fn names_and_counts() {
        let m = Metrics::default();
        m.reconcile_started();
        m.reconcile_started();
        m.reconcile_failed();
        m.command_ran(
            "/usr/sbin/lvchange --activate y vg/lv",
            Duration::from_millis(20),
        );
        m.status("a", Some(&status(ClientMountState::Mounted, true)));
        m.status("b", Some(&status(ClientMountState::Mounted, false)));
        m.status("b", Some(&status(ClientMountState::Mounted, true)));
        m.status("c", Some(&status(ClientMountState::Unmounted, true)));
        m.status("c", None);
        let text = m.render();
        for line in [
            "nnf_clientmount_reconciles_total 2",
            "nnf_clientmount_reconcile_errors_total 1",
            "nnf_clientmount_clientmounts{state=\"mounted\",ready=\"true\"} 2",
            "nnf_clientmount_clientmounts{state=\"unmounted\",ready=\"true\"} 0",
            "nnf_clientmount_command_duration_seconds_count{command=\"lvchange\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
