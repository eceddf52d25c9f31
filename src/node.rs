//! The host itself: its size (for capacity decisions) and its live figures (`GET /v1/node`).
//!
//! CPU usage needs two readings apart in time, so a background task refreshes `sysinfo`
//! every few seconds and requests read the latest figures without waiting.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::config::CapacityConfig;
use crate::store::Allocation;

/// What the host has, measured once at startup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostFacts {
    pub cpu_cores: u32,
    pub ram_mb: u64,
    /// Size of the filesystem holding VM disks.
    pub storage_gb: u64,
}

impl HostFacts {
    pub fn measure(vm_dir: &Path) -> HostFacts {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let storage = fs_usage(vm_dir).map(|u| u.total_bytes).unwrap_or(0);
        HostFacts {
            cpu_cores: sys.cpus().len().max(1) as u32,
            ram_mb: sys.total_memory() / (1024 * 1024),
            storage_gb: storage >> 30,
        }
    }

    /// Whether one more VM of this size fits next to `alloc`; the reason if not.
    pub fn admits(
        &self,
        limits: &CapacityConfig,
        alloc: &Allocation,
        cpu_cores: u32,
        ram_mb: u64,
        disk_gb: u64,
    ) -> Result<(), String> {
        let cpu_max = (self.cpu_cores as f64 * limits.cpu_overcommit).floor() as u64;
        let ram_max = (self.ram_mb.saturating_sub(limits.ram_reserved_mb) as f64
            * limits.ram_overcommit)
            .floor() as u64;
        let disk_max = (self.storage_gb as f64 * limits.disk_overcommit).floor() as u64;
        if limits.max_vms > 0 && alloc.vms >= limits.max_vms {
            return Err(format!(
                "vms: this host takes at most {} (capacity.max_vms)",
                limits.max_vms
            ));
        }
        if alloc.cpu_cores + cpu_cores as u64 > cpu_max {
            return Err(format!(
                "cpu: {} of {cpu_max} vCPUs allocated, {cpu_cores} more requested",
                alloc.cpu_cores
            ));
        }
        if alloc.ram_mb + ram_mb > ram_max {
            return Err(format!(
                "ram: {} of {ram_max} MB allocated, {ram_mb} more requested",
                alloc.ram_mb
            ));
        }
        // Snapshots take room of their own beside the disks they belong to.
        let allocated_gb = alloc.disk_gb + alloc.snapshot_bytes.div_ceil(1 << 30);
        if allocated_gb + disk_gb > disk_max {
            return Err(format!(
                "disk: {allocated_gb} of {disk_max} GB allocated (snapshots included), \
                 {disk_gb} more requested"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Usage of the filesystem holding `path` (or its nearest existing parent).
pub fn fs_usage(path: &Path) -> Option<FsUsage> {
    let mut p: PathBuf = path.to_owned();
    loop {
        if let Ok(st) = nix::sys::statvfs::statvfs(&p) {
            let frag = st.fragment_size();
            return Some(FsUsage {
                total_bytes: st.blocks() * frag,
                available_bytes: st.blocks_available() * frag,
            });
        }
        if !p.pop() {
            return None;
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct CpuFigures {
    pub cores: usize,
    /// Of all host CPUs, 0–100.
    pub usage_percent: f32,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct MemoryFigures {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Live host figures, refreshed in the background.
#[derive(Clone)]
pub struct NodeMonitor {
    latest: Arc<Mutex<(CpuFigures, MemoryFigures)>>,
}

impl NodeMonitor {
    /// Starts the refresher task; it ends when the last handle is dropped.
    pub fn start() -> NodeMonitor {
        let latest = Arc::new(Mutex::new((
            CpuFigures::default(),
            MemoryFigures::default(),
        )));
        let weak = Arc::downgrade(&latest);
        tokio::spawn(async move {
            let mut sys = System::new_with_specifics(
                RefreshKind::nothing()
                    .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                    .with_memory(MemoryRefreshKind::nothing().with_ram()),
            );
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                // Reads of /proc: microseconds, fine on the runtime.
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                let figures = (
                    CpuFigures {
                        cores: sys.cpus().len(),
                        usage_percent: sys.global_cpu_usage(),
                    },
                    MemoryFigures {
                        total_bytes: sys.total_memory(),
                        available_bytes: sys.available_memory(),
                    },
                );
                if let Ok(mut guard) = shared.lock() {
                    *guard = figures;
                };
            }
        });
        NodeMonitor { latest }
    }

    pub fn cpu_and_memory(&self) -> (CpuFigures, MemoryFigures) {
        let guard = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let (mut cpu, mut mem) = guard.clone();
        if cpu.cores == 0 {
            // Before the first refresh: report sizes, usage unknown (0).
            let sys = System::new_with_specifics(
                RefreshKind::nothing()
                    .with_cpu(CpuRefreshKind::nothing())
                    .with_memory(MemoryRefreshKind::nothing().with_ram()),
            );
            cpu.cores = sys.cpus().len();
            mem = MemoryFigures {
                total_bytes: sys.total_memory(),
                available_bytes: sys.available_memory(),
            };
        }
        (cpu, mem)
    }
}

pub fn load_average() -> [f64; 3] {
    let l = System::load_average();
    [l.one, l.five, l.fifteen]
}

pub fn kernel() -> String {
    System::kernel_version().unwrap_or_default()
}

pub fn hostname() -> String {
    System::host_name().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            cpu_cores: 2,
            ram_mb: 4096,
            storage_gb: 100,
        }
    }

    #[test]
    fn capacity_counts_overcommit_and_the_ram_reserve() {
        let limits = CapacityConfig {
            cpu_overcommit: 2.0,
            ram_reserved_mb: 1024,
            ..CapacityConfig::default()
        };
        let alloc = Allocation {
            vms: 1,
            cpu_cores: 3,
            ram_mb: 2048,
            disk_gb: 10,
            snapshot_bytes: 0,
        };

        assert!(host().admits(&limits, &alloc, 1, 1024, 10).is_ok());
        assert!(host().admits(&limits, &alloc, 2, 512, 10).is_err());
        assert!(host().admits(&limits, &alloc, 1, 1025, 10).is_err());
        assert!(host().admits(&limits, &alloc, 1, 512, 91).is_err());
    }

    #[test]
    fn snapshots_count_against_the_nodes_disk() {
        let limits = CapacityConfig::default();
        let alloc = Allocation {
            vms: 1,
            cpu_cores: 1,
            ram_mb: 512,
            disk_gb: 10,
            snapshot_bytes: 50 << 30,
        };

        assert!(host().admits(&limits, &alloc, 1, 512, 40).is_ok());
        assert!(host().admits(&limits, &alloc, 1, 512, 41).is_err());
    }

    #[test]
    fn usage_of_a_missing_path_comes_from_its_parent() {
        let usage = fs_usage(Path::new("/nonexistent/hvnode/vms")).unwrap();

        assert!(usage.total_bytes > 0);
    }
}
