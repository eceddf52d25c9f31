//! The status document of `GET /v1/vms/{id}/status` and of its stream.

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::sampler::Sample;
use crate::store::power::StopReason;
use crate::store::VmRow;
use crate::vm::VmStatus;

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct StatusDoc {
    pub vps_id: Uuid,
    pub name: String,
    pub status: VmStatus,
    /// QEMU's `query-status`; "stopped" when no QEMU runs the VM.
    pub qmpstatus: String,
    pub cpu: CpuDoc,
    pub memory: MemoryDoc,
    pub disk: DiskDoc,
    pub network: NetworkDoc,
    pub uptime_seconds: u64,
    /// QEMU's process id; null when no QEMU runs the VM.
    #[schema(required = true)]
    pub pid: Option<u32>,
    /// Why the VM last stopped (a stop through the API, the guest's own poweroff, QEMU
    /// ended, a host reboot, restarts given up); null if it never did.
    #[schema(required = true)]
    pub last_stop_reason: Option<StopReason>,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct CpuDoc {
    /// Percent of the VM's vCPUs used over the last sampling interval (0–100).
    pub usage_percent: f64,
    pub cores: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct MemoryDoc {
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub usage_percent: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct DiskDoc {
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// From the VM's point of view: `in` is what it received.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct NetworkDoc {
    pub in_bytes: u64,
    pub out_bytes: u64,
}

/// Memory in use: what the guest reports (total minus available) when its balloon driver
/// sends statistics, else what QEMU occupies on the host, never more than the VM has.
pub fn memory(sample: &Sample, ram_mb: u64) -> MemoryDoc {
    let s = &sample.stats;
    let total_kib = if s.balloon_current_kib > 0 {
        s.balloon_current_kib
    } else {
        ram_mb * 1024
    };
    let used_kib = match (s.guest_available_kib, s.guest_usable_kib) {
        (Some(avail), Some(usable)) if avail > 0 => avail.saturating_sub(usable),
        _ => s.rss_kib.unwrap_or(0),
    }
    .min(total_kib);
    MemoryDoc {
        used_bytes: used_kib * 1024,
        total_bytes: total_kib * 1024,
        usage_percent: if total_kib == 0 {
            0.0
        } else {
            round2(used_kib as f64 * 100.0 / total_kib as f64)
        },
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

pub fn document(
    vm: &VmRow,
    status: VmStatus,
    sample: Option<&Sample>,
    last_stop_reason: Option<StopReason>,
) -> StatusDoc {
    let Some(sample) = sample else {
        return StatusDoc {
            vps_id: vm.id,
            name: vm.hostname.clone(),
            status,
            qmpstatus: match status {
                VmStatus::Suspended => "paused".into(),
                _ => "stopped".into(),
            },
            cpu: CpuDoc {
                usage_percent: 0.0,
                cores: vm.cpu_cores,
            },
            memory: MemoryDoc {
                used_bytes: 0,
                total_bytes: vm.ram_mb * 1024 * 1024,
                usage_percent: 0.0,
            },
            disk: DiskDoc {
                read_bytes: 0,
                write_bytes: 0,
            },
            network: NetworkDoc {
                in_bytes: 0,
                out_bytes: 0,
            },
            uptime_seconds: 0,
            pid: None,
            last_stop_reason,
        };
    };
    let s = &sample.stats;
    StatusDoc {
        vps_id: vm.id,
        name: vm.hostname.clone(),
        status,
        qmpstatus: sample.qmpstatus.clone().unwrap_or_else(|| {
            // No QMP answer yet: libvirt's view of the same thing.
            match s.state {
                crate::hypervisor::PowerState::Paused => "paused".into(),
                _ => "running".into(),
            }
        }),
        cpu: CpuDoc {
            usage_percent: round2(sample.cpu_percent),
            cores: if s.vcpus > 0 { s.vcpus } else { vm.cpu_cores },
        },
        memory: memory(sample, vm.ram_mb),
        disk: DiskDoc {
            read_bytes: s.block_read_bytes,
            write_bytes: s.block_write_bytes,
        },
        network: NetworkDoc {
            in_bytes: s.net_rx_bytes,
            out_bytes: s.net_tx_bytes,
        },
        uptime_seconds: sample.uptime_seconds(),
        pid: sample.pid,
        last_stop_reason,
    }
}
