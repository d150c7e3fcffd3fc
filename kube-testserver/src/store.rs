//! Object storage and the API semantics of custom resources: create, get,
//! list, update, patch, the status subresource, delete with finalizers, and
//! the event history watches replay from.

use crate::crd::{Registry, ResourceDef, VersionDef};
use crate::patch::{json_patch, merge_patch, PatchError};
use crate::rbac::Account;
use crate::schema::{self, Cause};
use crate::selector::{FieldSelector, LabelSelector};
use crate::util::{generate_name_suffix, new_uid, now_rfc3339, ApiError};
use crate::{Change, EventType, RequestRecord};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;

mod meta;
mod write;

use meta::{finalizers, invalid, validate_meta};

pub(crate) type ResId = usize;

#[derive(Debug)]
pub(crate) struct StoredEvent {
    pub rv: u64,
    pub res: ResId,
    pub etype: EventType,
    /// Object after the change (the last state for DELETED), storage version.
    pub obj: Arc<Value>,
    /// Object before the change: a label-selected watch turns a MODIFIED
    /// into ADDED or DELETED when the object enters or leaves the selection.
    pub prev: Option<Arc<Value>>,
}

#[derive(Debug, Clone)]
pub(crate) enum Broadcast {
    Event(Arc<StoredEvent>),
    /// `expire_watches()`: every open watch ends with 410 Gone.
    Expire,
}

pub(crate) struct Store {
    pub rv: u64,
    /// Per resource, keyed by (namespace, name); namespace "" when cluster-scoped.
    pub objects: Vec<BTreeMap<(String, String), Value>>,
    pub history: VecDeque<Arc<StoredEvent>>,
    pub history_limit: usize,
    /// Every event with `rv <= compacted` has left the history.
    pub compacted: u64,
    pub subscribers: Vec<(ResId, mpsc::Sender<Change>)>,
}

#[derive(Debug, Clone)]
pub(crate) struct FailRule {
    pub verb: Option<String>,
    pub resource: Option<String>,
    pub status: u16,
    pub remaining: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub latency: Duration,
    /// Added delay of every POST (create).
    pub create_latency: Duration,
    /// POSTs now waiting out `create_latency`.
    pub creates_waiting: usize,
    pub fails: Vec<FailRule>,
    /// Creates with `generateName` still to answer as a name collision.
    pub name_collisions: usize,
}

pub(crate) struct Shared {
    pub registry: Registry,
    pub accounts: Vec<Account>,
    pub store: Mutex<Store>,
    pub changed: Condvar,
    pub events: broadcast::Sender<Broadcast>,
    pub faults: Mutex<Faults>,
    pub down: tokio::sync::watch::Sender<bool>,
    pub log: Mutex<Vec<RequestRecord>>,
    pub bookmark_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct WriteOpts {
    pub field_validation: FieldValidation,
    pub dry_run: bool,
}

/// The successful result of a write: the object (request version) and any
/// warnings for the `Warning` header.
pub(crate) struct Written {
    pub obj: Value,
    pub warnings: Vec<String>,
    /// Create answers 201, everything else 200.
    pub created: bool,
}

/// How a write treats the incoming object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// PUT/PATCH on the main resource.
    Main,
    /// PUT/PATCH on `/status`.
    Status,
    /// Test hook: the whole object is taken as given (status included).
    Whole,
}

pub(crate) enum PatchKind {
    Merge,
    Json,
}

pub(crate) struct ListQuery<'a> {
    pub namespace: Option<&'a str>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<&'a str>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not wedge every later request.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn meta_str<'a>(o: &'a Value, k: &str) -> Option<&'a str> {
    o["metadata"][k].as_str().filter(|s| !s.is_empty())
}

fn meta_mut(o: &mut Value) -> &mut Map<String, Value> {
    if !o["metadata"].is_object() {
        o["metadata"] = json!({});
    }
    o["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

pub(crate) fn at_version(res: &ResourceDef, version: &str, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(format!("{}/{}", res.group, version));
    obj["kind"] = json!(res.kind);
    obj
}

/// The parts of an object whose change bumps `metadata.generation`.
fn generation_view(obj: &Value, status_sub: bool) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if status_sub {
            m.remove("status");
        }
    }
    v
}

impl Shared {
    pub fn res(&self, id: ResId) -> &ResourceDef {
        &self.registry.resources[id]
    }

    pub fn res_id(&self, group: &str, version: &str, plural: &str) -> Option<ResId> {
        self.registry
            .resources
            .iter()
            .position(|r| r.group == group && r.plural == plural && r.version(version).is_some())
    }

    pub fn res_id_by_name(&self, name: &str) -> Option<ResId> {
        self.registry.resources.iter().position(|r| r.matches(name))
    }

