//! What a user writes never reaches a shell as code: the Kubernetes backend
//! refuses text the Rabbit's bash would interpret (through the control
//! filesystem and the gRPC door alike), and the local backend's command
//! profiles get every substituted value as exactly one word.

#[path = "grpc_client.rs"]
mod grpc_client;

use std::path::Path;
use std::time::Duration;

use dm_proto::data_movement_create_response::Status as CreateStatus;
use dm_proto::{DataMovementCreateRequest, DataMovementWorkflow};
use grpc_client::Client;
use integration_tests::kube::{kube_agent, seed_wf1, Wf1Mount};
use integration_tests::*;
use kube_testserver::{Config, TestServer};
use serde_json::json;

const LONG: Duration = Duration::from_secs(30);
const DM: &str = "NnfDataMovement";
const SRC: &str = "/mnt/nnf/lus-0/ckpt/step10";
const DST: &str = "/lus/global/me/step10";

// ---- the Kubernetes backend ----

/// Workflow `wf1` on Lustre ([`seed_wf1`]) with the upstream chart's default profile.
fn cluster() -> TestServer {
    let server = TestServer::start(Config::default());
    seed_wf1(
        &server,
        Wf1Mount::Lustre,
        json!({"default": true,
               "command": "mpirun --allow-run-as-root --hostfile $HOSTFILE dcp --progress 1 --uid $UID --gid $GID $SRC $DEST",
               "createDestDir": true, "maxSlots": 0, "slots": 8}),
    );
    server
}

