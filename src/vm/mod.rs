//! VMs: the platform's VPSes as persistent libvirt domains, and every operation on them.
//!
//! A VM's identity is the UUID the control plane chose; it is also the libvirt domain UUID.
//! The agent keeps a record of each VM in the store (spec, addresses, lifecycle record
//! state); whether it runs is always read from libvirt.
//!
//! ```text
//!   POST /v1/vms ──▶ admit (validate, reserve capacity + IP, record VM and task; 202)
//!                      │
//!                      ▼  create task: validate_resources → allocate_ip → create_vm →
//!                         configure_hardware → apply_cloud_init → start_vm →
//!                         configure_network → wait_for_guest_agent →
//!                         verify_connectivity → finalize
//!                      │ any step fails: undo in reverse, record stays as `failed`
//!                      ▼
//!   deploying ──▶ active (running / stopped / suspended, from libvirt) ──▶ deleted
//! ```
//!
//! Each operation lives in its own file (`create.rs`, `lifecycle.rs`, `delete.rs`), runs as
//! a task (`crate::tasks`) that holds the VM's claim, so two actions on one VM never
//! interleave. `state.rs` decides which action is allowed from which status.

mod create;
mod delete;
mod domain;
pub mod domain_xml;
mod error;
pub mod ips;
mod keeper;
mod kind;
mod lifecycle;
pub mod model;
mod net;
pub mod private_nets;
mod private_nics;
mod query;
mod readiness;
mod recover;
mod reinstall;
mod resize;
pub mod snapshots;
pub mod state;
pub mod validate;

use std::sync::Arc;

use uuid::Uuid;

use crate::config::Config;
use crate::hypervisor::Hypervisor;
use crate::network::ipam::Pool;
use crate::network::NetworkManager;
use crate::node::HostFacts;
use crate::storage::{Disks, ImageStore};
use crate::store::{self, NewTask, Store};
use crate::tasks::webhooks::Outbox;
use crate::tasks::{Claim, TaskEngine};

pub use error::{Op, VmError};
use kind::Resume;
pub use kind::TaskKind;

/// `state::admit`, its refusal as the error the client gets (`INVALID_STATE`, or
/// `HYPERVISOR_UNAVAILABLE` when the power state cannot be read).
fn admit(kind: TaskKind, status: model::VmStatus) -> Result<state::Decision, VmError> {
    state::admit(kind, status).map_err(|r| match r {
        state::Refusal::Unknown => VmError::HypervisorUnavailable(r.explain(kind)),
        other => VmError::InvalidState(other.explain(kind)),
    })
}
pub use domain::StopOptions;
pub use keeper::KeeperCounts;
pub use model::VmStatus;
pub use query::InstanceCounts;
pub use recover::Reconciliation;

/// Shared by the manager and the operations it spawns.
pub(crate) struct Ctx {
    pub config: Arc<Config>,
    pub store: Store,
    pub hv: Arc<dyn Hypervisor>,
    pub images: ImageStore,
    pub disks: Disks,
    pub pool: Pool,
    /// The IPv6 pool, when configured: every VM then also gets a primary IPv6 address.
    pub pool6: Option<Pool>,
    pub engine: TaskEngine,
    pub host: HostFacts,
    pub outbox: Outbox,
    pub net: NetworkManager,
    /// Serialises creating and deleting private networks.
    pub network_admin: tokio::sync::Mutex<()>,
    /// Held from reading the store to committing the filter table, so that two tasks can
    /// never commit their snapshots out of order (an older one putting back an address a
    /// newer one removed).
    pub filter_lock: tokio::sync::Mutex<()>,
    /// What the last startup found when comparing the store with libvirt.
    pub reconciliation: std::sync::Mutex<Option<Reconciliation>>,
    /// What the keeper (VMs coming back by themselves) has seen and done.
    pub keeper: keeper::KeeperState,
}

/// The entry point for every VM operation.
#[derive(Clone)]
pub struct VmManager {
    ctx: Arc<Ctx>,
}

impl VmManager {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        hv: Arc<dyn Hypervisor>,
        engine: TaskEngine,
        host: HostFacts,
        outbox: Outbox,
    ) -> VmManager {
        let images = ImageStore::new(&config.storage.image_dir, store.clone());
        let disks = Disks::new(&config.storage);
        let pool = Pool::new(config.network.pool.clone());
        let net = NetworkManager::new(config.network.clone());
        let pool6 = config.network.pool6.clone().map(Pool::new);
        VmManager {
            ctx: Arc::new(Ctx {
                config,
                store,
                hv,
                images,
                disks,
                pool,
                pool6,
                engine,
                host,
                outbox,
                net,
                network_admin: tokio::sync::Mutex::new(()),
                filter_lock: tokio::sync::Mutex::new(()),
                reconciliation: std::sync::Mutex::new(None),
                keeper: keeper::KeeperState::default(),
            }),
        }
    }

    pub fn images(&self) -> &ImageStore {
        &self.ctx.images
    }

    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.ctx.hv
    }

    pub fn store(&self) -> &Store {
        &self.ctx.store
    }

    /// Runs an operation on its own tokio task and waits for its result. A request whose
    /// client disconnects is dropped by the HTTP server between two awaits; an operation
    /// started here is not: it runs to its end (or its unwinding), and its journal row
    /// ends `completed` or `failed`, whether anyone still waits for it or not.
    pub async fn detached<T, F, Fut>(&self, op: F) -> Result<T, VmError>
    where
        T: Send + 'static,
        F: FnOnce(VmManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, VmError>> + Send + 'static,
    {
        match tokio::spawn(op(self.clone())).await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "an operation's task panicked");
                Err(VmError::Internal(
                    "the operation failed inside the agent".into(),
                ))
            }
        }
    }

    /// The report of the last startup reconciliation.
    pub fn reconciliation(&self) -> Option<Reconciliation> {
        self.ctx
            .reconciliation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Ctx {
    /// Admits an operation of `kind` on `vm` by its record alone (deploying or failed VMs
    /// refuse what needs a deployed one); see `state::admit`.
    fn admit_recorded(&self, kind: TaskKind, vm: &store::VmRow) -> Result<(), VmError> {
        admit(kind, model::VmStatus::derive(vm.state, None)).map(|_| ())
    }

    /// Claims `vm` for a new task of `kind`, or reports the task holding it.
    fn claim(&self, vm: Uuid, kind: TaskKind) -> Result<Claim, VmError> {
        self.engine
            .claim(vm, Uuid::new_v4(), kind.as_str())
            .map_err(|busy| VmError::TaskInProgress {
                vm,
                task: busy.task,
            })
    }

    /// Records the task of `claim` with `steps`.
    async fn record_task<S: crate::tasks::Step>(
        &self,
        claim: &Claim,
        kind: TaskKind,
        steps: &'static [S],
        input: serde_json::Value,
    ) -> Result<(), VmError> {
        let (id, vm, now) = (claim.task(), claim.vm(), crate::time::now());
        let steps = crate::tasks::step_names(steps);
        self.store
            .call(move |c| {
                store::tasks::insert(
                    c,
                    &NewTask {
                        id,
                        kind: kind.as_str(),
                        vps_id: vm,
                        input,
                        steps: &steps,
                        now: &now,
                    },
                )
            })
            .await?;
        Ok(())
    }

    async fn vm(&self, id: Uuid) -> Result<store::VmRow, VmError> {
        self.store
            .call(move |c| store::vms::get(c, id))
            .await?
            .ok_or(VmError::NotFound(id))
    }
}
