//! Many writers of one name at once, from two users, on both backends:
//! exactly one wins, and its operation carries its own request (control-fs.md
//! "EEXIST: the name is in use").

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::kube::{kube_agent, seed_wf1, Wf1Mount};
use integration_tests::*;
use kube_testserver::{Config, EventType, TestServer};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);
const WRITERS_PER_USER: usize = 8;

/// One writer, started now, that waits for `go` to exist and then writes
/// `request` in one write(2); prints "ok" or the errno's name.
fn racer(user: &User, request_file: &Path, go: &Path, request: &str) -> Child {
    let script = format!(
        "import os, errno, time\nwhile not os.path.exists({go:?}):\n    time.sleep(0.005)\nfd = os.open({path:?}, os.O_WRONLY)\ntry:\n    os.write(fd, {request:?}.encode())\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
        go = go.to_str().unwrap(),
        path = request_file.to_str().unwrap(),
    );
    as_user_cmd(user, "/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a writer")
}

/// Kills whatever writers are left, even when the test fails.
struct Racers(Vec<(User, String, Child)>);

impl Drop for Racers {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `WRITERS_PER_USER` writers of `name` per user, each with its own
/// tag in `request(tag)`, releases them at once, and returns (user, tag,
/// outcome) of each.
fn race(
    dir: &Path,
    request_file: &Path,
    users: &[User],
    request: impl Fn(&str) -> String,
) -> Vec<(User, String, String)> {
    let go = dir.join("go");
    let mut racers = Racers(Vec::new());
    for u in users {
        for i in 0..WRITERS_PER_USER {
            let tag = format!("{}-{i}", u.name);
            let child = racer(u, request_file, &go, &request(&tag));
            racers.0.push((*u, tag, child));
        }
    }
    std::fs::write(&go, b"").unwrap();
    let mut outcomes = Vec::new();
    for (u, tag, child) in std::mem::take(&mut racers.0) {
        let out = child.wait_with_output().expect("writer ends");
        outcomes.push((u, tag, stdout(&out).trim().to_string()));
    }
    outcomes
}

/// Exactly one "ok", every other EEXIST: the winner.
fn the_winner(outcomes: &[(User, String, String)]) -> (User, String) {
    let winners: Vec<_> = outcomes.iter().filter(|o| o.2 == "ok").collect();
    assert_eq!(winners.len(), 1, "exactly one writer wins: {outcomes:?}");
    for (_, tag, outcome) in outcomes {
        assert!(
            outcome == "ok" || outcome == "EEXIST",
            "{tag}: {outcome} (every loser gets EEXIST): {outcomes:?}"
        );
    }
    (winners[0].0, winners[0].1.clone())
}

fn errors_as(agent: &Agent, u: &User) -> String {
    stdout(&sh_as(
        u,
        &format!("cat {}", agent.path("errors").display()),
    ))
}

fn root_names(agent: &Agent) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&agent.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn same_name_writers_on_the_local_backend_one_wins_with_its_own_request() {
    let agent = Agent::start(&[]);
    let users = [user("nnfdmt1"), user("nnfdmt2")];
    let src = agent.dir.path().join("src");
    for u in &users {
        for i in 0..WRITERS_PER_USER {
            let dir = src.join(format!("{}-{i}", u.name));
            std::fs::create_dir_all(&dir).unwrap();
        }
    }
    let out: PathBuf = agent.dir.path().join("out");
    let outcomes = race(agent.dir.path(), &agent.path("request"), &users, |tag| {
        format!(
            "name=race dryrun=true source={}/{tag} destination={}/{tag}",
            src.display(),
            out.display()
        )
    });
    let (winner, tag) = the_winner(&outcomes);

    // The operation is the winner's: owner, source, destination.
    let dir = std::fs::metadata(agent.path("race")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((dir.uid(), dir.gid()), (winner.uid, winner.gid));
    let request = agent.read("race/request").unwrap();
    assert_eq!(
        field(&request, "source").unwrap(),
        format!("{}/{tag}", src.display())
    );
    assert_eq!(
        field(&request, "destination").unwrap(),
        format!("{}/{tag}", out.display())
    );
    let status = agent.wait_completed("race", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    // Its record is the winner's too.
    let record: Value =
        serde_json::from_slice(&std::fs::read(agent.state.join("ops/race.json")).unwrap()).unwrap();
    assert_eq!(record["uid"], winner.uid);
    assert_eq!(
        record["request"]["source"],
        format!("{}/{tag}", src.display())
    );

    // Every loser was told why.
    for u in &users {
        let losses = outcomes
            .iter()
            .filter(|o| o.0 == *u && o.2 == "EEXIST")
            .count();
        let errors = errors_as(&agent, u);
        assert_eq!(
            errors.matches("EEXIST name 'race' is in use").count(),
            losses,
            "{}: {errors}",
            u.name
        );
    }

    // Nothing left behind: one directory, one record; once removed, the
    // name and every user's count are free again.
    assert_eq!(
        root_names(&agent),
        ["README", "errors", "metrics", "race", "request", "version"]
    );
    assert_eq!(
        std::fs::read_dir(agent.state.join("ops")).unwrap().count(),
        1
    );
    let rmdir = sh_as(&winner, &format!("rmdir {}", agent.path("race").display()));
    assert!(rmdir.status.success(), "{}", stderr(&rmdir));
    assert_eq!(
        std::fs::read_dir(agent.state.join("ops")).unwrap().count(),
        0
    );
    let loser = if winner == users[0] {
        users[1]
    } else {
        users[0]
    };
    let again = agent.request_as(
        &loser,
        &format!(
            "name=race dryrun=true source={}/{}-0 destination={}/again",
            src.display(),
            loser.name,
            out.display()
        ),
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        field(&agent.read("race/request").unwrap(), "destination").unwrap(),
        format!("{}/again", out.display())
    );
}

// ---- the Kubernetes backend, against kube-testserver ----

const DM: &str = "NnfDataMovement";

/// Workflow `wf1` in PreRun with one Lustre mount on the node and the Rabbit,
/// the default profile, and a Rabbit that finishes every copy at once.
fn cluster() -> Arc<TestServer> {
    let server = Arc::new(TestServer::start(Config::default()));
    seed_wf1(
        &server,
        Wf1Mount::Lustre,
        json!({"default": true, "command": "mpirun --hostfile $HOSTFILE dcp --uid $UID --gid $GID $SRC $DEST",
               "createDestDir": true, "maxSlots": 0, "slots": 8}),
    );
    let weak = Arc::downgrade(&server);
    server.on_change(DM, move |change| {
        if change.event_type != EventType::Added {
            return;
        }
        let Some(s) = weak.upgrade() else { return };
        let _ = s.modify_object(DM, &change.namespace, &change.name, |dm| {
            dm["status"] = json!({"state": "Finished", "status": "Success", "message": ""});
        });
    });
    server
}

#[test]
fn same_name_writers_on_the_kubernetes_backend_one_wins_with_its_own_resource() {
    let server = cluster();
    let agent = kube_agent(&server, &[]);
    let users = [user("nnfdmt1"), user("nnfdmt2")];
    let outcomes = race(agent.dir.path(), &agent.path("request"), &users, |tag| {
        format!(
            "name=race workflow=wf1 namespace=default source=/mnt/nnf/lus-0/{tag} destination=/lus/global/{tag}"
        )
    });
    let (winner, tag) = the_winner(&outcomes);

    // One resource, the winner's: its uid, its source and destination.
    let dms = server.objects(DM, None);
    assert_eq!(dms.len(), 1, "{dms:#?}");
    let dm = &dms[0];
    let note: Value = serde_json::from_str(
        dm["metadata"]["annotations"]["dm.cray.hpe.com/nnf-dm-operation"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(note["name"], "race");
    assert_eq!(dm["spec"]["userId"], winner.uid, "{dm:#}");
    assert_eq!(dm["spec"]["groupId"], winner.gid, "{dm:#}");
    assert_eq!(
        dm["spec"]["source"]["path"],
        format!("/rabbit/lus-0/compute-1/{tag}"),
        "{dm:#}"
    );
    let destination = dm["spec"]["destination"]["path"].as_str().unwrap();
    assert!(destination.ends_with(&format!("/{tag}")), "{dm:#}");
    let request = agent.read("race/request").unwrap();
    assert_eq!(
        field(&request, "source").unwrap(),
        format!("/mnt/nnf/lus-0/{tag}")
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(agent.path("race")).unwrap().uid(),
        winner.uid
    );
    for u in &users {
        let losses = outcomes
            .iter()
            .filter(|o| o.0 == *u && o.2 == "EEXIST")
            .count();
        let errors = errors_as(&agent, u);
        assert_eq!(
            errors.matches("EEXIST name 'race' is in use").count(),
            losses,
            "{}: {errors}",
            u.name
        );
    }

    // Nothing left behind: once finished and removed, the resource goes and
    // the name is free for the other user.
    let status = agent.wait_completed("race", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    let rmdir = sh_as(&winner, &format!("rmdir {}", agent.path("race").display()));
    assert!(rmdir.status.success(), "{}", stderr(&rmdir));
    assert!(
        wait_until(LONG, || server.objects(DM, None).is_empty()),
        "the resource was not deleted: {:#?}",
        server.objects(DM, None)
    );
    assert_eq!(
        root_names(&agent),
        ["README", "errors", "metrics", "request", "version"]
    );
    let loser = if winner == users[0] {
        users[1]
    } else {
        users[0]
    };
    let again = agent.request_as(
        &loser,
        "name=race workflow=wf1 namespace=default source=/mnt/nnf/lus-0/again destination=/lus/global/again",
    );
    assert!(
        again.status.success(),
        "{}\n{}",
        stderr(&again),
        agent.log()
    );
    assert!(wait_until(LONG, || server.objects(DM, None).len() == 1));
    assert_eq!(server.objects(DM, None)[0]["spec"]["userId"], loser.uid);
}
