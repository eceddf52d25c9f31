//! Prometheus text exposition (format 0.0.4), written by hand: a few dozen families do not
//! need a metrics framework.

use std::collections::HashMap;
use std::fmt::Write;

use uuid::Uuid;

use super::sampler::{Sample, SweepFigures};
use crate::node::{CpuFigures, FsUsage, MemoryFigures};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one scrape shows.
pub struct Scrape<'a> {
    pub cpu: &'a CpuFigures,
    pub memory: &'a MemoryFigures,
    pub storage: Option<&'a FsUsage>,
    pub load: [f64; 3],
    pub vms_by_status: &'a [(&'static str, usize)],
    /// Running VMs' latest samples, with their hostnames.
    pub samples: &'a HashMap<Uuid, Sample>,
    pub names: &'a HashMap<Uuid, String>,
    pub tasks_by_state: &'a [(String, u64)],
    pub webhooks_by_state: &'a [(&'static str, u64)],
    /// What the keeper did: VMs started by the agent, by why they were down.
    pub keeper: crate::vm::KeeperCounts,
    pub requests: &'a [((String, String, u16), u64)],
    pub sweep: SweepFigures,
    pub libvirt_up: bool,
    pub uptime_seconds: u64,
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(s: &Scrape) -> String {
    let mut o = Out(String::with_capacity(4096 + s.samples.len() * 1500));

    o.family("hvnode_up", "gauge", "Whether the agent can reach libvirt.");
    o.sample("hvnode_up", &[], if s.libvirt_up { 1.0 } else { 0.0 });
    o.family("hvnode_build_info", "gauge", "The agent's version.");
    o.sample(
        "hvnode_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    o.family(
        "hvnode_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
    );
    o.sample("hvnode_uptime_seconds", &[], s.uptime_seconds as f64);

    // --- the node
    o.family(
        "hvnode_node_cpu_cores",
        "gauge",
        "Logical CPUs of the host.",
    );
    o.sample("hvnode_node_cpu_cores", &[], s.cpu.cores as f64);
    o.family(
        "hvnode_node_cpu_usage_ratio",
        "gauge",
        "Host CPU use over the last refresh, 0 to 1.",
    );
    o.sample(
        "hvnode_node_cpu_usage_ratio",
        &[],
        f64::from(s.cpu.usage_percent) / 100.0,
    );
    o.family("hvnode_node_memory_total_bytes", "gauge", "Host memory.");
    o.sample(
        "hvnode_node_memory_total_bytes",
        &[],
        s.memory.total_bytes as f64,
    );
    o.family(
        "hvnode_node_memory_available_bytes",
        "gauge",
        "Host memory available for new work.",
    );
    o.sample(
        "hvnode_node_memory_available_bytes",
        &[],
        s.memory.available_bytes as f64,
    );
    if let Some(fs) = s.storage {
        o.family(
            "hvnode_node_storage_total_bytes",
            "gauge",
            "Size of the filesystem holding VM disks.",
        );
        o.sample(
            "hvnode_node_storage_total_bytes",
            &[],
            fs.total_bytes as f64,
        );
        o.family(
            "hvnode_node_storage_available_bytes",
            "gauge",
            "Free space for VM disks.",
        );
        o.sample(
            "hvnode_node_storage_available_bytes",
            &[],
            fs.available_bytes as f64,
        );
    }
    o.family("hvnode_node_load", "gauge", "Host load average.");
    for (window, v) in ["1m", "5m", "15m"].iter().zip(s.load) {
        o.sample("hvnode_node_load", &[("window", window)], v);
    }
    o.family("hvnode_vms", "gauge", "VMs on this node by status.");
    for (status, n) in s.vms_by_status {
        o.sample("hvnode_vms", &[("status", status)], *n as f64);
    }

    // --- VMs (running ones; a stopped VM has no counters)
    let mut ids: Vec<&Uuid> = s.samples.keys().collect();
    ids.sort();
    type Get = fn(&Sample) -> f64;
    let families: [(&str, &str, &str, Get); 10] = [
        (
            "hvnode_vm_cpu_seconds_total",
            "counter",
            "CPU time used by the VM.",
            |x| x.stats.cpu_time_ns as f64 / 1e9,
        ),
        (
            "hvnode_vm_cpu_usage_ratio",
            "gauge",
            "CPU use over the last interval, 0 to 1 of its vCPUs.",
            |x| x.cpu_percent / 100.0,
        ),
        ("hvnode_vm_vcpus", "gauge", "vCPUs of the VM.", |x| {
            f64::from(x.stats.vcpus)
        }),
        (
            "hvnode_vm_memory_total_bytes",
            "gauge",
            "Memory the VM has.",
            |x| super::status::memory(x, 0).total_bytes as f64,
        ),
        (
            "hvnode_vm_memory_used_bytes",
            "gauge",
            "Memory in use (guest-reported when available).",
            |x| super::status::memory(x, 0).used_bytes as f64,
        ),
        (
            "hvnode_vm_disk_read_bytes_total",
            "counter",
            "Bytes read from the VM's disks.",
            |x| x.stats.block_read_bytes as f64,
        ),
        (
            "hvnode_vm_disk_written_bytes_total",
            "counter",
            "Bytes written to the VM's disks.",
            |x| x.stats.block_write_bytes as f64,
        ),
        (
            "hvnode_vm_network_receive_bytes_total",
            "counter",
            "Bytes the VM received.",
            |x| x.stats.net_rx_bytes as f64,
        ),
        (
            "hvnode_vm_network_transmit_bytes_total",
            "counter",
            "Bytes the VM sent.",
            |x| x.stats.net_tx_bytes as f64,
        ),
        (
            "hvnode_vm_uptime_seconds",
            "gauge",
            "Seconds since the VM's QEMU started.",
            |x| x.uptime_seconds() as f64,
        ),
    ];
    for (name, kind, help, get) in families {
        o.family(name, kind, help);
        for id in &ids {
            let sample = &s.samples[*id];
            let vm = id.to_string();
            let host = s.names.get(*id).map(String::as_str).unwrap_or("");
            o.sample(name, &[("vm", &vm), ("name", host)], get(sample));
        }
    }
    o.family(
        "hvnode_vm_qmp_status",
        "gauge",
        "QEMU's run state (query-status) of each running VM, as a label.",
    );
    for id in &ids {
        let sample = &s.samples[*id];
        if let Some(q) = &sample.qmpstatus {
            o.sample(
                "hvnode_vm_qmp_status",
                &[("vm", &id.to_string()), ("status", q)],
                1.0,
            );
        }
    }

    // --- the agent
    o.family("hvnode_tasks", "gauge", "Tasks in the journal by state.");
    for (state, n) in s.tasks_by_state {
        o.sample("hvnode_tasks", &[("state", state)], *n as f64);
    }
    o.family(
        "hvnode_webhooks",
        "gauge",
        "Webhook deliveries by state (pending: not yet acknowledged; abandoned: given up after webhooks.max_age_s).",
    );
    for (state, n) in s.webhooks_by_state {
        o.sample("hvnode_webhooks", &[("state", state)], *n as f64);
    }
    o.family(
        "hvnode_vm_restarts_total",
        "counter",
        "VMs the agent started by itself: host_reboot (found off at the agent's start), qemu_ended (QEMU crashed or was killed).",
    );
    let k = s.keeper;
    for (why, n) in [
        ("host_reboot", k.autostarts),
        ("qemu_ended", k.autorestarts),
    ] {
        o.sample("hvnode_vm_restarts_total", &[("reason", why)], n as f64);
    }
    o.family(
        "hvnode_vm_restarts_given_up_total",
        "counter",
        "VMs left stopped after autorestart.max_restarts restarts within autorestart.window_s.",
    );
    o.sample("hvnode_vm_restarts_given_up_total", &[], k.gave_up as f64);
    o.family(
        "hvnode_vm_guest_poweroffs_total",
        "counter",
        "Guests that powered themselves off (they stay off).",
    );
    o.sample(
        "hvnode_vm_guest_poweroffs_total",
        &[],
        k.guest_poweroffs as f64,
    );
    o.family(
        "hvnode_api_requests_total",
        "counter",
        "API requests by route, method and status.",
    );
    for ((route, method, status), n) in s.requests {
        o.sample(
            "hvnode_api_requests_total",
            &[
                ("route", route),
                ("method", method),
                ("status", &status.to_string()),
            ],
            *n as f64,
        );
    }
    o.family(
        "hvnode_sampler_sweeps_total",
        "counter",
        "Sampler sweeps done.",
    );
    o.sample("hvnode_sampler_sweeps_total", &[], s.sweep.sweeps as f64);
    o.family(
        "hvnode_sampler_failures_total",
        "counter",
        "Sampler sweeps that could not reach libvirt.",
    );
    o.sample(
        "hvnode_sampler_failures_total",
        &[],
        s.sweep.failures as f64,
    );
    o.family(
        "hvnode_sampler_qmp_timeouts_total",
        "counter",
        "query-status and bulk stats calls that did not answer in time (a hung QEMU).",
    );
    o.sample(
        "hvnode_sampler_qmp_timeouts_total",
        &[],
        s.sweep.qmp_timeouts as f64,
    );
    o.family(
        "hvnode_sampler_duration_seconds",
        "gauge",
        "Wall time of the last sweep.",
    );
    o.sample(
        "hvnode_sampler_duration_seconds",
        &[],
        s.sweep.last_wall.as_secs_f64(),
    );
    o.family(
        "hvnode_sampler_cpu_seconds",
        "gauge",
        "Agent CPU time during the last sweep.",
    );
    o.sample(
        "hvnode_sampler_cpu_seconds",
        &[],
        s.sweep.last_cpu.as_secs_f64(),
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_break_the_format() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_parse() {
        let samples = HashMap::new();
        let names = HashMap::new();
        let text = render(&Scrape {
            cpu: &CpuFigures {
                cores: 2,
                usage_percent: 50.0,
            },
            memory: &MemoryFigures {
                total_bytes: 10,
                available_bytes: 5,
            },
            storage: None,
            load: [0.5, 0.25, 0.125],
            vms_by_status: &[("running", 1)],
            samples: &samples,
            names: &names,
            tasks_by_state: &[("completed".into(), 3)],
            webhooks_by_state: &[("pending", 1), ("delivered", 2), ("abandoned", 0)],
            keeper: crate::vm::KeeperCounts {
                autostarts: 2,
                autorestarts: 1,
                gave_up: 0,
                guest_poweroffs: 0,
            },
            requests: &[(("/v1/vms".into(), "GET".into(), 200), 7)],
            sweep: SweepFigures::default(),
            libvirt_up: true,
            uptime_seconds: 9,
        });
        assert!(text.contains("hvnode_node_cpu_usage_ratio 0.5\n"));
        assert!(text.contains(
            "hvnode_api_requests_total{route=\"/v1/vms\",method=\"GET\",status=\"200\"} 7\n"
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().expect("numeric value");
        }
    }
}
