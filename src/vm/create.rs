//! Creating a VM: admission, then the ten-step create task.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use uuid::Uuid;

use super::domain::{define, ensure_off, remove_domain, write_seed};
use super::model::{CreateAccepted, CreateVmRequest, IpKind, VmSpec, VmStatus};
use super::net;
use super::{readiness, validate, Ctx, Op, Resume, TaskKind, VmError, VmManager};
use crate::cloudinit;
use crate::hypervisor::{HypervisorError, PowerState};
use crate::network::{self, ipam::IpamError};
use crate::store::{self, NewTask, VmRow, VmRowState};
use crate::tasks::{webhooks, Operation, StepCtx};

/// Time a create takes under normal conditions, for the client's progress display.
const ESTIMATED_SECONDS_KVM: u64 = 60;
const ESTIMATED_SECONDS_TCG: u64 = 180;

impl VmManager {
    /// Admits a create and starts its task; answers before the VM exists.
    pub async fn create(&self, req: CreateVmRequest) -> Result<CreateAccepted, VmError> {
        let ctx = &self.ctx;
        let spec = validate::create(req, &ctx.config.capacity)?;
        let template =
            ctx.images.get(&spec.template_id).await.map_err(|_| {
                validate::ValidationError::InvalidTemplate(spec.template_id.clone())
            })?;
        if spec.disk_gb << 30 < template.virtual_size {
            return Err(validate::ValidationError::InvalidResources(format!(
                "disk_gb {} is smaller than template {} ({} GB)",
                spec.disk_gb,
                template.id,
                template.virtual_size.div_ceil(1 << 30)
            ))
            .into());
        }
        if let Some(existing) = self.repeated_create(&spec).await? {
            return Ok(existing);
        }
        let claim = match ctx.claim(spec.id, TaskKind::Create) {
            Ok(c) => c,
            // Two identical creates racing: the loser answers with the winner's task.
            Err(busy) => return self.repeated_create(&spec).await?.ok_or(busy),
        };
        let password_hash = {
            let pw = spec.root_password.clone();
            tokio::task::spawn_blocking(move || cloudinit::hash_password(&pw))
                .await
                .map_err(|e| VmError::Internal(e.to_string()))?
                .map_err(|e| VmError::cloud_init(Op::Deploy, e))?
        };
        let vm = admit(ctx, &spec, claim.task(), password_hash).await?;
        let accepted = accepted(ctx, &vm, claim.task(), VmStatus::Deploying);
        tracing::info!(vps = %vm.id, task = %claim.task(), hostname = %vm.hostname,
            ip = ?vm.ip_address, "create admitted");
        let op = CreateOp {
            ctx: self.ctx.clone(),
            id: vm.id,
        };
        ctx.engine.launch(claim, TaskKind::Create.as_str(), op);
        Ok(accepted)
    }

    /// The answer to a create that repeats an earlier one, `VPS_EXISTS` for a create that
    /// reuses an id with another body, `None` for a new id.
    async fn repeated_create(&self, spec: &VmSpec) -> Result<Option<CreateAccepted>, VmError> {
        let ctx = &self.ctx;
        let id = spec.id;
        let Some(existing) = ctx.store.call(move |c| store::vms::get(c, id)).await? else {
            return Ok(None);
        };
        let requested_ip = spec.ip_address.or(existing.ip_address);
        let same = existing.request_digest == spec.digest(requested_ip)
            && cloudinit::password_matches(&spec.root_password, &existing.password_hash);
        if !same {
            return Err(VmError::Exists(id));
        }
        let task = ctx
            .store
            .call(move |c| store::tasks::latest_of_kind(c, id, TaskKind::Create.as_str()))
            .await?
            .ok_or(VmError::Exists(id))?;
        let status = match existing.state {
            VmRowState::Deploying => VmStatus::Deploying,
            VmRowState::Failed => VmStatus::Failed,
            VmRowState::Active => self.status_of(&existing).await,
        };
        Ok(Some(accepted(ctx, &existing, task.id, status)))
    }
}

