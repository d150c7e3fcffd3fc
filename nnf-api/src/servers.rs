//! `Servers` (`dataworkflowservices.github.io/v1alpha7`): the Rabbits holding
//! each allocation set of a directive.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{ObjectMeta, ResourceError};

pub const SERVERS_KIND: &str = "Servers";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Servers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServersSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServersStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServersSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocation_sets: Vec<ServersSpecAllocationSet>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServersSpecAllocationSet {
    pub allocation_size: i64,
    /// `mgt`, `mdt`, `mgtmdt`, `ost`, or a raw/xfs/gfs2 label.
    pub label: String,
    pub storage: Vec<ServersSpecStorage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServersSpecStorage {
    pub allocation_count: i64,
    /// The Rabbit's name.
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServersStatus {
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResourceError>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocation_sets: Vec<ServersStatusAllocationSet>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServersStatusAllocationSet {
    pub label: String,
    pub storage: BTreeMap<String, ServersStatusStorage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServersStatusStorage {
    pub allocation_size: i64,
    pub ready: bool,
}

impl Servers {
    /// The content of a Lustre mount's `.nnf-servers.json`, as upstream
    /// writes it: for each allocation-set label (always `mdt`, `mgt`,
    /// `mgtmdt`, `ost`) the Rabbit names, one per allocation, and under
    /// `nnfNode` every Rabbit once, in order of first appearance.
    pub fn lustre_mapping(&self) -> BTreeMap<String, Vec<String>> {
        let mut map: BTreeMap<String, Vec<String>> = ["mdt", "mgt", "mgtmdt", "ost", "nnfNode"]
            .into_iter()
            .map(|k| (k.to_string(), Vec::new()))
            .collect();
        let mut rabbits: Vec<String> = Vec::new();
        for set in &self.spec.allocation_sets {
            for storage in &set.storage {
                let entry = map.entry(set.label.clone()).or_default();
                for _ in 0..storage.allocation_count.max(0) {
                    entry.push(storage.name.clone());
                }
                if !rabbits.contains(&storage.name) {
                    rabbits.push(storage.name.clone());
                }
            }
        }
        map.insert("nnfNode".to_string(), rabbits);
        map
    }
}
