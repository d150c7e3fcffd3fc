//! How the NNF compute daemons (nnf-dm's Kubernetes backend and
//! clientmountd) connect to Kubernetes: the flags and environment of
//! upstream's daemons (nnf-dm `daemons/compute/server/main.go`, nnf-sos
//! `mount-daemon/main.go`).
//!
//! Each daemon fills a [`Connection`] from its own clap flags (the flag names
//! are the same, the environment variables behind them differ), calls
//! [`Connection::check`] at startup so a broken installation fails at once
//! with a message naming the flag, and then [`Connection::client`].
//!
//! ```no_run
//! # async fn f() -> Result<(), kube_connect::ConnectError> {
//! let conn = kube_connect::Connection {
//!     host: Some("10.0.0.1".into()),
//!     port: Some("6443".into()),
//!     token_file: Some("/etc/client-mount/service.token".into()),
//!     cert_file: Some("/etc/client-mount/service.cert".into()),
//!     ..Default::default()
//! };
//! conn.check()?;
//! let client = conn.client().await?;
//! # Ok(()) }
//! ```

mod observe;
mod ratelimit;
mod token;

use std::sync::Arc;

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub use observe::{ObserveLayer, ObserveService, Observer, Target};
pub use ratelimit::{kind_of, RateLimitLayer, RateLimitService};
pub use token::{TokenFileLayer, TokenFileService};

/// Kubernetes connection settings of a daemon. Every field is what the
/// daemon's flag (or its environment default) gave; `None` = not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connection {
    /// `--kubernetes-service-host`
    pub host: Option<String>,
    /// `--kubernetes-service-port`
    pub port: Option<String>,
    /// `--service-token-file`: bearer token; surrounding whitespace (a
    /// trailing newline) is trimmed, as client-go does.
    pub token_file: Option<PathBuf>,
    /// `--service-cert-file`: PEM CA bundle of the API server.
    pub cert_file: Option<PathBuf>,
    /// `--kubeconfig` (used only without host and port).
    pub kubeconfig: Option<PathBuf>,
    /// `--kubernetes-qps`: sustained client-side request rate of each
    /// resource kind (as upstream's controller-runtime client); `None` = no
    /// limit.
    pub qps: Option<f64>,
    /// `--kubernetes-burst`: requests of one kind allowed at once above
    /// `qps` (default: `qps` rounded up).
    pub burst: Option<u32>,
}

/// A startup error. Its message names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("--kubernetes-service-host and --kubernetes-service-port must be given together (missing: {missing})")]
    HostOrPortMissing { missing: &'static str },
    #[error("--service-token-file not given (required with --kubernetes-service-host and --kubernetes-service-port)")]
    TokenFileNotGiven,
    #[error("--service-token-file {}: cannot read: {source}", path.display())]
    TokenFileUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--service-token-file {}: {why}", path.display())]
    TokenFileContent { path: PathBuf, why: String },
    #[error("--service-cert-file not given (required with --kubernetes-service-host and --kubernetes-service-port)")]
    CertFileNotGiven,
    #[error("--service-cert-file {}: not a valid PEM CA certificate: {why}", path.display())]
    CertFileInvalid { path: PathBuf, why: String },
    #[error("--kubeconfig {}: {why}", path.display())]
    Kubeconfig { path: PathBuf, why: String },
    #[error("no Kubernetes configuration (no --kubernetes-service-host/--kubernetes-service-port, no usable kubeconfig, not in a cluster): {0}")]
    Infer(String),
    #[error(
        "--kubernetes-service-host/--kubernetes-service-port: invalid API server URL {url}: {why}"
    )]
    Url { url: String, why: String },
    #[error("--kubernetes-qps/--kubernetes-burst: {0}")]
    RateLimit(String),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

fn given_str(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|s| !s.is_empty())
}

fn given_path(v: &Option<PathBuf>) -> bool {
    v.as_deref().is_some_and(|p| !p.as_os_str().is_empty())
}