fn accepted(ctx: &Ctx, vm: &VmRow, task: Uuid, status: VmStatus) -> CreateAccepted {
    CreateAccepted {
        vps_id: vm.id,
        task_id: task,
        name: vm.hostname.clone(),
        status,
        ip_address: vm.ip_address,
        deployment_url: format!("{}/v1/vms/{}/deployment", ctx.config.public_url(), vm.id),
        estimated_time_seconds: match ctx.config.libvirt.accelerator {
            crate::config::Accelerator::Kvm => ESTIMATED_SECONDS_KVM,
            crate::config::Accelerator::Tcg => ESTIMATED_SECONDS_TCG,
        },
        webhook_configured: vm.webhook_url.is_some(),
    }
}

/// In one transaction: checks capacity, takes the IP, records the VM and its create task.
/// Either all of it is stored or none.
async fn admit(
    ctx: &Ctx,
    spec: &VmSpec,
    task_id: Uuid,
    password_hash: String,
) -> Result<VmRow, VmError> {
    let pool = ctx.pool.clone();
    let pool6 = ctx.pool6.clone();
    let host = ctx.host;
    let capacity = ctx.config.capacity.clone();
    let spec = spec.clone();
    let now = crate::time::now();
    ctx.store
        .call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if store::vms::get(&tx, spec.id)?.is_some() {
                return Ok(Err(VmError::Exists(spec.id)));
            }
            // Device names (taps, IFBs, filter chains) carry part of the id: two VMs
            // sharing it would share filters.
            let key = network::name_key(spec.id);
            if let Some(other) = store::vms::ids(&tx)?
                .into_iter()
                .find(|o| network::name_key(*o) == key)
            {
                return Ok(Err(VmError::IdConflict { id: spec.id, other }));
            }
            let alloc = store::vms::allocation(&tx)?;
            if let Err(why) =
                host.admits(&capacity, &alloc, spec.cpu_cores, spec.ram_mb, spec.disk_gb)
            {
                return Ok(Err(VmError::InsufficientCapacity(why)));
            }
            let taken: HashSet<IpAddr> = store::vms::ip_allocations(&tx)?
                .into_iter()
                .map(|a| a.address)
                .collect();
            let ip = match pool.choose(spec.ip_address, &taken) {
                Ok(ip) => ip,
                Err(e) => return Ok(Err(VmError::Ip(e))),
            };
            let ip6 = match pool6.as_ref().map(|p| p.choose(None, &taken)).transpose() {
                Ok(ip6) => ip6,
                Err(e) => return Ok(Err(VmError::Ip(e))),
            };
            let mut mac = network::random_mac();
            while store::vms::mac_in_use(&tx, &mac)? {
                mac = network::random_mac();
            }
            let vm = VmRow {
                id: spec.id,
                hostname: spec.hostname.clone(),
                template_id: spec.template_id.clone(),
                cpu_cores: spec.cpu_cores,
                ram_mb: spec.ram_mb,
                disk_gb: spec.disk_gb,
                bandwidth_mbps: spec.bandwidth_mbps,
                password_hash,
                ssh_keys: spec.ssh_keys.clone(),
                ip_address: Some(ip),
                mac,
                state: VmRowState::Deploying,
                webhook_url: spec.webhook_url.clone(),
                webhook_secret: spec.webhook_secret.as_ref().map(|s| s.expose().to_owned()),
                instance_id: format!("{}-{}", spec.id, Uuid::new_v4().simple()),
                request_digest: spec.digest(Some(ip)),
                created_at: now.clone(),
                updated_at: now.clone(),
                deployed_at: None,
            };
            store::vms::insert(&tx, &vm)?;
            store::power::insert(&tx, vm.id, spec.autostart, &now)?;
            store::vms::insert_ip(&tx, ip, vm.id, IpKind::Primary.as_str(), &now)?;
            if let Some(ip6) = ip6 {
                store::vms::insert_ip(&tx, ip6, vm.id, IpKind::Primary.as_str(), &now)?;
            }
            store::tasks::insert(
                &tx,
                &NewTask {
                    id: task_id,
                    kind: TaskKind::Create.as_str(),
                    vps_id: vm.id,
                    input: serde_json::json!({}),
                    steps: &crate::tasks::step_names(CreateStep::ALL),
                    now: &now,
                },
            )?;
            tx.commit()?;
            Ok(Ok(vm))
        })
        .await?
}

