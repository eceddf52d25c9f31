//! The one admission table: which operation may start on a VM in which status
//! (`admit`), and what a new operation does when another holds the VM (`on_busy`).
//! Power actions follow the lifecycle below, as one exhaustive match (`decide`).
//!
//! ```text
//!                 start / restart
//!   ┌─────────┐ ───────────────▶ ┌─────────┐  suspend  ┌───────────┐
//!   │ stopped │                  │ running │ ────────▶ │ suspended │
//!   └─────────┘ ◀─────────────── └─────────┘ ◀──────── └───────────┘
//!        ▲          stop              │ reset   resume       │
//!        └────────────────────────────┴──────────────────────┘ stop
//!   deploying, failed: no actions (delete only)
//! ```
//! Asking for the status a VM is already in succeeds without doing anything, so retries
//! are safe.

use super::model::VmStatus;
use super::TaskKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Reset,
    Suspend,
    Resume,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Reset => "reset",
            Action::Suspend => "suspend",
            Action::Resume => "resume",
        }
    }

    pub const ALL: [Action; 6] = [
        Action::Start,
        Action::Stop,
        Action::Restart,
        Action::Reset,
        Action::Suspend,
        Action::Resume,
    ];

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do it.
    Proceed,
    /// The VM is already where the action leads: answer success, change nothing.
    AlreadyThere,
}

/// Why an action is refused, as a value the API turns into `INVALID_STATE` (or
/// `HYPERVISOR_UNAVAILABLE` for `Unknown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Deploying,
    DeploymentFailed,
    Unknown,
    NotRunning,
    Suspended,
}

impl Refusal {
    /// The refusal of an operation of `kind`, as the client reads it.
    pub fn explain(self, kind: TaskKind) -> String {
        format!("cannot {}: {}", kind.verb(), self.why())
    }

    fn why(self) -> &'static str {
        match self {
            Refusal::Deploying => "the VPS is still deploying",
            Refusal::DeploymentFailed => "the VPS failed to deploy; delete it",
            Refusal::Unknown => "the VPS's power state cannot be read from libvirt",
            Refusal::NotRunning => "the VPS is not running",
            Refusal::Suspended => "the VPS is suspended; resume it first",
        }
    }

    pub fn message(self, action: Action) -> String {
        let why = match self {
            Refusal::Deploying => "the VPS is still deploying",
            Refusal::DeploymentFailed => "the VPS failed to deploy; delete it",
            Refusal::Unknown => "the VPS's power state cannot be read from libvirt",
            Refusal::NotRunning => "the VPS is not running",
            Refusal::Suspended => "the VPS is suspended; resume it first",
        };
        format!("cannot {}: {why}", action.as_str())
    }
}

pub fn decide(action: Action, status: VmStatus) -> Result<Decision, Refusal> {
    use Action::*;
    use Decision::*;
    use VmStatus::*;
    match (status, action) {
        (Deploying, _) => Err(Refusal::Deploying),
        (Failed, _) => Err(Refusal::DeploymentFailed),
        (Unknown, _) => Err(Refusal::Unknown),
        (Running, Start | Resume) => Ok(AlreadyThere),
        (Running, Stop | Restart | Reset | Suspend) => Ok(Proceed),
        (Stopped, Stop) => Ok(AlreadyThere),
        (Stopped, Start | Restart) => Ok(Proceed),
        (Stopped, Reset | Suspend | Resume) => Err(Refusal::NotRunning),
        (Suspended, Suspend) => Ok(AlreadyThere),
        (Suspended, Resume | Stop | Restart) => Ok(Proceed),
        (Suspended, Start | Reset) => Err(Refusal::Suspended),
    }
}

/// Whether an operation of `kind` may start on a VM in `status`. `status` comes from the
/// VM's record and, for the kinds that depend on it (power actions, reinstall, resize),
/// from libvirt's power state; `Unknown` only refuses those.
pub fn admit(kind: TaskKind, status: VmStatus) -> Result<Decision, Refusal> {
    use TaskKind::*;
    let deployed = || match status {
        VmStatus::Deploying => Err(Refusal::Deploying),
        VmStatus::Failed => Err(Refusal::DeploymentFailed),
        _ => Ok(Decision::Proceed),
    };
    match kind {
        // A create admits itself (its VM must not exist yet); a delete takes a VM in any
        // state; a detach or an address removal only undoes what the VM was given.
        Create | Delete | NetDetach | IpRemove => Ok(Decision::Proceed),
        Start | Autostart | Autorestart => decide(Action::Start, status),
        Stop => decide(Action::Stop, status),
        Restart => decide(Action::Restart, status),
        Reset => decide(Action::Reset, status),
        Suspend => decide(Action::Suspend, status),
        Resume => decide(Action::Resume, status),
        // Whether the guest runs decides how the disk is swapped and the VM restarted.
        Reinstall | Resize => match status {
            VmStatus::Unknown => Err(Refusal::Unknown),
            _ => deployed(),
        },
        SnapshotCreate | SnapshotRollback | SnapshotDelete | IpAdd | IpMove | NetAttach => {
            deployed()
        }
    }
}