    pub fn lock_store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Records a change: new resourceVersion, history, watchers, test-side
    /// subscribers. `new` None removes the object.
    fn commit(
        &self,
        st: &mut Store,
        res: ResId,
        key: (String, String),
        new: Option<Value>,
        etype: EventType,
    ) -> Value {
        st.rv += 1;
        let rv = st.rv;
        let prev = st.objects[res].get(&key).cloned().map(Arc::new);
        let mut obj = match new {
            Some(o) => o,
            None => prev.as_deref().cloned().unwrap_or(Value::Null),
        };
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        if etype == EventType::Deleted {
            st.objects[res].remove(&key);
        } else {
            st.objects[res].insert(key.clone(), obj.clone());
        }
        let ev = Arc::new(StoredEvent {
            rv,
            res,
            etype,
            obj: Arc::new(obj.clone()),
            prev,
        });
        st.history.push_back(ev.clone());
        while st.history.len() > st.history_limit {
            if let Some(old) = st.history.pop_front() {
                st.compacted = old.rv;
            }
        }
        // No receivers is normal (no watch open): ignore the error.
        let _ = self.events.send(Broadcast::Event(ev));
        let def = self.res(res);
        st.subscribers.retain(|(r, tx)| {
            *r != res
                || tx
                    .send(Change {
                        event_type: etype,
                        kind: def.kind.clone(),
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                        object: obj.clone(),
                    })
                    .is_ok()
        });
        self.changed.notify_all();
        obj
    }

    /// Decoding as the real server does it: unknown fields pruned (or
    /// rejected with `fieldValidation=Strict`), schema defaults applied.
    fn decode(
        &self,
        res: &ResourceDef,
        ver: &VersionDef,
        obj: &mut Value,
        opts: &WriteOpts,
        warnings: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let mut unknown = Vec::new();
        schema::prune(obj, &ver.schema, "", true, &mut unknown);
        match opts.field_validation {
            FieldValidation::Strict if !unknown.is_empty() => {
                let name = meta_str(obj, "name").unwrap_or("");
                let causes = unknown
                    .iter()
                    .map(|u| Cause {
                        reason: "FieldValueInvalid",
                        message: format!("unknown field \"{u}\""),
                        field: String::new(),
                    })
                    .collect();
                let mut e = invalid(res, name, causes);
                e.code = 400;
                e.status["code"] = json!(400);
                e.status["reason"] = json!("BadRequest");
                return Err(e);
            }
            FieldValidation::Warn => {
                warnings.extend(unknown.iter().map(|u| format!("unknown field \"{u}\"")))
            }
            _ => {}
        }
        schema::apply_defaults(obj, &ver.schema);
        Ok(())
    }

    fn validate(&self, res: &ResourceDef, ver: &VersionDef, obj: &Value) -> Result<(), ApiError> {
        let mut errs = Vec::new();
        validate_meta(obj, res.namespaced, &mut errs);
        schema::validate(obj, &ver.schema, "", true, &mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(invalid(res, meta_str(obj, "name").unwrap_or(""), errs))
        }
    }

