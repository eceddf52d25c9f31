//! VPSes come back by themselves.
//!
//! - **At the agent's start** (after unfinished tasks are resumed and the network is
//!   restored from the store): every deployed VM whose intended state is running or paused,
//!   whose domain is off, and that has `autostart` on, is started, `boot.parallel` at once
//!   and `boot.delay_ms` apart, each as an `autostart` task. That is what a host reboot
//!   needs. `boot.autostart = false` holds every VM down (maintenance).
//! - **While the agent runs**: libvirt's domain states are read every
//!   `autorestart.interval_ms`. A VM seen running and now off, that no task holds, stopped
//!   without the agent: libvirt's stop reason says how. A guest that powered itself off
//!   stays off (the customer asked for it: its intended state becomes stopped). A QEMU that
//!   crashed, failed or was destroyed from outside is started again (`autorestart` task)
//!   after `backoff_ms`, doubled for each restart within `window_s`; after `max_restarts`
//!   in the window it is left stopped with `gave_up` as its reason.
//!
//! Only transitions the keeper saw are acted on: a VM found off at start is the boot's
//! business, and a VM a task stopped was stopped on purpose.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{TaskKind, VmError, VmManager};
use crate::hypervisor::{DomainStats, OffReason, PowerState};
use crate::store;
use crate::store::power::{Intended, Power, StopReason};

/// What the keeper has done since the agent started, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeeperCounts {
    /// VMs started at the agent's start.
    pub autostarts: u64,
    /// VMs started again after their QEMU ended without being asked.
    pub autorestarts: u64,
    /// VMs left stopped after too many restarts in the window.
    pub gave_up: u64,
    /// Guests that powered themselves off (they stay off).
    pub guest_poweroffs: u64,
}

#[derive(Default)]
pub(crate) struct KeeperState {
    autostarts: AtomicU64,
    autorestarts: AtomicU64,
    gave_up: AtomicU64,
    guest_poweroffs: AtomicU64,
    watch: Mutex<Watch>,
}

#[derive(Default)]
struct Watch {
    /// VMs seen running (or paused) by the last sweep, with no task holding them.
    seen_up: HashSet<Uuid>,
    /// Restarts due: when, and why the VM went down.
    pending: HashMap<Uuid, (Instant, StopReason)>,
    /// When each VM was restarted within the window.
    restarts: HashMap<Uuid, VecDeque<Instant>>,
}

/// What to do with a VM that is off although it should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    StartAgain(StopReason),
    StayOff(StopReason),
}

/// libvirt's stop reason, read by the keeper. `at_start`: the agent found the VM off at its
/// start, where libvirtd's memory of why is often gone (a host reboot).
fn verdict(off: Option<OffReason>, at_start: bool) -> Verdict {
    match off {
        Some(OffReason::Shutdown) => Verdict::StayOff(StopReason::GuestPoweroff),
        Some(OffReason::Crashed | OffReason::Failed) => {
            Verdict::StartAgain(StopReason::QemuCrashed)
        }
        Some(OffReason::Destroyed) => Verdict::StartAgain(StopReason::DestroyedOutside),
        _ if at_start => Verdict::StartAgain(StopReason::HostReboot),
        _ => Verdict::StartAgain(StopReason::QemuCrashed),
    }
}

fn is_off(s: &DomainStats) -> bool {
    matches!(
        s.state,
        PowerState::Shutoff | PowerState::Crashed | PowerState::Unknown
    )
}

fn should_run(p: &Power) -> bool {
    matches!(p.intended, Intended::Running | Intended::Paused)
}

/// The wait before the `n`-th restart within the window (0-based): doubled each time,
/// at most a minute.
fn backoff(base: Duration, n: usize) -> Duration {
    base.saturating_mul(1u32 << n.min(16))
        .min(Duration::from_secs(60).max(base))
}

impl VmManager {
    pub fn keeper_counts(&self) -> KeeperCounts {
        let k = &self.ctx.keeper;
        KeeperCounts {
            autostarts: k.autostarts.load(Ordering::Relaxed),
            autorestarts: k.autorestarts.load(Ordering::Relaxed),
            gave_up: k.gave_up.load(Ordering::Relaxed),
            guest_poweroffs: k.guest_poweroffs.load(Ordering::Relaxed),
        }
    }

