//! The running agent's shared state, and the node-level answers (health, node, templates).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::api::auth::{SocketPolicy, TokenSet};
use crate::config::Config;
use crate::hypervisor::{Hypervisor, Libvirt};
use crate::node::{self, CpuFigures, FsUsage, HostFacts, MemoryFigures, NodeMonitor};
use crate::store::{Allocation, Store, StoreError};
use crate::tasks::webhooks::{Deliverer, Outbox};
use crate::tasks::{faults::FaultPoints, TaskEngine};
use crate::vm::{VmError, VmManager};

pub struct App {
    pub config: Arc<Config>,
    pub vms: VmManager,
    pub tokens: TokenSet,
    pub socket_policy: SocketPolicy,
    monitor: NodeMonitor,
    started: Instant,
    outbox: Outbox,
}

impl App {
    /// Opens the store and prepares the libvirt client (connected lazily). Must run inside
    /// a tokio runtime.
    pub fn open(config: Config, faults: FaultPoints) -> Result<App, StoreError> {
        let store = Store::open(&config.storage.state_db)?;
        let hv: Arc<dyn Hypervisor> = Arc::new(Libvirt::new(
            &config.libvirt.uri,
            config.libvirt.connections,
        ));
        Ok(App::with_parts(config, store, hv, faults))
    }

    pub fn with_parts(
        config: Config,
        store: Store,
        hv: Arc<dyn Hypervisor>,
        faults: FaultPoints,
    ) -> App {
        let config = Arc::new(config);
        let engine = TaskEngine::new(store.clone(), config.tasks.max_concurrent, faults);
        let host = HostFacts::measure(&config.storage.vm_dir);
        let outbox = Outbox::default();
        let vms = VmManager::new(config.clone(), store, hv, engine, host, outbox.clone());
        App {
            tokens: TokenSet::from_hex(&config.api.token_sha256),
            socket_policy: SocketPolicy::from_group(&config.api.socket_group),
            config,
            vms,
            monitor: NodeMonitor::start(),
            started: Instant::now(),
            outbox,
        }
    }

    /// Starts the background workers: webhook delivery.
    pub fn start_background(&self) {
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

#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub service: &'static str,
    pub version: &'static str,
    pub libvirt: LibvirtHealth,
    pub uptime_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct LibvirtHealth {
    pub connected: bool,
    pub uri: String,
}

#[derive(Debug, Serialize)]
pub struct StorageFigures {
    pub path: String,
    #[serde(flatten)]
    pub usage: FsUsage,
}

#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct NodeInfo {
    pub hostname: String,
    pub cpu: CpuFigures,
    pub memory: MemoryFigures,
    pub storage: StorageFigures,
    pub load_average: [f64; 3],
    pub kernel: String,
    pub libvirt_version: Option<String>,
    pub qemu_version: Option<String>,
    pub accelerator: &'static str,
    pub instances: crate::vm::InstanceCounts,
    pub allocated: AllocatedFigures,
    /// What startup found when it compared the store with libvirt.
    pub reconciliation: Option<crate::vm::Reconciliation>,
}

#[derive(Debug, Serialize)]
pub struct Templates {
    pub templates: Vec<crate::storage::Template>,
}
