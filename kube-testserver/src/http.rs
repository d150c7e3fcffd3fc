//! HTTPS front end: connections, authentication, routing, discovery, and
//! watch streams.

mod route;
mod watch;

use route::{route, Route, Target};

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
        "watch" => watch::watch(shared, &t, &q),
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
