//! Serde types for the NNF / DWS custom resources the compute daemons use,
//! written against the CRD schemas in `kube-testserver/api/crds/` (storage versions
//! `dataworkflowservices.github.io/v1alpha7` and `nnf.cray.hpe.com/v1alpha11`).
//!
//! Conventions: JSON names are the schema's camelCase names. A field the
//! schema lists as `required` is a plain field (a document without it fails
//! to parse with a clear serde error); every other field is an `Option`, or
//! `#[serde(default)]` where an empty value means the same as a missing one.
//! Nothing here panics on a missing field. Fields a daemon does not need are
//! not modelled and are ignored when parsing.

pub mod clientmount;
pub mod datamovement;
pub mod meta;
pub mod servers;
pub mod storageprofile;
pub mod typed;

pub use clientmount::*;
pub use datamovement::*;
pub use meta::*;
pub use servers::*;
pub use storageprofile::*;
pub use typed::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_objects_parse_and_round_trip() {
        let cm: ClientMount = serde_json::from_str(
            r#"{"kind":"ClientMount","spec":{"node":"n","desiredState":"mounted","mounts":[
                {"mountPath":"/m","type":"none","targetType":"file","options":"","setPermissions":false,
                 "device":{"type":"lvm","lvm":{"deviceType":"nvme","nvmeInfo":[
                   {"deviceSerial":"s","namespaceID":"1","namespaceGUID":"g"}]}}}]},
              "status":{"mounts":[{"state":"unmounted","ready":true}],"allReady":true,
                "error":{"type":"WLM","severity":"Minor","debugMessage":"d"}}}"#,
        )
        .unwrap();
        assert_eq!(cm.spec.mounts[0].mount_type, ClientMountType::None);
        assert_eq!(cm.spec.mounts[0].user_id, None);
        let back = serde_json::to_value(&cm).unwrap();
        assert_eq!(
            back["spec"]["mounts"][0]["device"]["lvm"]["nvmeInfo"][0]["namespaceID"],
            "1"
        );
        assert_eq!(back["status"]["error"]["type"], "WLM");
        assert!(back["spec"]["mounts"][0].get("userID").is_none());
        let p: NnfStorageProfile = serde_json::from_str(r#"{"data":{"xfsStorage":{}}}"#).unwrap();
        assert!(!p.data.pinned);
        assert_eq!(
            p.data
                .xfs_storage
                .file_system_commands
                .compute_commands
                .mount,
            None
        );
        let s: Servers = serde_json::from_str(r#"{"kind":"Servers"}"#).unwrap();
        assert_eq!(s.lustre_mapping()["nnfNode"], Vec::<String>::new());
    }
}
