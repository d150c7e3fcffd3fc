//! Data-movement profiles of the local backend: the built-in native engine
//! (`default`) plus those of `--profiles FILE`, whose fields are named as the
//! NnfDataMovementProfile `data` fields.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One profile. `command: None` is the native engine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default = "default_slots")]
    pub slots: i32,
    #[serde(default)]
    pub max_slots: i32,
    #[serde(default)]
    pub log_stdout: bool,
    #[serde(default)]
    pub store_stdout: bool,
    #[serde(default = "default_progress_interval")]
    pub progress_interval_seconds: u32,
    #[serde(default = "default_true")]
    pub create_dest_dir: bool,
    // Accepted so a real cluster profile can be pasted as is; the local
    // backend already runs as the user and needs neither.
    #[serde(default)]
    pub mkdir_command: Option<String>,
    #[serde(default)]
    pub stat_command: Option<String>,
    #[serde(default)]
    pub setpriv_command: Option<String>,
    #[serde(default)]
    pub pinned: bool,
}

fn default_slots() -> i32 {
    8
}
fn default_progress_interval() -> u32 {
    5
}
fn default_true() -> bool {
    true
}

impl Profile {
    fn native() -> Self {
        Profile {
            name: "default".into(),
            default: true,
            command: None,
            slots: 0,
            max_slots: 0,
            log_stdout: false,
            store_stdout: false,
            progress_interval_seconds: 1,
            create_dest_dir: true,
            mkdir_command: None,
            stat_command: None,
            setpriv_command: None,
            pinned: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
    default_name: String,
}

impl Profiles {
    pub fn builtin() -> Self {
        let mut by_name = BTreeMap::new();
        by_name.insert("default".to_string(), Profile::native());
        Profiles {
            by_name,
            default_name: "default".into(),
        }
    }

    /// The built-in profile plus those of `path` (a JSON array).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| LoadError::Invalid {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        let list: Vec<Profile> = serde_json::from_str(text)?;
        let mut profiles = Self::builtin();
        let defaults: Vec<&str> = list
            .iter()
            .filter(|p| p.default)
            .map(|p| p.name.as_str())
            .collect();
        if defaults.len() > 1 {
            return Err(ProfileError::SeveralDefaults(defaults.join(", ")));
        }
        if let Some(name) = defaults.first() {
            profiles.default_name = name.to_string();
        }
        for profile in list {
            if profile.name.is_empty() {
                return Err(ProfileError::EmptyName);
            }
            if profiles
                .by_name
                .insert(profile.name.clone(), profile.clone())
                .is_some()
                && profile.name != "default"
            {
                return Err(ProfileError::Twice(profile.name));
            }
        }
        Ok(profiles)
    }

    pub fn get(&self, name: Option<&str>) -> Option<&Profile> {
        self.by_name.get(name.unwrap_or(&self.default_name))
    }
}

/// Why `--profiles` cannot be used; the agent does not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: ProfileError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("not a JSON array of profiles")]
    Json(#[from] serde_json::Error),
    #[error("more than one profile has \"default\": true: {0}")]
    SeveralDefaults(String),
    #[error("a profile has an empty name")]
    EmptyName,
    #[error("profile '{0}' is defined twice")]
    Twice(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_default_is_native() {
        let p = Profiles::builtin();
        assert_eq!(p.get(None).unwrap().command, None);
        assert!(p.get(Some("nope")).is_none());
    }

    #[test]
    fn file_profiles_extend_and_can_take_default() {
        let p = Profiles::parse(
            r#"[{"name":"dcp","default":true,"command":"dcp $SRC $DEST","slots":4,"maxSlots":8}]"#,
        )
        .unwrap();
        assert_eq!(p.get(None).unwrap().name, "dcp");
        assert_eq!(p.get(None).unwrap().slots, 4);
        assert!(p.get(Some("default")).unwrap().command.is_none());
    }

    #[test]
    fn two_defaults_are_refused_by_name() {
        let e = Profiles::parse(r#"[{"name":"a","default":true},{"name":"b","default":true}]"#)
            .unwrap_err();
        assert!(e.to_string().contains("a, b"), "{e}");
    }

    #[test]
    fn replacing_default_is_allowed() {
        let p = Profiles::parse(r#"[{"name":"default","command":"cp -r $SRC $DEST"}]"#).unwrap();
        assert_eq!(
            p.get(None).unwrap().command.as_deref(),
            Some("cp -r $SRC $DEST")
        );
    }
}
