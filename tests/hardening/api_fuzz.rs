//! Schema-driven fuzzing of the whole API: schemathesis (from PyPI, installed by
//! `tests/rig/up`) reads the agent's own `GET /v1/openapi.json` and sends generated valid
//! and invalid requests to every operation, with the bearer token, checking that nothing
//! answers 5xx, that every status code, content type, header and body is what the
//! document promises, that what the document forbids is refused, and that requests
//! without the token are refused.
//!
//! It fuzzes something: before it runs, the agent has deployed two real VMs through the
//! API (then suspended them, so the guests do not take the rig's cores from the fuzzer), each
//! with a snapshot, and one with an extra address. `api_fuzz.py`, schemathesis's hooks
//! module here, steers generated per-VM requests to them (and task ids, addresses and
//! snapshot names to theirs), so the per-VM operations answer from real VMs instead of
//! stopping at 404; it keeps off them only what must not run (deleting them, reinstalling
//! them: see that file for each case and why), and logs every call, from which this test
//! counts how many reached a fixture and demands that every per-VM read did.
//!
//! The capacity is two VMs (`capacity.max_vms = 2`): a generated create that passes
//! validation is refused for capacity, so no guest beyond the fixtures boots.
//!
//! Besides the fuzzer's own response checks, every read about a VM is asked once for each
//! fixture, before and after the fuzzing, and its real answer validated against the
//! document's schema for that route and status (`api_fuzz.py validate`, with the
//! `jsonschema_rs` that schemathesis brings); a deliberately mislabelled answer must fail
//! that validation, so it is known to be able to fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

/// The slice of the rig's pool: two fixtures and two free addresses for the fuzzer's
/// extra-IP requests.
const POOL: (u8, u8) = (243, 246);
const BOOT: Duration = Duration::from_secs(1200);
/// A snapshot each fixture holds when the fuzzing starts, and the schema's example name,
/// which the examples phase creates: the names the hooks steer `{name}` to.
const SNAPSHOTS: [&str; 2] = ["fixture_snap", "before_upgrade"];
/// Per-VM reads: each must have answered 2xx from a fixture during the fuzzing.
const VM_READS: [&str; 5] = [
    "/v1/vms/{id}",
    "/v1/vms/{id}/status",
    "/v1/vms/{id}/deployment",
    "/v1/vms/{id}/ips",
    "/v1/vms/{id}/snapshots",
];

fn schemathesis() -> String {
    std::env::var("HVNODE_SCHEMATHESIS")
        .unwrap_or_else(|_| "/var/cache/hvnode/venv-schemathesis/bin/schemathesis".into())
}

/// The venv's Python, beside its `schemathesis`.
fn python() -> PathBuf {
    Path::new(&schemathesis()).with_file_name("python")
}

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hardening/api_fuzz.py")
}

struct Fixture {
    id: String,
    task: String,
    address: String,
}

/// One real answer, as `api_fuzz.py validate` reads it.
async fn answer(
    client: &reqwest::Client,
    agent: &Agent,
    route: &str,
    path: &str,
) -> (u16, Value, Value) {
    let resp = client
        .get(format!("{}{path}", agent.url))
        .bearer_auth(&agent.token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = resp.text().await.unwrap();
    let body = if content_type.starts_with("application/json") {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("GET {path}: not JSON: {text}"))
    } else {
        Value::String(text)
    };
    let record = json!({"method": "GET", "route": route, "path": path, "status": status,
        "content_type": content_type, "body": body});
    (status, body, record)
}

/// Runs the validator on `answers`; (passed, its report).
fn validate(agent: &Agent, doc: &Path, answers: &[Value], name: &str) -> (bool, String) {
    let file = agent.dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(answers).unwrap()).unwrap();
    let out = Command::new(python())
        .arg(helper())
        .arg("validate")
        .arg(doc)
        .arg(&file)
        .output()
        .expect("the schemathesis venv's python (tests/rig/up installs it)");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), report)
}

