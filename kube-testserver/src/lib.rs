//! An in-process Kubernetes API server for the end-to-end tests of the NNF
//! compute daemons.
//!
//! It serves the custom resources of `api/crds` over HTTPS on a random
//! loopback port with the semantics the daemons depend on (schema pruning,
//! defaulting and validation, RBAC from `api/rbac`, resourceVersion
//! conflicts, the status subresource, finalizers, watches with bookmarks and
//! `410 Gone`), so a daemon connects exactly as in production:
//!
//! ```text
//! --kubernetes-service-host 127.0.0.1 --kubernetes-service-port <port>
//! --service-token-file <token_file(account)> --service-cert-file <ca_file()>
//! ```
//!
//! Test hooks seed and observe objects directly, and inject faults (server
//! down, latency, error storms, expired watches).
//!
//! The API is deliberately narrow (start, connection facts, object hooks,
//! faults) so that a later envtest mode can back the non-fault parts with a
//! real kube-apiserver.

mod config;
mod crd;
mod http;
mod patch;
mod pki;
mod rbac;
mod schema;
mod selector;
mod store;
mod util;

pub use config::{AccountSpec, Config};
pub use util::ApiError;

use pki::make_pki;
use rbac::Account;
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use store::{Broadcast, FailRule, Faults, Shared, Store};

/// Handle of the cluster administrator (group `system:masters`).
pub const ADMIN: &str = "admin";
/// Handle of nnf-dm's service account `nnf-dm-system/nnf-dm-daemon`.
pub const NNF_DM: &str = "nnf-dm-daemon";
/// Handle of clientmountd's service account `nnf-system/nnf-clientmount`.
pub const CLIENTMOUNT: &str = "nnf-clientmount";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// A change seen from the test side (every write, whoever made it).
#[derive(Debug, Clone)]
pub struct Change {
    pub event_type: EventType,
    pub kind: String,
    /// "" for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
    /// The object after the change (its last state for `Deleted`), in the
    /// storage version.
    pub object: Value,
}

/// One HTTP request as the server saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// When the request arrived (before any injected latency).
    pub at: Instant,
    pub time: SystemTime,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Account handle, `None` when unauthenticated.
    pub account: Option<String>,
    /// RBAC verb (`get`, `list`, `watch`, `create`, ...) for resource requests.
    pub verb: Option<String>,
    /// Plural, with `/status` for the subresource.
    pub resource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// HTTP status of the response (200 for a watch that started).
    pub status: u16,
}

