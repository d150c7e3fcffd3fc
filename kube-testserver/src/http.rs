//! HTTPS front end: connections, authentication, routing, discovery, and
//! watch streams.

use crate::rbac::{Account, Attributes};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    at_version, Broadcast, FieldValidation, ListQuery, Mode, PatchKind, ResId, Shared, StoredEvent,
    WriteOpts,
};
use crate::util::ApiError;
use crate::{EventType, RequestRecord};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_rustls::TlsAcceptor;

/// Response body: a whole JSON document, or a watch stream fed by a task.
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
        if *shared.down.borrow() {
            // "Down": the port stays ours (nobody else can take it), but
            // every connection is closed before the TLS handshake.
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut down = shared.down.subscribe();
            let conn = async {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(shared, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            };
            // Going down drops the connection, open watches included.
            tokio::select! {
                _ = conn => {}
                _ = down.wait_for(|d| *d) => {}
            }
        });
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(Bytes::from(
        serde_json::to_vec(v).expect("JSON values serialise"),
    ))));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1" | "true" | "True"))
    }
}

fn authenticate<'a>(shared: &'a Shared, req: &Request<Incoming>) -> Option<&'a Account> {
    let h = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let token = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))?;
    shared.accounts.iter().find(|a| a.token == token)
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    const LIMIT: usize = 3 * 1024 * 1024;
    let mut body = body;
    let mut out = Vec::new();
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(e)) => return Err(ApiError::bad_request(format!("reading body: {e}"))),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                    if out.len() > LIMIT {
                        return Err(ApiError::new(
                            413,
                            "RequestEntityTooLarge",
                            "Request entity too large: limit is 3145728",
                        ));
                    }
                }
            }
        }
    }
    Ok(Bytes::from(out))
}

fn parse_json(b: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(b).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

/// What a resource URL addresses.
struct Target {
    res: ResId,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    watch_path: bool,
}

enum Route {
    Discovery(Value),
    Resource(Target),
    NotFound,
}

fn route(shared: &Shared, path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Route::Discovery(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-testserver",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
            "platform": "linux/amd64"
        })),
        ["healthz"] | ["livez"] | ["readyz"] => Route::Discovery(json!("ok")),
        ["api"] => Route::Discovery(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]
        })),
        ["api", "v1"] => Route::Discovery(json!({
            "kind": "APIResourceList", "groupVersion": "v1", "resources": []
        })),
        ["apis"] => {
            let groups: Vec<Value> = shared
                .registry
                .groups()
                .into_iter()
                .map(|(g, vs)| group_json(&g, &vs))
                .collect();
            Route::Discovery(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", g] => match shared.registry.groups().into_iter().find(|(x, _)| x == g) {
            Some((g, vs)) => {
                let mut v = group_json(&g, &vs);
                v["kind"] = json!("APIGroup");
                v["apiVersion"] = json!("v1");
                Route::Discovery(v)
            }
            None => Route::NotFound,
        },
        ["apis", g, v] => {
            let mut resources = Vec::new();
            for r in &shared.registry.resources {
                let Some(ver) = r.version(v).filter(|_| r.group == *g) else {
                    continue;
                };
                resources.push(json!({
                    "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"],
                    "shortNames": r.short_names,
                    "storageVersionHash": "",
                }));
                if ver.status_subresource {
                    resources.push(json!({
                        "name": format!("{}/status", r.plural), "singularName": "",
                        "namespaced": r.namespaced, "kind": r.kind,
                        "verbs": ["get", "patch", "update"],
                    }));
                }
            }
            if resources.is_empty() {
                return Route::NotFound;
            }
            Route::Discovery(json!({
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": format!("{g}/{v}"), "resources": resources
            }))
        }
        ["apis", g, v, rest @ ..] => {
            let (watch_path, rest) = match rest {
                ["watch", r @ ..] => (true, r),
                r => (false, r),
            };
            let (namespace, rest) = match rest {
                ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(ns.to_string()), r),
                r => (None, r),
            };
            let (plural, name, sub) = match rest {
                [p] => (*p, None, None),
                [p, n] => (*p, Some(n.to_string()), None),
                [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
                _ => return Route::NotFound,
            };
            let Some(res) = shared.res_id(g, v, plural) else {
                return Route::NotFound;
            };
            let def = shared.res(res);
            // A namespaced kind has no cluster-scoped items, and the reverse.
            if (def.namespaced && namespace.is_none() && name.is_some())
                || (!def.namespaced && namespace.is_some())
            {
                return Route::NotFound;
            }
            Route::Resource(Target {
                res,
                version: v.to_string(),
                namespace,
                name,
                subresource: sub,
                watch_path,
            })
        }
        _ => Route::NotFound,
    }
}