/// The create task. Every step reads the VM record afresh, so the task can be rebuilt
/// from the store alone after a restart.
pub(crate) struct CreateOp {
    pub ctx: Arc<Ctx>,
    pub id: Uuid,
}

impl CreateOp {
    /// The task found unfinished at startup: the create runs on from the step it reached
    /// (or unwinds), under the task's claim.
    pub(crate) fn resume(ctx: &Arc<Ctx>, task: &store::TaskRow) -> Resume {
        Resume::run(
            ctx,
            TaskKind::Create,
            CreateOp {
                ctx: ctx.clone(),
                id: task.vps_id,
            },
        )
    }

    /// A failure of the host's machinery (its detail stays in the log).
    fn host(&self, what: &str, cause: impl Into<super::error::Cause>) -> VmError {
        VmError::host(Op::Deploy, what, cause)
    }

    fn fail(&self, message: impl Into<String>) -> VmError {
        VmError::Failed {
            op: Op::Deploy,
            message: message.into(),
        }
    }

    fn hv(&self, e: HypervisorError) -> VmError {
        VmError::hypervisor(Op::Deploy, e)
    }

    async fn validate_resources(&self, vm: &VmRow) -> Result<(), VmError> {
        let template = self
            .ctx
            .images
            .get(&vm.template_id)
            .await
            .map_err(|e| self.host("the template could not be read", e))?;
        self.ctx
            .images
            .verify(&template)
            .await
            .map_err(|e| self.host("the template failed its check", e))?;
        if !self.ctx.hv.connected().await {
            return Err(VmError::HypervisorUnavailable(format!(
                "cannot reach libvirt at {}",
                self.ctx.hv.uri()
            )));
        }
        Ok(())
    }

    async fn allocate_ip(&self, vm: &VmRow) -> Result<(), VmError> {
        // Taken at admission, inside the transaction that recorded the VM; this step
        // confirms the address is still this VM's.
        let Some(ip) = vm.ip_address else {
            return Err(self.fail("the VPS has no primary address"));
        };
        let owner = self
            .ctx
            .store
            .call(move |c| store::vms::ip_owner(c, ip))
            .await?;
        match owner {
            Some(o) if o == vm.id => Ok(()),
            Some(_) => Err(VmError::Ip(IpamError::InUse(ip))),
            None => {
                let (id, now) = (vm.id, crate::time::now());
                self.ctx
                    .store
                    .call(move |c| store::vms::insert_ip(c, ip, id, IpKind::Primary.as_str(), &now))
                    .await?;
                Ok(())
            }
        }
    }

    async fn create_vm(&self, vm: &VmRow) -> Result<(), VmError> {
        let template = self
            .ctx
            .images
            .get(&vm.template_id)
            .await
            .map_err(|e| self.host("the template could not be read", e))?;
        self.ctx
            .disks
            .create_disk(vm.id, &template, vm.disk_gb)
            .await
            .map_err(|e| VmError::storage(Op::Deploy, e))
    }

    /// The domain, and the anti-spoofing rules its NICs will meet from their first packet.
    async fn configure_hardware(&self, vm: &VmRow) -> Result<(), VmError> {
        define(&self.ctx, vm, Op::Deploy).await?;
        net::refresh_filters(&self.ctx, &[], Op::Deploy).await
    }