/// Every read about the fixtures, asked for real: each answers 200 about that VM, and
/// every answer is what the document says that route answers.
async fn check_real_answers(
    agent: &Agent,
    doc: &Path,
    fixtures: &[Fixture],
    when: &str,
) -> Vec<Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut answers = Vec::new();
    // Fixtures not stopped: /metrics has series of running (and paused) VMs only.
    let mut active = Vec::new();
    for f in fixtures {
        let id = &f.id;
        for route in VM_READS {
            let path = route.replace("{id}", id);
            let (s, body, rec) = answer(&client, agent, route, &path).await;
            assert_eq!(s, 200, "{when}: GET {path}: {body}");
            let data = &body["data"];
            if route.ends_with("/status") && data["status"] != json!("stopped") {
                active.push(id.clone());
            }
            if route.ends_with("/ips") {
                // The address list names no VM: it holds the VM's primary address.
                assert!(
                    data["ips"]
                        .as_array()
                        .is_some_and(|ips| ips.iter().any(|ip| ip["address"] == json!(f.address))),
                    "{when}: GET {path}: {body}"
                );
            } else {
                let about = data["vps_id"].as_str().or(data["id"].as_str());
                assert_eq!(about, Some(id.as_str()), "{when}: GET {path}: {body}");
            }
            answers.push(rec);
        }
        let path = format!("/v1/tasks?vps_id={id}");
        let (s, body, rec) = answer(&client, agent, "/v1/tasks", &path).await;
        assert_eq!(s, 200, "{when}: GET {path}: {body}");
        let tasks = body["data"]["tasks"].as_array().expect("data.tasks");
        assert!(
            !tasks.is_empty() && tasks.iter().all(|t| t["vps_id"] == json!(id)),
            "{when}: GET {path}: its tasks, and only its: {body}"
        );
        answers.push(rec);
        let path = format!("/v1/tasks/{}", f.task);
        let (s, body, rec) = answer(&client, agent, "/v1/tasks/{id}", &path).await;
        assert_eq!(s, 200, "{when}: GET {path}: {body}");
        assert_eq!(body["data"]["vps_id"], json!(id), "{when}: {body}");
        answers.push(rec);
    }
    for path in ["/v1/vms", "/v1/vms?status=&limit=100&offset=0"] {
        let (s, body, rec) = answer(&client, agent, "/v1/vms", path).await;
        assert_eq!(s, 200, "{when}: GET {path}: {body}");
        for f in fixtures {
            assert!(
                body["data"]["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i["id"] == json!(f.id)),
                "{when}: GET {path} lists {}: {body}",
                f.id
            );
        }
        answers.push(rec);
    }
    let (s, body, rec) = answer(&client, agent, "/v1/node", "/v1/node").await;
    assert_eq!(s, 200, "{when}: GET /v1/node: {body}");
    assert_eq!(
        body["data"]["instances"]["total"],
        json!(2),
        "{when}: {body}"
    );
    answers.push(rec);
    let (s, body, rec) = answer(&client, agent, "/metrics", "/metrics").await;
    assert_eq!(s, 200, "{when}: GET /metrics: {body}");
    for id in &active {
        assert!(
            body.as_str().unwrap().contains(id.as_str()),
            "{when}: /metrics has series of {id}, not stopped"
        );
    }
    answers.push(rec);
    let (ok, report) = validate(agent, doc, &answers, &format!("answers-{when}"));
    eprintln!("--- real answers {when} the fuzzing\n{report}");
    assert!(
        ok,
        "{when} the fuzzing: real answers outside the document:\n{report}"
    );
    answers
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_document() {
    let started = Instant::now();
    let agent = Agent::start(
        "api-fuzz",
        AgentOptions {
            pool: POOL,
            // Room for the two fixtures and no more: a generated create that passes
            // validation is refused for capacity instead of booting a guest.
            extra_toml: "[capacity]\nmax_vms = 2\n".into(),
            // A tap prefix (`network.tap_prefix`) no other agent on the rig is given: an
            // agent with the same one, running or killed with its filter table left behind,
            // would drop these guests' frames (their deployment never gets past
            // `verify_connectivity`).
            env: vec![("HVNODE_NETWORK__TAP_PREFIX".into(), "\"fz\"".into())],
            ..Default::default()
        },
    );

    // --- The fixtures: two real VMs, deployed through the API, then suspended.
    let mut fixtures = Vec::new();
    for (n, host) in ["fuzz-paused", "fuzz-power.example.net"].iter().enumerate() {
        let id = new_id();
        let password = format!(
            "Fuzz-{}-{n}x9",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let (s, body) = agent.create(create_body(&id, host, &password)).await;
        assert_eq!(s, 202, "create {host}: {body}");
        fixtures.push(Fixture {
            id,
            task: body["data"]["task_id"].as_str().unwrap().to_owned(),
            address: body["data"]["ip_address"].as_str().unwrap().to_owned(),
        });
    }
    agent
        .wait_deployed(&[&fixtures[0].id, &fixtures[1].id], BOOT)
        .await;
    let deployed = started.elapsed();
    for f in &fixtures {
        let (s, body) = agent
            .post(&format!("/v1/vms/{}/suspend", f.id), json!({}))
            .await;
        assert_eq!(
            (s, &body["data"]["status"]),
            (200, &json!("suspended")),
            "{body}"
        );
        let (s, body) = agent
            .post(
                &format!("/v1/vms/{}/snapshots", f.id),
                json!({"name": SNAPSHOTS[0], "description": "before the fuzzing"}),
            )
            .await;
        assert_eq!(s, 201, "{body}");
    }
    let (s, body) = agent
        .post(&format!("/v1/vms/{}/ips", fixtures[0].id), json!({}))
        .await;
    assert_eq!(s, 201, "an extra address for the paused fixture: {body}");
    let (s, status) = agent
        .get(&format!("/v1/vms/{}/status", fixtures[0].id))
        .await;
    assert_eq!(
        (s, &status["data"]["status"]),
        (200, &json!("suspended")),
        "{status}"
    );

    // --- The document as served, and real answers checked against it.
    let doc = agent.dir.join("openapi.json");
    let (s, served) = agent.get("/v1/openapi.json").await;
    assert_eq!(s, 200, "{served}");
    std::fs::write(&doc, serde_json::to_vec(&served).unwrap()).unwrap();
    let answers = check_real_answers(&agent, &doc, &fixtures, "before").await;
    assert!(
        answers.iter().any(|a| a["route"] == json!("/metrics")
            && fixtures
                .iter()
                .all(|f| a["body"].as_str().unwrap().contains(&f.id))),
        "/metrics has series of both suspended fixtures"
    );
    // The validator can fail: a real status document is not a deployment document.
    let mut wrong = answers
        .iter()
        .find(|a| a["route"] == json!("/v1/vms/{id}/status"))
        .unwrap()
        .clone();
    wrong["route"] = json!("/v1/vms/{id}/deployment");
    let (ok, report) = validate(&agent, &doc, &[wrong], "answers-mislabelled");
    assert!(
        !ok && report.contains("FAIL"),
        "a status document passed as a deployment document:\n{report}"
    );

    // --- The fuzzing.
    let report = agent.dir.join("schemathesis");
    let calls = agent.dir.join("calls.ndjson");
    let addresses: Vec<String> = (POOL.0..=POOL.1).map(|n| agent.rig.addr(n)).collect();
    assert!(fixtures.iter().all(|f| addresses.contains(&f.address)));
    let fuzz_started = Instant::now();
    // A deadline for the whole run: a fuzzer that hangs fails the test instead of the
    // suite's own limit.
    let out = Command::new("timeout")
        .args(["--kill-after=10", "900"])
        .arg(schemathesis())
        // Its cache (`.schemathesis/`) goes with the agent's directory, not the checkout.
        .current_dir(&agent.dir)
        .env("SCHEMATHESIS_HOOKS", helper())
        .env("HVNODE_FUZZ_PAUSED", &fixtures[0].id)
        .env("HVNODE_FUZZ_POWER", &fixtures[1].id)
        .env(
            "HVNODE_FUZZ_TASKS",
            format!("{},{}", fixtures[0].task, fixtures[1].task),
        )
        .env("HVNODE_FUZZ_ADDRESSES", addresses.join(","))
        .env("HVNODE_FUZZ_SNAPSHOTS", SNAPSHOTS.join(","))
        .env("HVNODE_FUZZ_LOG", &calls)
        .arg("run")
        .arg(format!("{}/v1/openapi.json", agent.url))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", agent.token),
        ])
        // Every check but `positive_data_acceptance`: it wants each schema-valid request
        // accepted, and no static document can say which templates this node holds or
        // which subnets are still free (those answer 400, by the contract).
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "100", "--workers", "2", "--seed", "4242"])
        // Requests on real VMs wait for their task: a snapshot with the guest's memory, a
        // power action, an address the guest agent is asked about.
        .args(["--request-timeout", "120", "--no-color"])
        .args(["--suppress-health-check", "all"])
        .arg("--report-dir")
        .arg(&report)
        .args(["--report", "junit"])
        .output()
        .expect("schemathesis (tests/rig/up installs it)");
    let fuzz_time = fuzz_started.elapsed();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let summary: String = text
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("--- schemathesis\n{summary}");
    let logs = agent.rig.root.join("e2e-logs");
    let _ = std::fs::create_dir_all(&logs);
    let _ = std::fs::write(logs.join("schemathesis.txt"), &text);

    // --- What reached the fixtures.
    let log = std::fs::read_to_string(&calls).unwrap_or_default();
    let _ = std::fs::write(logs.join("api-fuzz-calls.ndjson"), &log);
    let calls: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (method route) -> (calls, on a fixture, 2xx from a fixture)
    let mut per_op: BTreeMap<String, (u32, u32, u32)> = BTreeMap::new();
    for c in &calls {
        let (method, route) = (c["method"].as_str().unwrap(), c["route"].as_str().unwrap());
        // Per-VM operations of the document (not the probes with undocumented methods).
        if !route.starts_with("/v1/vms/{id}")
            || served["paths"][route][method.to_lowercase()].is_null()
        {
            continue;
        }
        let e = per_op.entry(format!("{method} {route}")).or_default();
        e.0 += 1;
        if !c["vm"].is_null() {
            e.1 += 1;
            if (200..300).contains(&c["status"].as_u64().unwrap()) {
                e.2 += 1;
            }
        }
    }
    let per_vm: u32 = per_op.values().map(|e| e.0).sum();
    let on_fixture: u32 = per_op.values().map(|e| e.1).sum();
    let real_2xx: u32 = per_op.values().map(|e| e.2).sum();
    let table: String = per_op
        .iter()
        .map(|(op, (n, f, ok))| format!("  {op:<48} {n:>5} {f:>5} {ok:>5}\n"))
        .collect();
    // `  4260 generated, 4260 passed, 50 skipped`
    let generated = text
        .lines()
        .find(|l| {
            let l = l.trim_start();
            l.contains(" generated") && l.starts_with(|c: char| c.is_ascii_digit())
        })
        .unwrap_or("")
        .trim()
        .to_owned();
    let figures = format!(
        "fixtures deployed in {deployed:?}, fuzzing took {fuzz_time:?}; schemathesis: \
         {generated}\n{} calls, {per_vm} on per-VM routes, {on_fixture} of those on a \
         fixture, {real_2xx} answered 2xx by a fixture\n  {:<48} {:>5} {:>5} {:>5}\n{table}",
        calls.len(),
        "operation",
        "calls",
        "fixt",
        "2xx"
    );
    eprintln!("--- api fuzz figures\n{figures}");
    let _ = std::fs::write(logs.join("api-fuzz-figures.txt"), &figures);
    // Its verdict after the figures, which tell what it reached either way.
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n--- agent\n{}",
        agent.log_tail(40)
    );
    for route in VM_READS {
        let ok = per_op.get(&format!("GET {route}")).map_or(0, |e| e.2);
        assert!(
            ok > 0,
            "no GET {route} reached a fixture and answered 2xx: the fuzzer was not steered\n{figures}"
        );
    }
    let answered: usize = per_op.values().filter(|e| e.2 > 0).count();
    assert!(
        answered >= 10,
        "only {answered} per-VM operations answered 2xx from a real VM\n{figures}"
    );

    // --- The fixtures lived through it, and still answer as documented.
    check_real_answers(&agent, &doc, &fixtures, "after").await;
    let (s, health) = agent.get("/v1/health").await;
    assert_eq!(s, 200, "the agent lives on: {health}");
    assert!(
        !agent.log().contains("panicked"),
        "no handler panicked under fuzzing"
    );
    assert_eq!(
        agent.log().matches("create admitted").count(),
        2,
        "no VM but the fixtures was created: the fuzzer's creates are refused for capacity"
    );
    eprintln!("api fuzz: {:?} in all", started.elapsed());
}