    /// The deployed VMs, their intents (VMs from before intents were recorded get one from
    /// their domain's state now, never starting anything) and their domains' states.
    async fn keeper_view(&self) -> Result<Vec<(Uuid, Power, Option<DomainStats>)>, VmError> {
        // libvirt first, the store after: a stop records its intent before the domain goes
        // down, so a domain seen off here is never paired with the intent from before it.
        let states: HashMap<Uuid, DomainStats> = self
            .ctx
            .hv
            .domain_states()
            .await
            .map_err(|e| VmError::HypervisorUnavailable(e.to_string()))?
            .into_iter()
            .map(|s| (s.id, s))
            .collect();
        let deployed = self
            .ctx
            .store
            .call(|c| store::power::of_deployed(c))
            .await?;
        let mut out = Vec::new();
        for (id, power) in deployed {
            let state = states.get(&id).cloned();
            let power = match power {
                Some(p) => p,
                None => {
                    let Some(s) = &state else { continue };
                    let intended = match s.state {
                        PowerState::Running => Intended::Running,
                        PowerState::Paused => Intended::Paused,
                        _ => Intended::Stopped,
                    };
                    let now = crate::time::now();
                    self.ctx
                        .store
                        .call(move |c| store::power::set_intended(c, id, intended, None, &now))
                        .await?;
                    tracing::info!(vps = %id, intended = intended.as_str(), "recorded the intended state from libvirt");
                    Power {
                        vps_id: id,
                        intended,
                        autostart: true,
                        last_stop_reason: None,
                    }
                }
            };
            out.push((id, power, state));
        }
        Ok(out)
    }

    /// The VMs to start at the agent's start. Call after `recover`. A guest that powered
    /// itself off while the agent was down is recorded as stopped instead.
    pub async fn boot_plan(&self) -> Result<Vec<Uuid>, VmError> {
        let mut plan = Vec::new();
        for (id, power, state) in self.keeper_view().await? {
            let Some(state) = state else { continue };
            if !is_off(&state) || !should_run(&power) || self.ctx.engine.holder(id).is_some() {
                continue;
            }
            match verdict(state.off_reason, true) {
                Verdict::StayOff(reason) => self.stays_off(id, reason).await?,
                Verdict::StartAgain(reason) => {
                    if !power.autostart || !self.ctx.config.boot.autostart {
                        tracing::info!(vps = %id, "autostart is off: the VM stays off");
                        continue;
                    }
                    self.set_stop_reason(id, reason).await?;
                    plan.push(id);
                }
            }
        }
        Ok(plan)
    }

    async fn stays_off(&self, id: Uuid, reason: StopReason) -> Result<(), VmError> {
        tracing::info!(vps = %id, reason = reason.as_str(), "the guest powered itself off; it stays off");
        self.ctx
            .keeper
            .guest_poweroffs
            .fetch_add(1, Ordering::Relaxed);
        let now = crate::time::now();
        self.ctx
            .store
            .call(move |c| store::power::set_intended(c, id, Intended::Stopped, Some(reason), &now))
            .await?;
        Ok(())
    }

    async fn set_stop_reason(&self, id: Uuid, reason: StopReason) -> Result<(), VmError> {
        let now = crate::time::now();
        self.ctx
            .store
            .call(move |c| store::power::set_stop_reason(c, id, reason, &now))
            .await?;
        Ok(())
    }

    async fn intended(&self, id: Uuid) -> Option<Power> {
        self.ctx
            .store
            .call(move |c| store::power::get(c, id))
            .await
            .ok()
            .flatten()
    }

    /// Starts the VMs of `plan` (`boot.parallel` at once, `boot.delay_ms` apart), then
    /// watches for QEMUs that end without being asked, until the agent stops.
    pub fn start_keeper(&self, plan: Vec<Uuid>) {
        let me = self.clone();
        tokio::spawn(async move {
            me.boot(plan).await;
            me.watch().await;
        });
    }

