//! SIGKILL during a create, at different steps, then a restart: every task ends completed
//! or failed-and-unwound, and the host holds exactly what the task says.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1200);

/// Files a complete VM has in its directory, and nothing half-written.
fn assert_complete_files(agent: &Agent, id: &str) {
    let dir = agent.vm_dir.join(id);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // What the guest wrote on its console (once it has run) is virtlogd's, not a disk.
        .filter(|n| n != "console.log")
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk.qcow2", "nvram.fd", "seed.img"],
        "files of {id}"
    );
}

/// Kills the agent at `fault`, restarts it, and expects the create to complete.
async fn crash_then_complete(name: &str, pool: (u8, u8), fault: &str) {
    let mut agent = Agent::start(
        name,
        AgentOptions {
            pool,
            env: vec![("HVNODE_FAULT".into(), fault.into())],
            ..Default::default()
        },
    );
    let id = new_id();
    let (s, created) = agent.create(create_body(&id, name, "Crash-test-1")).await;
    assert_eq!(s, 202, "{created}");
    let ip = created["data"]["ip_address"].as_str().unwrap().to_owned();

    assert!(
        agent.wait_exit(Duration::from_secs(300)),
        "agent did not die at {fault}"
    );
    agent.start_again(Vec::new());
    let (doc, _) = agent.wait_deployment(&id, BOOT).await;

    assert_eq!(
        doc["deployment_status"],
        json!("completed"),
        "{fault}: {doc}"
    );
    assert_eq!(doc["tasks_completed"], json!(10));
    assert_eq!(domain_state(&id), "running", "{fault}");
    assert_complete_files(&agent, &id);
    let (_, vm) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(vm["data"]["status"], json!("running"));
    assert_eq!(
        vm["data"]["ips"].as_array().unwrap().len(),
        1,
        "one address held"
    );
    assert_eq!(
        vm["data"]["ips"][0]["address"],
        json!(ip),
        "the same address as admitted"
    );
    assert!(
        agent.log().contains("resuming create"),
        "the restarted agent resumed the task"
    );
    let (s, _) = agent.delete(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200);
    assert!(!domain_exists(&id));
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_the_disk_was_made_the_create_resumes() {
    crash_then_complete("crash-disk", (110, 111), "create:create_vm:after").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_after_the_domain_was_defined_the_create_resumes() {
    crash_then_complete(
        "crash-define",
        (112, 113),
        "create:configure_hardware:after",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_right_after_start_the_create_resumes() {
    crash_then_complete("crash-start", (114, 115), "create:start_vm:after").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_while_waiting_for_the_guest_the_create_resumes() {
    crash_then_complete(
        "crash-wait",
        (116, 117),
        "create:wait_for_guest_agent:before",
    )
    .await;
}

/// A create that fails (its guest cannot answer in 1 s) is unwinding when the agent is
/// killed; the restarted agent finishes the unwinding: nothing is left but the failed record.
#[tokio::test(flavor = "multi_thread")]
async fn killed_while_unwinding_the_unwind_finishes_after_restart() {
    let mut agent = Agent::start(
        "crash-unwind",
        AgentOptions {
            pool: (118, 119),
            env: vec![
                (
                    "HVNODE_FAULT".into(),
                    "create:configure_hardware:undo".into(),
                ),
                ("HVNODE_TASKS__GUEST_AGENT_TIMEOUT_S".into(), "1".into()),
            ],
            ..Default::default()
        },
    );
    let id = new_id();
    let (s, created) = agent
        .create(create_body(&id, "crash-unwind", "Crash-test-1"))
        .await;
    assert_eq!(s, 202, "{created}");
    let ip = created["data"]["ip_address"].as_str().unwrap().to_owned();

    assert!(
        agent.wait_exit(Duration::from_secs(300)),
        "agent did not die while unwinding"
    );
    assert!(domain_exists(&id), "killed before the domain was undefined");
    agent.start_again(Vec::new());
    let (doc, _) = agent.wait_deployment(&id, Duration::from_secs(120)).await;

    assert_eq!(doc["deployment_status"], json!("failed"), "{doc}");
    assert!(
        doc["error"].as_str().unwrap().contains("guest agent"),
        "{doc}"
    );
    assert!(!domain_exists(&id), "no domain left");
    assert!(!vm_dir_exists(&agent, &id), "no disk or seed left");
    let (_, vm) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(vm["data"]["status"], json!("failed"));
    assert_eq!(vm["data"]["ips"], json!([]), "the address was released");
    // The address is free again: a new VM asking for it gets it.
    let other = new_id();
    let mut body = create_body(&other, "crash-unwind-2", "Crash-test-1");
    body["ip_address"] = json!(ip);
    let (s, again) = agent.create(body).await;
    assert_eq!(s, 202, "{again}");
    assert_eq!(again["data"]["ip_address"], json!(ip));
    let (s, _) = agent.delete(&format!("/v1/vms/{other}")).await;
    assert_eq!(s, 200, "deleting a deploying VM cancels it");
    assert!(!domain_exists(&other));
    let (s, _) = agent.delete(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200);
}
