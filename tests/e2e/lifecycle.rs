//! Create from template 9010, boot, check what cloud-init did, stop/start, delete — on two
//! VMs booting at once.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(900);

#[tokio::test(flavor = "multi_thread")]
async fn two_vms_deploy_boot_with_cloud_init_stop_start_and_delete_cleanly() {
    let mut agent = Agent::start(
        "lifecycle",
        AgentOptions {
            pool: (100, 109),
            // Every VM also gets a primary IPv6 address from this pool.
            extra_toml: format!(
                "[network.pool6]\ncidr = \"fd70::/64\"\ngateway = \"{gw6}\"\n\
                 first = \"fd70::100\"\nlast = \"fd70::1ff\"\ndns = [\"{gw6}\"]\n",
                gw6 = Rig::load().gateway6
            ),
            ..Default::default()
        },
    );
    let (a, b) = (new_id(), new_id());

    let (_, templates) = agent.get("/v1/templates").await;
    let t = &templates["data"]["templates"][0];
    assert_eq!(t["id"], json!(TEMPLATE), "{templates}");
    assert_eq!(t["sha256"].as_str().map(str::len), Some(64));
    assert!(t["size_bytes"].as_u64().unwrap() > 0);
    let password_a = "Tr0ub4dor-e2e";

    // Both creates are accepted at once and report the contract's first answer.
    let (sa, ra) = agent.create(create_body(&a, "e2e-alpha", password_a)).await;
    let (sb, rb) = agent
        .create(create_body(&b, "e2e-beta.example.net", "An0ther-pass"))
        .await;
    assert_eq!(sa, 202, "{ra}");
    assert_eq!(sb, 202, "{rb}");
    assert_eq!(ra["data"]["status"], json!("deploying"));
    assert_eq!(ra["data"]["vps_id"], json!(a));
    let ip_a = ra["data"]["ip_address"].as_str().unwrap().to_owned();
    assert_ne!(ip_a, rb["data"]["ip_address"].as_str().unwrap());

    // The same body again is the same task; another body with the same id is a conflict.
    let (again, same) = agent.create(create_body(&a, "e2e-alpha", password_a)).await;
    assert_eq!(again, 202, "{same}");
    assert_eq!(same["data"]["task_id"], ra["data"]["task_id"]);
    let (conflict, body) = agent.create(create_body(&a, "e2e-other", password_a)).await;
    assert_eq!(conflict, 409, "{body}");
    assert_eq!(body["error_code"], json!("VPS_EXISTS"));
    // A power action on a VM that is still deploying is refused for what it is.
    let (s, early) = agent.post(&format!("/v1/vms/{a}/start"), json!({})).await;
    assert_eq!(
        (s, early["error_code"].clone()),
        (409, json!("INVALID_STATE")),
        "{early}"
    );

    let ((da, seen_a), (db, _)) = tokio::join!(
        agent.wait_deployment(&a, BOOT),
        agent.wait_deployment(&b, BOOT)
    );
    assert_eq!(
        da["deployment_status"],
        json!("completed"),
        "{da}\n{}",
        agent.log_tail(40)
    );
    assert_eq!(
        db["deployment_status"],
        json!("completed"),
        "{db}\n{}",
        agent.log_tail(40)
    );
    assert_eq!(da["tasks_completed"], json!(10));
    assert_eq!(da["is_ready"], json!(true));
    // What the guest wrote on its serial console is kept beside its disk.
    let console = agent.console_tail(&a, usize::MAX);
    assert!(
        console.contains("Linux version"),
        "the kernel's banner is in console.log: {}",
        agent.console_tail(&a, 20)
    );
    assert_eq!(da["access_info"]["ip_address"], json!(ip_a));
    assert!(
        seen_a.len() >= 2,
        "progress was visible while deploying: {seen_a:?}"
    );
    let names: Vec<&str> = da["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "validate_resources",
            "allocate_ip",
            "create_vm",
            "configure_hardware",
            "apply_cloud_init",
            "start_vm",
            "configure_network",
            "wait_for_guest_agent",
            "verify_connectivity",
            "finalize",
        ]
    );

    // What cloud-init did inside the guest.
    let (_, done) = guest_sh(
        &a,
        "cloud-init status --wait >/dev/null 2>&1; cloud-init status",
    );
    assert!(done.contains("done"), "cloud-init: {done}");
    let (_, hostname) = guest_exec(&a, "/bin/hostname", &[]);
    assert_eq!(hostname.trim(), "e2e-alpha");
    let (_, hostname_b) = guest_exec(&b, "/bin/hostname", &[]);
    assert_eq!(hostname_b.trim(), "e2e-beta");
    let (_, shadow) = guest_sh(&a, "grep '^root:' /etc/shadow");
    let hash = shadow.trim().split(':').nth(1).unwrap().to_owned();
    assert!(
        hash.starts_with("$6$"),
        "root's hash is SHA-512 crypt: {hash}"
    );
    assert!(
        sha_crypt::sha512_check(password_a, &hash).is_ok(),
        "hash matches the password"
    );
    let (_, keys) = guest_sh(&a, "cat /root/.ssh/authorized_keys");
    assert!(
        keys.lines().any(|l| l.trim() == SSH_KEY),
        "authorized_keys: {keys}"
    );
    let (_, addr) = guest_sh(&a, "ip -4 -o addr show");
    assert!(
        addr.contains(&format!("{ip_a}/")),
        "static address configured: {addr}"
    );
    // The primary IPv6 address, from the IPv6 pool: in the guest, and answering.
    let (_, detail) = agent.get(&format!("/v1/vms/{a}")).await;
    let ip6 = detail["data"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == json!("primary"))
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("a primary IPv6 address: {detail}"))
        .to_owned();
    assert!(ip6.starts_with("fd70::"), "{ip6}");
    let (_, addr6) = guest_sh(&a, "ip -6 -o addr show dev eth0");
    assert!(
        addr6.contains(&format!("{ip6}/64")),
        "IPv6 configured: {addr6}"
    );
    let ns = agent.rig.netns.clone();
    let reached = eventually(Duration::from_secs(60), || {
        ns_sh(&ns, &format!("ping -6 -c 1 -W 2 {ip6}")).0
    })
    .await;
    assert!(reached, "the guest answers on {ip6}");
    let (_, root_size) = guest_sh(&a, "df -B1G --output=size / | tail -n1");
    assert!(
        root_size.trim().parse::<u64>().unwrap() >= 3,
        "root grown to the plan: {root_size}"
    );

    let (_, sshd) = guest_sh(
        &a,
        "sshd -T 2>/dev/null | grep -E '^(permitrootlogin|passwordauthentication) '",
    );
    assert!(
        sshd.contains("permitrootlogin yes"),
        "root may log in with the password: {sshd}"
    );

    // The admin CLI over the Unix socket, as a table and as JSON.
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvnode"))
            .arg("ctl")
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = ctl(&["vms"]);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(&a) && l.contains("running") && l.contains(&ip_a)),
        "{table}"
    );
    let one: serde_json::Value = serde_json::from_str(&ctl(&["--json", "vm", &a])).unwrap();
    assert_eq!(one["status"], json!("running"));
    assert!(ctl(&["node"]).contains("accelerator: tcg"));

    // SIGTERM stops the agent cleanly and leaves the VMs running; a new agent finds them.
    let exit = agent.terminate();
    assert!(exit.success(), "agent exit status {exit}");
    assert_eq!(domain_state(&a), "running");
    assert_eq!(domain_state(&b), "running");
    agent.start_again(Vec::new());

    // Details and listing.
    let (_, detail) = agent.get(&format!("/v1/vms/{a}")).await;
    assert_eq!(detail["data"]["status"], json!("running"));
    assert_eq!(detail["data"]["resources"]["disk_gb"], json!(4));
    assert_eq!(detail["data"]["ips"][0]["address"], json!(ip_a));
    assert_eq!(detail["data"]["ips"][0]["type"], json!("primary"));
    let (_, list) = agent.get("/v1/vms?status=running").await;
    assert_eq!(list["data"]["pagination"]["total"], json!(2));

    // ACPI stop, then start; a second stop is a no-op success.
    let (s, stopped) = agent
        .post(&format!("/v1/vms/{a}/stop?timeout_s=240"), json!({}))
        .await;
    assert_eq!(s, 200, "{stopped}");
    assert_eq!(stopped["data"]["status"], json!("stopped"));
    assert_eq!(domain_state(&a), "shut off");
    let (s, again) = agent.post(&format!("/v1/vms/{a}/stop"), json!({})).await;
    assert_eq!(s, 200, "{again}");
    let (s, started) = agent.post(&format!("/v1/vms/{a}/start"), json!({})).await;
    assert_eq!(s, 200, "{started}");
    assert_eq!(started["data"]["status"], json!("running"));
    assert_eq!(domain_state(&a), "running");

    // Suspend/resume, and a refused action.
    let (s, susp) = agent.post(&format!("/v1/vms/{b}/suspend"), json!({})).await;
    assert_eq!(
        (s, susp["data"]["status"].clone()),
        (200, json!("suspended"))
    );
    let (s, refused) = agent.post(&format!("/v1/vms/{b}/start"), json!({})).await;
    assert_eq!(
        (s, refused["error_code"].clone()),
        (409, json!("INVALID_STATE"))
    );
    let (s, resumed) = agent.post(&format!("/v1/vms/{b}/resume"), json!({})).await;
    assert_eq!(
        (s, resumed["data"]["status"].clone()),
        (200, json!("running"))
    );

    // Delete leaves nothing in libvirt, on disk or in the store.
    for id in [&a, &b] {
        let (s, del) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200, "{del}");
        assert_eq!(del["data"]["deleted"], json!(true));
        assert!(!domain_exists(id), "domain {id} is gone");
        assert!(!vm_dir_exists(&agent, id), "files of {id} are gone");
        let (s, gone) = agent.get(&format!("/v1/vms/{id}")).await;
        assert_eq!(
            (s, gone["error_code"].clone()),
            (404, json!("VPS_NOT_FOUND"))
        );
    }
    let (_, list) = agent.get("/v1/vms").await;
    assert_eq!(list["data"]["pagination"]["total"], json!(0));
    let nvram = std::fs::read_dir("/var/lib/libvirt/qemu/nvram")
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(nvram, 0, "no NVRAM files left in libvirt's directory");
}
