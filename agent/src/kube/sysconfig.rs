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
pub(super) type Lookup = Option<Result<String, LookupError>>;

/// Why this node's Rabbit is not known. Every message says what was looked
/// up, and the flag that fixes or skips it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LookupError {
    #[error("{}: SystemConfiguration not found (--sys-config)", what(.sys_config))]
    NotFound { sys_config: String },
    #[error("{}: no storage node lists {node} in computesAccess (--node-name)", what(.sys_config))]
    NotListed { sys_config: String, node: String },
    #[error(
        "{}: the storage node serving {node} is of type '{node_type}', not 'Rabbit'",
        what(.sys_config)
    )]
    NotRabbit {
        sys_config: String,
        node: String,
        node_type: String,
    },
    #[error("{}: storage node without a name", what(.sys_config))]
    Unnamed { sys_config: String },
    #[error("{}: no answer from the Kubernetes API server within {timeout:?}", what(.sys_config))]
    NoAnswer {
        sys_config: String,
        timeout: Duration,
    },
}

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
) -> Result<String, LookupError> {
    let sys_config = sys_config.to_string();
    let Some(sc) = sc else {
        return Err(LookupError::NotFound { sys_config });
    };
    let Some(storage) = sc
        .spec
        .storage_nodes
        .iter()
        .find(|s| s.computes_access.iter().any(|c| c.name == node))
    else {
        return Err(LookupError::NotListed {
            sys_config,
            node: node.to_string(),
        });
    };
    if storage.node_type != "Rabbit" {
        return Err(LookupError::NotRabbit {
            sys_config,
            node: node.to_string(),
            node_type: storage.node_type.clone(),
        });
    }
    if storage.name.is_empty() {
        return Err(LookupError::Unnamed { sys_config });
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
) -> Result<(String, watch::Receiver<Lookup>), LookupError> {
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
        None => Err(LookupError::NoAnswer {
            sys_config: sys_config.to_string(),
            timeout,
        }),
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
