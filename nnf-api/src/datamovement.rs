//! `NnfDataMovement` (`nnf.cray.hpe.com/v1alpha11`), as the compute node's
//! agent creates, watches, patches and deletes it: a typed `kube::Resource`
//! (written by hand, so that no derive macro or schema generator is built).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube_core::{NamespaceResourceScope, Resource};
use serde::{Deserialize, Serialize};

use crate::ObjectReference;

/// Implements `kube::Resource` for a namespaced kind with `metadata`.
macro_rules! namespaced_resource {
    ($ty:ty, $group:expr, $version:expr, $kind:expr, $plural:expr) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                $version.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use namespaced_resource;

pub const NNF_GROUP: &str = "nnf.cray.hpe.com";
pub const NNF_VERSION: &str = "v1alpha11";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfDataMovement {
    #[serde(default = "NnfDataMovement::api_version_value")]
    pub api_version: String,
    #[serde(default = "NnfDataMovement::kind_value")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NnfDataMovementSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NnfDataMovementStatus>,
}

namespaced_resource!(
    NnfDataMovement,
    NNF_GROUP,
    NNF_VERSION,
    "NnfDataMovement",
    "nnfdatamovements"
);

impl NnfDataMovement {
    fn api_version_value() -> String {
        format!("{NNF_GROUP}/{NNF_VERSION}")
    }

    fn kind_value() -> String {
        "NnfDataMovement".into()
    }

    pub fn new(metadata: ObjectMeta, spec: NnfDataMovementSpec) -> Self {
        NnfDataMovement {
            api_version: Self::api_version_value(),
            kind: Self::kind_value(),
            metadata,
            spec,
            status: None,
        }
    }
}

/// `spec`. No field is required by the schema; `cancel` is defaulted by the
/// API server, so a create leaves it out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfDataMovementSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<NnfDataMovementSpecSourceDest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<NnfDataMovementSpecSourceDest>,
    /// int32 in the schema: read as i64 so that no stored value fails.
    #[serde(default)]
    pub user_id: i64,
    #[serde(default)]
    pub group_id: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_reference: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_config: Option<NnfDataMovementConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfDataMovementSpecSourceDest {
    #[serde(default)]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_reference: Option<ObjectReference>,
}

/// `spec.userConfig`: what the Copy Offload API lets a user set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfDataMovementConfig {
    #[serde(default)]
    pub dryrun: bool,
    #[serde(default)]
    pub mpirun_options: String,
    #[serde(default)]
    pub dcp_options: String,
    #[serde(default)]
    pub log_stdout: bool,
    #[serde(default)]
    pub store_stdout: bool,
    /// `None` defers to the profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_slots: Option<i64>,
}

/// `status`, as the Rabbit's data-movement manager writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfDataMovementStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_status: Option<NnfDataMovementCommandStatus>,
}

/// `status.commandStatus`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfDataMovementCommandStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directories: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_body_has_kind_and_no_defaults_the_server_adds() {
        let dm = NnfDataMovement::new(
            ObjectMeta {
                generate_name: Some("nnf-dm-".into()),
                ..Default::default()
            },
            NnfDataMovementSpec {
                user_id: 1000,
                user_config: Some(NnfDataMovementConfig {
                    slots: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let body = serde_json::to_value(&dm).unwrap();
        assert_eq!(body["apiVersion"], "nnf.cray.hpe.com/v1alpha11");
        assert_eq!(body["kind"], "NnfDataMovement");
        assert_eq!(body["metadata"]["generateName"], "nnf-dm-");
        assert!(body["spec"].get("cancel").is_none());
        assert!(body.get("status").is_none());
        assert_eq!(body["spec"]["userConfig"]["slots"], 0);
        assert!(body["spec"]["userConfig"].get("maxSlots").is_none());
        // What the API server stores reads back.
        let back: NnfDataMovement = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {"cancel": true, "userId": -1},
            "status": {"state": "Running", "commandStatus": {"progress": 5}},
        }))
        .unwrap();
        assert!(back.spec.cancel);
        assert_eq!(back.spec.user_id, -1);
        assert_eq!(
            back.status.unwrap().command_status.unwrap().progress,
            Some(5)
        );
        assert_eq!(NnfDataMovement::plural(&()), "nnfdatamovements");
    }
}
