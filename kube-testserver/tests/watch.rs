//! Watches, kube-rs `watcher`/`reflector` recovery, and fault injection.

mod common;

use common::*;
use futures::{StreamExt, TryStreamExt};
use kube::api::{DynamicObject, PostParams, WatchEvent, WatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube_testserver::{Config, TestServer, ADMIN, CLIENTMOUNT, NNF_DM};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::time::timeout;

type Events =
    std::pin::Pin<Box<dyn futures::Stream<Item = kube::Result<WatchEvent<DynamicObject>>> + Send>>;

async fn next(s: &mut Events) -> WatchEvent<DynamicObject> {
    timeout(Duration::from_secs(10), s.next())
        .await
        .expect("an event within 10 s")
        .expect("stream open")
        .expect("event decodes")
}

fn summary(e: &WatchEvent<DynamicObject>) -> (String, String) {
    match e {
        WatchEvent::Added(o) => ("ADDED".into(), o.metadata.name.clone().unwrap()),
        WatchEvent::Modified(o) => ("MODIFIED".into(), o.metadata.name.clone().unwrap()),
        WatchEvent::Deleted(o) => ("DELETED".into(), o.metadata.name.clone().unwrap()),
        WatchEvent::Bookmark(b) => ("BOOKMARK".into(), b.metadata.resource_version.clone()),
        WatchEvent::Error(e) => ("ERROR".into(), e.code.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_events_and_follows_the_label_selection() {
    let s = TestServer::start(Config::default());
    s.put_object(client_mount("node1", "a"));
    let api = cms(&client(&s, CLIENTMOUNT), "node1");
    let wp = WatchParams::default().labels("dataworkflowservices.github.io/workflow.name=wf");
    let mut w: Events = api.watch(&wp, "0").await.unwrap().boxed();
    assert_eq!(summary(&next(&mut w).await), ("ADDED".into(), "a".into()));
    s.put_object(client_mount("node1", "b"));
    assert_eq!(summary(&next(&mut w).await), ("ADDED".into(), "b".into()));
    s.modify_object("ClientMount", "node1", "a", |o| {
        o["spec"]["desiredState"] = json!("unmounted");
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        summary(&next(&mut w).await),
        ("MODIFIED".into(), "a".into())
    );
    // Leaving the selection is a DELETED for this watch.
    s.modify_object("ClientMount", "node1", "b", |o| {
        o["metadata"]["labels"] = json!({});
    })
    .unwrap()
    .unwrap();
    assert_eq!(summary(&next(&mut w).await), ("DELETED".into(), "b".into()));
    s.delete_object("ClientMount", "node1", "a").unwrap();
    assert_eq!(summary(&next(&mut w).await), ("DELETED".into(), "a".into()));
    // Other namespaces are not seen.
    s.put_object(client_mount("node2", "c"));
    assert!(timeout(Duration::from_millis(300), w.next()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_a_resource_version_and_410s_when_expired() {
    let s = TestServer::start(Config::default().history_limit(5));
    let created = s.put_object(client_mount("node1", "a"));
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    for st in ["unmounted", "mounted"] {
        s.modify_object("ClientMount", "node1", "a", |o| {
            o["spec"]["desiredState"] = json!(st)
        })
        .unwrap()
        .unwrap();
    }
    let api = cms(&client(&s, CLIENTMOUNT), "node1");
    let mut w: Events = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    assert_eq!(
        summary(&next(&mut w).await),
        ("MODIFIED".into(), "a".into())
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ("MODIFIED".into(), "a".into())
    );
    // expire_watches(): the open watch ends with 410 ...
    s.expire_watches();
    match next(&mut w).await {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert!(
                e.message.starts_with("too old resource version"),
                "{}",
                e.message
            );
        }
        other => panic!("expected ERROR, got {:?}", summary(&other)),
    }
    assert!(timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .is_none());
    // ... and resuming from before the compaction is 410 too.
    let mut w: Events = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    assert_eq!(summary(&next(&mut w).await), ("ERROR".into(), "410".into()));
    // History overflow has the same effect as compaction.
    let fresh = s.resource_version().to_string();
    for i in 0..8 {
        s.modify_object("ClientMount", "node1", "a", |o| {
            o["spec"]["node"] = json!(format!("n{i}"))
        })
        .unwrap()
        .unwrap();
    }
    let mut w: Events = api
        .watch(&WatchParams::default(), &fresh)
        .await
        .unwrap()
        .boxed();
    assert_eq!(summary(&next(&mut w).await), ("ERROR".into(), "410".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_and_timeout() {
    let s = TestServer::start(Config::default().bookmark_interval(Duration::from_millis(200)));
    let api = cms(&client(&s, CLIENTMOUNT), "node1");
    let rv = s.resource_version().to_string();
    let mut wp = WatchParams::default().timeout(2);
    wp.bookmarks = true;
    let started = Instant::now();
    let mut w: Events = api.watch(&wp, &rv).await.unwrap().boxed();
    assert_eq!(summary(&next(&mut w).await).0, "BOOKMARK");
    // The stream ends by itself after timeoutSeconds.
    while let Some(e) = timeout(Duration::from_secs(5), w.next()).await.unwrap() {
        assert_eq!(summary(&e.unwrap()).0, "BOOKMARK");
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
}

/// Creates an object with the admin client, returns its name.
async fn create_cm(s: &TestServer, ns: &str, name: &str) {
    cms(&client(s, ADMIN), ns)
        .create(&PostParams::default(), &dyn_obj(client_mount(ns, name)))
        .await
        .unwrap();
}

async fn wait_store(
    store: &reflector::Store<DynamicObject>,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .map(|o| o.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        if pred(&names) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: store has {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lists(s: &TestServer) -> usize {
    s.requests()
        .iter()
        .filter(|r| {
            r.account.as_deref() == Some(CLIENTMOUNT)
                && r.verb.as_deref() == Some("list")
                && r.status == 200
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_and_reflector_recover_from_410_and_from_the_server_going_down() {
    let s = TestServer::start(Config::default());
    s.put_object(client_mount("node1", "a"));
    let api = cms(&client(&s, CLIENTMOUNT), "node1");
    let writer = reflector::store::Writer::new(cm_ar());
    let store = writer.as_reader();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic()),
    )
    .default_backoff()
    .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Errors are retried by default_backoff; keep consuming.
        while let Ok(Some(_)) | Err(_) = stream.try_next().await {}
    });
    wait_store(&store, "initial list", |n| n == ["a"]).await;

    create_cm(&s, "node1", "b").await;
    wait_store(&store, "after create", |n| n == ["a", "b"]).await;

    // 410: the watcher re-lists and catches up with what changed meanwhile.
    s.expire_watches();
    create_cm(&s, "node1", "c").await;
    s.delete_object("ClientMount", "node1", "a").unwrap();
    wait_store(&store, "after 410", |n| n == ["b", "c"]).await;
    assert!(lists(&s) >= 2, "the 410 made the watcher list again");

    // Down: the watch is cut, changes happen while it cannot reconnect.
    s.set_down(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.put_object(client_mount("node1", "d"));
    s.delete_object("ClientMount", "node1", "b").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.account.as_deref() == Some(CLIENTMOUNT))
        .collect();
    let up_at = s.requests().len();
    s.set_down(false);
    wait_store(&store, "after down/up", |n| n == ["c", "d"]).await;
    let after = s
        .requests()
        .into_iter()
        .filter(|r| r.account.as_deref() == Some(CLIENTMOUNT))
        .count();
    assert!(after > during.len(), "the watcher reconnected");
    // Resumed from its last resourceVersion: the history replayed what it
    // missed, no re-list needed.
    assert_eq!(lists(&s), 2);
    assert!(s.requests()[up_at..]
        .iter()
        .any(|r| r.verb.as_deref() == Some("watch")
            && r.path.contains("resourceVersion=")
            && r.status == 200));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_latency_errors_and_down() {
    let s = TestServer::start(Config::default());
    s.put_object(client_mount("node1", "a"));
    let api = cms(&client(&s, NNF_DM), "node1");

    s.set_latency(Duration::from_millis(300));
    let t = Instant::now();
    api.get("a").await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    s.set_latency(Duration::ZERO);

    s.fail_next_with(500, 1);
    let e = api.get("a").await.unwrap_err();
    assert!(
        matches!(&e, kube::Error::Api(st) if st.code == 500),
        "{e:?}"
    );
    api.get("a").await.unwrap();

    s.set_down(true);
    let e = timeout(Duration::from_secs(20), api.get("a"))
        .await
        .expect("fails fast")
        .unwrap_err();
    assert!(
        !matches!(e, kube::Error::Api(_)),
        "a transport error, got {e:?}"
    );
    s.set_down(false);
    api.get("a").await.unwrap();

    // The request log is what QPS assertions count.
    let log = s.requests();
    let gets = log
        .iter()
        .filter(|r| r.verb.as_deref() == Some("get"))
        .count();
    assert_eq!(
        gets, 4,
        "the request made while down never reached the server"
    );
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(log.iter().all(|r| r.path.starts_with(
        "/apis/dataworkflowservices.github.io/v1alpha7/namespaces/node1/clientmounts/a"
    )));
}
