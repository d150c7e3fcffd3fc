//! Listing again after a restart: resources of ours that no operation
//! tracks yet, and operations whose resource went while we did not watch.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use kube::runtime::reflector::Store;
use nnf_api::NnfDataMovement;

use crate::op::{Operation, Status};
use crate::request::Request;

use super::api::*;
use super::mapping::*;
use super::track::Tracked;
use super::KubeBackend;

impl KubeBackend {
    /// A resource of ours we do not track yet: one being created right now
    /// (its creation's answer not yet seen), or one created before a restart.
    /// Returns whether it is tracked now.
    pub(super) fn adopt(&self, ns: &str, obj: &NnfDataMovement) -> bool {
        let res = obj.metadata.name.clone().unwrap_or_default();
        let note = note_of(obj);
        let mut tracking = self.tracking.lock().unwrap();
        if tracking.ops.contains_key(&note.name) {
            tracing::warn!(resource = %format!("{ns}/{res}"), op = %note.name, "another resource stands for this operation: not listed");
            return false;
        }
        let op = match tracking.creating.get(&note.name) {
            // Ours, in creation: `accept` will find it tracked.
            Some(op) if op.uid == note.uid => op.clone(),
            Some(_) => {
                tracing::warn!(resource = %format!("{ns}/{res}"), op = %note.name, "an operation of another user has this name: not listed");
                return false;
            }
            None => {
                let op = Arc::new(Operation::new(
                    note.name.clone(),
                    note.uid,
                    note.gid,
                    note.request.clone(),
                    PathBuf::from(&note.request.destination),
                    Status::default(),
                ));
                // The core lists it (or says why not): the name may be
                // taken by an operation of the core's.
                self.notify.found(op.clone());
                op
            }
        };
        tracking.insert(Tracked {
            op,
            namespace: ns.to_string(),
            resource: res,
            message: String::new(),
            deletable: false,
        });
        true
    }

    /// After a (re-)list: an operation whose resource is not in the list was
    /// deleted while we did not watch. Confirmed with a GET before it goes
    /// (it may have been created after the list).
    pub(super) fn resync(&self, ns: &str, store: &Store<NnfDataMovement>) {
        let listed: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        let missing: Vec<String> = self
            .tracking
            .lock()
            .unwrap()
            .ops
            .values()
            .filter(|t| t.namespace == ns && !listed.contains(&t.resource))
            .map(|t| t.resource.clone())
            .collect();
        for res in missing {
            let Some(me) = self.me.upgrade() else { return };
            let ns = ns.to_string();
            self.rt.spawn(async move {
                if let Err(e) = me.ctx.dms(&ns).get(&res).await {
                    if not_found(&e) {
                        let mut gone = NnfDataMovement::default();
                        gone.metadata.name = Some(res.clone());
                        gone.metadata.namespace = Some(ns.clone());
                        me.deleted(&ns, &gone);
                    }
                }
            });
        }
    }
}

/// The operation a resource stands for: its annotation, or (a resource made
/// by an older daemon) its own name and `spec.userId/groupId`.
pub(super) fn note_of(obj: &NnfDataMovement) -> OperationNote {
    if let Some(note) = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(OPERATION_ANNOTATION))
        .and_then(|text| serde_json::from_str::<OperationNote>(text).ok())
    {
        return note;
    }
    let spec = &obj.spec;
    let id = |id: i64| u32::try_from(id).unwrap_or(0);
    let path = |end: &Option<nnf_api::NnfDataMovementSpecSourceDest>| {
        end.as_ref().map(|e| e.path.clone()).unwrap_or_default()
    };
    let name = obj.metadata.name.clone().unwrap_or_default();
    OperationNote {
        name: name.clone(),
        uid: id(spec.user_id),
        gid: id(spec.group_id),
        request: Request {
            name: Some(name),
            source: path(&spec.source),
            destination: path(&spec.destination),
            slots: -1,
            max_slots: -1,
            ..Default::default()
        },
    }
}
