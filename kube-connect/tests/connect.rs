//! kube-connect against the in-process API server: the startup checks in
//! the spec's order, a real client with the clientmount service account's
//! token and CA, kubeconfig mode, and the client-side rate limit measured
//! in the server's request log.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::Api;
use kube_connect::{ConnectError, Connection};
use kube_testserver::{Config, TestServer, ADMIN, CLIENTMOUNT};
use serde_json::json;

fn clientmount_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("dataworkflowservices.github.io", "v1alpha7", "ClientMount"),
        "clientmounts",
    )
}

fn seed_clientmount(server: &TestServer, ns: &str, name: &str) {
    server.put_object(json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "ClientMount",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"node": ns, "desiredState": "mounted", "mounts": [{
            "mountPath": "/mnt/x", "type": "xfs", "targetType": "directory",
            "options": "", "setPermissions": false,
            "device": {"type": "lvm", "lvm": {"deviceType": "nvme"}}}]}
    }));
}

fn conn(server: &TestServer) -> Connection {
    Connection {
        host: Some(server.host().to_string()),
        port: Some(server.port().to_string()),
        token_file: Some(server.token_file(CLIENTMOUNT)),
        cert_file: Some(server.ca_file()),
        ..Default::default()
    }
}

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, content).unwrap();
    p
}

#[track_caller]
fn expect_err(c: &Connection, pattern: fn(&ConnectError) -> bool, words: &[&str]) {
    let err = c.check().expect_err("check should fail");
    assert!(pattern(&err), "wrong error: {err:?}");
    let msg = err.to_string();
    for w in words {
        assert!(msg.contains(w), "message {msg:?} lacks {w:?}");
    }
}

