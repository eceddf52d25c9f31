//! The domain plumbing every operation shares: the domain XML as the store describes the
//! VM, defining, starting (with the taps put on their bridges), powering off, removing, and
//! the cloud-init seed. Operations use these; they never import one another.

use super::model::domain_name;
use super::net::{self, VmNet};
use super::{domain_xml, Ctx, Op, VmError};
use crate::cloudinit::{self, SeedInput};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::hypervisor::{HypervisorError, PowerState};
use crate::store::VmRow;

/// The domain XML of `vm` with the NICs of `net`.
pub(crate) fn domain_xml_for(ctx: &Ctx, vm: &VmRow, net: &VmNet) -> Result<String, VmError> {
    let lv = &ctx.config.libvirt;
    let dir = ctx.disks.dir(vm.id);
    let (disk, seed, nvram, console_log) = (
        ctx.disks.disk_path(vm.id),
        ctx.disks.seed_path(vm.id),
        dir.join("nvram.fd"),
        ctx.disks.console_log_path(vm.id),
    );
    let specs = net.all();
    let nics: Vec<domain_xml::Nic<'_>> = specs
        .iter()
        .map(|n| domain_xml::Nic {
            mac: &n.mac,
            bridge: &n.bridge,
            tap: &n.tap,
        })
        .collect();
    // A linked clone's template, as the disk itself names it (an older build for a VM
    // cloned before the template was rebuilt).
    let backing = match crate::storage::backing(&disk) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other,
    }
    .map_err(|e| {
        VmError::host(
            Op::Deploy,
            format!("cannot read the backing file of {}", disk.display()),
            e,
        )
    })?;
    let cpu_mode = match lv.accelerator {
        crate::config::Accelerator::Tcg => None,
        crate::config::Accelerator::Kvm => {
            (!lv.cpu_mode.is_empty()).then_some(lv.cpu_mode.as_str())
        }
    };
    // Validation keeps client text XML-safe already; a value XML cannot carry is refused
    // here too rather than altered on its way to libvirt.
    domain_xml::try_render(&domain_xml::DomainSpec {
        id: vm.id,
        name: &domain_name(vm.id),
        title: &vm.hostname,
        template_id: &vm.template_id,
        accelerator: lv.accelerator,
        machine: &lv.machine,
        cpu_mode,
        vcpus: vm.cpu_cores,
        memory_mib: vm.ram_mb,
        ovmf_code: &lv.ovmf_code,
        ovmf_vars: &lv.ovmf_vars,
        nvram: &nvram,
        disk: &disk,
        backing: backing.as_ref().map(|(f, fmt)| (f.as_path(), fmt.as_str())),
        seed: &seed,
        console_log: &console_log,
        nics: &nics,
    })
    .map_err(|e| VmError::Internal(format!("domain XML: {e}")))
}

/// Defines (or redefines) the persistent domain of `vm` as the store describes it.
pub(crate) async fn define(ctx: &Ctx, vm: &VmRow, op: Op) -> Result<(), VmError> {
    let net = net::load(ctx, vm).await?;
    ctx.hv
        .define(domain_xml_for(ctx, vm, &net)?)
        .await
        .map_err(|e| VmError::hypervisor(op, e))
}

/// Starts the domain and puts its fresh taps on their bridges with their limits.
pub(crate) async fn start_domain(ctx: &Ctx, vm: &VmRow, op: Op) -> Result<(), VmError> {
    ctx.hv
        .start(vm.id)
        .await
        .map_err(|e| VmError::hypervisor(op, e))?;
    net::plug(ctx, vm, op).await
}

/// Starts the domain paused, before its first instruction, and plugs its network.
pub(crate) async fn start_domain_paused(ctx: &Ctx, vm: &VmRow, op: Op) -> Result<(), VmError> {
    ctx.hv
        .start_paused(vm.id)
        .await
        .map_err(|e| VmError::hypervisor(op, e))?;
    net::plug(ctx, vm, op).await
}