    fn check_type_meta(
        &self,
        res: &ResourceDef,
        version: &str,
        obj: &Value,
    ) -> Result<(), ApiError> {
        let want = format!("{}/{}", res.group, version);
        match (obj["apiVersion"].as_str(), obj["kind"].as_str()) {
            (Some(av), Some(k)) if av == want && k == res.kind => Ok(()),
            (Some(av), Some(k)) => Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({want})"
            ))
            .with_kind_hint(k, &res.kind)),
            _ => Err(ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{}'",
                obj.to_string().chars().take(200).collect::<String>()
            ))),
        }
    }

    pub fn create(
        &self,
        res_id: ResId,
        version: &str,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
        mode: Mode,
    ) -> Result<Written, ApiError> {
        let res = self.res(res_id);
        let ver = res.version(version).ok_or_else(ApiError::plain_not_found)?;
        self.check_type_meta(res, version, &obj)?;
        let mut warnings = Vec::new();
        self.decode(res, ver, &mut obj, opts, &mut warnings)?;
        if let Some(body_ns) = meta_str(&obj, "namespace") {
            if res.namespaced && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        // Status is reset on create when the status subresource is enabled.
        if ver.status_subresource && mode != Mode::Whole {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        let mut st = self.lock_store();
        let name = match meta_str(&obj, "name") {
            Some(n) => n.to_string(),
            None => match meta_str(&obj, "generateName") {
                Some(prefix) => {
                    let mut n;
                    // The real server retries a clashing generated name too.
                    let mut tries = 0;
                    loop {
                        n = format!("{prefix}{}", generate_name_suffix());
                        tries += 1;
                        if !st.objects[res_id].contains_key(&(ns.to_string(), n.clone()))
                            || tries > 8
                        {
                            break;
                        }
                    }
                    n
                }
                None => {
                    return Err(invalid(
                        res,
                        "",
                        vec![Cause {
                            reason: "FieldValueRequired",
                            message: "Required value: name or generateName is required".into(),
                            field: "metadata.name".into(),
                        }],
                    ))
                }
            },
        };
        {
            let m = meta_mut(&mut obj);
            m.insert("name".into(), json!(name));
            if res.namespaced {
                m.insert("namespace".into(), json!(ns));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(new_uid()));
            m.insert("creationTimestamp".into(), json!(now_rfc3339()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("resourceVersion");
            m.remove("selfLink");
            m.remove("managedFields");
        }
        self.validate(res, ver, &obj)?;
        let key = (ns.to_string(), name.clone());
        if st.objects[res_id].contains_key(&key) {
            return Err(ApiError::already_exists(&res.group, &res.plural, &name));
        }
        let stored = at_version(res, &res.storage_version, obj);
        if opts.dry_run {
            return Ok(Written {
                obj: at_version(res, version, stored),
                warnings,
                created: true,
            });
        }
        let out = self.commit(&mut st, res_id, key, Some(stored), EventType::Added);
        Ok(Written {
            obj: at_version(res, version, out),
            warnings,
            created: true,
        })
    }

    pub fn get(
        &self,
        res_id: ResId,
        version: &str,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let res = self.res(res_id);
        let st = self.lock_store();
        st.objects[res_id]
            .get(&(ns.to_string(), name.to_string()))
            .map(|o| at_version(res, version, o.clone()))
            .ok_or_else(|| ApiError::not_found(&res.group, &res.plural, name))
    }

    pub fn list(&self, res_id: ResId, version: &str, q: &ListQuery<'_>) -> Result<Value, ApiError> {
        let res = self.res(res_id);
        let st = self.lock_store();
        // A continue token is "<rv>:<last key>"; pages after the first are
        // served from the current state, but report the first page's RV.
        let (list_rv, after) = match q.continue_token {
            Some(tok) => {
                let (rv, rest) = tok
                    .split_once(':')
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                let rv: u64 = rv
                    .parse()
                    .map_err(|_| ApiError::bad_request("invalid continue token"))?;
                let (ns, name) = rest
                    .split_once('/')
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                if rv < st.compacted {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some((ns.to_string(), name.to_string())))
            }
            None => (st.rv, None),
        };
        let mut items = Vec::new();
        let mut more = false;
        for (key, o) in &st.objects[res_id] {
            if after.as_ref().is_some_and(|a| key <= a) {
                continue;
            }
            if q.namespace.is_some_and(|ns| ns != key.0) {
                continue;
            }
            if !q.labels.matches(&o["metadata"]["labels"]) || !q.fields.matches(o) {
                continue;
            }
            if q.limit.is_some_and(|l| l > 0 && items.len() >= l) {
                more = true;
                break;
            }
            items.push(at_version(res, version, o.clone()));
        }
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if more {
            let last = items.last().expect("a full page has items");
            meta["continue"] = json!(format!(
                "{list_rv}:{}/{}",
                meta_str(last, "namespace").unwrap_or(""),
                meta_str(last, "name").unwrap_or("")
            ));
        }
        Ok(json!({
            "apiVersion": format!("{}/{}", res.group, version),
            "kind": res.list_kind,
            "metadata": meta,
            "items": items,
        }))
    }

    /// Test hook: creates or replaces an object as given (status included),
    /// with schema checks and finalizer semantics.
    pub fn put_whole(&self, obj: Value) -> Result<Value, ApiError> {
        let av = obj["apiVersion"].as_str().unwrap_or("");
        let kind = obj["kind"].as_str().unwrap_or("");
        let res_id = self
            .registry
            .resources
            .iter()
            .position(|r| {
                r.kind == kind
                    && av
                        .rsplit_once('/')
                        .is_some_and(|(g, v)| g == r.group && r.version(v).is_some())
            })
            .ok_or_else(|| {
                ApiError::bad_request(format!("no resource for apiVersion {av:?} kind {kind:?}"))
            })?;
        let res = self.res(res_id);
        let version = av
            .rsplit_once('/')
            .map(|(_, v)| v)
            .unwrap_or("")
            .to_string();
        let ns = if res.namespaced {
            meta_str(&obj, "namespace").unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let opts = WriteOpts {
            field_validation: FieldValidation::Strict,
            dry_run: false,
        };
        if let Some(name) = meta_str(&obj, "name").map(str::to_string) {
            let exists =
                self.lock_store().objects[res_id].contains_key(&(ns.clone(), name.clone()));
            if exists {
                let mut obj = obj;
                meta_mut(&mut obj).remove("resourceVersion");
                return self
                    .update(res_id, &version, &ns, &name, obj, Mode::Whole, &opts, false)
                    .map(|w| w.obj);
            }
        }
        self.create(res_id, &version, &ns, obj, &opts, Mode::Whole)
            .map(|w| w.obj)
    }
}

impl ApiError {
    fn with_kind_hint(self, got: &str, want: &str) -> Self {
        if got == want {
            self
        } else {
            ApiError::bad_request(format!(
                "the kind in the data ({got}) does not match the expected kind ({want})"
            ))
        }
    }
}
