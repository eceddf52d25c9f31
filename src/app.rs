//! The running agent's shared state, and the node-level answers (health, node, templates).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use utoipa::ToSchema;

use crate::config::Config;
use crate::console::Tickets;
use crate::hypervisor::{Hypervisor, Libvirt, PowerState};
use crate::metrics::{RequestCounters, Sampler};
use crate::node::{self, CpuFigures, FsUsage, HostFacts, MemoryFigures, NodeMonitor};
use crate::store::{Allocation, Store, StoreError};
use crate::tasks::webhooks::{Deliverer, Outbox};
use crate::tasks::{faults::FaultPoints, TaskEngine};
use crate::vm::{VmError, VmManager, VmStatus};

pub struct App {
    pub config: Arc<Config>,
    pub vms: VmManager,
    pub sampler: Sampler,
    pub requests: RequestCounters,
    pub tickets: Tickets,
    /// Console sessions open now, within `console.max_sessions` and
    /// `console.max_sessions_per_vm`.
    pub consoles: crate::console::Sessions,
    monitor: NodeMonitor,
    started: Instant,
    outbox: Outbox,
    checked: Arc<std::sync::Mutex<Checked>>,
}

/// What the background check last found (`/v1/health`, `/metrics`).
#[derive(Debug, Clone, Copy, Default)]
struct Checked {
    /// Every pooled libvirt connection answered.
    reachable: bool,
    /// Whether QEMU runs confined (AppArmor, SELinux); unknown until libvirt answered.
    confined: Option<bool>,
}

/// How often the background check asks libvirt.
const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

impl App {
    /// Opens the store and prepares the libvirt client (connected lazily). Must run inside
    /// a tokio runtime.
    pub fn open(config: Config, faults: FaultPoints) -> Result<App, StoreError> {
        crate::store::check_not_lost(&config.storage.state_db, &config.storage.vm_dir)?;
        let store = Store::open(&config.storage.state_db)?;
        store.claim_dir(&config.storage.vm_dir)?;
        let hv: Arc<dyn Hypervisor> = Arc::new(Libvirt::new(
            &config.libvirt.uri,
            config.libvirt.connections,
        ));
        // The sampler's own connections: libvirtd serves a few calls per connection at a
        // time, and a sweep must not queue behind a burst of API requests (nor they
        // behind it).
        let sampler_hv: Arc<dyn Hypervisor> = Arc::new(Libvirt::new(&config.libvirt.uri, 2));
        Ok(App::assemble(config, store, hv, sampler_hv, faults))
    }

    pub fn with_parts(
        config: Config,
        store: Store,
        hv: Arc<dyn Hypervisor>,
        faults: FaultPoints,
    ) -> App {
        App::assemble(config, store, hv.clone(), hv, faults)
    }

    fn assemble(
        config: Config,
        store: Store,
        hv: Arc<dyn Hypervisor>,
        sampler_hv: Arc<dyn Hypervisor>,
        faults: FaultPoints,
    ) -> App {
        let config = Arc::new(config);
        let engine = TaskEngine::new(store.clone(), config.tasks.max_concurrent, faults);
        let host = HostFacts::measure(&config.storage.vm_dir);
        let outbox = Outbox::default();
        let sampler = Sampler::new(
            sampler_hv,
            Some(store.clone()),
            std::time::Duration::from_millis(config.metrics.interval_ms),
            std::time::Duration::from_millis(config.metrics.qmp_timeout_ms),
        );
        let vms = VmManager::new(config.clone(), store, hv, engine, host, outbox.clone());
        App {
            sampler,
            requests: RequestCounters::default(),
            tickets: Tickets::default(),
            consoles: crate::console::Sessions::new(
                config.console.max_sessions,
                config.console.max_sessions_per_vm,
            ),
            config,
            vms,
            monitor: NodeMonitor::start(),
            started: Instant::now(),
            outbox,
            checked: Arc::default(),
        }
    }

    /// Asks libvirt once on every pooled connection, and whether QEMU is confined, and
    /// keeps the answer for health checks. A change is logged once.
    pub async fn check_health(&self) {
        let hv = self.vms.hypervisor();
        let probe = hv.probe().await;
        let reachable = probe.is_ok();
        let mut confined = self.checked_now().confined;
        if reachable && confined.is_none() {
            confined = hv.confined().await.ok();
            if confined == Some(false) {
                let required = self.config.libvirt.require_confinement;
                tracing::warn!(
                    required,
                    "libvirt confines QEMU with no mandatory access control (security model \
                     none): one escaped guest could reach every VM's disk; install AppArmor \
                     or SELinux for libvirt (health is degraded unless \
                     libvirt.require_confinement = false)"
                );
            }
        }
        let before = {
            let mut c = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            let before = c.reachable;
            *c = Checked {
                reachable,
                confined,
            };
            before
        };
        match probe {
            Err(e) if before => tracing::warn!(error = %e, "libvirt is unreachable"),
            Ok(()) if !before => tracing::info!("libvirt is reachable"),
            _ => {}
        }
    }

