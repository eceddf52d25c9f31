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

/// Sends a request to an agent that may die while it answers; only the journal matters.
async fn fire(agent: &Agent, method: &str, path: &str, body: serde_json::Value) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let _ = client
        .request(method.parse().unwrap(), format!("{}{path}", agent.url))
        .bearer_auth(&agent.token)
        .json(&body)
        .send()
        .await;
}

/// The newest task of `kind` on `vm` once it has ended.
async fn ended(agent: &Agent, vm: &str, kind: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    loop {
        let (_, list) = agent
            .get(&format!("/v1/tasks?vps_id={vm}&kind={kind}&limit=1"))
            .await;
        let t = list["data"]["tasks"][0].clone();
        if ["completed", "failed", "cancelled"].contains(&t["state"].as_str().unwrap_or("")) {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the {kind} task on {vm} did not end after the restart: {t}\n{}",
            agent.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts the agent armed with `fault`, sends the request, waits for the agent to kill
/// itself there, starts it again unarmed, and returns the task once it has ended.
async fn killed_during(
    agent: &mut Agent,
    fault: &str,
    (method, path, body): (&str, String, serde_json::Value),
    (vm, kind): (&str, &str),
) -> serde_json::Value {
    agent.kill();
    agent.start_again(vec![("HVNODE_FAULT".into(), fault.into())]);
    fire(agent, method, &path, body).await;
    assert!(
        agent.wait_exit(Duration::from_secs(600)),
        "the agent did not die at {fault}"
    );
    agent.start_again(Vec::new());
    let t = ended(agent, vm, kind).await;
    eprintln!("{fault}: the task ended {}", t["state"]);
    t
}

/// The addresses in a VM NIC's anti-spoofing set.
fn filter_set(agent: &Agent, tap: &str) -> String {
    ns_sh(
        &agent.rig.netns,
        &format!("nft list set bridge {} {tap}_v4", agent.filter_table),
    )
    .1
}

/// SIGKILL in the middle of every other kind of task: addresses added, moved and removed,
/// a private NIC attached, a snapshot taken and rolled back, a disk grown and (confirmed)
/// shrunk, a reinstall and a delete. After each restart the task ends and the host holds
/// what its end says: the store, the filters, the guest's NICs, the disk and the domain.
#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_task_killed_midway_finishes_or_unwinds_at_restart() {
    let mut agent = Agent::start(
        "crash-tasks",
        AgentOptions {
            pool: (174, 179),
            ..Default::default()
        },
    );
    let (a, b) = (new_id(), new_id());
    agent
        .deploy(
            vec![
                create_body(&a, "crash-a", "Crash-tasks-1"),
                create_body(&b, "crash-b", "Crash-tasks-1"),
            ],
            BOOT,
        )
        .await;
    let (tap_a, tap_b) = (agent.tap(&a, 0), agent.tap(&b, 0));

    // An address added: the filter had it when the agent died; the guest gets it after.
    let t = killed_during(
        &mut agent,
        "ip_add:update_filter:after",
        ("POST", format!("/v1/vms/{a}/ips"), json!({})),
        (&a, "ip_add"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    let (_, ips) = agent.get(&format!("/v1/vms/{a}/ips")).await;
    let x = ips["data"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == json!("extra"))
        .unwrap_or_else(|| panic!("A holds the extra address: {ips}"))["address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        filter_set(&agent, &tap_a).contains(&x),
        "A's filter has {x}"
    );
    assert!(
        eventually(Duration::from_secs(60), || guest_sh(&a, "ip -o addr")
            .1
            .contains(&format!("{x}/")))
        .await,
        "A's guest has {x}"
    );

    // Moved to B, killed once the store said B: A's filter and guest let go, B's take it.
    let t = killed_during(
        &mut agent,
        "ip_move:reassign:after",
        (
            "POST",
            format!("/v1/vms/{a}/ips/{x}/move"),
            json!({"target_vps_id": b}),
        ),
        (&a, "ip_move"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    assert!(
        !filter_set(&agent, &tap_a).contains(&x),
        "A's filter let go of {x}"
    );
    assert!(
        filter_set(&agent, &tap_b).contains(&x),
        "B's filter has {x}"
    );
    assert!(!guest_sh(&a, "ip -o addr").1.contains(&format!("{x}/")));
    assert!(guest_sh(&b, "ip -o addr").1.contains(&format!("{x}/")));

    // Removed from B, killed once its filter let go: the address ends free.
    let t = killed_during(
        &mut agent,
        "ip_remove:update_filter:after",
        ("DELETE", format!("/v1/vms/{b}/ips/{x}"), json!({})),
        (&b, "ip_remove"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    assert!(!filter_set(&agent, &tap_b).contains(&x));
    let (s, again) = agent
        .post(&format!("/v1/vms/{a}/ips"), json!({"address": x}))
        .await;
    assert_eq!(s, 201, "{x} is free again: {again}");

    // A private NIC, killed once plugged: the attach completes, NIC and filter in place.
    let (s, net) = agent
        .post("/v1/private-networks", json!({"name": "crash"}))
        .await;
    assert_eq!(s, 201, "{net}");
    let net_id = net["data"]["id"].as_str().unwrap().to_owned();
    let t = killed_during(
        &mut agent,
        "net_attach:plug_nic:after",
        (
            "POST",
            format!("/v1/private-networks/{net_id}/attach"),
            json!({"vps_id": a}),
        ),
        (&a, "net_attach"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    let (_, nets) = agent.get("/v1/private-networks").await;
    let member = nets["data"]["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == json!(net_id))
        .and_then(|n| n["members"].as_array()?.first().cloned())
        .unwrap_or_else(|| panic!("A is a member: {nets}"));
    let mac = member["mac"].as_str().unwrap();
    assert!(
        virsh(&["dumpxml", &a]).1.contains(mac),
        "the NIC is plugged"
    );
    let (_, table) = ns_sh(
        &agent.rig.netns,
        &format!("nft list table bridge {}", agent.filter_table),
    );
    assert!(
        table.contains(&format!("p_{}", agent.tap(&a, 1))),
        "{table}"
    );

    // A snapshot, killed once taken but not yet recorded: resumed at restart, so the disk
    // and the listing agree that it exists (neither an unrecorded snapshot on the disk
    // nor a recorded one missing from it).
    let disk = agent.vm_dir.join(&a).join("disk.qcow2");
    let t = killed_during(
        &mut agent,
        "snapshot_create:take_snapshot:after",
        (
            "POST",
            format!("/v1/vms/{a}/snapshots"),
            json!({"name": "half"}),
        ),
        (&a, "snapshot_create"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    let image = sh(&format!("qemu-img snapshot -U -l {}", disk.display())).1;
    assert!(image.contains("half"), "the disk holds it: {image}");
    let (_, snaps) = agent.get(&format!("/v1/vms/{a}/snapshots")).await;
    assert!(snaps.to_string().contains("\"half\""), "listed: {snaps}");
    let (s, r) = agent.delete(&format!("/v1/vms/{a}/snapshots/half")).await;
    assert_eq!(s, 200, "{r}");
    let image = sh(&format!("qemu-img snapshot -U -l {}", disk.display())).1;
    assert!(!image.contains("half"), "deleted from the disk: {image}");

    // A rollback, killed once the disk was reverted: repeated, the VM runs again.
    let (s, r) = agent
        .post(&format!("/v1/vms/{a}/snapshots"), json!({"name": "base"}))
        .await;
    assert_eq!(s, 201, "{r}");
    let t = killed_during(
        &mut agent,
        "snapshot_rollback:revert_disk:after",
        (
            "POST",
            format!("/v1/vms/{a}/snapshots/base/rollback"),
            json!({}),
        ),
        (&a, "snapshot_rollback"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    assert_eq!(domain_state(&a), "running");
    wait_guest_agent(&a, BOOT).await;

    // The disk grown, killed after the resize: 6 GiB on the host and in the guest.
    let t = killed_during(
        &mut agent,
        "resize:resize_disk:after",
        ("POST", format!("/v1/vms/{a}/resize"), json!({"disk_gb": 6})),
        (&a, "resize"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    let size = crate::harness::sh(&format!("qemu-img info -U {}", disk.display())).1;
    assert!(size.contains("virtual size: 6 GiB"), "{size}");
    wait_guest_agent(&a, BOOT).await;
    assert!(
        eventually(Duration::from_secs(60), || guest_sh(
            &a,
            "lsblk -bdno SIZE /dev/vda"
        )
        .1
        .trim()
            == (6u64 << 30).to_string())
        .await,
        "the guest sees 6 GiB"
    );

    // Shrunk back with the confirmation, killed after the disk was re-created: the VM comes
    // back on a 4 GiB disk, and what the old disk held is gone (that is what ERASE
    // confirmed); the marker is there until then.
    let (code, out) = guest_sh(
        &a,
        "echo kept > /root/shrink-marker && sync && cat /root/shrink-marker",
    );
    assert_eq!((code, out.trim()), (0, "kept"), "the marker is written");
    let t = killed_during(
        &mut agent,
        "resize:resize_disk:after",
        (
            "POST",
            format!("/v1/vms/{a}/resize"),
            json!({"disk_gb": 4, "confirm_data_loss": true, "erase_confirmation": "ERASE"}),
        ),
        (&a, "resize"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    let size = crate::harness::sh(&format!("qemu-img info -U {}", disk.display())).1;
    assert!(size.contains("virtual size: 4 GiB"), "{size}");
    wait_guest_agent(&a, BOOT).await;
    assert!(
        eventually(Duration::from_secs(60), || guest_sh(
            &a,
            "lsblk -bdno SIZE /dev/vda"
        )
        .1
        .trim()
            == (4u64 << 30).to_string())
        .await,
        "the guest sees 4 GiB"
    );
    let (code, out) = guest_sh(
        &a,
        "if test -e /root/shrink-marker; then echo present; else echo absent; fi",
    );
    assert_eq!(
        (code, out.trim()),
        (0, "absent"),
        "the erased disk no longer holds the marker"
    );

    // A reinstall, killed once the new disk was in place: it finishes, and the guest
    // answers with the address it had.
    let t = killed_during(
        &mut agent,
        "reinstall:replace_disk:after",
        (
            "POST",
            format!("/v1/vms/{a}/reinstall"),
            json!({"template_id": TEMPLATE, "root_password": "Crash-tasks-2"}),
        ),
        (&a, "reinstall"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    wait_guest_agent(&a, BOOT).await;
    let (_, vm) = agent.get(&format!("/v1/vms/{a}")).await;
    let ip_a = vm["data"]["ip_address"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(120), || tcp_open(
            &agent.rig.netns,
            &ip_a,
            22
        ))
        .await,
        "A answers on {ip_a} after its reinstall"
    );

    // A delete, killed once the disks were gone: it finishes, and nothing of A is left.
    let t = killed_during(
        &mut agent,
        "delete:remove_disks:after",
        ("DELETE", format!("/v1/vms/{a}"), json!({})),
        (&a, "delete"),
    )
    .await;
    assert_eq!(t["state"], json!("completed"), "{t}");
    assert!(!domain_exists(&a), "no domain");
    assert!(!vm_dir_exists(&agent, &a), "no files");
    let (s, _) = agent.get(&format!("/v1/vms/{a}")).await;
    assert_eq!(s, 404, "no record");
    let (_, table) = ns_sh(
        &agent.rig.netns,
        &format!("nft list table bridge {}", agent.filter_table),
    );
    assert!(!table.contains(&tap_a), "no filter: {table}");
    let (s, again) = agent
        .post(&format!("/v1/vms/{b}/ips"), json!({"address": ip_a}))
        .await;
    assert_eq!(s, 201, "A's primary address is free: {again}");

    let (s, r) = agent.delete(&format!("/v1/vms/{b}")).await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = agent
        .delete(&format!("/v1/private-networks/{net_id}"))
        .await;
    assert_eq!(s, 200, "{r}");
}
