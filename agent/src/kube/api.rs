//! The API plumbing every part shares: resource descriptions, the client
//! context, and how API failures become rejections.

use fuse_ctl::Errno;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;

use crate::agent::Rejection;

use super::mapping::*;

pub(super) fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub(super) fn dm_resource() -> ApiResource {
    resource(DM_GROUP, DM_VERSION, "NnfDataMovement", "nnfdatamovements")
}

pub(super) const DWS: &str = "dataworkflowservices.github.io";
pub(super) const DWS_VERSION: &str = "v1alpha7";

/// The shared, cloneable context of API calls.
pub(super) struct Ctx {
    pub(super) client: kube::Client,
    pub(super) node: String,
    pub(super) rabbit: String,
}

impl Ctx {
    pub(super) fn api(&self, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }

    pub(super) fn dms(&self, namespace: &str) -> Api<DynamicObject> {
        self.api(&dm_resource(), Some(namespace))
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