fn group_json(g: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": g, "versions": vs, "preferredVersion": vs[0]})
}

fn verb_for(method: &Method, t: &Target, q: &Query) -> &'static str {
    match *method {
        Method::GET if t.watch_path || q.flag("watch") => "watch",
        Method::GET if t.name.is_some() => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if t.name.is_some() => "delete",
        Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

fn take_fault(shared: &Shared, verb: &str, resource: &str) -> Option<u16> {
    let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
    let rule = f.fails.iter_mut().find(|r| {
        r.remaining > 0
            && match &r.verb {
                Some(v) => v == verb,
                // An unqualified storm spares watches: their failures are
                // what expire_watches() and set_down() are for.
                None => verb != "watch",
            }
            && r.resource.as_ref().is_none_or(|x| x == resource)
    })?;
    rule.remaining -= 1;
    let code = rule.status;
    f.fails.retain(|r| r.remaining > 0);
    Some(code)
}

fn take_name_collision(shared: &Shared) -> bool {
    let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
    if f.name_collisions == 0 {
        return false;
    }
    f.name_collisions -= 1;
    true
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let time = SystemTime::now();
    let (latency, create_latency) = {
        let mut faults = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        let create = if req.method() == Method::POST {
            faults.create_latency
        } else {
            Duration::ZERO
        };
        if !create.is_zero() {
            faults.creates_waiting += 1;
        }
        (faults.latency, create)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if !create_latency.is_zero() {
        tokio::time::sleep(create_latency).await;
        let mut faults = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.creates_waiting -= 1;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let full_path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let account = authenticate(&shared, &req).map(|a| a.id.clone());
    let mut record = RequestRecord {
        at: started,
        time,
        method: method.to_string(),
        path: full_path,
        account: account.clone(),
        verb: None,
        resource: None,
        namespace: None,
        name: None,
        status: 0,
    };
    let resp = dispatch(&shared, req, &mut record).await;
    record.status = resp.status().as_u16();
    shared
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(record);
    resp
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    rec: &mut RequestRecord,
) -> Response<Body> {
    let Some(account) = authenticate(shared, &req).cloned() else {
        return error_response(&ApiError::unauthorized());
    };
    let q = Query::parse(req.uri().query());
    let t = match route(shared, req.uri().path()) {
        Route::Discovery(v) => {
            if req.method() != Method::GET {
                return error_response(&ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ));
            }
            return json_response(200, &v);
        }
        Route::NotFound => return error_response(&ApiError::plain_not_found()),
        Route::Resource(t) => t,
    };
    let verb = verb_for(req.method(), &t, &q);
    let def = shared.res(t.res);
    rec.verb = Some(verb.to_string());
    rec.resource = Some(match &t.subresource {
        Some(s) => format!("{}/{s}", def.plural),
        None => def.plural.clone(),
    });
    rec.namespace = t.namespace.clone();
    rec.name = t.name.clone();
    if verb == "unknown" {
        return error_response(&ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    if let Err(e) = account.authorize(&Attributes {
        verb,
        group: &def.group,
        resource: &def.plural,
        subresource: t.subresource.as_deref(),
        namespace: t.namespace.as_deref(),
        name: t.name.as_deref(),
    }) {
        return error_response(&e);
    }
    if let Some(code) = take_fault(shared, verb, rec.resource.as_deref().unwrap_or("")) {
        return error_response(&ApiError::injected(code));
    }
    let ver = def.version(&t.version).expect("routed to a served version");
    let mode = match t.subresource.as_deref() {
        None => Mode::Main,
        Some("status") if ver.status_subresource => Mode::Status,
        Some(_) => return error_response(&ApiError::plain_not_found()),
    };
    if mode == Mode::Status && !matches!(verb, "get" | "update" | "patch") {
        return error_response(&ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let ns = t.namespace.clone().unwrap_or_default();
    let opts = WriteOpts {
        field_validation: match q.get("fieldValidation") {
            Some("Strict") => FieldValidation::Strict,
            Some("Ignore") => FieldValidation::Ignore,
            _ => FieldValidation::Warn,
        },
        dry_run: q.get("dryRun") == Some("All"),
    };
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let body = if matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    ) {
        match read_body(req.into_body()).await {
            Ok(b) => b,
            Err(e) => return error_response(&e),
        }
    } else {
        Bytes::new()
    };
    let name = t.name.clone().unwrap_or_default();
    let written = |r: Result<crate::store::Written, ApiError>| match r {
        Ok(w) => {
            let mut resp = json_response(if w.created { 201 } else { 200 }, &w.obj);
            for warn in &w.warnings {
                let v = format!("299 - {}", serde_json::to_string(warn).unwrap_or_default());
                if let Ok(h) = HeaderValue::from_str(&v) {
                    resp.headers_mut().append("Warning", h);
                }
            }
            resp
        }
        Err(e) => error_response(&e),
    };
    match verb {
        "get" => match shared.get(t.res, &t.version, &ns, &name) {
            Ok(v) => json_response(200, &v),
            Err(e) => error_response(&e),
        },
        "list" => {
            let labels = match LabelSelector::parse(q.get("labelSelector").unwrap_or("")) {
                Ok(l) => l,
                Err(e) => return error_response(&ApiError::bad_request(e)),
            };
            let fields = match FieldSelector::parse(q.get("fieldSelector").unwrap_or("")) {
                Ok(f) => f,
                Err(e) => return error_response(&ApiError::bad_request(e)),
            };
            let lq = ListQuery {
                namespace: t.namespace.as_deref(),
                labels,
                fields,
                limit: q.get("limit").and_then(|l| l.parse().ok()),
                continue_token: q.get("continue").filter(|c| !c.is_empty()),
            };
            match shared.list(t.res, &t.version, &lq) {
                Ok(v) => json_response(200, &v),
                Err(e) => error_response(&e),
            }
        }
        "watch" => watch(shared, &t, &q),
        "create" => {
            if t.name.is_some() {
                return error_response(&ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ));
            }
            let obj = match parse_json(&body) {
                Ok(v) => v,
                Err(e) => return error_response(&e),
            };
            if let Some(prefix) = obj["metadata"]["generateName"].as_str() {
                if obj["metadata"]["name"].as_str().is_none_or(str::is_empty)
                    && take_name_collision(shared)
                {
                    let name = format!("{prefix}{}", crate::util::generate_name_suffix());
                    return error_response(&ApiError::generate_name_conflict(
                        &def.group,
                        &def.plural,
                        &name,
                    ));
                }
            }
            written(shared.create(t.res, &t.version, &ns, obj, &opts, Mode::Main))
        }
        "update" => {
            let obj = match parse_json(&body) {
                Ok(v) => v,
                Err(e) => return error_response(&e),
            };
            written(shared.update(t.res, &t.version, &ns, &name, obj, mode, &opts, true))
        }
        "patch" => {
            let kind = match content_type.as_str() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json,
                other => {
                    // Custom resources have no Go struct to drive a strategic
                    // merge, so the real server refuses it, as it does
                    // server-side apply here (not implemented).
                    return error_response(&ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
                    ));
                }
            };
            let patch = match parse_json(&body) {
                Ok(v) => v,
                Err(e) => return error_response(&e),
            };
            written(shared.patch(t.res, &t.version, &ns, &name, kind, &patch, mode, &opts))
        }
        "delete" => {
            let options = if body.is_empty() {
                Value::Null
            } else {
                match parse_json(&body) {
                    Ok(v) => v,
                    Err(e) => return error_response(&e),
                }
            };
            match shared.delete(t.res, &t.version, &ns, &name, &options) {
                Ok(v) => json_response(200, &v),
                Err(e) => error_response(&e),
            }
        }
        "deletecollection" => {
            let labels = match LabelSelector::parse(q.get("labelSelector").unwrap_or("")) {
                Ok(l) => l,
                Err(e) => return error_response(&ApiError::bad_request(e)),
            };
            let lq = ListQuery {
                namespace: t.namespace.as_deref(),
                labels,
                fields: FieldSelector::default(),
                limit: None,
                continue_token: None,
            };
            let list = match shared.list(t.res, &t.version, &lq) {
                Ok(l) => l,
                Err(e) => return error_response(&e),
            };
            for item in list["items"].as_array().into_iter().flatten() {
                let n = item["metadata"]["name"].as_str().unwrap_or("");
                let ins = item["metadata"]["namespace"].as_str().unwrap_or("");
                let _ = shared.delete(t.res, &t.version, ins, n, &Value::Null);
            }
            json_response(200, &list)
        }
        _ => error_response(&ApiError::plain_not_found()),
    }
}

fn event_line(etype: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": etype, "object": obj})).expect("serialise");
    v.push(b'\n');
    Bytes::from(v)
}

struct WatchFilter {
    res: ResId,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn selects(&self, o: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
            && self.labels.matches(&o["metadata"]["labels"])
            && self.fields.matches(o)
    }

    /// The event a watch with this filter sees for a change, if any: an
    /// object entering the selection is ADDED, one leaving it DELETED.
    fn map<'a>(&self, ev: &'a StoredEvent) -> Option<(&'static str, &'a Value)> {
        if ev.res != self.res {
            return None;
        }
        let now = self.selects(&ev.obj);
        match ev.etype {
            EventType::Added => now.then_some(("ADDED", &*ev.obj)),
            EventType::Deleted => now.then_some(("DELETED", &*ev.obj)),
            EventType::Modified => {
                let before = ev.prev.as_deref().is_some_and(|p| self.selects(p));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", &*ev.obj)),
                    (false, true) => Some(("ADDED", &*ev.obj)),
                    (true, false) => Some(("DELETED", &*ev.obj)),
                    (false, false) => None,
                }
            }
        }
    }
}

