//! Reinstall replaces the system and keeps the VM's identity, and a failed one is rolled
//! back to the previous disk; resize grows a disk the guest sees, applies CPU after a
//! restart, and refuses an unconfirmed shrink.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1200);

fn disk_bytes(id: &str) -> u64 {
    let (_, out) = guest_sh(id, "lsblk -bdno SIZE /dev/vda");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("lsblk: {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn reinstall_keeps_identity_and_resize_grows_what_the_guest_sees() {
    let mut agent = Agent::start(
        "reinstall",
        AgentOptions {
            pool: (140, 141),
            ..Default::default()
        },
    );
    let id = new_id();
    agent
        .deploy(vec![create_body(&id, "reinstall-me", "First-pass-1")], BOOT)
        .await;
    let (_, before) = agent.get(&format!("/v1/vms/{id}")).await;
    let (_, first_instance) = guest_sh(&id, "cat /var/lib/cloud/data/instance-id");
    let (code, _) = guest_sh(&id, "echo original > /root/marker && sync");
    assert_eq!(code, 0);

    // Reinstall: new system (the marker is gone), new password, same id, MAC and address.
    let (s, accepted) = agent
        .post(
            &format!("/v1/vms/{id}/reinstall"),
            json!({"template_id": TEMPLATE, "root_password": "Second-pass-2"}),
        )
        .await;
    assert_eq!(s, 202, "{accepted}");
    let task = agent
        .wait_task(accepted["data"]["task_id"].as_str().unwrap(), BOOT)
        .await;
    assert_eq!(task["state"], json!("completed"), "{task}");
    let (code, _) = guest_sh(&id, "test -e /root/marker");
    assert_ne!(code, 0, "the marker file is gone after the reinstall");
    let (_, second_instance) = guest_sh(&id, "cat /var/lib/cloud/data/instance-id");
    assert_ne!(
        first_instance.trim(),
        second_instance.trim(),
        "a new cloud-init instance"
    );
    let (_, shadow) = guest_sh(&id, "grep '^root:' /etc/shadow");
    let hash = shadow.trim().split(':').nth(1).unwrap().to_owned();
    assert!(
        sha_crypt::sha512_check("Second-pass-2", &hash).is_ok(),
        "new password set"
    );
    let (_, keys) = guest_sh(&id, "cat /root/.ssh/authorized_keys");
    assert!(keys.contains(SSH_KEY), "keys kept when none are given");
    let (_, after) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(after["data"]["ip_address"], before["data"]["ip_address"]);
    assert_eq!(after["data"]["mac"], before["data"]["mac"]);
    assert_eq!(after["data"]["status"], json!("running"));
    let ip = before["data"]["ip_address"].as_str().unwrap();
    let (_, addr) = guest_sh(&id, "ip -4 -o addr show");
    assert!(
        addr.contains(&format!("{ip}/")),
        "same address in the guest: {addr}"
    );
    assert!(!agent.vm_dir.join(&id).join("disk.prev.qcow2").exists());

    // A reinstall that fails (the new system's guest agent "never" answers: the agent is
    // restarted with a 1 s limit) is rolled back: the VM runs its previous disk again, with
    // its data, instance and password, at the same address; the template is unchanged.
    let (code, _) = guest_sh(&id, "echo second > /root/marker && sync");
    assert_eq!(code, 0);
    let status = agent.terminate();
    assert!(status.success(), "{status}");
    agent.start_again(vec![(
        "HVNODE_TASKS__GUEST_AGENT_TIMEOUT_S".into(),
        "1".into(),
    )]);
    let (s, accepted) = agent
        .post(
            &format!("/v1/vms/{id}/reinstall"),
            json!({"template_id": TEMPLATE, "root_password": "Third-pass-3"}),
        )
        .await;
    assert_eq!(s, 202, "{accepted}");
    let task = agent
        .wait_task(accepted["data"]["task_id"].as_str().unwrap(), BOOT)
        .await;
    assert_eq!(task["state"], json!("failed"), "{task}");
    let rolled_back: Vec<&str> = task["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == json!("rolled_back"))
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        rolled_back.contains(&"replace_disk"),
        "the disk swap was undone: {task}"
    );
    wait_guest_agent(&id, BOOT).await;
    let (_, marker) = guest_sh(&id, "cat /root/marker");
    assert_eq!(marker.trim(), "second", "the previous disk, with its data");
    let (_, instance) = guest_sh(&id, "cat /var/lib/cloud/data/instance-id");
    assert_eq!(
        instance.trim(),
        second_instance.trim(),
        "the previous instance"
    );
    let (_, shadow) = guest_sh(&id, "grep '^root:' /etc/shadow");
    let hash = shadow.trim().split(':').nth(1).unwrap().to_owned();
    assert!(
        sha_crypt::sha512_check("Second-pass-2", &hash).is_ok(),
        "the previous password"
    );
    let (_, rolled) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(rolled["data"]["status"], json!("running"), "{rolled}");
    assert_eq!(rolled["data"]["ip_address"], before["data"]["ip_address"]);
    assert!(
        eventually(BOOT, || tcp_open(&agent.rig.netns, ip, 22)).await,
        "the VM answers on {ip} after the rollback"
    );
    assert!(!agent.vm_dir.join(&id).join("disk.prev.qcow2").exists());
    let status = agent.terminate();
    assert!(status.success(), "{status}");
    agent.start_again(Vec::new());

    // A shrink without confirmation is refused and changes nothing.
    let size_before = disk_bytes(&id);
    let (s, refused) = agent
        .post(&format!("/v1/vms/{id}/resize"), json!({"disk_gb": 3}))
        .await;
    assert_eq!(
        (s, refused["error_code"].clone()),
        (400, json!("CONFIRMATION_REQUIRED"))
    );
    let (s, refused) = agent
        .post(
            &format!("/v1/vms/{id}/resize"),
            json!({"disk_gb": 3, "confirm_data_loss": true, "erase_confirmation": "erase"}),
        )
        .await;
    assert_eq!(
        (s, refused["error_code"].clone()),
        (400, json!("CONFIRMATION_REQUIRED"))
    );
    let (_, same) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(same["data"]["resources"]["disk_gb"], json!(4));
    assert_eq!(disk_bytes(&id), size_before);

    // Growing the disk keeps the data, live: the guest sees the new size at once.
    guest_sh(&id, "echo kept > /root/marker2 && sync");
    let (s, grow) = agent
        .post(&format!("/v1/vms/{id}/resize"), json!({"disk_gb": 6}))
        .await;
    assert_eq!(s, 202, "{grow}");
    let task = agent
        .wait_task(
            grow["data"]["task_id"].as_str().unwrap(),
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(task["state"], json!("completed"), "{task}");
    assert!(
        eventually(Duration::from_secs(30), || disk_bytes(&id) == 6 << 30).await,
        "the guest sees 6 GiB"
    );
    let (_, kept) = guest_sh(&id, "cat /root/marker2");
    assert_eq!(kept.trim(), "kept");

    // More CPUs, applied by a restart.
    let (s, cpu) = agent
        .post(
            &format!("/v1/vms/{id}/resize"),
            json!({"cpu_cores": 2, "restart": true}),
        )
        .await;
    assert_eq!(s, 202, "{cpu}");
    let task = agent
        .wait_task(
            cpu["data"]["task_id"].as_str().unwrap(),
            Duration::from_secs(300),
        )
        .await;
    assert_eq!(task["state"], json!("completed"), "{task}");
    wait_guest_agent(&id, BOOT).await;
    let (_, nproc) = guest_exec(&id, "/usr/bin/nproc", &[]);
    assert_eq!(nproc.trim(), "2");
    let (_, resized) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(resized["data"]["resources"]["cpu_cores"], json!(2));
    assert_eq!(resized["data"]["resources"]["disk_gb"], json!(6));
    let (_, root) = guest_sh(
        &id,
        "cloud-init status --wait >/dev/null 2>&1; df -B1G --output=size / | tail -n1",
    );
    assert!(
        root.trim().parse::<u64>().unwrap() >= 5,
        "root grew after the reboot: {root}"
    );

    let (s, _) = agent.delete(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200);
    assert!(!domain_exists(&id));
}