/// The running server. Dropping it stops the server and removes its files.
pub struct TestServer {
    shared: Arc<Shared>,
    port: u16,
    dir: tempfile::TempDir,
    ca_pem: String,
    ca_der: Vec<u8>,
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TestServer {
    /// Starts a server; panics with the reason if it cannot (a test fixture).
    pub fn start(config: Config) -> TestServer {
        Self::try_start(config).unwrap_or_else(|e| panic!("kube-testserver: {e}"))
    }

    pub fn try_start(config: Config) -> Result<TestServer, String> {
        let registry = crd::Registry::load_dir(&config.api_dir.join("crds"))?;
        let dir = tempfile::Builder::new()
            .prefix("kube-testserver-")
            .tempdir()
            .map_err(|e| format!("creating temp dir: {e}"))?;
        let mut accounts = Vec::new();
        for a in &config.accounts {
            let rules = match &a.cluster_role {
                Some(p) => Some(rbac::load_cluster_role(p)?),
                None => None,
            };
            let token = util::random_hex(24);
            // No trailing newline: kube-rs does not trim token files.
            std::fs::write(dir.path().join(format!("{}.token", a.id)), &token)
                .map_err(|e| format!("writing token file: {e}"))?;
            accounts.push(Account {
                id: a.id.clone(),
                user: a.user.clone(),
                token,
                rules,
            });
        }
        let pki = make_pki().map_err(|e| format!("generating certificates: {e}"))?;
        std::fs::write(dir.path().join("ca.crt"), &pki.ca_pem)
            .map_err(|e| format!("writing CA file: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_single_cert(pki.cert_chain, pki.key)
            .map_err(|e| format!("TLS setup: {e}"))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let std_listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .map_err(|e| format!("binding 127.0.0.1: {e}"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener: {e}"))?;
        let port = std_listener
            .local_addr()
            .map_err(|e| format!("listener: {e}"))?
            .port();

        let n_res = registry.resources.len();
        let (events, _) = tokio::sync::broadcast::channel(8192);
        let (down, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            registry,
            accounts,
            store: Mutex::new(Store {
                rv: 1,
                objects: vec![Default::default(); n_res],
                history: VecDeque::new(),
                history_limit: config.history_limit.max(1),
                compacted: 0,
                subscribers: Vec::new(),
            }),
            changed: Condvar::new(),
            events,
            faults: Mutex::new(Faults::default()),
            down,
            log: Mutex::new(Vec::new()),
            bookmark_interval: config.bookmark_interval,
        });
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let srv_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kube-testserver-{port}"))
            .spawn(move || {
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => http::serve(l, acceptor, srv_shared, shutdown_rx).await,
                        Err(e) => eprintln!("kube-testserver: listener: {e}"),
                    }
                });
            })
            .map_err(|e| format!("spawning server thread: {e}"))?;
        Ok(TestServer {
            shared,
            port,
            dir,
            ca_pem: pki.ca_pem,
            ca_der: pki.ca_der,
            shutdown,
            thread: Some(thread),
        })
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// PEM file of the CA that signed the serving certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER (what `kube::Config::root_cert` takes).
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// File holding the account's bearer token (no trailing newline).
    /// Panics on an unknown account handle.
    pub fn token_file(&self, account: &str) -> PathBuf {
        self.account(account);
        self.dir.path().join(format!("{account}.token"))
    }

    pub fn token(&self, account: &str) -> String {
        self.account(account).token.clone()
    }

    /// The user name RBAC sees for an account handle.
    pub fn user(&self, account: &str) -> String {
        self.account(account).user.clone()
    }

    fn account(&self, id: &str) -> &Account {
        self.shared
            .accounts
            .iter()
            .find(|a| a.id == id)
            .unwrap_or_else(|| panic!("kube-testserver: no account {id:?}"))
    }

    fn res_id(&self, kind: &str) -> usize {
        self.shared
            .res_id_by_name(kind)
            .unwrap_or_else(|| panic!("kube-testserver: no resource {kind:?}"))
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_store().rv
    }

    /// Creates or replaces an object as given, status included, bypassing
    /// RBAC but not the schema (unknown fields are an error here, so a test
    /// cannot seed something the real server would silently change).
    /// `metadata.namespace` defaults to `default`. Panics if rejected.
    pub fn put_object(&self, obj: Value) -> Value {
        self.try_put_object(obj)
            .unwrap_or_else(|e| panic!("kube-testserver: put_object: {e}"))
    }

    pub fn try_put_object(&self, obj: Value) -> Result<Value, ApiError> {
        self.shared.put_whole(obj)
    }

    /// `kind`: Kind, plural, singular or `<plural>.<group>`; `namespace` ""
    /// for cluster-scoped kinds. Storage version.
    pub fn get_object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let id = self.res_id(kind);
        self.shared.lock_store().objects[id]
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// All objects of a kind, in one namespace or all (`None`).
    pub fn objects(&self, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let id = self.res_id(kind);
        self.shared.lock_store().objects[id]
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Read-modify-write of a whole object (status included) as one
    /// update; finalizer semantics apply (removing the last finalizer of a
    /// deleting object deletes it). `None` if the object does not exist.
    pub fn modify_object(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Result<Value, ApiError>> {
        let id = self.res_id(kind);
        let def = self.shared.res(id).clone();
        let mut obj = self.get_object(kind, namespace, name)?;
        let rv = obj["metadata"]["resourceVersion"].clone();
        f(&mut obj);
        // Pinned to the version read: a concurrent writer makes this a 409
        // rather than a silent lost update.
        obj["metadata"]["resourceVersion"] = rv;
        let opts = store::WriteOpts {
            field_validation: store::FieldValidation::Strict,
            dry_run: false,
        };
        Some(
            self.shared
                .update(
                    id,
                    &def.storage_version,
                    namespace,
                    name,
                    obj,
                    store::Mode::Whole,
                    &opts,
                    true,
                )
                .map(|w| w.obj),
        )
    }

    /// Deletes as a client would (finalizers honoured). Returns what the API
    /// returns: the object while finalizers hold it, else a Status.
    pub fn delete_object(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let id = self.res_id(kind);
        let v = self.shared.res(id).storage_version.clone();
        self.shared.delete(id, &v, namespace, name, &Value::Null)
    }

    /// Blocks until an object of `kind` (in `namespace`, or any) satisfies
    /// `pred`, or the timeout passes.
    pub fn wait_for(
        &self,
        kind: &str,
        namespace: Option<&str>,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let id = self.res_id(kind);
        self.wait_store(timeout, |st| {
            st.objects[id]
                .iter()
                .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
                .map(|(_, o)| o)
                .find(|o| pred(o))
                .cloned()
        })
    }

    /// Blocks until no object of `kind` named `name` exists in `namespace`.
    pub fn wait_gone(&self, kind: &str, namespace: &str, name: &str, timeout: Duration) -> bool {
        let id = self.res_id(kind);
        let key = (namespace.to_string(), name.to_string());
        self.wait_store(timeout, |st| {
            (!st.objects[id].contains_key(&key)).then_some(())
        })
        .is_some()
    }

    /// Checks the store after every change until `check` finds something,
    /// or the timeout passes.
    fn wait_store<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Store) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock_store();
        loop {
            if let Some(found) = check(&st) {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Every later change of `kind`, in order.
    pub fn subscribe(&self, kind: &str) -> mpsc::Receiver<Change> {
        let id = self.res_id(kind);
        let (tx, rx) = mpsc::channel();
        self.shared.lock_store().subscribers.push((id, tx));
        rx
    }

    /// Calls `f` for every later change of `kind`, on a thread of its own
    /// (so `f` may call back into the server, e.g. to move a status on like
    /// a Rabbit would). The thread ends with the server.
    pub fn on_change(&self, kind: &str, mut f: impl FnMut(Change) + Send + 'static) {
        let rx = self.subscribe(kind);
        std::thread::spawn(move || {
            while let Ok(c) = rx.recv() {
                f(c);
            }
        });
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Requests so far (since the last [`clear_requests`](Self::clear_requests)),
    /// counted by `(verb, resource)`, e.g. `("list", "clientmounts")`; a
    /// request that never reached a resource counts as `("", path)`.
    pub fn request_counts(&self) -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        for r in lock(&self.shared.log).iter() {
            let key = match (&r.verb, &r.resource) {
                (Some(v), Some(res)) => (v.clone(), res.clone()),
                _ => (String::new(), r.path.clone()),
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }

    /// How many requests of `verb` on `resource` (plural, `x/status` for
    /// the subresource) arrived since the last `clear_requests`.
    pub fn request_count(&self, verb: &str, resource: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.verb.as_deref() == Some(verb) && r.resource.as_deref() == Some(resource))
            .count()
    }

    /// The next `n` creates that give `generateName` (and no name) are
    /// answered as the real server answers when it could not find a free
    /// name: 409 AlreadyExists, "the server was not able to generate a
    /// unique name for the object".
    pub fn collide_next_generated_names(&self, n: usize) {
        lock(&self.shared.faults).name_collisions += n;
    }

    /// Down: open connections (watches included) are closed and new ones are
    /// closed at accept, until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// Delay before every request is handled.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.faults).latency = latency;
    }

    /// Delay before every create (POST) is handled, on top of
    /// [`set_latency`](Self::set_latency)'s: a create in flight while
    /// reads answer at once.
    pub fn set_create_latency(&self, latency: Duration) {
        lock(&self.shared.faults).create_latency = latency;
    }

    /// Creates now held by [`set_create_latency`](Self::set_create_latency).
    pub fn creates_waiting(&self) -> usize {
        lock(&self.shared.faults).creates_waiting
    }

    /// The next `n` requests (any verb but watch) fail with `status` and the
    /// Status the real server sends with that code.
    pub fn fail_next_with(&self, status: u16, n: usize) {
        self.fail_next_matching(None, None, status, n);
    }

    /// Like [`fail_next_with`](Self::fail_next_with), limited to one RBAC
    /// verb (`update`, `patch`, `create`, `watch`, ...) and/or resource
    /// (`nnfdatamovements`, `clientmounts/status`, ...).
    pub fn fail_next_matching(
        &self,
        verb: Option<&str>,
        resource: Option<&str>,
        status: u16,
        n: usize,
    ) {
        lock(&self.shared.faults).fails.push(FailRule {
            verb: verb.map(str::to_string),
            resource: resource.map(str::to_string),
            status,
            remaining: n,
        });
    }

    /// Ends every open watch with a `410 Gone` ERROR event and forgets the
    /// event history, so resuming from any earlier resourceVersion is 410
    /// too (what an etcd compaction does).
    pub fn expire_watches(&self) {
        let mut st = self.shared.lock_store();
        st.history.clear();
        st.compacted = st.rv;
        let _ = self.shared.events.send(Broadcast::Expire);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shared.down.send_replace(true);
        self.shutdown.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
