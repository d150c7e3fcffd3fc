//! Writes to existing objects: update (PUT), patch, delete with finalizers.

use super::*;

impl Shared {
    /// PUT (and the second half of PATCH): `obj` is the complete new object in
    /// the request version.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        res_id: ResId,
        version: &str,
        ns: &str,
        name: &str,
        mut obj: Value,
        mode: Mode,
        opts: &WriteOpts,
        require_rv: bool,
    ) -> Result<Written, ApiError> {
        let res = self.res(res_id);
        let ver = res.version(version).ok_or_else(ApiError::plain_not_found)?;
        self.check_type_meta(res, version, &obj)?;
        let body_name = meta_str(&obj, "name").unwrap_or("");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if res.namespaced && meta_str(&obj, "namespace").is_some_and(|n| n != ns) {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut warnings = Vec::new();
        self.decode(res, ver, &mut obj, opts, &mut warnings)?;
        let mut st = self.lock_store();
        let key = (ns.to_string(), name.to_string());
        let Some(old) = st.objects[res_id].get(&key).cloned() else {
            return Err(ApiError::not_found(&res.group, &res.plural, name));
        };
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or("").to_string();
        match meta_str(&obj, "resourceVersion") {
            Some(rv) if rv != old_rv => {
                return Err(ApiError::modified(&res.group, &res.plural, name))
            }
            None if require_rv => {
                return Err(invalid(
                    res,
                    name,
                    vec![Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: 0x0: must be specified for an update".into(),
                        field: "metadata.resourceVersion".into(),
                    }],
                ))
            }
            _ => {}
        }
        let old_v = at_version(res, version, old.clone());
        let mut new = match mode {
            Mode::Status => {
                // Only .status is taken from the request.
                let mut n = old_v.clone();
                match obj.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        n.as_object_mut().expect("object").remove("status");
                    }
                }
                n
            }
            Mode::Main | Mode::Whole => {
                if mode == Mode::Main && ver.status_subresource {
                    let m = obj.as_object_mut().expect("decoded object");
                    match old_v.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
                // Server-managed metadata cannot be changed by a client.
                let om = &old_v["metadata"];
                let m = meta_mut(&mut obj);
                for k in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "namespace",
                    "name",
                ] {
                    match om.get(k) {
                        Some(v) => m.insert(k.into(), v.clone()),
                        None => m.remove(k),
                    };
                }
                m.remove("managedFields");
                m.remove("selfLink");
                obj
            }
        };
        meta_mut(&mut new).insert("resourceVersion".into(), json!(old_rv));
        let deleting = old["metadata"]["deletionTimestamp"].is_string();
        if deleting {
            let before = finalizers(&old);
            let added: Vec<String> = finalizers(&new)
                .into_iter()
                .filter(|f| !before.contains(f))
                .collect();
            if !added.is_empty() {
                return Err(invalid(
                    res,
                    name,
                    vec![Cause {
                        reason: "FieldValueForbidden",
                        message: format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                            added.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ")
                        ),
                        field: "metadata.finalizers".into(),
                    }],
                ));
            }
        }
        if generation_view(&new, ver.status_subresource)
            != generation_view(&old_v, ver.status_subresource)
        {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            meta_mut(&mut new).insert("generation".into(), json!(g));
        }
        self.validate(res, ver, &new)?;
        let stored = at_version(res, &res.storage_version, new);
        if stored == old {
            // A no-op write changes nothing, not even the resourceVersion,
            // and sends no watch event (controllers rely on that).
            return Ok(Written {
                obj: at_version(res, version, old),
                warnings,
                created: false,
            });
        }
        if opts.dry_run {
            return Ok(Written {
                obj: at_version(res, version, stored),
                warnings,
                created: false,
            });
        }
        let out = if deleting && finalizers(&stored).is_empty() {
            st.objects[res_id].insert(key.clone(), stored);
            self.commit(&mut st, res_id, key, None, EventType::Deleted)
        } else {
            self.commit(&mut st, res_id, key, Some(stored), EventType::Modified)
        };
        Ok(Written {
            obj: at_version(res, version, out),
            warnings,
            created: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        res_id: ResId,
        version: &str,
        ns: &str,
        name: &str,
        kind: PatchKind,
        patch: &Value,
        mode: Mode,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let res = self.res(res_id);
        // Read-modify-write under the store lock would need a re-entrant
        // lock; instead retry on a concurrent change, like the real server's
        // GuaranteedUpdate loop does.
        for _ in 0..16 {
            let current = self.get(res_id, version, ns, name)?;
            let current_rv = meta_str(&current, "resourceVersion")
                .unwrap_or("")
                .to_string();
            let mut doc = current.clone();
            match kind {
                PatchKind::Merge => {
                    if !patch.is_object() {
                        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                    }
                    merge_patch(&mut doc, patch)
                }
                PatchKind::Json => match json_patch(&mut doc, patch) {
                    Ok(()) => {}
                    Err(PatchError::Malformed(m)) => return Err(ApiError::bad_request(m)),
                    Err(PatchError::Failed(m)) => {
                        return Err(ApiError::with_details(
                            422,
                            "Invalid",
                            m,
                            json!({"name": name, "group": res.group, "kind": res.kind}),
                        ))
                    }
                },
            }
            let explicit_rv = meta_str(&doc, "resourceVersion").map(str::to_string);
            if explicit_rv.as_deref() != Some(current_rv.as_str()) && explicit_rv.is_some() {
                return Err(ApiError::modified(&res.group, &res.plural, name));
            }
            match self.update(res_id, version, ns, name, doc, mode, opts, false) {
                // The object changed between our read and our write, and the
                // patch did not pin a resourceVersion: apply it again.
                Err(e) if e.code == 409 && e.status["reason"] == "Conflict" => continue,
                r => return r,
            }
        }
        Err(ApiError::modified(&res.group, &res.plural, name))
    }

    pub fn delete(
        &self,
        res_id: ResId,
        version: &str,
        ns: &str,
        name: &str,
        options: &Value,
    ) -> Result<Value, ApiError> {
        let res = self.res(res_id);
        let mut st = self.lock_store();
        let key = (ns.to_string(), name.to_string());
        let Some(old) = st.objects[res_id].get(&key).cloned() else {
            return Err(ApiError::not_found(&res.group, &res.plural, name));
        };
        let pre = &options["preconditions"];
        if let Some(uid) = pre["uid"].as_str() {
            let actual = meta_str(&old, "uid").unwrap_or("");
            if uid != actual {
                return Err(ApiError::conflict(
                    &res.group,
                    &res.plural,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"),
                ));
            }
        }
        if let Some(rv) = pre["resourceVersion"].as_str() {
            let actual = meta_str(&old, "resourceVersion").unwrap_or("");
            if rv != actual {
                return Err(ApiError::conflict(
                    &res.group,
                    &res.plural,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in meta: {actual}"),
                ));
            }
        }
        let dry_run = options["dryRun"].as_array().is_some_and(|a| !a.is_empty());
        if !finalizers(&old).is_empty() {
            if old["metadata"]["deletionTimestamp"].is_string() || dry_run {
                return Ok(at_version(res, version, old));
            }
            let mut new = old.clone();
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            m.insert("generation".into(), json!(g));
            let out = self.commit(&mut st, res_id, key, Some(new), EventType::Modified);
            return Ok(at_version(res, version, out));
        }
        if dry_run {
            return Ok(at_version(res, version, old));
        }
        let out = self.commit(&mut st, res_id, key, None, EventType::Deleted);
        Ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name,
                "group": res.group,
                "kind": res.plural,
                "uid": out["metadata"]["uid"],
            }
        }))
    }
}