impl Connection {
    /// Whether any Kubernetes setting is present (an empty value, as an
    /// empty environment variable gives, counts as absent).
    pub fn given(&self) -> bool {
        given_str(&self.host)
            || given_str(&self.port)
            || given_path(&self.token_file)
            || given_path(&self.cert_file)
            || given_path(&self.kubeconfig)
    }

    /// Explicit mode: host/port, or a token or cert file, given. Without
    /// any of them the kubeconfig / in-cluster configuration is used.
    fn explicit(&self) -> bool {
        given_str(&self.host)
            || given_str(&self.port)
            || given_path(&self.token_file)
            || given_path(&self.cert_file)
    }

    /// The startup checks, in the spec's order: host or port missing; token
    /// file not given; token file unreadable (or empty once trimmed, or
    /// holding whitespace inside); cert file not given; cert file not a
    /// valid PEM CA. Without host, port, token and
    /// cert: only that `--kubeconfig`, if given, is readable.
    pub fn check(&self) -> Result<(), ConnectError> {
        if let Some(r) = self.rate() {
            r?;
        }
        if !self.explicit() {
            if let Some(path) = self
                .kubeconfig
                .as_ref()
                .filter(|_| given_path(&self.kubeconfig))
            {
                std::fs::metadata(path)
                    .and_then(|_| std::fs::File::open(path).map(drop))
                    .map_err(|e| ConnectError::Kubeconfig {
                        path: path.clone(),
                        why: format!("cannot read: {e}"),
                    })?;
            }
            return Ok(());
        }
        match (given_str(&self.host), given_str(&self.port)) {
            (true, true) => {}
            (false, true) => {
                return Err(ConnectError::HostOrPortMissing {
                    missing: "--kubernetes-service-host",
                })
            }
            (true, false) => {
                return Err(ConnectError::HostOrPortMissing {
                    missing: "--kubernetes-service-port",
                })
            }
            (false, false) => {
                return Err(ConnectError::HostOrPortMissing {
                    missing: "--kubernetes-service-host and --kubernetes-service-port",
                })
            }
        }
        let token = self
            .token_file
            .as_ref()
            .filter(|_| given_path(&self.token_file))
            .ok_or(ConnectError::TokenFileNotGiven)?;
        check_token(token)?;
        let cert = self
            .cert_file
            .as_ref()
            .filter(|_| given_path(&self.cert_file))
            .ok_or(ConnectError::CertFileNotGiven)?;
        read_ca(cert)?;
        Ok(())
    }

