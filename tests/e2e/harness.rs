//! The rig-side test harness: the rig's description, a real agent process per test, an
//! HTTP client for it, and the guest agent as the tests' eyes inside a VM.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

pub const TEMPLATE: &str = "9010";

/// The rig as `tests/rig/up` described it in `/run/hvnode-rig/rig.env`.
#[derive(Debug, Clone)]
pub struct Rig {
    pub netns: String,
    pub bridge: String,
    pub gateway: String,
    /// The bridge's IPv6 address (the gateway of a /64 IPv6 pool).
    pub gateway6: String,
    pub prefix: u8,
    pub root: PathBuf,
    pub image_dir: PathBuf,
}

impl Rig {
    pub fn load() -> Rig {
        let path = "/run/hvnode-rig/rig.env";
        let text = std::fs::read_to_string(path).unwrap_or_else(|_| {
            panic!("{path} is missing: bring the rig up first (tests/rig/up, as root)")
        });
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| {
            vars.get(k)
                .unwrap_or_else(|| panic!("{k} missing in {path}"))
                .to_string()
        };
        Rig {
            netns: get("HVNODE_RIG_NETNS"),
            bridge: get("HVNODE_RIG_BRIDGE"),
            gateway: get("HVNODE_RIG_GATEWAY"),
            gateway6: get("HVNODE_RIG_GATEWAY6"),
            prefix: get("HVNODE_RIG_PREFIX").parse().unwrap(),
            root: get("HVNODE_RIG_ROOT").into(),
            image_dir: get("HVNODE_RIG_IMAGE_DIR").into(),
        }
    }

    /// `a.b.c.N` in the rig's subnet.
    pub fn addr(&self, n: u8) -> String {
        let net = self.gateway.rsplit_once('.').unwrap().0;
        format!("{net}.{n}")
    }
}

/// A real `hvnode serve` process with its own state, port, socket and slice of the pool.
pub struct Agent {
    pub rig: Rig,
    pub name: String,
    pub dir: PathBuf,
    pub url: String,
    pub token: String,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// Where its VMs' directories are.
    pub vm_dir: PathBuf,
    /// The agent's nftables tables (bridge family, and inet for its VXLAN guard).
    pub filter_table: String,
    /// The first two characters of its VMs' tap names (`network.tap_prefix`), its own in
    /// the shared rig: its filter drops whatever arrives on a port with this prefix that
    /// has no chain.
    pub tap_prefix: String,
    child: Option<Child>,
    env: Vec<(String, String)>,
    client: reqwest::Client,
    /// VMs this test created, destroyed by `Drop` if the test left them behind.
    pub created: Mutex<Vec<String>>,
}

pub struct AgentOptions {
    /// First and last host number of the pool slice (`rig.addr(n)`).
    pub pool: (u8, u8),
    /// Whether the agent removes hvnode devices its store does not know.
    pub remove_leftovers: bool,
    pub env: Vec<(String, String)>,
    /// Extra TOML appended to the generated config.
    pub extra_toml: String,
    /// Image store instead of the rig's (e.g. with extra manifests).
    pub image_dir: Option<PathBuf>,
    /// VM storage instead of `<agent dir>/vms` (e.g. a small filesystem).
    pub vm_dir: Option<PathBuf>,
    /// `[tasks]` keys replacing the harness's defaults (the whole table's body).
    pub tasks_toml: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            pool: (100, 109),
            remove_leftovers: false,
            env: Vec::new(),
            extra_toml: String::new(),
            image_dir: None,
            vm_dir: None,
            tasks_toml: None,
        }
    }
}