fn gone_line(requested: u64, oldest: u64) -> Bytes {
    let e = ApiError::gone(format!("too old resource version: {requested} ({oldest})"));
    event_line("ERROR", &e.status)
}

fn watch(shared: &Arc<Shared>, t: &Target, q: &Query) -> Response<Body> {
    let def = shared.res(t.res).clone();
    let labels = match LabelSelector::parse(q.get("labelSelector").unwrap_or("")) {
        Ok(l) => l,
        Err(e) => return error_response(&ApiError::bad_request(e)),
    };
    let mut fields = match FieldSelector::parse(q.get("fieldSelector").unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return error_response(&ApiError::bad_request(e)),
    };
    if let Some(n) = &t.name {
        fields = match FieldSelector::parse(&format!("metadata.name={n}")) {
            Ok(f) => f,
            Err(e) => return error_response(&ApiError::bad_request(e)),
        };
    }
    let from = match q
        .get("resourceVersion")
        .filter(|s| !s.is_empty() && *s != "0")
    {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version: {s}"
                )))
            }
        },
    };
    let bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.flag("sendInitialEvents");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let filter = WatchFilter {
        res: t.res,
        namespace: t.namespace.clone(),
        labels,
        fields,
    };
    let version = t.version.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut initial: Vec<Bytes> = Vec::new();
    let (mut sub, mut last_rv) = {
        let st = shared.lock_store();
        match from {
            Some(rv) if rv < st.compacted => {
                initial.push(gone_line(rv, st.compacted + 1));
                drop(st);
                let mut r = json_response(200, &Value::Null);
                *r.body_mut() = Body::Stream(rx);
                tokio::spawn(async move {
                    for b in initial {
                        let _ = tx.send(b).await;
                    }
                });
                return r;
            }
            Some(rv) => {
                for ev in st.history.iter().filter(|e| e.rv > rv) {
                    if let Some((ty, o)) = filter.map(ev) {
                        initial.push(event_line(ty, &at_version(&def, &version, o.clone())));
                    }
                }
            }
            None => {
                let objs = st.objects[t.res].values().filter(|o| filter.selects(o));
                for o in objs {
                    initial.push(event_line("ADDED", &at_version(&def, &version, o.clone())));
                }
                if send_initial && bookmarks {
                    initial.push(event_line(
                        "BOOKMARK",
                        &json!({
                            "kind": def.kind,
                            "apiVersion": format!("{}/{}", def.group, version),
                            "metadata": {
                                "resourceVersion": st.rv.to_string(),
                                "annotations": {"k8s.io/initial-events-end": "true"}
                            }
                        }),
                    ));
                }
            }
        }
        (shared.events.subscribe(), st.rv)
    };
    let interval = shared.bookmark_interval;
    tokio::spawn(async move {
        let bookmark = |rv: u64| {
            event_line(
                "BOOKMARK",
                &json!({
                    "kind": def.kind,
                    "apiVersion": format!("{}/{}", def.group, version),
                    "metadata": {"resourceVersion": rv.to_string()}
                }),
            )
        };
        for b in initial {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(1800));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let line = tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(bookmark(last_rv)).await;
                    }
                    return;
                }
                _ = tick.tick(), if bookmarks => bookmark(last_rv),
                msg = sub.recv() => match msg {
                    Ok(Broadcast::Event(ev)) => {
                        last_rv = ev.rv;
                        match filter.map(&ev) {
                            Some((ty, o)) => event_line(ty, &at_version(&def, &version, o.clone())),
                            None => continue,
                        }
                    }
                    Ok(Broadcast::Expire) => {
                        let _ = tx.send(gone_line(last_rv, last_rv + 1)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow a reader: the real watch cache drops it
                        // the same way, and the client re-lists.
                        let _ = tx.send(gone_line(last_rv, last_rv + 1)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let mut r = json_response(200, &Value::Null);
    *r.body_mut() = Body::Stream(rx);
    r
}
