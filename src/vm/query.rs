//! Read-only views: lists, details, deployment progress, tasks, counts.

use std::collections::HashMap;

use uuid::Uuid;

use super::model::{
    Deployment, IpKind, IpView, ListQuery, Pagination, Resources, TaskView, VmDetail, VmList,
    VmPrivateNetwork, VmStatus, VmSummary, VncView, PRIMARY_ADAPTER,
};
use super::{VmError, VmManager};
use crate::hypervisor::PowerState;
use crate::store::{self, Allocation, TaskFilter, VmRow, VmRowState};

/// How many VMs of each status the node holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct InstanceCounts {
    pub total: usize,
    pub running: usize,
    pub stopped: usize,
    pub suspended: usize,
}

impl VmManager {
    /// The status of one VM, asking libvirt only when the record says it is deployed.
    pub async fn status_of(&self, vm: &VmRow) -> VmStatus {
        if vm.state != VmRowState::Active {
            return VmStatus::derive(vm.state, None);
        }
        let power = match self.ctx.hv.power_state(vm.id).await {
            Ok(p) => p,
            Err(e) => {
                // The status reads "unknown"; why is the operator's to see.
                tracing::warn!(vps = %vm.id, error = %e, "cannot read the power state");
                None
            }
        };
        VmStatus::derive(vm.state, power)
    }

    /// Every VM with its status, from one libvirt call for all domains.
    async fn all_with_status(&self) -> Result<Vec<(VmRow, VmStatus)>, VmError> {
        let vms = self.ctx.store.call(|c| store::vms::list(c)).await?;
        let power: HashMap<Uuid, PowerState> = match self.ctx.hv.power_states().await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list domains; statuses unknown");
                HashMap::new()
            }
        };
        Ok(vms
            .into_iter()
            .map(|vm| {
                let status = VmStatus::derive(vm.state, power.get(&vm.id).copied());
                (vm, status)
            })
            .collect())
    }

    pub async fn list(&self, query: ListQuery) -> Result<VmList, VmError> {
        let matching: Vec<VmSummary> = self
            .all_with_status()
            .await?
            .iter()
            .filter(|(_, s)| query.status.is_none_or(|want| *s == want))
            .map(|(vm, s)| VmSummary::new(vm, *s))
            .collect();
        let total = matching.len();
        let instances: Vec<VmSummary> = matching
            .into_iter()
            .skip(query.offset)
            .take(query.limit)
            .collect();
        Ok(VmList {
            pagination: Pagination {
                total,
                limit: query.limit,
                offset: query.offset,
                has_more: query.offset + instances.len() < total,
            },
            instances,
        })
    }

    /// Every VM's hostname by id.
    pub async fn hostnames(&self) -> Result<HashMap<Uuid, String>, VmError> {
        let vms = self.ctx.store.call(|c| store::vms::list(c)).await?;
        Ok(vms.into_iter().map(|v| (v.id, v.hostname)).collect())
    }

    /// The VM's record and status; `NotFound` when no record exists.
    /// What the VM should be doing and why it last stopped (`None`: not recorded yet).
    pub async fn power(&self, id: Uuid) -> Result<Option<store::power::Power>, VmError> {
        Ok(self
            .ctx
            .store
            .call(move |c| store::power::get(c, id))
            .await?)
    }

    pub async fn row_with_status(&self, id: Uuid) -> Result<(VmRow, VmStatus), VmError> {
        let vm = self.ctx.vm(id).await?;
        let status = self.status_of(&vm).await;
        Ok((vm, status))
    }

    pub async fn get(&self, id: Uuid) -> Result<VmDetail, VmError> {
        let vm = self.ctx.vm(id).await?;
        let status = self.status_of(&vm).await;
        let (allocations, members, networks, power) = self
            .ctx
            .store
            .call(move |c| {
                Ok((
                    store::vms::ip_allocations(c)?,
                    store::networks::members_of_vm(c, id)?,
                    store::networks::networks(c)?,
                    store::power::get(c, id)?,
                ))
            })
            .await?;
        let mut ips: Vec<IpView> = allocations
            .into_iter()
            .filter(|a| a.vps_id == id)
            .map(|a| IpView {
                address: a.address,
                kind: IpKind::from_store(&a.kind),
                adapter: PRIMARY_ADAPTER.into(),
            })
            .collect();
        ips.sort_by_key(|i| (i.kind, i.address));
        let private_networks = members
            .iter()
            .map(|m| {
                let n = networks.iter().find(|n| n.id == m.network_id);
                VmPrivateNetwork {
                    network_id: m.network_id,
                    name: n.map(|n| n.name.clone()),
                    vni: n.map(|n| n.vni),
                    membership_id: m.id,
                    address: m.address,
                    mac: m.mac.clone(),
                    adapter: format!("eth{}", m.nic),
                }
            })
            .collect();
        Ok(VmDetail {
            summary: VmSummary::new(&vm, status),
            updated_at: vm.updated_at.clone(),
            resources: Resources {
                cpu_cores: vm.cpu_cores,
                ram_mb: vm.ram_mb,
                disk_gb: vm.disk_gb,
                bandwidth_mbps: vm.bandwidth_mbps,
            },
            template_id: vm.template_id.clone(),
            ips,
            private_networks,
            vnc: VncView { enabled: true },
            mac: vm.mac.clone(),
            intended_state: power.as_ref().map(|p| p.intended),
            autostart: power.as_ref().is_none_or(|p| p.autostart),
            last_stop_reason: power.and_then(|p| p.last_stop_reason),
        })
    }

    pub async fn deployment(&self, id: Uuid) -> Result<Deployment, VmError> {
        let vm = self.ctx.vm(id).await?;
        let status = self.status_of(&vm).await;
        let task = self
            .ctx
            .store
            .call(move |c| store::tasks::latest_of_kind(c, id, super::TaskKind::Create.as_str()))
            .await?
            .ok_or(VmError::NotFound(id))?;
        Ok(Deployment::new(&vm, status, &task))
    }

    pub async fn task(&self, id: Uuid) -> Result<TaskView, VmError> {
        self.ctx
            .store
            .call(move |c| store::tasks::get(c, id))
            .await?
            .map(TaskView::from)
            .ok_or(VmError::TaskNotFound(id))
    }

    pub async fn tasks(&self, filter: TaskFilter) -> Result<Vec<TaskView>, VmError> {
        Ok(self
            .ctx
            .store
            .call(move |c| store::tasks::list(c, &filter))
            .await?
            .into_iter()
            .map(TaskView::from)
            .collect())
    }

    pub async fn counts(&self) -> Result<InstanceCounts, VmError> {
        let mut counts = InstanceCounts::default();
        for (_, status) in self.all_with_status().await? {
            counts.total += 1;
            match status {
                VmStatus::Running => counts.running += 1,
                VmStatus::Stopped => counts.stopped += 1,
                VmStatus::Suspended => counts.suspended += 1,
                _ => {}
            }
        }
        Ok(counts)
    }

    pub async fn allocation(&self) -> Result<Allocation, VmError> {
        Ok(self.ctx.store.call(|c| store::vms::allocation(c)).await?)
    }
}
