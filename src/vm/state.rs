//! Which lifecycle action is allowed from which status, as one exhaustive match.
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

    pub fn parse(s: &str) -> Option<Action> {
        [
            Action::Start,
            Action::Stop,
            Action::Restart,
            Action::Reset,
            Action::Suspend,
            Action::Resume,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
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
}