    async fn apply_cloud_init(&self, vm: &VmRow) -> Result<(), VmError> {
        write_seed(&self.ctx, vm).await
    }

    async fn start_vm(&self, vm: &VmRow) -> Result<(), VmError> {
        self.ctx.hv.start(vm.id).await.map_err(|e| self.hv(e))?;
        match self
            .ctx
            .hv
            .power_state(vm.id)
            .await
            .map_err(|e| self.hv(e))?
        {
            Some(PowerState::Running) => Ok(()),
            other => Err(self.fail(format!("domain is {other:?} after start"))),
        }
    }

    async fn configure_network(&self, vm: &VmRow) -> Result<(), VmError> {
        // The tap exists once QEMU runs; make sure libvirt put it where it belongs.
        let xml = self
            .ctx
            .hv
            .domain_xml(vm.id)
            .await
            .map_err(|e| self.hv(e))?;
        let tap = network::tap_name(&self.ctx.config.network.tap_prefix, vm.id, 0);
        if !xml.contains(&format!("<target dev='{tap}'/>")) {
            return Err(self.fail(format!("tap {tap} is missing from the running domain")));
        }
        // Bridge membership and the plan's bandwidth limit, on the fresh taps.
        net::plug(&self.ctx, vm, Op::Deploy).await
    }

    async fn finalize(&self, vm: &VmRow) -> Result<(), VmError> {
        let (id, now) = (vm.id, crate::time::now());
        let hook = deployment_webhook(vm, webhooks::DEPLOYMENT_COMPLETED, "running", None);
        self.ctx
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                store::vms::set_state(&tx, id, VmRowState::Active, &now)?;
                if let Some(h) = &hook {
                    webhooks::enqueue(&tx, &h.as_new())?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.ctx.outbox.wake();
        tracing::info!(vps = %vm.id, "deployment completed");
        Ok(())
    }
}

/// A deployment event for the VM's webhook, if it has one.
struct PendingHook {
    dedupe_key: String,
    vps_id: Uuid,
    event: &'static str,
    url: String,
    secret: Option<String>,
    body: String,
}

impl PendingHook {
    fn as_new(&self) -> webhooks::NewWebhook<'_> {
        webhooks::NewWebhook {
            dedupe_key: self.dedupe_key.clone(),
            vps_id: self.vps_id,
            event: self.event,
            url: &self.url,
            secret: self.secret.as_deref(),
            body: self.body.clone(),
        }
    }
}

fn deployment_webhook(
    vm: &VmRow,
    event: &'static str,
    status: &str,
    error: Option<&str>,
) -> Option<PendingHook> {
    let url = vm.webhook_url.clone()?;
    let seconds = crate::time::seconds_between(&vm.created_at, &crate::time::now()).unwrap_or(0);
    Some(PendingHook {
        // One event per deployment (instance) and kind, however often a task finishes.
        dedupe_key: format!("{}:{event}", vm.instance_id),
        vps_id: vm.id,
        event,
        url,
        secret: vm.webhook_secret.clone(),
        body: webhooks::deployment_body(
            event,
            vm.id,
            &vm.hostname,
            status,
            vm.ip_address,
            seconds,
            error,
        ),
    })
}

crate::steps! {
    /// The create task's steps in order, by the names the journal stores and the deployment document lists.
    pub(crate) enum CreateStep {
        ValidateResources = "validate_resources",
        AllocateIp = "allocate_ip",
        CreateVm = "create_vm",
        ConfigureHardware = "configure_hardware",
        ApplyCloudInit = "apply_cloud_init",
        StartVm = "start_vm",
        ConfigureNetwork = "configure_network",
        WaitForGuestAgent = "wait_for_guest_agent",
        VerifyConnectivity = "verify_connectivity",
        Finalize = "finalize",
    }
}

impl Operation for CreateOp {
    type Error = VmError;
    type Step = CreateStep;

