//! The other kinds the compute node's agent reads, as typed
//! `kube::Resource`s holding only what it reads (everything else is
//! ignored when parsing). Every field is optional or defaulted, so that a
//! stored object never fails to parse and never stops a watch.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube_core::{NamespaceResourceScope, Resource};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

use crate::datamovement::{namespaced_resource, NNF_GROUP, NNF_VERSION};

pub const DWS_GROUP: &str = "dataworkflowservices.github.io";
pub const DWS_VERSION: &str = "v1alpha7";
pub const LUS_GROUP: &str = "lus.cray.hpe.com";
pub const LUS_VERSION: &str = "v1beta1";

/// `Workflow`: its state and status (copies are allowed in PreRun/Completed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkflowStatus>,
}
namespaced_resource!(Workflow, DWS_GROUP, DWS_VERSION, "Workflow", "workflows");

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkflowStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// `SystemConfiguration`: which storage node serves which compute node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemConfiguration {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: SystemConfigurationSpec,
}
namespaced_resource!(
    SystemConfiguration,
    DWS_GROUP,
    DWS_VERSION,
    "SystemConfiguration",
    "systemconfigurations"
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemConfigurationSpec {
    #[serde(default)]
    pub storage_nodes: Vec<StorageNode>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageNode {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub node_type: String,
    #[serde(default)]
    pub computes_access: Vec<ComputeAccess>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComputeAccess {
    #[serde(default)]
    pub name: String,
}

/// `LustreFileSystem`: where it is mounted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LustreFileSystem {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: LustreFileSystemSpec,
}
namespaced_resource!(
    LustreFileSystem,
    LUS_GROUP,
    LUS_VERSION,
    "LustreFileSystem",
    "lustrefilesystems"
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LustreFileSystemSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_root: Option<String>,
}

/// `NnfDataMovementProfile`: whether it is the default one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NnfDataMovementProfile {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: NnfDataMovementProfileData,
}
namespaced_resource!(
    NnfDataMovementProfile,
    NNF_GROUP,
    NNF_VERSION,
    "NnfDataMovementProfile",
    "nnfdatamovementprofiles"
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NnfDataMovementProfileData {
    #[serde(default)]
    pub default: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_agent_reads_parses_from_stored_objects() {
        let sc: SystemConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "default", "namespace": "default"},
            "spec": {"portsCooldownInSeconds": 5, "storageNodes": [
                {"name": "rabbit-1", "type": "Rabbit", "computesAccess": [{"index": 0, "name": "c1"}]}]},
        }))
        .unwrap();
        assert_eq!(sc.spec.storage_nodes[0].computes_access[0].name, "c1");
        assert_eq!(sc.spec.storage_nodes[0].node_type, "Rabbit");
        let wf: Workflow = serde_json::from_value(
            serde_json::json!({"status": {"state": "PreRun", "ready": true}}),
        )
        .unwrap();
        assert_eq!(wf.status.unwrap().state.as_deref(), Some("PreRun"));
        let p: NnfDataMovementProfile =
            serde_json::from_value(serde_json::json!({"data": {"default": true, "slots": 8}}))
                .unwrap();
        assert!(p.data.default);
        assert_eq!(LustreFileSystem::group(&()), "lus.cray.hpe.com");
    }
}
