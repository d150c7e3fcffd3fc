//! What a server is started with: the API directory, accounts, watch
//! history and bookmark timing.

use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(doc)]
use crate::TestServer;
use crate::{ADMIN, CLIENTMOUNT, NNF_DM};

/// A user the server accepts, with its bearer token.
#[derive(Debug, Clone)]
pub struct AccountSpec {
    /// Handle for [`TestServer::token_file`] and request-log records.
    pub id: String,
    /// User name as RBAC reports it.
    pub user: String,
    /// ClusterRole JSON bound to the user cluster-wide; `None` = admin.
    pub cluster_role: Option<PathBuf>,
}

/// Server configuration. [`Config::default`] loads the CRDs and roles of the
/// `api/` directory and creates the admin and the two daemon accounts.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `crds/*.json` and `rbac/*.json`.
    pub api_dir: PathBuf,
    pub accounts: Vec<AccountSpec>,
    /// Watch events kept for resuming from a resourceVersion; older ones
    /// answer `410 Gone`.
    pub history_limit: usize,
    /// How often a watch with `allowWatchBookmarks` gets a BOOKMARK (the real
    /// server: about a minute; shorter here so tests see them).
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        let api_dir = Self::api_dir_default();
        let role = |f: &str| Some(api_dir.join("rbac").join(f));
        Config {
            accounts: vec![
                AccountSpec {
                    id: ADMIN.into(),
                    user: "kubernetes-admin".into(),
                    cluster_role: None,
                },
                AccountSpec {
                    id: NNF_DM.into(),
                    user: "system:serviceaccount:nnf-dm-system:nnf-dm-daemon".into(),
                    cluster_role: role("nnf-dm-daemon-clusterrole.json"),
                },
                AccountSpec {
                    id: CLIENTMOUNT.into(),
                    user: "system:serviceaccount:nnf-system:nnf-clientmount".into(),
                    cluster_role: role("clientmount-clusterrole.json"),
                },
            ],
            api_dir,
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// The CRDs and ClusterRoles kept in this crate (`api/`, copied from
    /// the NNF/DWS releases; see its README).
    pub fn api_dir_default() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("api")
    }

    pub fn history_limit(mut self, n: usize) -> Self {
        self.history_limit = n.max(1);
        self
    }

    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    /// Adds (or replaces) an account.
    pub fn account(mut self, id: &str, user: &str, cluster_role: Option<PathBuf>) -> Self {
        self.accounts.retain(|a| a.id != id);
        self.accounts.push(AccountSpec {
            id: id.into(),
            user: user.into(),
            cluster_role,
        });
        self
    }
}