#[test]
fn check_reports_each_problem_in_the_spec_order() {
    let server = TestServer::start(Config::default());
    let tmp = tempfile::tempdir().unwrap();
    let good_token = server.token_file(CLIENTMOUNT);
    let good_ca = server.ca_file();
    let newline = write(tmp.path(), "nl.token", b"abc\n");
    let empty = write(tmp.path(), "empty.token", b"");
    let not_pem = write(tmp.path(), "bad.crt", b"hello\n");
    let bad_der = write(
        tmp.path(),
        "baddier.crt",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let all_missing = Connection {
        token_file: Some(good_token.clone()),
        ..Default::default()
    };

    // 1. host or port missing (reported before anything else is looked at)
    expect_err(
        &Connection {
            host: Some("127.0.0.1".into()),
            ..Default::default()
        },
        |e| matches!(e, ConnectError::HostOrPortMissing { .. }),
        &["--kubernetes-service-port"],
    );
    expect_err(
        &Connection {
            port: Some("6443".into()),
            cert_file: Some("/nonexistent".into()),
            ..Default::default()
        },
        |e| matches!(e, ConnectError::HostOrPortMissing { .. }),
        &["--kubernetes-service-host"],
    );
    expect_err(
        &all_missing,
        |e| matches!(e, ConnectError::HostOrPortMissing { .. }),
        &["--kubernetes-service-host and --kubernetes-service-port"],
    );
    let base = Connection {
        host: Some("127.0.0.1".into()),
        port: Some(server.port().to_string()),
        ..Default::default()
    };
    // 2. token file not given (even though the cert file is missing too)
    expect_err(
        &base,
        |e| matches!(e, ConnectError::TokenFileNotGiven),
        &["--service-token-file"],
    );
    // 3. token file unreadable
    expect_err(
        &Connection {
            token_file: Some(tmp.path().join("nope.token")),
            ..base.clone()
        },
        |e| matches!(e, ConnectError::TokenFileUnreadable { .. }),
        &["--service-token-file", "nope.token", "cannot read"],
    );
    // 3b. token content: a trailing newline is trimmed (client-go does);
    // empty is refused.
    Connection {
        token_file: Some(newline.clone()),
        cert_file: Some(good_ca.clone()),
        ..base.clone()
    }
    .check()
    .expect("a token file ending in a newline is fine");
    expect_err(
        &Connection {
            token_file: Some(empty),
            ..base.clone()
        },
        |e| matches!(e, ConnectError::TokenFileContent { .. }),
        &["--service-token-file", "empty"],
    );
    let with_token = Connection {
        token_file: Some(good_token.clone()),
        ..base.clone()
    };
    // 4. cert file not given
    expect_err(
        &with_token,
        |e| matches!(e, ConnectError::CertFileNotGiven),
        &["--service-cert-file"],
    );
    // 5. cert file not a valid PEM CA
    for (bad, why) in [
        (tmp.path().join("nope.crt"), "cannot read"),
        (not_pem, "no CERTIFICATE"),
        (bad_der, "does not parse"),
    ] {
        expect_err(
            &Connection {
                cert_file: Some(bad),
                ..with_token.clone()
            },
            |e| matches!(e, ConnectError::CertFileInvalid { .. }),
            &["--service-cert-file", why],
        );
    }
    // All good.
    conn(&server).check().expect("valid settings");
    // Nothing given: kubeconfig / in-cluster mode, nothing to check here.
    assert!(!Connection::default().given());
    Connection::default().check().expect("nothing to check");
    expect_err(
        &Connection {
            kubeconfig: Some(tmp.path().join("nope.kubeconfig")),
            ..Default::default()
        },
        |e| matches!(e, ConnectError::Kubeconfig { .. }),
        &["--kubeconfig", "nope.kubeconfig"],
    );
    // A bad rate limit is a startup error too.
    expect_err(
        &Connection {
            qps: Some(0.0),
            ..conn(&server)
        },
        |e| matches!(e, ConnectError::RateLimit(_)),
        &["--kubernetes-qps"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gets_an_object_with_the_clientmount_token() {
    let server = TestServer::start(Config::default());
    seed_clientmount(&server, "node1", "cm1");
    let client = conn(&server).client().await.expect("client");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "node1", &clientmount_resource());
    let obj = api.get("cm1").await.expect("get ClientMount");
    assert_eq!(obj.metadata.name.as_deref(), Some("cm1"));
    // RBAC is the clientmount role's: no create.
    let denied = api
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "apiVersion": "dataworkflowservices.github.io/v1alpha7",
                "kind": "ClientMount",
                "metadata": {"name": "cm2", "namespace": "node1"},
                "spec": {"node": "node1", "desiredState": "mounted", "mounts": []}
            }))
            .unwrap(),
        )
        .await
        .expect_err("create is not in the role");
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "{denied:?}"
    );
    let reqs = server.requests();
    assert!(reqs
        .iter()
        .any(|r| r.account.as_deref() == Some(CLIENTMOUNT) && r.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_mode() {
    let server = TestServer::start(Config::default());
    seed_clientmount(&server, "node1", "cm1");
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = write(
        tmp.path(),
        "kubeconfig",
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {url}
    certificate-authority: {ca}
users:
- name: cm
  user:
    tokenFile: {token}
contexts:
- name: test
  context: {{cluster: test, user: cm}}
current-context: test
"#,
            url = server.url(),
            ca = server.ca_file().display(),
            token = server.token_file(CLIENTMOUNT).display()
        )
        .as_bytes(),
    );
    let c = Connection {
        kubeconfig: Some(kubeconfig),
        ..Default::default()
    };
    assert!(c.given());
    let client = c.client().await.expect("client from kubeconfig");
    let api: Api<DynamicObject> = Api::namespaced_with(client, "node1", &clientmount_resource());
    api.get("cm1").await.expect("get via kubeconfig");
}

/// qps 20, burst 5: 45 GETs from 45 clones of one client at once need at
/// least (45 - 5) / 20 = 2 s, and no one-second window of the server's log
/// holds more than burst + qps requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qps_and_burst_limit_every_clone() {
    let server = TestServer::start(Config::default());
    seed_clientmount(&server, "node1", "cm1");
    let client = Connection {
        qps: Some(20.0),
        burst: Some(5),
        ..conn(&server)
    }
    .client()
    .await
    .expect("client");
    // The connection is set up (TLS) outside the measured part.
    server.clear_requests();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..45 {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "node1", &clientmount_resource());
        tasks.spawn(async move { api.get("cm1").await.map(|_| ()) });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().expect("get");
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "45 GETs at qps 20 burst 5 took only {elapsed:?}"
    );
    let times: Vec<Instant> = server
        .requests()
        .iter()
        .filter(|r| r.account.as_deref() == Some(CLIENTMOUNT))
        .map(|r| r.at)
        .collect();
    assert_eq!(times.len(), 45);
    let max_per_second = times
        .iter()
        .map(|t0| {
            times
                .iter()
                .filter(|t| **t >= *t0 && **t < *t0 + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    // Scheduling jitter may let one extra slip into a window edge.
    assert!(
        max_per_second <= 26,
        "{max_per_second} requests in one second (limit 20/s, burst 5)"
    );
    eprintln!("45 GETs in {elapsed:?}, at most {max_per_second} in any 1 s window");
}

/// A token file written with a trailing newline works (trimmed as client-go
/// does), and the file is read again as it rotates: a wrong token is
/// refused at once, another account's token is used at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_is_trimmed_and_read_again_as_it_rotates() {
    let server = TestServer::start(Config::default());
    seed_clientmount(&server, "node1", "cm1");
    let tmp = tempfile::tempdir().unwrap();
    let token = write(
        tmp.path(),
        "service.token",
        format!("{}\n", server.token(CLIENTMOUNT)).as_bytes(),
    );
    let client = Connection {
        token_file: Some(token.clone()),
        ..conn(&server)
    }
    .client()
    .await
    .expect("client with a newline-terminated token");
    let api: Api<DynamicObject> = Api::namespaced_with(client, "node1", &clientmount_resource());
    api.get("cm1").await.expect("get with the trimmed token");
    let last_account = || server.requests().last().and_then(|r| r.account.clone());
    assert_eq!(last_account().as_deref(), Some(CLIENTMOUNT));

    // Rotated to something the server does not know: 401 on the next call.
    let tmp_file = tmp.path().join("service.token.new");
    fs::write(&tmp_file, "not-a-token\n").unwrap();
    fs::rename(&tmp_file, &token).unwrap();
    let refused = api.get("cm1").await.expect_err("a wrong token is refused");
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 401),
        "{refused:?}"
    );

    // Rotated in place (same inode) to another account's token, with
    // surrounding whitespace: used by the next call.
    fs::write(&token, format!("  {}\r\n", server.token(ADMIN))).unwrap();
    api.get("cm1").await.expect("get with the rotated token");
    assert_eq!(last_account().as_deref(), Some(ADMIN));
}

