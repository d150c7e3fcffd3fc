//! Watch streams: the initial events of a list-then-watch, then every
//! change the filter selects, and 410 Gone for a compacted version.

use super::*;

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

pub(super) fn watch(shared: &Arc<Shared>, t: &Target, q: &Query) -> Response<Body> {
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