    /// `https://HOST:PORT` (IPv6 literals bracketed).
    fn url(&self) -> String {
        let host = self.host.as_deref().unwrap_or("");
        let port = self.port.as_deref().unwrap_or("");
        if host.contains(':') && !host.starts_with('[') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        }
    }

    /// The `kube::Config` these settings describe (runs [`check`](Self::check)),
    /// without the explicit mode's token, which [`client`](Self::client) adds.
    async fn config(&self) -> Result<kube::Config, ConnectError> {
        self.check()?;
        if self.explicit() {
            let url = self.url();
            let uri: http::Uri =
                url.parse()
                    .map_err(|e: http::uri::InvalidUri| ConnectError::Url {
                        url: url.clone(),
                        why: e.to_string(),
                    })?;
            // No token here: `client` sets it from the file, trimmed and
            // re-read as it rotates (`token.rs`); kube's own `token_file`
            // would send a trailing newline as part of the token.
            let mut config = kube::Config::new(uri);
            let cert = self.cert_file.as_ref().expect("checked");
            config.root_cert = Some(read_ca(cert)?);
            return Ok(config);
        }
        if let Some(path) = self
            .kubeconfig
            .as_ref()
            .filter(|_| given_path(&self.kubeconfig))
        {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                ConnectError::Kubeconfig {
                    path: path.clone(),
                    why: e.to_string(),
                }
            })?;
            return kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| ConnectError::Kubeconfig {
                    path: path.clone(),
                    why: e.to_string(),
                });
        }
        // KUBECONFIG, ~/.kube/config, then the in-cluster service account.
        kube::Config::infer()
            .await
            .map_err(|e| ConnectError::Infer(e.to_string()))
    }

    /// A client for these settings, with the client-side rate limit when
    /// `qps` is set. Every clone of the returned client shares one limit.
    pub async fn client(&self) -> Result<kube::Client, ConnectError> {
        self.client_observed(None).await
    }

    /// [`client`](Self::client), telling `observer` (when given) of every
    /// request and of every wait on the rate limit.
    pub async fn client_observed(
        &self,
        observer: Option<Arc<dyn Observer>>,
    ) -> Result<kube::Client, ConnectError> {
        let config = self.config().await?;
        let builder =
            kube::client::ClientBuilder::try_from(config).map_err(ConnectError::Client)?;
        let token = self
            .token_file
            .as_ref()
            .filter(|_| self.explicit())
            .map(|p| TokenFileLayer::new(absolute(p)));
        let builder = builder.with_layer(&tower::util::option_layer(token));
        // Under the rate limit: a request counts when it is sent.
        let observe = observer.clone().map(ObserveLayer::new);
        let builder = builder.with_layer(&tower::util::option_layer(observe));
        Ok(match self.rate() {
            Some(r) => {
                let (qps, burst) = r?;
                builder
                    .with_layer(&RateLimitLayer::new(qps, burst).observed(observer))
                    .build()
            }
            None => builder.build(),
        })
    }

    /// `(qps, burst)` when a limit is configured.
    fn rate(&self) -> Option<Result<(f64, u32), ConnectError>> {
        let qps = self.qps?;
        if !(qps.is_finite() && qps > 0.0) {
            return Some(Err(ConnectError::RateLimit(format!(
                "qps must be a positive number, not {qps}"
            ))));
        }
        let burst = self.burst.unwrap_or(qps.ceil() as u32);
        if burst == 0 {
            return Some(Err(ConnectError::RateLimit(
                "burst must be at least 1".into(),
            )));
        }
        Some(Ok((qps, burst)))
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn check_token(path: &Path) -> Result<(), ConnectError> {
    let bytes = std::fs::read(path).map_err(|source| ConnectError::TokenFileUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    token::parse_token(&bytes).map_err(|why| ConnectError::TokenFileContent {
        path: path.to_path_buf(),
        why: why.to_string(),
    })?;
    Ok(())
}

/// The DER certificates of a PEM CA bundle; each must parse as a trust
/// anchor (what the TLS verifier will do with it later).
fn read_ca(path: &Path) -> Result<Vec<Vec<u8>>, ConnectError> {
    let invalid = |why: String| ConnectError::CertFileInvalid {
        path: path.to_path_buf(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
    let mut ders = Vec::new();
    for item in CertificateDer::pem_slice_iter(&pem) {
        let der = item.map_err(|e| invalid(format!("bad PEM: {e}")))?;
        ders.push(der);
    }
    if ders.is_empty() {
        return Err(invalid("no CERTIFICATE block found".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for der in &ders {
        roots
            .add(der.clone())
            .map_err(|e| invalid(format!("certificate does not parse: {e}")))?;
    }
    Ok(ders.into_iter().map(|d| d.to_vec()).collect())
}

/// This node's name: the flag (or `NODE_NAME`, which the daemon's clap
/// puts in the flag) when non-empty, else the host name cut at the first
/// `.`.
pub fn node_name(flag: Option<String>) -> String {
    if let Some(n) = flag.filter(|n| !n.is_empty()) {
        return n;
    }
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.is_empty() {
            return n;
        }
    }
    host_name()
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    name.split('.').next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_ignores_empty_values() {
        assert!(!Connection::default().given());
        let c = Connection {
            host: Some(String::new()),
            ..Default::default()
        };
        assert!(!c.given());
        let c = Connection {
            kubeconfig: Some("/x".into()),
            ..Default::default()
        };
        assert!(c.given());
    }

    #[test]
    fn url_brackets_ipv6() {
        let c = Connection {
            host: Some("::1".into()),
            port: Some("6443".into()),
            ..Default::default()
        };
        assert_eq!(c.url(), "https://[::1]:6443");
    }

    #[test]
    fn node_name_flag_wins() {
        assert_eq!(node_name(Some("n1".into())), "n1");
        assert!(!node_name(None).contains('.'));
    }
}
