//! Startup compares the store with libvirt: a record whose domain is gone and an hvnode
//! domain no record knows are reported, and removed when the config says so.

use serde_json::json;
use uuid::Uuid;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn startup_reports_and_cleans_orphans_and_unknown_domains() {
    let mut agent = Agent::start(
        "reconcile",
        AgentOptions {
            pool: (150, 151),
            extra_toml:
                "[reconcile]\nremove_unknown_domains = true\nremove_orphan_records = true\n".into(),
            ..Default::default()
        },
    );
    agent.kill();

    // Behind the stopped agent's back: a deployed record without a domain…
    let orphan = Uuid::new_v4();
    let store = hvnode::store::Store::open(&agent.dir.join("hvnode.db")).unwrap();
    store
        .call_sync(|c| {
            let now = "2026-01-01T00:00:00.000Z";
            hvnode::store::vms::insert(
                c,
                &hvnode::store::VmRow {
                    id: orphan,
                    hostname: "orphan".into(),
                    template_id: TEMPLATE.into(),
                    cpu_cores: 1,
                    ram_mb: 512,
                    disk_gb: 4,
                    bandwidth_mbps: None,
                    password_hash: "$6$x$y".into(),
                    ssh_keys: vec![],
                    ip_address: Some(agent.rig.addr(150).parse().unwrap()),
                    mac: "52:54:00:0f:0f:01".into(),
                    state: hvnode::store::VmRowState::Active,
                    webhook_url: None,
                    webhook_secret: None,
                    instance_id: "i".into(),
                    request_digest: "d".into(),
                    created_at: now.into(),
                    updated_at: now.into(),
                    deployed_at: Some(now.into()),
                },
            )?;
            hvnode::store::vms::insert_ip(
                c,
                agent.rig.addr(150).parse().unwrap(),
                orphan,
                "primary",
                now,
            )
        })
        .unwrap();
    drop(store);
    // …and an hvnode domain with its files in this agent's vm_dir but no record.
    let unknown = Uuid::new_v4();
    let vm_dir = agent.vm_dir.join(unknown.to_string());
    std::fs::create_dir_all(&vm_dir).unwrap();
    let xml = format!(
        "<domain type='qemu'><name>vps-{unknown}</name><uuid>{unknown}</uuid>
         <metadata><hvnode:vm xmlns:hvnode='https://hvnode.dev/xmlns/vm/1'/></metadata>
         <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>
         <devices><disk type='file' device='disk'><source file='{}/disk.qcow2'/>
         <target dev='vda' bus='virtio'/></disk></devices></domain>",
        vm_dir.display()
    );
    let xml_path = agent.dir.join("unknown.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let (ok, out) = virsh(&["define", xml_path.to_str().unwrap()]);
    assert!(ok, "{out}");
    agent.created.lock().unwrap().push(unknown.to_string());

    agent.start_again(Vec::new());

    let (_, node) = agent.get("/v1/node").await;
    let report = &node["data"]["reconciliation"];
    assert_eq!(
        report["missing_domains"],
        json!([orphan.to_string()]),
        "{report}"
    );
    assert!(
        report["unknown_domains"]
            .as_array()
            .unwrap()
            .contains(&json!(unknown.to_string())),
        "{report}"
    );
    let removed = report["removed"].as_array().unwrap();
    assert!(removed.contains(&json!(orphan.to_string())), "{report}");
    assert!(removed.contains(&json!(unknown.to_string())), "{report}");
    let (s, _) = agent.get(&format!("/v1/vms/{orphan}")).await;
    assert_eq!(s, 404, "the orphan record is gone");
    assert!(
        !domain_exists(&unknown.to_string()),
        "the unknown domain is gone"
    );
    assert!(!vm_dir.exists(), "its files are gone");
    // The orphan's address is free again.
    let id = new_id();
    let mut body = create_body(&id, "reuse", "Reuse-pass-1");
    body["ip_address"] = json!(agent.rig.addr(150));
    let (s, created) = agent.create(body).await;
    assert_eq!(s, 202, "{created}");
    let (s, _) = agent.delete(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200);
}