    async fn boot(&self, plan: Vec<Uuid>) {
        if plan.is_empty() {
            return;
        }
        let boot = &self.ctx.config.boot;
        tracing::info!(
            vms = plan.len(),
            parallel = boot.parallel,
            "starting the VMs that should run"
        );
        let slots = Arc::new(tokio::sync::Semaphore::new(boot.parallel));
        let mut running = tokio::task::JoinSet::new();
        for (i, id) in plan.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(boot.delay_ms)).await;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let me = self.clone();
            running.spawn(async move {
                let _slot = slot;
                let paused = me
                    .intended(id)
                    .await
                    .is_some_and(|p| p.intended == Intended::Paused);
                match me
                    .come_back(id, TaskKind::Autostart, paused, StopReason::HostReboot)
                    .await
                {
                    Ok(true) => {
                        me.ctx.keeper.autostarts.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(vps = %id, error = %e, "could not start a VM that should run"),
                }
            });
        }
        while running.join_next().await.is_some() {}
    }

    async fn watch(&self) {
        let config = self.ctx.config.autorestart.clone();
        if !config.enabled {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.watch_once(&config).await {
                tracing::debug!(error = %e, "keeper: could not read the domains' states");
            }
        }
    }

    /// One look at every VM: notes the ones that went down, and starts the ones due.
    async fn watch_once(&self, config: &crate::config::AutorestartConfig) -> Result<(), VmError> {
        let view = self.keeper_view().await?;
        let now = Instant::now();
        let window = Duration::from_secs(config.window_s);
        let mut due = Vec::new();
        let mut gave_up = Vec::new();
        let mut powered_off = Vec::new();
        let mut went_down = Vec::new();
        {
            let mut w = self
                .ctx
                .keeper
                .watch
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let known: HashSet<Uuid> = view.iter().map(|(id, ..)| *id).collect();
            w.seen_up.retain(|id| known.contains(id));
            w.pending.retain(|id, _| known.contains(id));
            w.restarts.retain(|id, _| known.contains(id));
            for (id, power, state) in &view {
                let id = *id;
                // A task's doing is the task's business (a stop, a restart, a reinstall).
                if self.ctx.engine.holder(id).is_some() {
                    w.seen_up.remove(&id);
                    continue;
                }
                let Some(state) = state else {
                    w.seen_up.remove(&id);
                    w.pending.remove(&id);
                    continue;
                };
                if !is_off(state) {
                    w.seen_up.insert(id);
                    w.pending.remove(&id);
                    continue;
                }
                if !should_run(power) {
                    w.seen_up.remove(&id);
                    w.pending.remove(&id);
                    continue;
                }
                if w.seen_up.remove(&id) {
                    match verdict(state.off_reason, false) {
                        Verdict::StayOff(reason) => {
                            powered_off.push((id, reason));
                            continue;
                        }
                        Verdict::StartAgain(reason) => {
                            let times = w.restarts.entry(id).or_default();
                            while times
                                .front()
                                .is_some_and(|t| now.duration_since(*t) > window)
                            {
                                times.pop_front();
                            }
                            if times.len() >= config.max_restarts as usize {
                                times.clear();
                                gave_up.push((id, reason));
                                continue;
                            }
                            let wait =
                                backoff(Duration::from_millis(config.backoff_ms), times.len());
                            w.pending.insert(id, (now + wait, reason));
                            went_down.push((id, reason, wait));
                        }
                    }
                }
                if let Some(&(at, reason)) = w.pending.get(&id) {
                    if at <= now {
                        w.pending.remove(&id);
                        w.restarts.entry(id).or_default().push_back(now);
                        due.push((id, reason, power.intended == Intended::Paused));
                    }
                }
            }
        }
        for (id, reason, wait) in went_down {
            tracing::warn!(vps = %id, reason = reason.as_str(), restart_in_ms = wait.as_millis() as u64, "a VM's QEMU ended without being asked");
            self.set_stop_reason(id, reason).await?;
        }
        for (id, reason) in powered_off {
            self.stays_off(id, reason).await?;
        }
        for (id, reason) in gave_up {
            tracing::error!(vps = %id, reason = reason.as_str(), max_restarts = config.max_restarts, window_s = config.window_s, "a VM's QEMU keeps ending: left stopped");
            self.ctx.keeper.gave_up.fetch_add(1, Ordering::Relaxed);
            let now = crate::time::now();
            self.ctx
                .store
                .call(move |c| {
                    store::power::set_intended(
                        c,
                        id,
                        Intended::Stopped,
                        Some(StopReason::GaveUp),
                        &now,
                    )
                })
                .await?;
        }
        for (id, reason, paused) in due {
            let me = self.clone();
            tokio::spawn(async move {
                match me
                    .come_back(id, TaskKind::Autorestart, paused, reason)
                    .await
                {
                    Ok(true) => {
                        me.ctx.keeper.autorestarts.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(vps = %id, error = %e, "could not restart a VM whose QEMU ended");
                        // Counted as going down again: retried with backoff, up to the limit.
                        let mut w = me
                            .ctx
                            .keeper
                            .watch
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        w.seen_up.insert(id);
                    }
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_poweroff_stays_off_and_everything_else_comes_back() {
        assert_eq!(
            verdict(Some(OffReason::Shutdown), false),
            Verdict::StayOff(StopReason::GuestPoweroff)
        );
        assert_eq!(
            verdict(Some(OffReason::Shutdown), true),
            Verdict::StayOff(StopReason::GuestPoweroff)
        );
        for r in [OffReason::Crashed, OffReason::Failed] {
            assert_eq!(
                verdict(Some(r), false),
                Verdict::StartAgain(StopReason::QemuCrashed)
            );
        }
        assert_eq!(
            verdict(Some(OffReason::Destroyed), false),
            Verdict::StartAgain(StopReason::DestroyedOutside)
        );
        assert_eq!(
            verdict(Some(OffReason::Unknown), true),
            Verdict::StartAgain(StopReason::HostReboot)
        );
        assert_eq!(
            verdict(None, false),
            Verdict::StartAgain(StopReason::QemuCrashed)
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let base = Duration::from_millis(1000);
        assert_eq!(backoff(base, 0), Duration::from_secs(1));
        assert_eq!(backoff(base, 1), Duration::from_secs(2));
        assert_eq!(backoff(base, 3), Duration::from_secs(8));
        assert_eq!(backoff(base, 10), Duration::from_secs(60));
        assert_eq!(backoff(base, 99), Duration::from_secs(60));
    }
}
