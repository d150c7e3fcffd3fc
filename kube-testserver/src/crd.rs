//! The CustomResourceDefinitions the server knows, loaded from JSON files.

use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone)]
pub(crate) struct VersionDef {
    pub name: String,
    pub served: bool,
    pub status_subresource: bool,
    pub schema: Value,
}

#[derive(Debug, Clone)]
pub(crate) struct ResourceDef {
    pub group: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub storage_version: String,
    pub versions: Vec<VersionDef>,
}

impl ResourceDef {
    pub fn version(&self, v: &str) -> Option<&VersionDef> {
        self.versions.iter().find(|x| x.name == v && x.served)
    }

    /// `<plural>.<group>`, the key test hooks and RBAC messages use.
    pub fn qualified(&self) -> String {
        crate::util::qualified(&self.plural, &self.group)
    }

    /// Whether a test-side name (kind, plural, singular or
    /// `<plural>.<group>`) means this resource.
    pub fn matches(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case(&self.kind)
            || name == self.plural
            || name == self.singular
            || name == self.qualified()
            || self.short_names.iter().any(|s| s == name)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub resources: Vec<ResourceDef>,
}

impl Registry {
    pub fn load_dir(dir: &Path) -> Result<Self, String> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| format!("reading CRD directory {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        let mut reg = Registry::default();
        for p in paths {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("reading CRD {}: {e}", p.display()))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| format!("parsing CRD {}: {e}", p.display()))?;
            reg.add(&v)
                .map_err(|e| format!("loading CRD {}: {e}", p.display()))?;
        }
        Ok(reg)
    }

    pub fn add(&mut self, crd: &Value) -> Result<(), String> {
        if crd["kind"] != "CustomResourceDefinition" {
            return Err("not a CustomResourceDefinition".into());
        }
        let spec = &crd["spec"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let names = &spec["names"];
        let mut versions = Vec::new();
        let mut storage = None;
        for v in spec["versions"].as_array().ok_or("spec.versions missing")? {
            let name = s(&v["name"]);
            if v["storage"] == true {
                storage = Some(name.clone());
            }
            versions.push(VersionDef {
                name,
                served: v["served"] == true,
                status_subresource: v["subresources"]["status"].is_object(),
                schema: v["schema"]["openAPIV3Schema"].clone(),
            });
        }
        let def = ResourceDef {
            group: s(&spec["group"]),
            plural: s(&names["plural"]),
            singular: s(&names["singular"]),
            kind: s(&names["kind"]),
            list_kind: names["listKind"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}List", s(&names["kind"]))),
            namespaced: spec["scope"] != "Cluster",
            short_names: names["shortNames"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default(),
            storage_version: storage.ok_or("no storage version")?,
            versions,
        };
        self.resources
            .retain(|r| !(r.group == def.group && r.plural == def.plural));
        self.resources.push(def);
        Ok(())
    }

    /// Groups in a stable order, each with its served versions, storage
    /// version first (the preferred version discovery reports).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for r in &self.resources {
            let entry = match out.iter_mut().find(|(g, _)| *g == r.group) {
                Some(e) => e,
                None => {
                    out.push((r.group.clone(), vec![r.storage_version.clone()]));
                    out.last_mut().expect("just pushed")
                }
            };
            for v in r.versions.iter().filter(|v| v.served) {
                if !entry.1.contains(&v.name) {
                    entry.1.push(v.name.clone());
                }
            }
        }
        out
    }
}