    fn steps(&self) -> &'static [Self::Step] {
        CreateStep::ALL
    }

    async fn run_step(&self, step: CreateStep, ctx: &StepCtx) -> Result<(), VmError> {
        let vm = self.ctx.vm(self.id).await?;
        match step {
            CreateStep::ValidateResources => self.validate_resources(&vm).await,
            CreateStep::AllocateIp => self.allocate_ip(&vm).await,
            CreateStep::CreateVm => self.create_vm(&vm).await,
            CreateStep::ConfigureHardware => self.configure_hardware(&vm).await,
            CreateStep::ApplyCloudInit => self.apply_cloud_init(&vm).await,
            CreateStep::StartVm => self.start_vm(&vm).await,
            CreateStep::ConfigureNetwork => self.configure_network(&vm).await,
            CreateStep::WaitForGuestAgent => {
                readiness::wait_for_guest_agent(&self.ctx, vm.id, &vm.template_id, ctx, Op::Deploy)
                    .await
            }
            CreateStep::VerifyConnectivity => {
                readiness::verify_connectivity(&self.ctx, vm.ip_address, ctx, Op::Deploy).await
            }
            CreateStep::Finalize => self.finalize(&vm).await,
        }
    }

    async fn undo_step(&self, step: CreateStep) -> Result<(), VmError> {
        let ctx = &self.ctx;
        let id = self.id;
        match step {
            CreateStep::AllocateIp => {
                ctx.store
                    .call(move |c| store::vms::release_ips(c, id))
                    .await?;
            }
            CreateStep::CreateVm => ctx
                .disks
                .remove_all(id)
                .await
                .map_err(|e| VmError::storage(Op::Deploy, e))?,
            CreateStep::ConfigureHardware => {
                remove_domain(ctx, id, Op::Deploy).await?;
                net::refresh_filters(ctx, &[id], Op::Deploy).await?;
            }
            CreateStep::ConfigureNetwork => {
                let vm = ctx.vm(id).await?;
                let nics = net::load(ctx, &vm).await?;
                for nic in nics.all() {
                    let _ = ctx.net.remove_nic(&nic).await;
                }
            }
            CreateStep::ApplyCloudInit => {
                crate::storage::remove_file_if_exists(&ctx.disks.seed_path(id))
                    .await
                    .map_err(|e| VmError::storage(Op::Deploy, e))?
            }
            CreateStep::StartVm => ensure_off(ctx, id, Op::Deploy).await?,
            CreateStep::Finalize => {
                let now = crate::time::now();
                ctx.store
                    .call(move |c| store::vms::set_state(c, id, VmRowState::Deploying, &now))
                    .await?;
            }
            // Checks and waits: nothing to take back.
            CreateStep::ValidateResources
            | CreateStep::WaitForGuestAgent
            | CreateStep::VerifyConnectivity => {}
        }
        Ok(())
    }

    async fn finish(&self, outcome: Result<(), &VmError>) {
        let Err(e) = outcome else { return };
        let (id, now) = (self.id, crate::time::now());
        let vm = match self.ctx.vm(id).await {
            Ok(vm) => vm,
            Err(_) => return,
        };
        let message = e.public_message();
        let hook = deployment_webhook(&vm, webhooks::DEPLOYMENT_FAILED, "failed", Some(&message));
        let marked = self
            .ctx
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                store::vms::set_state(&tx, id, VmRowState::Failed, &now)?;
                // The addresses were taken at admission, before any step could undo
                // them: a failed VM holds none (its record keeps the primary for the
                // deployment document only).
                store::vms::release_ips(&tx, id)?;
                if let Some(h) = &hook {
                    webhooks::enqueue(&tx, &h.as_new())?;
                }
                tx.commit()?;
                Ok(())
            })
            .await;
        if let Err(se) = marked {
            tracing::error!(vps = %id, error = %se, "cannot mark VPS failed");
        }
        self.ctx.outbox.wake();
        tracing::warn!(vps = %id, error = %e, "deployment failed and was unwound");
    }
}
