//! `ClientMount` (`dataworkflowservices.github.io/v1alpha7`).

use serde::{Deserialize, Serialize};

use crate::meta::{ObjectMeta, ObjectReference, ResourceError};

pub const CLIENTMOUNT_API_VERSION: &str = "dataworkflowservices.github.io/v1alpha7";
pub const CLIENTMOUNT_KIND: &str = "ClientMount";
/// Finalizer the compute daemon puts on a ClientMount before its first mount.
pub const CLIENTMOUNT_FINALIZER: &str = "nnf.cray.hpe.com/nnf_clientmount";

/// Labels on a ClientMount the daemon reads.
pub mod labels {
    pub const PINNED_PROFILE_NAME: &str = "nnf.cray.hpe.com/pinned_storage_profile_name";
    pub const PINNED_PROFILE_NAMESPACE: &str = "nnf.cray.hpe.com/pinned_storage_profile_namespace";
    pub const TARGET_OWNER_UID: &str = "nnf.cray.hpe.com/target_owner_uid";
    pub const TARGET_DIRECTIVE_INDEX: &str = "nnf.cray.hpe.com/target_directive_index";
    pub const DIRECTIVE_INDEX: &str = "nnf.cray.hpe.com/directive_index";
    pub const JOB_ID: &str = "nnf.cray.hpe.com/job_id";
    pub const WORKFLOW_NAME: &str = "dataworkflowservices.github.io/workflow.name";
    pub const WORKFLOW_NAMESPACE: &str = "dataworkflowservices.github.io/workflow.namespace";
    pub const WORKFLOW_UID: &str = "dataworkflowservices.github.io/workflow.uid";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMount {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Not `required` at the top level of the schema, but a ClientMount
    /// without a spec has nothing to do: it fails to parse.
    pub spec: ClientMountSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ClientMountStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMountSpec {
    /// Name of the client node targeted by this mount.
    pub node: String,
    pub desired_state: ClientMountState,
    /// `minItems: 1` in the schema; an empty list is reported as a user error.
    pub mounts: Vec<ClientMountInfo>,
}

/// `spec.desiredState` and `status.mounts[].state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMountState {
    Mounted,
    Unmounted,
}

impl ClientMountState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientMountState::Mounted => "mounted",
            ClientMountState::Unmounted => "unmounted",
        }
    }
}

/// One entry of `spec.mounts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMountInfo {
    pub mount_path: String,
    #[serde(rename = "type")]
    pub mount_type: ClientMountType,
    pub target_type: ClientMountTargetType,
    pub options: String,
    pub set_permissions: bool,
    pub device: ClientMountDevice,
    #[serde(default, rename = "userID", skip_serializing_if = "Option::is_none")]
    pub user_id: Option<u32>,
    #[serde(default, rename = "groupID", skip_serializing_if = "Option::is_none")]
    pub group_id: Option<u32>,
    /// Compute node sharing this mount, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<String>,
}

/// `spec.mounts[].type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMountType {
    Lustre,
    Xfs,
    Gfs2,
    /// Raw block device, bind-mounted onto a file.
    None,
}

impl ClientMountType {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientMountType::Lustre => "lustre",
            ClientMountType::Xfs => "xfs",
            ClientMountType::Gfs2 => "gfs2",
            ClientMountType::None => "none",
        }
    }
}

/// `spec.mounts[].targetType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMountTargetType {
    File,
    Directory,
}

/// `spec.mounts[].device`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMountDevice {
    #[serde(rename = "type")]
    pub device_type: ClientMountDeviceType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lustre: Option<ClientMountDeviceLustre>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<ClientMountDeviceLvm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_reference: Option<ClientMountDeviceReference>,
}

/// `spec.mounts[].device.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMountDeviceType {
    Lustre,
    Lvm,
    Reference,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMountDeviceLustre {
    pub file_system_name: String,
    /// `[address]@[lnet]`, several separated as Lustre expects.
    pub mgs_addresses: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMountDeviceLvm {
    pub device_type: ClientMountLvmDeviceType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_volume: Option<String>,
    #[serde(default, rename = "nvmeInfo", skip_serializing_if = "Vec::is_empty")]
    pub nvme_info: Vec<ClientMountNvmeDesc>,
}

/// `spec.mounts[].device.lvm.deviceType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMountLvmDeviceType {
    Nvme,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMountNvmeDesc {
    #[serde(rename = "deviceSerial")]
    pub device_serial: String,
    #[serde(rename = "namespaceID")]
    pub namespace_id: String,
    #[serde(rename = "namespaceGUID")]
    pub namespace_guid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMountDeviceReference {
    pub object_reference: ObjectReference,
    /// Driver-private data; NNF stores the allocation index here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<i64>,
}

/// `status` of a ClientMount.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientMountStatus {
    #[serde(default)]
    pub mounts: Vec<ClientMountInfoStatus>,
    #[serde(default)]
    pub all_ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResourceError>,
}

/// `status.mounts[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMountInfoStatus {
    pub state: ClientMountState,
    pub ready: bool,
}
