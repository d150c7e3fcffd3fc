//! Which API a request path addresses: discovery documents, or a resource
//! with its version, namespace, name and subresource.

use super::*;

/// What a resource URL addresses.
pub(super) struct Target {
    pub(super) res: ResId,
    pub(super) version: String,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
    pub(super) watch_path: bool,
}

pub(super) enum Route {
    Discovery(Value),
    Resource(Target),
    NotFound,
}

pub(super) fn route(shared: &Shared, path: &str) -> Route {
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