/// Renders and writes the VM's cloud-init seed.
pub(crate) async fn write_seed(ctx: &Ctx, vm: &VmRow) -> Result<(), VmError> {
    let net = net::load(ctx, vm).await?;
    let nics = net::seed_nics(ctx, &net);
    let docs = cloudinit::render(&SeedInput {
        instance_id: &vm.instance_id,
        hostname: &vm.hostname,
        password_hash: &vm.password_hash,
        ssh_keys: &vm.ssh_keys,
        nics: &nics,
    })
    .map_err(|e| VmError::cloud_init(Op::Deploy, e))?;
    ctx.disks
        .ensure_dir(vm.id)
        .await
        .map_err(|e| VmError::storage(Op::Deploy, e))?;
    let path = ctx.disks.seed_path(vm.id);
    tokio::task::spawn_blocking(move || cloudinit::seed::write(&path, &docs))
        .await
        .map_err(|e| VmError::Internal(e.to_string()))?
        .map_err(|e| VmError::cloud_init(Op::Deploy, e))
}

/// Stops the domain if it runs and removes its definition.
pub(crate) async fn remove_domain(ctx: &Ctx, id: Uuid, op: Op) -> Result<(), VmError> {
    ensure_off(ctx, id, op).await?;
    ctx.hv
        .undefine(id)
        .await
        .map_err(|e| VmError::hypervisor(op, e))
}

/// Powers the domain off at once if it runs; a domain that is already off or gone is fine.
pub(crate) async fn ensure_off(ctx: &Ctx, id: Uuid, op: Op) -> Result<(), VmError> {
    match ctx.hv.destroy(id).await {
        Ok(()) | Err(HypervisorError::NoDomain(_)) => Ok(()),
        Err(e) => Err(VmError::hypervisor(op, e)),
    }
}

/// How a stop treats the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StopOptions {
    /// Power off at once instead of asking the guest.
    pub force: bool,
    /// How long the guest may take to shut down before it is powered off.
    pub timeout_s: u64,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            force: false,
            timeout_s: 60,
        }
    }
}

/// Stops the domain as a customer's stop does: an ACPI shutdown the guest may take
/// `stop.timeout_s` to finish, then a power-off; `stop.force` powers off at once. A paused
/// guest is resumed first (it cannot see the power button); an off domain is left alone.
/// A button libvirt cannot press (a hung QEMU holds its monitor, so the request times out
/// waiting for it) is not worth waiting on: the domain is powered off at once.
pub(crate) async fn shutdown(
    ctx: &Ctx,
    id: Uuid,
    op: Op,
    stop: StopOptions,
) -> Result<(), VmError> {
    let hv = &ctx.hv;
    let power = || async {
        hv.power_state(id)
            .await
            .map_err(|e| VmError::hypervisor(op, e))
    };
    let unheard = |what: &str, e: HypervisorError| match e {
        HypervisorError::Unavailable { .. } => Err(VmError::hypervisor(op, e)),
        other => {
            tracing::warn!(vps = %id, error = %other,
                "{what} could not be delivered; powering off");
            Ok(())
        }
    };
    let mut ask = !stop.force;
    match power().await? {
        Some(PowerState::Shutoff | PowerState::Crashed) | None => return Ok(()),
        Some(PowerState::Paused) if ask => {
            if let Err(e) = hv.resume(id).await {
                unheard("resume before the ACPI shutdown", e)?;
                ask = false;
            }
        }
        _ => {}
    }
    if ask {
        match hv.shutdown(id).await {
            Ok(()) => {
                let deadline = Instant::now() + Duration::from_secs(stop.timeout_s);
                while Instant::now() < deadline {
                    if matches!(power().await?, Some(PowerState::Shutoff) | None) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                tracing::warn!(vps = %id, timeout_s = stop.timeout_s,
                    "guest ignored ACPI shutdown; powering off");
            }
            Err(HypervisorError::NoDomain(_)) => return Ok(()),
            Err(e) => unheard("ACPI shutdown", e)?,
        }
    }
    ensure_off(ctx, id, op).await
}