/// The limit is per resource kind, as upstream's controller-runtime client
/// (one REST client and token bucket per GroupVersionKind): with qps 5 and
/// burst 5, five GETs of ClientMounts empty their bucket, and a GET of
/// another kind then goes at once while the next ClientMount GET waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_resource_kind_has_its_own_bucket() {
    let server = TestServer::start(Config::default());
    seed_clientmount(&server, "node1", "cm1");
    let client = Connection {
        qps: Some(5.0),
        burst: Some(5),
        token_file: Some(server.token_file(ADMIN)),
        ..conn(&server)
    }
    .client()
    .await
    .expect("client");
    let mounts: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "node1", &clientmount_resource());
    for _ in 0..5 {
        mounts.get("cm1").await.expect("get within the burst");
    }
    // The ClientMount bucket is empty now: its next GET waits about 200 ms
    // for a token, and a Workflow list, in its own bucket, does not wait
    // behind it.
    let workflows: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("dataworkflowservices.github.io", "v1alpha7", "Workflow"),
            "workflows",
        ),
    );
    server.clear_requests();
    let waiting = tokio::spawn(async move { mounts.get("cm1").await.map(drop) });
    workflows
        .list(&Default::default())
        .await
        .expect("list workflows");
    let order: Vec<String> = server
        .requests()
        .iter()
        .filter_map(|r| r.resource.clone())
        .collect();
    assert_eq!(
        order.first().map(String::as_str),
        Some("workflows"),
        "{order:?}"
    );
    waiting
        .await
        .unwrap()
        .expect("the ClientMount GET goes once its token is there");
    let order: Vec<String> = server
        .requests()
        .iter()
        .filter_map(|r| r.resource.clone())
        .collect();
    assert_eq!(order, ["workflows", "clientmounts"]);
}
