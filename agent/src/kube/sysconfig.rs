//! Step 1 of the mapping: the Rabbit that serves this node, from a watch of
//! the SystemConfiguration (`--sys-config`, namespace `default`) kept
//! current for the life of the agent. Not needed with `--nnf-node-name`.
//!
//! Upstream reads it once at start (nnf-dm daemon `main.go`); here a change
//! (the node moved to another Rabbit) is followed: new copies go to the new
//! Rabbit, and its namespace is watched as well as the old one's.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use nnf_api::SystemConfiguration;
use tokio::sync::watch;

use super::api::mirror;
use super::KubeBackend;

/// What the SystemConfiguration says, once listed: the Rabbit or why not.
pub(super) type Lookup = Option<Result<String, String>>;

/// Where a lookup's messages point the operator.
fn what(sys_config: &str) -> String {
    format!(
        "looking up this node's Rabbit in SystemConfiguration default/{sys_config} (give --nnf-node-name to skip)"
    )
}

/// The Rabbit serving `node` in `sc`.
pub(super) fn rabbit_in(
    sc: Option<&SystemConfiguration>,
    sys_config: &str,
    node: &str,
) -> Result<String, String> {
    let what = what(sys_config);
    let Some(sc) = sc else {
        return Err(format!(
            "{what}: SystemConfiguration not found (--sys-config)"
        ));
    };
    let Some(storage) = sc
        .spec
        .storage_nodes
        .iter()
        .find(|s| s.computes_access.iter().any(|c| c.name == node))
    else {
        return Err(format!(
            "{what}: no storage node lists {node} in computesAccess (--node-name)"
        ));
    };
    if storage.node_type != "Rabbit" {
        return Err(format!(
            "{what}: the storage node serving {node} is of type '{}', not 'Rabbit'",
            storage.node_type
        ));
    }
    if storage.name.is_empty() {
        return Err(format!("{what}: storage node without a name"));
    }
    Ok(storage.name.clone())
}

/// Starts the watch and waits (at most `timeout`) for its first answer:
/// the Rabbit now, and its later answers.
pub(super) fn follow(
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    sys_config: &str,
    node: &str,
    timeout: Duration,
) -> Result<(String, watch::Receiver<Lookup>), String> {
    let (tx, mut rx) = watch::channel::<Lookup>(None);
    let (name, node) = (sys_config.to_string(), node.to_string());
    let on_change = Box::new(move |store: &Store<SystemConfiguration>| {
        let sc = store
            .state()
            .into_iter()
            .find(|sc| sc.metadata.name.as_deref() == Some(name.as_str()));
        tx.send_replace(Some(rabbit_in(sc.as_deref(), &name, &node)));
    });
    mirror(
        rt,
        client,
        Some("default"),
        watcher::Config::default(),
        "SystemConfigurations",
        Some(on_change),
    );
    let first = rt.block_on(async {
        tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|seen| seen.ok().and_then(|lookup| lookup.clone()))
    });
    match first {
        None => Err(format!(
            "{}: no answer from the Kubernetes API server within {timeout:?}",
            what(sys_config)
        )),
        Some(Err(e)) => Err(e),
        Some(Ok(rabbit)) => {
            rx.mark_unchanged();
            Ok((rabbit, rx))
        }
    }
}

impl KubeBackend {
    /// Follows the SystemConfiguration: a new Rabbit takes the new copies,
    /// and its namespace is watched from then on.
    pub(super) async fn follow_rabbit(
        self: Arc<Self>,
        mut lookups: watch::Receiver<Lookup>,
        mut watched: HashSet<String>,
    ) {
        while lookups.changed().await.is_ok() {
            let lookup = lookups.borrow_and_update().clone();
            let rabbit = match lookup {
                Some(Ok(rabbit)) => rabbit,
                Some(Err(e)) => {
                    tracing::warn!("{e}: keeping Rabbit {}", self.ctx.rabbit());
                    continue;
                }
                None => continue,
            };
            let old = self.ctx.rabbit();
            if rabbit == old {
                continue;
            }
            tracing::warn!(node = %self.ctx.node, old = %old, rabbit = %rabbit, "the SystemConfiguration moved this node to another Rabbit: new copies go there");
            *self.ctx.rabbit.write().unwrap() = rabbit.clone();
            if watched.insert(rabbit.clone()) {
                // Nobody waits for this watch to list.
                let (synced, _) = std::sync::mpsc::channel();
                tokio::spawn(self.clone().watch(rabbit, synced));
            }
        }
    }
}
