//! Schema-driven fuzzing of the whole API: schemathesis (from PyPI, installed by
//! `tests/rig/up`) reads the agent's own `GET /v1/openapi.json` and sends generated valid
//! and invalid requests to every operation, with the bearer token, checking that nothing
//! answers 5xx, that every status code, content type, header and body is what the
//! document promises, that what the document forbids is refused, and that requests
//! without the token are refused.
//!
//! The agent under fuzz takes no VMs (`capacity.cpu_overcommit = 0`): a generated create
//! passes validation and is then refused for capacity, so the fuzzer exercises every check
//! without booting guests.

use std::process::Command;

use crate::harness::*;

fn schemathesis() -> String {
    std::env::var("HVNODE_SCHEMATHESIS")
        .unwrap_or_else(|_| "/var/cache/hvnode/venv-schemathesis/bin/schemathesis".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_document() {
    let agent = Agent::start(
        "api-fuzz",
        AgentOptions {
            pool: (194, 199),
            // No vCPU to give: every create that passes validation is refused for capacity.
            extra_toml: "[capacity]\ncpu_overcommit = 0.0\n".into(),
            ..Default::default()
        },
    );
    let report = agent.dir.join("schemathesis");
    // A deadline for the whole run: a fuzzer that hangs fails the test instead of the
    // suite's own limit.
    let out = Command::new("timeout")
        .args(["--kill-after=10", "900"])
        .arg(schemathesis())
        // Its cache (`.schemathesis/`) goes with the agent's directory, not the checkout.
        .current_dir(&agent.dir)
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
        .args(["--request-timeout", "30", "--no-color"])
        .args(["--suppress-health-check", "all"])
        .arg("--report-dir")
        .arg(&report)
        .args(["--report", "junit"])
        .output()
        .expect("schemathesis (tests/rig/up installs it)");
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
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n--- agent\n{}",
        agent.log_tail(40)
    );
    let (s, health) = agent.get("/v1/health").await;
    assert_eq!(s, 200, "the agent lives on: {health}");
    assert!(
        !agent.log().contains("panicked"),
        "no handler panicked under fuzzing"
    );
    assert!(
        !agent.log().contains("create admitted"),
        "no VM was created: the fuzzer's creates are refused for capacity"
    );
}