/// `value` in the request grammar: double-quoted with its escapes.
fn grammar(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One request per `write(2)` to the request file, as `user`: for each, "ok"
/// or the errno's name, then the caller's newest `errors` line.
fn write_all_as(agent: &Agent, user: &User, requests: &[String]) -> Vec<(String, String)> {
    let script = r#"
import errno, json, os, sys
request, errors = sys.argv[1], sys.argv[2]
for text in json.loads(sys.stdin.read()):
    fd = os.open(request, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
        result, line = "ok", ""
    except OSError as e:
        result = errno.errorcode[e.errno]
        with open(errors) as f:
            line = f.read().splitlines()[-1]
    finally:
        os.close(fd)
    print(json.dumps([result, line]))
"#;
    let mut child = as_user_cmd(user, "/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(agent.path("request"))
        .arg(agent.path("errors"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed for the control-filesystem writes");
    let input = serde_json::to_vec(requests).unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "writer: {}", stderr(&out));
    let results: Vec<(String, String)> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), requests.len(), "{}", stderr(&out));
    results
}

fn grpc_request(
    source: &str,
    destination: &str,
    dcp: &str,
    mpirun: &str,
) -> DataMovementCreateRequest {
    DataMovementCreateRequest {
        workflow: Some(DataMovementWorkflow {
            name: "wf1".into(),
            namespace: "default".into(),
        }),
        dcp_options: dcp.into(),
        mpirun_options: mpirun.into(),
        ..grpc_client::copy(source, destination)
    }
}

/// Every character class the Rabbit's bash would interpret: the value
/// (an option unless `path`), the character the refusal must name.
fn refused_cases() -> Vec<(&'static str, String, char)> {
    let mut cases = Vec::new();
    for c in ['"', '\'', '`', '\\'] {
        cases.push(("quote", format!("-x A{c}B"), c));
    }
    for c in ";&|<>()$*?[]{}!".chars() {
        cases.push(("operator", format!("--bufsize 1MB{c}id"), c));
    }
    for c in ['\n', '\t', '\r', '\u{1b}'] {
        cases.push(("control", format!("--bufsize{c}1MB"), c));
    }
    cases.push(("start", "~/opts".into(), '~'));
    cases.push(("start", "--bufsize 1MB #x".into(), '#'));
    cases.push(("assignment", "-x HOME=~/x".into(), '~'));
    // The measured attacks of the issue.
    cases.push(("attack", "--bufsize 1MB; touch /tmp/pwned".into(), ';'));
    cases.push(("attack", "$(id>/tmp/pwned)".into(), '$'));
    cases.push(("attack", "`id`".into(), '`'));
    cases.push(("attack", "-x A | sh".into(), '|'));
    cases
}

/// How a refusal names `c`: `';'`, `"'"`, `U+000A`.
fn char_name(c: char) -> String {
    match c {
        '\'' => "\"'\"".into(),
        c if (c as u32) < 0x20 || c == '\u{7f}' => format!("U+{:04X}", c as u32),
        c => format!("'{c}'"),
    }
}

fn refused_paths() -> Vec<(&'static str, String, String, String)> {
    // (key, source, destination, what the reason names)
    vec![
        ("source", format!("{SRC}/e;touch"), DST.into(), "';'".into()),
        (
            "source",
            format!("{SRC}/a b"),
            DST.into(),
            "whitespace".into(),
        ),
        (
            "source",
            format!("{SRC}/a\tb"),
            DST.into(),
            "whitespace".into(),
        ),
        ("source", format!("{SRC}/$(id)"), DST.into(), "'$'".into()),
        ("source", format!("{SRC}/`id`"), DST.into(), "'`'".into()),
        (
            "destination",
            SRC.into(),
            format!("{DST}&&id"),
            "'&'".into(),
        ),
        (
            "destination",
            SRC.into(),
            format!("{DST}/x y"),
            "whitespace".into(),
        ),
        (
            "destination",
            SRC.into(),
            format!("{DST}/a'b"),
            "\"'\"".into(),
        ),
        ("destination", SRC.into(), format!("{DST}/*"), "'*'".into()),
        (
            "destination",
            SRC.into(),
            format!("{DST}/a\nb"),
            "whitespace".into(),
        ),
    ]
}

#[test]
fn kube_backend_refuses_shell_text_through_the_control_filesystem() {
    let server = cluster();
    let agent = kube_agent(&server, &[]);
    let u = user("nnfdmt1");
    let base = format!("workflow=wf1 namespace=default source={SRC} destination={DST}");
    let mut requests = Vec::new();
    let mut expect = Vec::new();
    for (class, value, c) in refused_cases() {
        for key in ["dcp_options", "mpirun_options"] {
            requests.push(format!("{base} {key}={}", grammar(&value)));
            expect.push((format!("{class} {value:?}"), key.to_string(), char_name(c)));
        }
    }
    for (key, source, destination, what) in refused_paths() {
        requests.push(format!(
            "workflow=wf1 namespace=default source={} destination={}",
            grammar(&source),
            grammar(&destination)
        ));
        expect.push((
            format!("{source:?} -> {destination:?}"),
            key.to_string(),
            what,
        ));
    }
    let results = write_all_as(&agent, &u, &requests);
    for ((case, key, what), (result, line)) in expect.iter().zip(&results) {
        assert_eq!(result, "EINVAL", "{case}: {line}");
        assert!(
            line.contains(" EINVAL ") && line.contains(&format!("{key}: ")) && line.contains(what),
            "{case}: errors line {line:?} should name {key} and {what}"
        );
        if key == "source" || key == "destination" {
            assert!(
                line.contains("the Rabbit's command cannot carry that path"),
                "{line}"
            );
        }
    }
    assert!(
        server.objects(DM, None).is_empty(),
        "no NnfDataMovement for a refused request: {:?}",
        server.objects(DM, None)
    );

    // Plain options pass through unchanged, word for word.
    let plain = [
        ("--chunksize 64MB", "--mca btl self"),
        ("--bufsize 1MB --progress 5", "-x FOO=bar"),
        ("-v", "--map-by ppr:1:node"),
    ];
    let requests: Vec<String> = plain
        .iter()
        .enumerate()
        .map(|(i, (dcp, mpirun))| {
            format!(
                "name=plain{i} {base} dcp_options={} mpirun_options={}",
                grammar(dcp),
                grammar(mpirun)
            )
        })
        .collect();
    for (result, line) in write_all_as(&agent, &u, &requests) {
        assert_eq!(result, "ok", "{line}\nlog:\n{}", agent.log());
    }
    let dms = server.objects(DM, None);
    assert_eq!(dms.len(), plain.len());
    for (i, (dcp, mpirun)) in plain.iter().enumerate() {
        let dm = dms
            .iter()
            .find(|o| {
                o["metadata"]["annotations"]["dm.cray.hpe.com/nnf-dm-operation"]
                    .as_str()
                    .is_some_and(|a| a.contains(&format!("\"name\":\"plain{i}\"")))
            })
            .unwrap_or_else(|| panic!("no resource for plain{i}: {dms:?}"));
        assert_eq!(dm["spec"]["userConfig"]["dcpOptions"], *dcp);
        assert_eq!(dm["spec"]["userConfig"]["mpirunOptions"], *mpirun);
        assert_eq!(
            dm["spec"]["source"]["path"],
            "/rabbit/lus-0/compute-1/ckpt/step10"
        );
        assert_eq!(dm["spec"]["destination"]["path"], DST);
    }
}

#[test]
fn kube_backend_refuses_shell_text_through_the_grpc_door() {
    let server = cluster();
    let agent = kube_agent(&server, &[]);
    let mut client = Client::of(&agent);
    let check = |client: &mut Client, request: DataMovementCreateRequest, key: &str, what: &str| {
        let case = format!("{request:?}");
        let response = client.create(request);
        assert_eq!(
            CreateStatus::try_from(response.status),
            Ok(CreateStatus::Invalid),
            "{case}: {response:?}"
        );
        assert!(response.uid.is_empty(), "{case}: {response:?}");
        assert!(
            response.message.starts_with(&format!("{key}: ")) && response.message.contains(what),
            "{case}: message {:?} should name {key} and {what}",
            response.message
        );
        // The same words as the control filesystem, in the caller's `errors`.
        let errors = agent.read("errors").unwrap();
        let line = errors.lines().last().unwrap_or("");
        assert!(
            line.contains(" EINVAL ") && line.ends_with(&response.message),
            "{case}: errors line {line:?}"
        );
    };
    for (_, value, c) in refused_cases() {
        let what = char_name(c);
        check(
            &mut client,
            grpc_request(SRC, DST, &value, ""),
            "dcp_options",
            &what,
        );
        check(
            &mut client,
            grpc_request(SRC, DST, "", &value),
            "mpirun_options",
            &what,
        );
    }
    for (key, source, destination, what) in refused_paths() {
        check(
            &mut client,
            grpc_request(&source, &destination, "", ""),
            key,
            &what,
        );
    }
    assert!(
        server.objects(DM, None).is_empty(),
        "no NnfDataMovement for a refused request"
    );

    let response = client.create(grpc_request(
        SRC,
        DST,
        "--chunksize 64MB",
        "--mca btl self -x FOO=bar --map-by ppr:1:node",
    ));
    assert_eq!(
        CreateStatus::try_from(response.status),
        Ok(CreateStatus::Success),
        "{response:?}\nlog:\n{}",
        agent.log()
    );
    let dms = server.objects(DM, None);
    assert_eq!(dms.len(), 1);
    assert_eq!(
        dms[0]["spec"]["userConfig"]["dcpOptions"],
        "--chunksize 64MB"
    );
    assert_eq!(
        dms[0]["spec"]["userConfig"]["mpirunOptions"],
        "--mca btl self -x FOO=bar --map-by ppr:1:node"
    );
}

// ---- the local backend's command profiles ----

/// Names that a shell would split, unquote, run or take as an option.
const HOSTILE: &[&str] = &[
    "we ird",
    "it's",
    "say \"hi\"",
    "a;touch MARK",
    "$(touch MARK)",
    "`touch MARK`",
    "new\nline",
    "-rf",
    "a&&touch MARK|x>y",
    "*",
    "$DEST",
];

/// `name` with MARK standing for a command word that names `marker` without
/// holding a `/` (a file name cannot): bash makes each `/` with printf.
fn hostile(name: &str, marker: &Path) -> String {
    let slash_free = marker.to_str().unwrap().replace('/', "$(printf '\\057')");
    name.replace("MARK", &slash_free)
}

/// The test would prove nothing if a name did not run when pasted into a
/// command unquoted: check that it does, as the user, then remove the marker.
fn assert_runs_unquoted(user: &User, name: &str, marker: &Path, cwd: &Path) {
    let out = as_user_cmd(user, "bash")
        .arg("-c")
        .arg(format!(": {name}"))
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        marker.exists(),
        "{name:?} unquoted should create {}: {}",
        marker.display(),
        stderr(&out)
    );
    std::fs::remove_file(marker).unwrap();
}

/// A writable-by-everyone scratch directory (the copies run as the user).
fn open_dir(parent: &Path, name: &str) -> std::path::PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    sh(&format!(
        "chmod 1777 {}",
        shell_quote(dir.to_str().unwrap())
    ));
    dir
}

