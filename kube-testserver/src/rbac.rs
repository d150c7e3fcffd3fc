//! Accounts (bearer token → user) and ClusterRole evaluation as RBAC does it.

use crate::util::{qualified, ApiError};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn has(list: &[String], x: &str) -> bool {
    list.iter().any(|e| e == "*" || e == x)
}

pub(crate) fn rules_from_cluster_role(role: &Value) -> Result<Vec<Rule>, String> {
    if role["kind"] != "ClusterRole" && role["kind"] != "Role" {
        return Err("not a ClusterRole".into());
    }
    Ok(role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Rule {
            groups: strings(&r["apiGroups"]),
            resources: strings(&r["resources"]),
            verbs: strings(&r["verbs"]),
            names: strings(&r["resourceNames"]),
        })
        .collect())
}

pub(crate) fn load_cluster_role(path: &Path) -> Result<Vec<Rule>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading ClusterRole {}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("parsing ClusterRole {}: {e}", path.display()))?;
    rules_from_cluster_role(&v).map_err(|e| format!("{}: {e}", path.display()))
}

/// A user the server knows, with its bearer token and what it may do.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    /// Short handle used by test code (`admin`, `nnf-dm-daemon`, ...).
    pub id: String,
    /// The user name RBAC sees, e.g. `system:serviceaccount:nnf-system:nnf-clientmount`.
    pub user: String,
    pub token: String,
    /// `None`: member of `system:masters`, allowed everything.
    pub rules: Option<Vec<Rule>>,
}

/// The request attributes RBAC evaluates.
#[derive(Debug, Clone)]
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// Plural, without subresource.
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl Account {
    pub fn allows(&self, a: &Attributes<'_>) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        let full = match a.subresource {
            Some(s) => format!("{}/{s}", a.resource),
            None => a.resource.to_string(),
        };
        rules.iter().any(|r| {
            has(&r.verbs, a.verb)
                && has(&r.groups, a.group)
                && r.resources.iter().any(|x| {
                    // RBAC's only resource wildcards: `*` (everything,
                    // subresources included) and `*/<subresource>`.
                    x == "*"
                        || *x == full
                        || (a.subresource.is_some() && x.strip_prefix("*/") == a.subresource)
                })
                && (r.names.is_empty() || a.name.is_some_and(|n| r.names.iter().any(|x| x == n)))
        })
    }

    pub fn authorize(&self, a: &Attributes<'_>) -> Result<(), ApiError> {
        if self.allows(a) {
            return Ok(());
        }
        let full = match a.subresource {
            Some(s) => format!("{}/{s}", a.resource),
            None => a.resource.to_string(),
        };
        let what = match a.name {
            Some(n) => format!("{} \"{n}\"", qualified(&full, a.group)),
            None => qualified(&full, a.group),
        };
        let scope = match a.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        let mut details = json!({"group": a.group, "kind": a.resource});
        if let Some(n) = a.name {
            details["name"] = json!(n);
        }
        Err(ApiError::with_details(
            403,
            "Forbidden",
            format!(
                "{what} is forbidden: User \"{}\" cannot {} resource \"{full}\" in API group \"{}\" {scope}",
                self.user, a.verb, a.group
            ),
            details,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clientmount() -> Account {
        let role = json!({"kind": "ClusterRole", "rules": [
            {"apiGroups": ["dataworkflowservices.github.io"], "resources": ["clientmounts"], "verbs": ["get", "list", "watch", "update", "patch"]},
            {"apiGroups": ["dataworkflowservices.github.io"], "resources": ["clientmounts/status"], "verbs": ["get", "patch", "update"]}
        ]});
        Account {
            id: "cm".into(),
            user: "system:serviceaccount:nnf-system:nnf-clientmount".into(),
            token: "t".into(),
            rules: Some(rules_from_cluster_role(&role).unwrap()),
        }
    }

    fn attrs<'a>(verb: &'a str, sub: Option<&'a str>, name: Option<&'a str>) -> Attributes<'a> {
        Attributes {
            verb,
            group: "dataworkflowservices.github.io",
            resource: "clientmounts",
            subresource: sub,
            namespace: Some("node1"),
            name,
        }
    }

    #[test]
    fn evaluates_subresources_separately() {
        let a = clientmount();
        assert!(a.allows(&attrs("update", None, Some("x"))));
        assert!(a.allows(&attrs("update", Some("status"), Some("x"))));
        assert!(!a.allows(&attrs("delete", None, Some("x"))));
        assert!(!a.allows(&attrs("create", Some("status"), None)));
        let e = a.authorize(&attrs("delete", None, Some("x"))).unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(
            e.status["message"],
            "clientmounts.dataworkflowservices.github.io \"x\" is forbidden: User \"system:serviceaccount:nnf-system:nnf-clientmount\" cannot delete resource \"clientmounts\" in API group \"dataworkflowservices.github.io\" in the namespace \"node1\""
        );
    }
}
