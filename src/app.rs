//! The running agent's shared state, and the node-level answers (health, node, templates).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use utoipa::ToSchema;

use crate::api::auth::{SocketPolicy, TokenSet};
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
    pub tokens: TokenSet,
    pub socket_policy: SocketPolicy,
    pub sampler: Sampler,
    pub requests: RequestCounters,
    pub tickets: Tickets,
    /// Console sessions open at once (`console.max_sessions`).
    pub console_slots: Arc<tokio::sync::Semaphore>,
    monitor: NodeMonitor,
    started: Instant,
    outbox: Outbox,
}

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
            console_slots: Arc::new(tokio::sync::Semaphore::new(config.console.max_sessions)),
            tokens: TokenSet::from_hex(&config.api.token_sha256),
            socket_policy: SocketPolicy::from_group(&config.api.socket_group),
            config,
            vms,
            monitor: NodeMonitor::start(),
            started: Instant::now(),
            outbox,
        }
    }

    /// Starts the background workers: webhook delivery and the metrics sampler.
    pub fn start_background(&self) {
        self.sampler.start();
        Deliverer::new(
            self.vms.store().clone(),
            self.config.webhooks.clone(),
            self.outbox.clone(),
        )
        .start();
        self.outbox.wake();
    }

    pub async fn health(&self) -> Health {
        let connected = self.vms.hypervisor().connected().await;
        Health {
            status: if connected { "healthy" } else { "degraded" },
            service: "hvnode",
            version: env!("CARGO_PKG_VERSION"),
            libvirt: LibvirtHealth {
                connected,
                uri: self.vms.hypervisor().uri().to_owned(),
            },
            uptime_seconds: self.started.elapsed().as_secs(),
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
            accelerator: self.config.libvirt.accelerator.as_str(),
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
        let paused = |s: &crate::metrics::Sample| s.stats.state == PowerState::Paused;
        let stale = match (&sample, status) {
            (Some(s), VmStatus::Suspended) => !paused(s),
            (Some(s), VmStatus::Running) => paused(s),
            (Some(_), VmStatus::Stopped) => true,
            (None, VmStatus::Running | VmStatus::Suspended) => true,
            _ => false,
        };
        if stale {
            sample = self.sampler.fresh_since(id, asked).await;
        }
        Ok(crate::metrics::status::document(
            &vm,
            status,
            sample.as_ref(),
        ))
    }

    /// The Prometheus exposition of the node, every running VM and the agent.
    pub async fn metrics_text(&self) -> Result<String, VmError> {
        let (cpu, memory) = self.monitor.cpu_and_memory();
        let storage = node::fs_usage(&self.config.storage.vm_dir);
        let counts = self.vms.counts().await?;
        let names = self.vms.hostnames().await?;
        let tasks = self
            .vms
            .store()
            .call(|c| crate::store::tasks::count_by_state(c))
            .await?;
        let samples = self.sampler.all();
        let requests = self.requests.snapshot();
        let libvirt_up = self.vms.hypervisor().connected().await;
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

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `degraded` while libvirt cannot be reached.
    #[schema(value_type = crate::api::openapi::HealthStatus)]
    pub status: &'static str,
    pub service: &'static str,
    pub version: &'static str,
    pub libvirt: LibvirtHealth,
    pub uptime_seconds: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LibvirtHealth {
    pub connected: bool,
    pub uri: String,
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
    #[schema(value_type = crate::api::openapi::Accelerator)]
    pub accelerator: &'static str,
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