#[test]
fn profile_values_are_single_words_and_copies_land_where_they_should() {
    let dir = scratch();
    let work = open_dir(dir.path(), "work");
    let marker = work.join("pwned");
    let profiles = dir.path().join("profiles.json");
    std::fs::write(&profiles, r#"[{"name":"cp","command":"cp -r $SRC $DEST"}]"#).unwrap();
    let agent = Agent::start(&["--profiles", profiles.to_str().unwrap()]);
    let u = user("nnfdmt1");
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for (i, name) in HOSTILE.iter().enumerate() {
        let name = hostile(name, &marker);
        if name != *HOSTILE.get(i).unwrap() {
            assert_runs_unquoted(&u, &name, &marker, &work);
        }
        // A source directory with the name, holding one file, as the user.
        let case = work.join(format!("case{i}"));
        let src = case.join(&name);
        let out = as_user_cmd(&u, "/usr/bin/python3")
            .arg("-c")
            .arg("import os, sys\nos.makedirs(sys.argv[1])\nopen(os.path.join(sys.argv[1], 'data'), 'w').write(sys.argv[2])\nos.mkdir(sys.argv[3])")
            .arg(&src)
            .arg(format!("payload {i}"))
            .arg(case.join(format!("out {name}")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let dest = case.join(format!("out {name}")).join(&name);
        requests.push(format!(
            "name=hostile{i} profile=cp source={} destination={}",
            grammar(src.to_str().unwrap()),
            grammar(dest.to_str().unwrap())
        ));
        expected.push((name, dest.join("data"), format!("payload {i}")));
    }
    for (result, line) in write_all_as(&agent, &u, &requests) {
        assert_eq!(result, "ok", "{line}");
    }
    for (i, (name, data, payload)) in expected.iter().enumerate() {
        let status = agent.wait_completed(&format!("hostile{i}"), LONG);
        assert_eq!(
            field(&status, "status").as_deref(),
            Some("success"),
            "{name:?}: {status}\n{}",
            agent
                .read(&format!("hostile{i}/message"))
                .unwrap_or_default()
        );
        assert_eq!(
            std::fs::read_to_string(data).ok().as_deref(),
            Some(payload.as_str()),
            "{name:?}: the copy is not at {}",
            data.display()
        );
    }
    assert!(!marker.exists(), "a file name ran as a command");
}

#[test]
fn profile_options_are_split_by_the_request_grammar_into_separate_words() {
    let dir = scratch();
    let work = open_dir(dir.path(), "work");
    let marker = work.join("pwned");
    // A stand-in for dcp and mpirun: records its words, NUL-separated, next to
    // its last word (the destination), then copies like `cp -r`.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let recorder = "#!/bin/bash\nfor last; do :; done\nprintf '%s\\0' \"$(basename \"$0\")\" \"$@\" >> \"$last.args\"\n";
    write_executable(
        &bin.join("mpirun"),
        format!("{recorder}while [ $# -gt 0 ] && [ \"${{1##*/}}\" != dcp ]; do shift; done\nexec \"$@\"\n")
            .as_bytes(),
    );
    write_executable(
        &bin.join("dcp"),
        format!("{recorder}src=\"${{@: -2:1}}\"\ncp -r -- \"$src\" \"$last\"\n").as_bytes(),
    );
    let profiles = dir.path().join("profiles.json");
    std::fs::write(
        &profiles,
        format!(
            r#"[{{"name":"dcp","command":"{0}/mpirun -np 1 {0}/dcp --progress 1 $SRC $DEST"}}]"#,
            bin.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(&["--profiles", profiles.to_str().unwrap()]);
    let u = user("nnfdmt1");
    let src = work.join(hostile("src a;touch MARK", &marker));
    let out = sh_as(
        &u,
        &format!(
            "mkdir -p {0} && echo data > {0}/f",
            shell_quote(src.to_str().unwrap())
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dest = work.join(hostile("dest $(touch MARK)", &marker));
    let dcp_options = format!(
        "--label \"a b;touch {}\" -v \"\" \"q\\\"uote\"",
        marker.display()
    );
    let mpirun_options = format!("-x \"FOO=bar baz\" `touch {}`", marker.display());
    let request = format!(
        "name=opts profile=dcp source={} destination={} dcp_options={} mpirun_options={}",
        grammar(src.to_str().unwrap()),
        grammar(dest.to_str().unwrap()),
        grammar(&dcp_options),
        grammar(&mpirun_options)
    );
    let results = write_all_as(&agent, &u, &[request]);
    assert_eq!(results[0].0, "ok", "{}", results[0].1);
    let status = agent.wait_completed("opts", LONG);
    assert_eq!(
        field(&status, "status").as_deref(),
        Some("success"),
        "{status}\n{}",
        agent.read("opts/message").unwrap_or_default()
    );
    let args = std::fs::read(format!("{}.args", dest.display())).expect("the recorded words");
    let words: Vec<String> = args
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let (src, dest) = (src.to_str().unwrap(), dest.to_str().unwrap());
    let label = format!("a b;touch {}", marker.display());
    let dcp_words = [
        "--label",
        &label,
        "-v",
        "",
        "q\"uote",
        "--progress",
        "1",
        src,
        dest,
    ];
    let dcp_path = format!("{}/dcp", bin.display());
    let backquoted = format!("{}`", marker.display());
    let mut want: Vec<&str> = vec![
        "mpirun",
        "-x",
        "FOO=bar baz",
        "`touch",
        &backquoted,
        "-np",
        "1",
    ];
    want.push(&dcp_path);
    want.extend(dcp_words);
    want.push("dcp");
    want.extend(dcp_words);
    // Each recording ends in a NUL.
    want.push("");
    assert_eq!(words, want);
    assert_eq!(
        std::fs::read_to_string(Path::new(dest).join("f")).unwrap(),
        "data\n"
    );
    assert!(!marker.exists(), "an option ran as a command");
}

#[test]
fn an_unterminated_quote_in_the_options_of_a_command_profile_is_einval() {
    let dir = scratch();
    let profiles = dir.path().join("profiles.json");
    std::fs::write(&profiles, r#"[{"name":"cp","command":"cp -r $SRC $DEST"}]"#).unwrap();
    let agent = Agent::start(&["--profiles", profiles.to_str().unwrap()]);
    let u = user("nnfdmt1");
    let results = write_all_as(
        &agent,
        &u,
        &[format!(
            "profile=cp source=/etc/hostname destination=/tmp/x dcp_options={}",
            grammar("--label \"open")
        )],
    );
    assert_eq!(results[0].0, "EINVAL");
    assert!(
        results[0].1.contains("dcp_options: unterminated quote"),
        "{}",
        results[0].1
    );
}
