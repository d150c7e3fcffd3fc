//! `NnfStorageProfile` (`nnf.cray.hpe.com/v1alpha11`): only the parts the
//! compute daemon needs (compute-side commands, `sharedVg`,
//! `variableOverride`, `pinned`/`default`). Every field in `data` is optional
//! in the schema; an empty struct or list means the same as a missing one, so
//! nested objects are `#[serde(default)]` values rather than `Option`s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

pub const STORAGE_PROFILE_KIND: &str = "NnfStorageProfile";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfStorageProfile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: NnfStorageProfileData,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfStorageProfileData {
    #[serde(default)]
    pub default: bool,
    /// A pinned profile is the immutable copy made for one workflow; the
    /// ClientMount labels name it.
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub xfs_storage: NnfStorageProfileSharedData,
    #[serde(default)]
    pub gfs2_storage: NnfStorageProfileSharedData,
    #[serde(default)]
    pub raw_storage: NnfStorageProfileSharedData,
    #[serde(default)]
    pub lustre_storage: NnfStorageProfileLustreData,
}

/// `data.{xfsStorage,gfs2Storage,rawStorage}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfStorageProfileSharedData {
    #[serde(default)]
    pub block_device_commands: BlockDeviceCommands,
    #[serde(default)]
    pub file_system_commands: FileSystemCommands,
    /// Replaces the value of a command variable (`"$VG_NAME": "..."`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variable_override: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockDeviceCommands {
    /// One volume group shared by all allocations on a Rabbit (schema
    /// default `false`).
    #[serde(default)]
    pub shared_vg: bool,
    #[serde(default)]
    pub compute_commands: BlockDeviceComputeCommands,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockDeviceComputeCommands {
    #[serde(default)]
    pub lv_change: LvChangeCommands,
    #[serde(default)]
    pub vg_change: VgChangeCommands,
    #[serde(default)]
    pub user_commands: BlockDeviceUserCommands,
}

/// Arguments of `lvchange`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LvChangeCommands {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivate: Option<String>,
}

/// Arguments of `vgchange`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VgChangeCommands {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_stop: Option<String>,
}

/// Whole command lines run around block-device activation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockDeviceUserCommands {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_activate: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_activate: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_deactivate: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_deactivate: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileSystemCommands {
    #[serde(default)]
    pub compute_commands: FileSystemComputeCommands,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileSystemComputeCommands {
    /// Arguments of `mount -t <fstype>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Arguments of `umount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmount: Option<String>,
    #[serde(default)]
    pub user_commands: FileSystemUserCommands,
}

/// Whole command lines run around mount and unmount.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileSystemUserCommands {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_mount: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_mount: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_unmount: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_unmount: Vec<String>,
}

/// `data.lustreStorage` (client side only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NnfStorageProfileLustreData {
    #[serde(default)]
    pub client_options: LustreClientOptions,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LustreClientOptions {
    #[serde(default)]
    pub commandlines: LustreClientCommandLines,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variable_override: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LustreClientCommandLines {
    /// Arguments of `mount -t lustre` on a compute node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_compute: Option<String>,
    /// Arguments of `umount` on a compute node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmount_compute: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compute_pre_mount: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compute_post_mount: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compute_pre_unmount: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compute_post_unmount: Vec<String>,
}
