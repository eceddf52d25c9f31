//! Every kind of task the agent runs on a VM, declared once. The journal stores each task's
//! kind by name, so the list is append-only: a name once written is never renamed or
//! reused. Startup (`recover.rs`) matches on it exhaustively, so a new kind does not compile
//! until it says how an interrupted task of that kind comes back.

use super::state::Action;
use super::Ctx;
use crate::store;
use crate::tasks::{Claim, Operation};

macro_rules! task_kinds {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum TaskKind {
            $($(#[$doc])* $variant,)*
        }

        impl TaskKind {
            pub const ALL: &'static [TaskKind] = &[$(TaskKind::$variant,)*];

            /// The name the journal and `GET /v1/tasks` carry.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(TaskKind::$variant => $name,)*
                }
            }
        }
    };
}

task_kinds! {
    Create = "create",
    Start = "start",
    Stop = "stop",
    Restart = "restart",
    Reset = "reset",
    Suspend = "suspend",
    Resume = "resume",
    Delete = "delete",
    Reinstall = "reinstall",
    Resize = "resize",
    SnapshotCreate = "snapshot_create",
    SnapshotRollback = "snapshot_rollback",
    SnapshotDelete = "snapshot_delete",
    IpAdd = "ip_add",
    IpRemove = "ip_remove",
    IpMove = "ip_move",
    NetAttach = "net_attach",
    NetDetach = "net_detach",
    /// The agent starting a VM that should run, found off at the agent's start.
    Autostart = "autostart",
    /// The agent starting a VM again after its QEMU ended without being asked.
    Autorestart = "autorestart",
}

impl TaskKind {
    pub fn parse(s: &str) -> Option<TaskKind> {
        TaskKind::ALL.iter().copied().find(|k| k.as_str() == s)
    }

    /// What the task does, for messages: "cannot {verb}: …".
    pub fn verb(self) -> &'static str {
        match self {
            TaskKind::Create => "create",
            TaskKind::Delete => "delete",
            TaskKind::Reinstall => "reinstall",
            TaskKind::Resize => "resize",
            TaskKind::SnapshotCreate => "take a snapshot",
            TaskKind::SnapshotRollback => "roll back to a snapshot",
            TaskKind::SnapshotDelete => "delete a snapshot",
            TaskKind::IpAdd => "add an address",
            TaskKind::IpRemove => "remove an address",
            TaskKind::IpMove => "move an address",
            TaskKind::NetAttach => "join a private network",
            TaskKind::NetDetach => "leave a private network",
            TaskKind::Autostart | TaskKind::Autorestart => "start",
            TaskKind::Start
            | TaskKind::Stop
            | TaskKind::Restart
            | TaskKind::Reset
            | TaskKind::Suspend
            | TaskKind::Resume => self.as_str(),
        }
    }
}

impl From<Action> for TaskKind {
    fn from(a: Action) -> TaskKind {
        match a {
            Action::Start => TaskKind::Start,
            Action::Stop => TaskKind::Stop,
            Action::Restart => TaskKind::Restart,
            Action::Reset => TaskKind::Reset,
            Action::Suspend => TaskKind::Suspend,
            Action::Resume => TaskKind::Resume,
        }
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an interrupted task becomes at startup; each operation says it for its own kind.
pub(crate) enum Resume {
    /// Run on to its end (or its unwinding) under the task's claim.
    Run(Box<dyn FnOnce(Claim) + Send>),
    /// Nothing is left to run: the network reconciliation rebuilds what it left.
    Done,
    /// It cannot be resumed safely (an input this version cannot read, a VM it needs
    /// busy): marked failed with the reason.
    Unreadable(String),
    /// A power action: marked failed, for the control plane to retry if it still wants it.
    Interrupted,
}

impl Resume {
    /// Resumes with `op`, launched on the engine once the task's claim is given.
    pub(crate) fn run<O: Operation>(ctx: &Ctx, kind: TaskKind, op: O) -> Resume {
        let engine = ctx.engine.clone();
        Resume::Run(Box::new(move |claim| {
            engine.launch(claim, kind.as_str(), op)
        }))
    }

    /// Resumes with the operation `make` builds from the task's recorded input.
    pub(crate) fn from_input<I, O>(
        ctx: &Ctx,
        kind: TaskKind,
        task: &store::TaskRow,
        make: impl FnOnce(I) -> O,
    ) -> Resume
    where
        I: serde::de::DeserializeOwned,
        O: Operation,
    {
        match serde_json::from_value(task.input.clone()) {
            Ok(input) => Resume::run(ctx, kind, make(input)),
            Err(e) => Resume::Unreadable(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for k in TaskKind::ALL {
            assert!(seen.insert(k.as_str()), "{k} twice");
            assert_eq!(TaskKind::parse(k.as_str()), Some(*k));
        }
    }

    /// The journal holds step names: renaming one would strand every task recorded with it.
    #[test]
    fn step_names_are_the_journal_s() {
        use crate::tasks::step_names;
        assert_eq!(
            step_names(super::super::create::CreateStep::ALL),
            [
                "validate_resources",
                "allocate_ip",
                "create_vm",
                "configure_hardware",
                "apply_cloud_init",
                "start_vm",
                "configure_network",
                "wait_for_guest_agent",
                "verify_connectivity",
                "finalize",
            ],
            "the contract's ten deployment tasks, in order"
        );
        assert_eq!(
            step_names(super::super::reinstall::ReinstallStep::ALL),
            [
                "validate_template",
                "stop_vm",
                "replace_disk",
                "apply_cloud_init",
                "start_vm",
                "wait_for_guest_agent",
                "verify_connectivity",
                "finalize",
            ]
        );
        assert_eq!(
            step_names(super::super::delete::DeleteStep::ALL),
            [
                "remove_domain",
                "remove_network",
                "remove_disks",
                "release_ips",
                "remove_record"
            ]
        );
    }

    #[test]
    fn address_and_nic_steps_keep_their_names() {
        use super::super::ips::{ADD_STEPS, MOVE_STEPS, REMOVE_STEPS};
        use super::super::private_nics::{ATTACH_STEPS, DETACH_STEPS};
        use crate::tasks::step_names;
        assert_eq!(
            step_names(ADD_STEPS),
            ["allocate_ip", "update_filter", "update_guest"]
        );
        assert_eq!(
            step_names(REMOVE_STEPS),
            [
                "mark_releasing",
                "update_filter",
                "update_guest",
                "forget_neighbour",
                "release_ip"
            ]
        );
        assert_eq!(
            step_names(MOVE_STEPS),
            [
                "mark_releasing",
                "update_source_filter",
                "remove_from_source",
                "reassign",
                "update_target_filter",
                "forget_neighbour",
                "add_to_target"
            ]
        );
        assert_eq!(
            step_names(ATTACH_STEPS),
            [
                "ensure_segment",
                "update_filter",
                "plug_nic",
                "update_guest"
            ]
        );
        assert_eq!(
            step_names(DETACH_STEPS),
            [
                "update_guest",
                "unplug_nic",
                "release_member",
                "update_filter"
            ]
        );
    }

    #[test]
    fn power_actions_keep_their_names() {
        for a in Action::ALL {
            assert_eq!(TaskKind::from(a).as_str(), a.as_str());
        }
    }
}
