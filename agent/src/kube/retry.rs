//! Retries: cancel and delete, off the filesystem's threads, retried while
//! the API server is unreachable or overloaded.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nnf_api::NnfDataMovement;
use serde_json::json;

use crate::op::Operation;

use super::api::*;
use super::KubeBackend;

impl KubeBackend {
    pub(super) fn spawn_cancel(&self, ns: String, res: String, op: Arc<Operation>) {
        let ctx = self.ctx.clone();
        self.rt.spawn(async move {
            let patch = json!({"spec": {"cancel": true}});
            let mut delay = Duration::from_millis(50);
            let give_up = Instant::now() + Duration::from_secs(300);
            loop {
                match ctx
                    .dms(&ns)
                    .patch(&res, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(op = %op.name, resource = %format!("{ns}/{res}"), "spec.cancel set");
                        return;
                    }
                    Err(e) if not_found(&e) => return,
                    Err(e)
                        if transient(&e)
                            && Instant::now() < give_up
                            && !op.removed.load(Ordering::Acquire) =>
                    {
                        tracing::debug!(op = %op.name, "cancel: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::warn!(op = %op.name, "cannot set spec.cancel: {e}");
                        return;
                    }
                }
            }
        });
    }

    pub(super) fn spawn_delete(&self, ns: String, res: String) {
        let Some(me) = self.me.upgrade() else { return };
        self.rt.spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match me.ctx.dms(&ns).delete(&res, &DeleteParams::default()).await {
                    Ok(_) => return,
                    Err(e) if not_found(&e) => {
                        me.tracking
                            .lock()
                            .unwrap()
                            .deleting
                            .remove(&(ns.clone(), res.clone()));
                        return;
                    }
                    Err(e) if transient(&e) => {
                        tracing::debug!(resource = %format!("{ns}/{res}"), "delete: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => {
                        tracing::warn!(resource = %format!("{ns}/{res}"), "cannot delete: {e}");
                        return;
                    }
                }
            }
        });
    }
}

/// Tries of a create whose generated name was taken.
const NAME_TRIES: usize = 5;

/// Creates `obj`; when the server could not find a free name for its
/// `generateName` (409 AlreadyExists, "the server was not able to generate
/// a unique name for the object": nothing was created), asks again, which
/// draws a new name. Upstream fails such a create.
pub(super) async fn create_with_fresh_name(
    api: &Api<NnfDataMovement>,
    obj: &NnfDataMovement,
) -> Result<NnfDataMovement, kube::Error> {
    let mut tries = 1;
    loop {
        match api.create(&PostParams::default(), obj).await {
            Err(kube::Error::Api(s))
                if s.code == 409
                    && s.reason == "AlreadyExists"
                    && obj.metadata.name.is_none()
                    && obj.metadata.generate_name.is_some()
                    && tries < NAME_TRIES =>
            {
                tracing::info!(
                    "generated name taken ({}): creating again with a new one",
                    s.message
                );
                tries += 1;
            }
            other => return other,
        }
    }
}