/// A tap prefix no other agent on this rig has had since `tests/run` last cleared the
/// rig's `e2e` directory: claimed as a file there (atomically, so concurrent test processes
/// never share one) and never handed out again, because an agent killed mid-test leaves
/// its filter table behind, and that table's fail-closed rule drops every port with its
/// prefix. (`vb`, `hv`, `vh` are the agent's own; `fz` is the API fuzzing agent's.)
///
/// The claim's number also gives the agent private-network VNIs of its own (unless the
/// test configures `[network.private]` itself): bridges are named after their VNI
/// (`hvp<vni>`), so two agents allocating from one range would share, and tear down,
/// each other's bridges.
fn claim_tap_prefix(rig: &Rig) -> (String, u32) {
    let dir = rig.root.join("e2e/tap-prefixes");
    std::fs::create_dir_all(&dir).unwrap();
    let chars = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut number = 0;
    for &a in &chars[..26] {
        for &b in chars {
            number += 1;
            let prefix = format!("{}{}", a as char, b as char);
            if ["vb", "hv", "vh", "fz"].contains(&prefix.as_str()) {
                continue;
            }
            let claimed = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(&prefix));
            if claimed.is_ok() {
                return (prefix, number);
            }
        }
    }
    panic!(
        "every tap prefix is claimed; tests/run clears {}",
        dir.display()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Agent {
    pub fn start(name: &str, opts: AgentOptions) -> Agent {
        let rig = Rig::load();
        let dir = rig
            .root
            .join("e2e")
            .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&rig.root.join("e2e"), 0o711);
        set_mode(&dir, 0o711);
        let token = format!("e2e-{}", uuid::Uuid::new_v4().simple());
        let hash = hvnode::api::auth::hash_token(&token);
        let port = free_port();
        let socket = dir.join("hvnode.sock");
        let vm_dir = opts.vm_dir.clone().unwrap_or_else(|| dir.join("vms"));
        let config_path = dir.join("config.toml");
        let net = rig.gateway.rsplit_once('.').unwrap().0.to_string();
        let filter_table = format!("hv_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let (tap_prefix, claim) = claim_tap_prefix(&rig);
        let private_range = if opts.extra_toml.contains("[network.private]") {
            String::new()
        } else {
            let first = 20_000 + claim * 10;
            format!(
                "[network.private]\nvni_first = {first}\nvni_last = {}\n",
                first + 9
            )
        };
        let config = format!(
            r#"[api]
listen = "127.0.0.1:{port}"
socket = "{socket}"
token_sha256 = ["{hash}"]

[libvirt]
accelerator = "tcg"
cpu_mode = ""
# The rig has no AppArmor or SELinux for QEMU.
require_confinement = false

[storage]
image_dir = "{images}"
vm_dir = "{vms}"
state_db = "{db}"

[network]
netns = "{netns}"
bridge = "{bridge}"
# Several agents share the rig: each filters its own taps in its own table, and none
# removes devices it does not know (they may be another agent's).
filter_table = "{filter_table}"
tap_prefix = "{tap_prefix}"
remove_leftovers = {leftovers}

[tasks]
{tasks}

[network.pool]
cidr = "{net}.0/{prefix}"
gateway = "{gw}"
first = "{net}.{first}"
last = "{net}.{last}"
dns = ["{gw}"]

{private_range}
{extra}
"#,
            socket = socket.display(),
            images = opts.image_dir.as_ref().unwrap_or(&rig.image_dir).display(),
            vms = vm_dir.display(),
            tasks = opts.tasks_toml.as_deref().unwrap_or(
                "# Several guests boot at once under TCG on a small machine.\n\
                 guest_agent_timeout_s = 1500\nconnectivity_timeout_s = 600"
            ),
            db = dir.join("hvnode.db").display(),
            netns = rig.netns,
            bridge = rig.bridge,
            prefix = rig.prefix,
            gw = rig.gateway,
            leftovers = opts.remove_leftovers,
            first = opts.pool.0,
            last = opts.pool.1,
            extra = opts.extra_toml,
        );
        std::fs::write(&config_path, config).unwrap();
        set_mode(&config_path, 0o600);
        record_secret(&rig, &token);
        let mut agent = Agent {
            rig,
            name: name.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            token,
            socket,
            log_path: dir.join("agent.log"),
            vm_dir,
            config_path,
            dir,
            filter_table,
            tap_prefix,
            child: None,
            env: opts.env,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap(),
            created: Mutex::new(Vec::new()),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("{why}");
        }
    }

    /// Starts the process and waits until it listens; `Err` with its log when it exits
    /// first (or never listens).
    pub fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(agent_binary())
            .args(["serve", "--config"])
            .arg(&self.config_path)
            // The rig's webhook receivers are on loopback and the rig's private network;
            // a test's own env may say otherwise.
            .env("HVNODE_WEBHOOKS__ALLOW_PRIVATE", "true")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "hvnode=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn hvnode");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.url.trim_start_matches("http://")).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "agent exited early ({status}):\n{}",
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "agent did not listen within 30 s:\n{}",
            self.log_tail(40)
        ))
    }

    /// The host-side tap of NIC `nic` of VM `id`.
    pub fn tap(&self, id: &str, nic: u8) -> String {
        hvnode::network::tap_name(&self.tap_prefix, id.parse().unwrap(), nic)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as systemd stops it; waits for the exit (30 s at most, as systemd's
    /// TimeoutStopSec would, then SIGKILL and a failed test) and returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the agent did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start again after `kill`/`terminate` (or after the agent killed itself), with `env`.
    pub fn start_again(&mut self, env: Vec<(String, String)>) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.env = env;
        self.spawn();
    }

    /// Waits for the process to exit by itself (e.g. a fault point).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn log_tail(&self, lines: usize) -> String {
        last_lines(&self.log(), lines)
    }

    /// The last lines the guest wrote on its serial console (virtlogd's `console.log`),
    /// control characters dropped.
    pub fn console_tail(&self, id: &str, lines: usize) -> String {
        let raw = std::fs::read(self.vm_dir.join(id).join("console.log")).unwrap_or_default();
        let text: String = String::from_utf8_lossy(&raw)
            .chars()
            .filter(|c| *c == '\n' || !c.is_control())
            .collect();
        last_lines(&text, lines)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        if let Some(b) = &body {
            for key in ["root_password", "webhook_secret"] {
                if let Some(secret) = b[key].as_str() {
                    record_secret(&self.rig, secret);
                }
            }
        }
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
        (status, value)
    }

    /// The agent's Prometheus text.
    pub async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("/metrics: {e}"));
        resp.text().await.unwrap()
    }

    /// The value of one sample in `/metrics`, as `name{labels}` is written there.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        self.metrics().await.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// POST /v1/vms, remembering the VM for cleanup.
    pub async fn create(&self, body: Value) -> (u16, Value) {
        if let Some(id) = body["id"].as_str() {
            self.created.lock().unwrap().push(id.to_owned());
        }
        self.post("/v1/vms", body).await
    }

    /// Waits for the deployments of `ids` side by side; each must complete. Returns their
    /// deployment documents in the order of `ids`.
    pub async fn wait_deployed(&self, ids: &[&str], timeout: Duration) -> Vec<Value> {
        let docs =
            futures_util::future::join_all(ids.iter().map(|id| self.wait_deployment(id, timeout)))
                .await;
        docs.into_iter()
            .zip(ids)
            .map(|((doc, _), id)| {
                assert_eq!(
                    doc["deployment_status"],
                    serde_json::json!("completed"),
                    "deployment of {id}: {doc}"
                );
                doc
            })
            .collect()
    }

    /// Creates every VM of `bodies` (each admitted with 202) and waits until all of them
    /// are deployed: the prologue of most tests.
    pub async fn deploy(&self, bodies: Vec<Value>, timeout: Duration) -> Vec<Value> {
        let mut ids = Vec::new();
        for body in bodies {
            let id = body["id"].as_str().expect("a body with an id").to_owned();
            let (s, r) = self.create(body).await;
            assert_eq!(s, 202, "create of {id}: {r}");
            ids.push(id);
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.wait_deployed(&ids, timeout).await
    }

    /// Polls the deployment document until it is completed or failed; returns it with every
    /// step name seen in progress.
    pub async fn wait_deployment(&self, id: &str, timeout: Duration) -> (Value, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let (status, doc) = self.get(&format!("/v1/vms/{id}/deployment")).await;
            assert_eq!(status, 200, "{doc}");
            let data = doc["data"].clone();
            if let Some(cur) = data["current_task"].as_str() {
                if seen.last().map(String::as_str) != Some(cur) {
                    seen.push(cur.to_owned());
                }
            }
            match data["deployment_status"].as_str() {
                Some("completed") | Some("failed") => return (data, seen),
                _ => {}
            }
            if Instant::now() > deadline {
                // `Drop` adds the agent's log and the guests' consoles.
                panic!("deployment of {id} not finished after {timeout:?}: {data}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        for id in self.created.lock().unwrap().iter() {
            destroy_domain(id);
        }
        // Its anti-spoofing table (and IFBs of its VMs) would otherwise stay in the rig.
        ns_sh(
            &self.rig.netns,
            &format!(
                "nft delete table bridge {t} 2>/dev/null; nft delete table inet {t} 2>/dev/null; \
                 true",
                t = self.filter_table
            ),
        );
        if std::thread::panicking() {
            eprintln!(
                "--- agent {} log tail ---\n{}",
                self.name,
                self.log_tail(60)
            );
            for id in self.created.lock().unwrap().iter() {
                eprintln!(
                    "--- serial console of {id} ---\n{}",
                    self.console_tail(id, 40)
                );
            }
        } else {
            // Kept for the suite's last check: no secret a test used reached any log.
            let logs = self.rig.root.join("e2e-logs");
            let _ = std::fs::create_dir_all(&logs);
            let _ = std::fs::copy(
                &self.log_path,
                logs.join(format!(
                    "{}-{}.log",
                    self.name,
                    self.dir.file_name().unwrap().to_string_lossy()
                )),
            );
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The agent binary under test: `HVNODE_AGENT_BIN` (e.g. a release build, for the load
/// figures), else the one cargo built with the tests.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("HVNODE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hvnode")))
}

/// Appends a secret a test handed to an agent (token, root password, webhook secret) to
/// `<rig root>/e2e-secrets.txt`; `tests/run` finally greps every agent's and QEMU's log
/// for each of them.
pub fn record_secret(rig: &Rig, secret: &str) {
    use std::io::Write;
    if secret.len() < 6 {
        return;
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rig.root.join("e2e-secrets.txt"))
    {
        // One write per line: tests append at once, and `writeln!` may split the newline off.
        let _ = f.write_all(format!("{secret}\n").as_bytes());
    }
}

/// Records something the suite could not check on this machine, for its summary
/// (`<rig root>/e2e-logs/gaps.txt`, printed by `tests/run`): a refusal is not a pass.
pub fn record_gap(rig: &Rig, what: &str) {
    use std::io::Write;
    let logs = rig.root.join("e2e-logs");
    let _ = std::fs::create_dir_all(&logs);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join("gaps.txt"))
    {
        let _ = f.write_all(format!("{what}\n").as_bytes());
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("run virsh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

pub fn domain(id: &str) -> String {
    format!("vps-{id}")
}

/// Whether libvirt knows a domain with this UUID.
pub fn domain_exists(id: &str) -> bool {
    virsh(&["dominfo", id]).0
}

pub fn domain_state(id: &str) -> String {
    virsh(&["domstate", id]).1.trim().to_owned()
}

/// Last-resort cleanup of a test VM.
pub fn destroy_domain(id: &str) {
    if domain_exists(id) {
        virsh(&["destroy", id]);
        virsh(&["undefine", "--nvram", id]);
    }
}

/// Runs a program in the guest through its agent; returns (exit code, stdout).
pub fn guest_exec(id: &str, path: &str, args: &[&str]) -> (i64, String) {
    let cmd = json!({"execute": "guest-exec", "arguments": {
        "path": path, "arg": args, "capture-output": true}});
    let (ok, out) = virsh(&["qemu-agent-command", id, &cmd.to_string()]);
    assert!(ok, "guest-exec {path}: {out}");
    let pid = serde_json::from_str::<Value>(out.trim()).unwrap()["return"]["pid"]
        .as_i64()
        .unwrap();
    // Generous: with the whole suite's guests booting at once under TCG on two cores, a
    // command like `cloud-init status --wait` can take minutes.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let status = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let (ok, out) = virsh(&["qemu-agent-command", id, &status.to_string()]);
        assert!(ok, "guest-exec-status: {out}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        if v["return"]["exited"] == json!(true) {
            let data = v["return"]["out-data"].as_str().unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap_or_default();
            return (
                v["return"]["exitcode"].as_i64().unwrap_or(-1),
                String::from_utf8_lossy(&bytes).into_owned(),
            );
        }
        assert!(
            Instant::now() < deadline,
            "guest-exec {path} did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A shell command in the guest.
pub fn guest_sh(id: &str, script: &str) -> (i64, String) {
    guest_exec(id, "/bin/sh", &["-c", script])
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A real ed25519 public key (generated once with ssh-keygen for these tests).
pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExjcmSUhytrxMZpzkoyJK4FdmaWCEK5+1xneLRoEZHT hvnode-e2e";

pub fn create_body(id: &str, hostname: &str, password: &str) -> Value {
    json!({
        "id": id,
        "hostname": hostname,
        "template_id": TEMPLATE,
        "cpu_cores": 1,
        "ram_mb": 512,
        "disk_gb": 4,
        "root_password": password,
        "ssh_keys": [SSH_KEY],
    })
}

/// The last `lines` lines of `text`.
fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether the VM's directory exists under the agent's vm_dir.
pub fn vm_dir_exists(agent: &Agent, id: &str) -> bool {
    agent.vm_dir.join(id).exists()
}

/// Waits until `f` returns true or the timeout passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f()
}

impl Agent {
    /// Polls a task until it is completed, failed or cancelled; returns it.
    pub async fn wait_task(&self, task_id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get(&format!("/v1/tasks/{task_id}")).await;
            assert_eq!(status, 200, "{body}");
            match body["data"]["state"].as_str() {
                Some("completed") | Some("failed") | Some("cancelled") => {
                    return body["data"].clone()
                }
                _ => {}
            }
            if Instant::now() > deadline {
                panic!(
                    "task {task_id} not finished after {timeout:?}: {body}\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Waits until the guest agent answers (after a reboot).
pub async fn wait_guest_agent(id: &str, timeout: Duration) {
    let ok = eventually(timeout, || {
        virsh(&["qemu-agent-command", id, r#"{"execute":"guest-ping"}"#]).0
    })
    .await;
    assert!(ok, "guest agent of {id} did not answer within {timeout:?}");
}

/// Runs a shell script on the host inside network namespace `ns` (test setup only; the
/// agent itself never shells out for networking).
pub fn ns_sh(ns: &str, script: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .expect("run ip netns exec");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

pub fn sh(script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("run sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Whether `addr:port` accepts a TCP connection from inside `ns` within 3 s.
pub fn tcp_open(ns: &str, addr: &str, port: u16) -> bool {
    ns_sh(ns, &format!("timeout 3 bash -c '</dev/tcp/{addr}/{port}'")).0
}

/// Runs `f` on a thread inside network namespace `ns` and returns its handle.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns exists");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// A UDP listener in a network namespace that records payloads until told to stop, so a
/// slow guest (TCG, a loaded CI host) cannot send after a fixed window has closed.
pub struct UdpObserver {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl UdpObserver {
    /// Listens on `addr` (`ip:port`) inside `netns`; returns once it is bound.
    pub fn start(netns: &str, addr: &str) -> UdpObserver {
        use std::sync::atomic::{AtomicBool, Ordering};
        let addr = addr.to_owned();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = spawn_in_netns(netns, move || {
            let sock = std::net::UdpSocket::bind(&addr).expect("bind the observer");
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while !flag.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            got
        });
        ready_rx.recv().expect("the observer is listening");
        UdpObserver { stop, thread }
    }

    /// Keeps listening a second more for datagrams still in flight, then returns
    /// everything received.
    pub fn finish(self) -> Vec<String> {
        std::thread::sleep(Duration::from_secs(1));
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Sends five UDP datagrams saying `mark` from the guest, bound to `source`; panics if the
/// guest could not send them (so "nothing arrived" always means "dropped on the way").
pub fn guest_udp(id: &str, source: &str, to: &str, port: u16, mark: &str) {
    let script = format!(
        "python3 -c \"import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.bind(('{source}',0))\nfor _ in range(5):\n  s.sendto(b'{mark}',('{to}',{port})); time.sleep(0.2)\" 2>&1"
    );
    let (code, out) = guest_sh(id, &script);
    assert_eq!(code, 0, "{id} sent {mark} from {source}: {out}");
}
