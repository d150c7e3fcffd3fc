//! The API plumbing every part shares: resource descriptions, the client
//! context, and how API failures become rejections.

use std::sync::Arc;
use std::time::Duration;

use fuse_ctl::Errno;
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};

use kube::core::NamespaceResourceScope;
use kube::Resource;
use nnf_api::{LustreFileSystem, NnfDataMovement, NnfDataMovementProfile, Workflow};
use serde::de::DeserializeOwned;

use crate::agent::Rejection;

use super::cache::Flight;

/// How long a Workflow read serves later creates. A workflow leaves PreRun
/// when the workload manager moves it on (its job's compute phase ended, or
/// it is being torn down); a copy requested within this time after that is
/// still created, as one requested just before would have been (upstream
/// reads the Workflow and creates in two steps too, with the same race).
/// Its NnfDataMovement carries the teardown label, so the PostRun teardown
/// still finds and removes it. After this time every create sees the new
/// state and is refused.
pub(super) const WORKFLOW_TTL: Duration = Duration::from_secs(1);

/// How long a ClientMount list serves later creates of the same workflow
/// (keyed by the workflow's uid, so a workflow deleted and made again with
/// the same name never sees the old one's mounts). ClientMounts are created
/// at the workflow's Setup and deleted at its Teardown; copies are allowed
/// only in PreRun, between the two, where the list does not change.
pub(super) const MOUNTS_TTL: Duration = Duration::from_secs(10);

/// (namespace, workflow namespace, workflow, workflow uid).
pub(super) type MountsKey = (String, String, String, String);

pub(super) fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub(super) const DWS: &str = "dataworkflowservices.github.io";
pub(super) const DWS_VERSION: &str = "v1alpha7";

/// The shared, cloneable context of API calls.
pub(super) struct Ctx {
    pub(super) client: kube::Client,
    pub(super) node: String,
    /// The Rabbit serving this node (kept current: `sysconfig`).
    pub(super) rabbit: std::sync::RwLock<String>,
    /// Every LustreFileSystem, from a watch.
    pub(super) lustre: Store<LustreFileSystem>,
    /// Every NnfDataMovementProfile in `nnf-system`, from a watch.
    pub(super) profiles: Store<NnfDataMovementProfile>,
    pub(super) workflows: Flight<(String, String), Arc<Workflow>>,
    pub(super) mounts: Flight<MountsKey, Arc<Vec<nnf_api::ClientMount>>>,
}

impl Ctx {
    pub(super) fn rabbit(&self) -> String {
        self.rabbit.read().unwrap().clone()
    }

    pub(super) fn api(&self, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }

    pub(super) fn workflows(&self, namespace: &str) -> Api<Workflow> {
        Api::namespaced(self.client.clone(), namespace)
    }

    pub(super) fn dms(&self, namespace: &str) -> Api<NnfDataMovement> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// An API failure as a rejection: unreachable or overloaded is EAGAIN,
/// anything else EIO.
pub(super) fn api_rejection(what: &str, e: &kube::Error) -> Rejection {
    match e {
        kube::Error::Api(status) => {
            let errno = match status.code {
                429 | 500 | 502 | 503 | 504 => Errno::EAGAIN,
                _ => Errno::EIO,
            };
            let hint = match status.code {
                401 => " (the service token was refused: check --service-token-file)",
                403 => " (the nnf-dm-daemon ClusterRole does not allow it)",
                _ => "",
            };
            Rejection::new(
                errno,
                format!("{what}: {} {}{hint}", status.code, status.message),
            )
        }
        kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => {
            Rejection::new(Errno::EIO, format!("{what}: {e}"))
        }
        _ => Rejection::new(
            Errno::EAGAIN,
            format!("{what}: Kubernetes API server unreachable: {e}"),
        ),
    }
}

pub(super) fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Worth retrying (cancel, delete): conflicts, overload, transport errors.
pub(super) fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 409 | 429 | 500 | 502 | 503 | 504),
        kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => false,
        _ => true,
    }
}

/// What a mirror is told after each change its watch brought.
pub(super) type OnChange<K> = Box<dyn Fn(&Store<K>) + Send + Sync>;

/// A store of every object of `K` (in `namespace`, or in all) that `config`
/// selects, kept current by a watch that the runtime runs for the life of
/// the agent.
pub(super) fn mirror<K>(
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    namespace: Option<&str>,
    config: watcher::Config,
    what: &'static str,
    on_change: Option<OnChange<K>>,
) -> Store<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let writer = reflector::store::Writer::<K>::default();
    let reader = writer.as_reader();
    let store = reader.clone();
    rt.spawn(async move {
        let stream = reflector::reflector(writer, watcher::watcher(api, config).default_backoff());
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    if failing {
                        failing = false;
                        tracing::info!("watch of the {what} resumed");
                    }
                    let listed =
                        !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
                    if let (true, Some(f)) = (listed, &on_change) {
                        f(&store);
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("watch of the {what} failed (retrying): {e}");
                    }
                    failing = true;
                }
            }
        }
    });
    reader
}