    fn checked_now(&self) -> Checked {
        *self.checked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the background workers: the health check, webhook delivery and the metrics
    /// sampler.
    pub fn start_background(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(app) = me.upgrade() else { return };
                app.check_health().await;
            }
        });
        self.sampler.start();
        Deliverer::new(
            self.vms.store().clone(),
            self.config.webhooks.clone(),
            self.outbox.clone(),
        )
        .start();
        self.outbox.wake();
    }

    /// The agent's health from the last background check; `trusted` callers also learn
    /// where it looks for libvirt.
    pub fn health(&self, trusted: bool) -> Health {
        let checked = self.checked_now();
        let connected = checked.reachable && !self.vms.hypervisor().failing();
        let mut reasons = Vec::new();
        if !connected {
            reasons.push(DegradedReason::LibvirtUnreachable);
        }
        if checked.confined == Some(false) && self.config.libvirt.require_confinement {
            reasons.push(DegradedReason::QemuUnconfined);
        }
        Health {
            status: if reasons.is_empty() {
                HealthStatus::Healthy
            } else {
                HealthStatus::Degraded
            },
            service: "hvnode",
            version: env!("CARGO_PKG_VERSION"),
            libvirt: LibvirtHealth {
                connected,
                uri: trusted.then(|| self.vms.hypervisor().uri().to_owned()),
            },
            uptime_seconds: self.started.elapsed().as_secs(),
            reasons,
        }
    }

    pub async fn node_info(&self) -> Result<NodeInfo, VmError> {
        let (cpu, memory) = self.monitor.cpu_and_memory();
        let versions = self.vms.hypervisor().versions().await.ok();
        let vm_dir = &self.config.storage.vm_dir;
        let usage = node::fs_usage(vm_dir).unwrap_or_default();
        Ok(NodeInfo {
            hostname: node::hostname(),
            cpu,
            memory,
            storage: StorageFigures {
                path: vm_dir.to_string_lossy().into_owned(),
                usage,
            },
            load_average: node::load_average(),
            kernel: node::kernel(),
            libvirt_version: versions.as_ref().map(|v| v.libvirt.clone()),
            qemu_version: versions.map(|v| v.qemu),
            accelerator: self.config.libvirt.accelerator,
            instances: self.vms.counts().await?,
            allocated: self.vms.allocation().await?.into(),
            reconciliation: self.vms.reconciliation(),
        })
    }

    /// The status document of one VM, from a sample no older than the interval.
    pub async fn vm_status(&self, id: uuid::Uuid) -> Result<crate::metrics::StatusDoc, VmError> {
        self.vm_status_within(id, self.sampler.interval()).await
    }

    /// Like `vm_status`, from a sample no older than `max_age` (or the sampler's
    /// interval, whichever is shorter).
    pub async fn vm_status_within(
        &self,
        id: uuid::Uuid,
        max_age: std::time::Duration,
    ) -> Result<crate::metrics::StatusDoc, VmError> {
        let asked = Instant::now();
        let (vm, status) = self.vms.row_with_status(id).await?;
        let mut sample = self
            .sampler
            .fresh_within(id, max_age.min(self.sampler.interval()))
            .await;
        // A power action since that sample (suspend, resume, stop): libvirt already says
        // so, the sample does not yet. Take a sample from a sweep begun after this request
        // (one such sweep serves every request waiting for it) rather than answer stale.
        // A restart (stop and start between two sweeps) leaves the status as it was; the
        // QEMU process is another one.
        let paused = |s: &crate::metrics::Sample| s.stats.state == PowerState::Paused;
        let restarted = |s: &crate::metrics::Sample| {
            let now = self.sampler.qemu_pid(id);
            now.is_some() && now != s.pid
        };
        let stale = match (&sample, status) {
            (Some(s), VmStatus::Suspended) => !paused(s) || restarted(s),
            (Some(s), VmStatus::Running) => paused(s) || restarted(s),
            (Some(_), VmStatus::Stopped) => true,
            (None, VmStatus::Running | VmStatus::Suspended) => true,
            _ => false,
        };
        if stale {
            sample = self.sampler.fresh_since(id, asked).await;
        }
        let sample = sample.map(|s| self.sampler.with_current_process(id, s));
        let last_stop_reason = self.vms.power(id).await?.and_then(|p| p.last_stop_reason);
        Ok(crate::metrics::status::document(
            &vm,
            status,
            sample.as_ref(),
            last_stop_reason,
        ))
    }

    /// The Prometheus exposition of the node, every running VM and the agent.
    pub async fn metrics_text(&self) -> Result<String, VmError> {
        let (cpu, memory) = self.monitor.cpu_and_memory();
        let storage = node::fs_usage(&self.config.storage.vm_dir);
        let counts = self.vms.counts().await?;
        let names = self.vms.hostnames().await?;
        let (tasks, webhooks) = self
            .vms
            .store()
            .call(|c| {
                Ok((
                    crate::store::tasks::count_by_state(c)?,
                    crate::tasks::webhooks::count_by_state(c)?,
                ))
            })
            .await?;
        let samples = self.sampler.all();
        let requests = self.requests.snapshot();
        let libvirt_up = self.checked_now().reachable && !self.vms.hypervisor().failing();
        Ok(crate::metrics::prometheus::render(
            &crate::metrics::prometheus::Scrape {
                cpu: &cpu,
                memory: &memory,
                storage: storage.as_ref(),
                load: node::load_average(),
                vms_by_status: &[
                    ("running", counts.running),
                    ("stopped", counts.stopped),
                    ("suspended", counts.suspended),
                    (
                        "other",
                        counts
                            .total
                            .saturating_sub(counts.running + counts.stopped + counts.suspended),
                    ),
                ],
                samples: &samples,
                names: &names,
                tasks_by_state: &tasks,
                webhooks_by_state: &webhooks,
                keeper: self.vms.keeper_counts(),
                requests: &requests,
                sweep: self.sampler.figures(),
                libvirt_up,
                uptime_seconds: self.started.elapsed().as_secs(),
            },
        ))
    }

    pub async fn templates(&self) -> Result<Templates, VmError> {
        let templates = self
            .vms
            .images()
            .templates()
            .await
            .map_err(|e| VmError::Internal(e.to_string()))?;
        Ok(Templates { templates })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Healthy,
    Degraded,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `degraded` while libvirt cannot be reached, or while QEMU runs unconfined (unless
    /// `libvirt.require_confinement = false`); `reasons` says which.
    pub status: HealthStatus,
    pub service: &'static str,
    pub version: &'static str,
    pub libvirt: LibvirtHealth,
    pub uptime_seconds: u64,
    /// Why the agent is degraded; empty when healthy.
    pub reasons: Vec<DegradedReason>,
}

/// Why `/v1/health` says `degraded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DegradedReason {
    /// A pooled libvirt connection did not answer, or a call found libvirt unreachable
    /// since the last check that reached it on every connection.
    LibvirtUnreachable,
    /// libvirt runs QEMU without AppArmor or SELinux: one escaped guest could reach every
    /// VM's disk.
    QemuUnconfined,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LibvirtHealth {
    pub connected: bool,
    /// Where the agent looks for libvirt; only for callers with a token or on the socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StorageFigures {
    pub path: String,
    #[serde(flatten)]
    pub usage: FsUsage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AllocatedFigures {
    pub cpu_cores: u64,
    pub ram_mb: u64,
    pub disk_gb: u64,
}

impl From<Allocation> for AllocatedFigures {
    fn from(a: Allocation) -> Self {
        AllocatedFigures {
            cpu_cores: a.cpu_cores,
            ram_mb: a.ram_mb,
            disk_gb: a.disk_gb,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeInfo {
    pub hostname: String,
    pub cpu: CpuFigures,
    pub memory: MemoryFigures,
    pub storage: StorageFigures,
    /// Over 1, 5 and 15 minutes.
    #[schema(min_items = 3, max_items = 3)]
    pub load_average: [f64; 3],
    pub kernel: String,
    /// Null while libvirt cannot be reached.
    #[schema(required = true)]
    pub libvirt_version: Option<String>,
    /// Null while libvirt cannot be reached.
    #[schema(required = true)]
    pub qemu_version: Option<String>,
    pub accelerator: crate::config::Accelerator,
    pub instances: crate::vm::InstanceCounts,
    pub allocated: AllocatedFigures,
    /// What startup found when it compared the store with libvirt.
    #[schema(required = true)]
    pub reconciliation: Option<crate::vm::Reconciliation>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Templates {
    pub templates: Vec<crate::storage::Template>,
}