/// Whether the guest runs (or is paused with its memory) in `status`: what an operation
/// that powers the VM off must bring back.
pub fn runs(status: VmStatus) -> bool {
    matches!(status, VmStatus::Running | VmStatus::Suspended)
}

/// What an operation of kind `incoming` does when a task of kind `holder` holds the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBusy {
    /// Answer `TASK_IN_PROGRESS`.
    Refuse,
    /// Cancel the holder, wait for it to unwind, then go ahead (a delete during a deploy).
    CancelHolder,
}

pub fn on_busy(holder: TaskKind, incoming: TaskKind) -> OnBusy {
    match (holder, incoming) {
        (TaskKind::Create, TaskKind::Delete) => OnBusy::CancelHolder,
        _ => OnBusy::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_requests_are_idempotent() {
        assert_eq!(
            decide(Action::Stop, VmStatus::Stopped),
            Ok(Decision::AlreadyThere)
        );
    }

    #[test]
    fn start_requests_are_idempotent() {
        assert_eq!(
            decide(Action::Start, VmStatus::Running),
            Ok(Decision::AlreadyThere)
        );
    }

    #[test]
    fn nothing_runs_while_deploying() {
        for action in [Action::Start, Action::Stop, Action::Reset] {
            assert_eq!(decide(action, VmStatus::Deploying), Err(Refusal::Deploying));
        }
    }

    #[test]
    fn a_stopped_vm_cannot_be_suspended_or_reset() {
        assert_eq!(
            decide(Action::Suspend, VmStatus::Stopped),
            Err(Refusal::NotRunning)
        );
        assert_eq!(
            decide(Action::Reset, VmStatus::Stopped),
            Err(Refusal::NotRunning)
        );
    }

    #[test]
    fn a_suspended_vm_must_be_resumed_not_started() {
        assert_eq!(
            decide(Action::Start, VmStatus::Suspended),
            Err(Refusal::Suspended)
        );
        assert_eq!(
            decide(Action::Resume, VmStatus::Suspended),
            Ok(Decision::Proceed)
        );
        assert_eq!(
            decide(Action::Stop, VmStatus::Suspended),
            Ok(Decision::Proceed)
        );
    }

    const STATUSES: [VmStatus; 6] = [
        VmStatus::Deploying,
        VmStatus::Failed,
        VmStatus::Running,
        VmStatus::Stopped,
        VmStatus::Suspended,
        VmStatus::Unknown,
    ];

    fn action_of(kind: TaskKind) -> Option<Action> {
        match kind {
            TaskKind::Autostart | TaskKind::Autorestart => Some(Action::Start),
            other => Action::parse(other.as_str()),
        }
    }

    /// Every (kind, status) pair: the domain is finite, so the table is checked whole
    /// rather than sampled.
    #[test]
    fn the_admission_table_holds_for_every_pair() {
        for &kind in TaskKind::ALL {
            for status in STATUSES {
                let got = admit(kind, status);
                if let Some(action) = action_of(kind) {
                    assert_eq!(got, decide(action, status), "{kind} on {status:?}");
                    continue;
                }
                assert_ne!(got, Ok(Decision::AlreadyThere), "{kind} on {status:?}");
                let undoes_or_owns = matches!(
                    kind,
                    TaskKind::Create | TaskKind::Delete | TaskKind::NetDetach | TaskKind::IpRemove
                );
                match status {
                    VmStatus::Deploying | VmStatus::Failed if !undoes_or_owns => {
                        assert!(got.is_err(), "{kind} on {status:?} is refused")
                    }
                    VmStatus::Unknown => assert_eq!(
                        got.is_err(),
                        matches!(kind, TaskKind::Reinstall | TaskKind::Resize),
                        "{kind} on an unreadable power state"
                    ),
                    _ => assert_eq!(got, Ok(Decision::Proceed), "{kind} on {status:?}"),
                }
            }
        }
    }

    #[test]
    fn only_a_delete_cancels_and_only_a_deploy() {
        for &holder in TaskKind::ALL {
            for &incoming in TaskKind::ALL {
                let cancels = holder == TaskKind::Create && incoming == TaskKind::Delete;
                assert_eq!(
                    on_busy(holder, incoming) == OnBusy::CancelHolder,
                    cancels,
                    "{incoming} while {holder} holds the VM"
                );
            }
        }
    }

    #[test]
    fn power_action_refusals_read_as_before() {
        for action in [Action::Start, Action::Stop, Action::Suspend] {
            assert_eq!(
                Refusal::Deploying.explain(action.into()),
                Refusal::Deploying.message(action)
            );
        }
    }
}
