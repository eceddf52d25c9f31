//! Open console sessions: at most `console.max_sessions` on the node and
//! `console.max_sessions_per_vm` on one VM (so one customer holding many tickets cannot
//! lock everyone else out), and a way to end every session of a VM at once (it was
//! suspended, reinstalled or deleted: whoever watched it must not keep watching).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why a session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionLimit {
    #[error("too many console sessions are open on this node (console.max_sessions)")]
    Node,
    #[error(
        "this VPS already has its maximum of console sessions open (console.max_sessions_per_vm)"
    )]
    Vm,
}

#[derive(Default)]
struct Open {
    total: usize,
    /// Per VM: each session's id and the token that ends it.
    by_vm: HashMap<Uuid, Vec<(u64, CancellationToken)>>,
    next_id: u64,
}

#[derive(Clone)]
pub struct Sessions {
    open: Arc<Mutex<Open>>,
    max_total: usize,
    max_per_vm: usize,
}

/// One open session; dropping it gives its place back. `ended` fires when the VM's
/// sessions are closed.
pub struct Session {
    open: Arc<Mutex<Open>>,
    vm: Uuid,
    id: u64,
    pub ended: CancellationToken,
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = open.by_vm.get_mut(&self.vm) {
            let before = list.len();
            list.retain(|(id, _)| *id != self.id);
            let removed = before - list.len();
            if list.is_empty() {
                open.by_vm.remove(&self.vm);
            }
            open.total -= removed;
        }
    }
}

impl Sessions {
    pub fn new(max_total: usize, max_per_vm: usize) -> Sessions {
        Sessions {
            open: Arc::default(),
            max_total,
            max_per_vm,
        }
    }

    pub fn open(&self, vm: Uuid) -> Result<Session, SessionLimit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.max_total {
            return Err(SessionLimit::Node);
        }
        if open.by_vm.get(&vm).map_or(0, Vec::len) >= self.max_per_vm {
            return Err(SessionLimit::Vm);
        }
        open.next_id += 1;
        let id = open.next_id;
        let ended = CancellationToken::new();
        open.by_vm.entry(vm).or_default().push((id, ended.clone()));
        open.total += 1;
        Ok(Session {
            open: self.open.clone(),
            vm,
            id,
            ended,
        })
    }

    /// Ends every open session of `vm`; returns how many there were.
    pub fn close_vm(&self, vm: Uuid) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let list = open.by_vm.get(&vm).map(Vec::as_slice).unwrap_or(&[]);
        for (_, token) in list {
            token.cancel();
        }
        list.len()
    }

    /// Sessions open on the node.
    pub fn total(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_vm_cannot_take_the_nodes_sessions() {
        let s = Sessions::new(4, 2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());

        let first = s.open(a).unwrap();
        let _second = s.open(a).unwrap();

        assert_eq!(s.open(a).err(), Some(SessionLimit::Vm));
        assert!(s.open(b).is_ok(), "another VM still gets one");
        drop(first);
        assert!(s.open(a).is_ok(), "a closed session frees its place");
    }

    #[test]
    fn the_node_limit_holds_across_vms() {
        let s = Sessions::new(2, 2);
        let _held: Vec<_> = (0..2).map(|_| s.open(Uuid::new_v4()).unwrap()).collect();

        assert_eq!(s.open(Uuid::new_v4()).err(), Some(SessionLimit::Node));
    }

    #[test]
    fn closing_a_vm_ends_its_sessions_only() {
        let s = Sessions::new(8, 2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (sa, sb) = (s.open(a).unwrap(), s.open(b).unwrap());

        assert_eq!(s.close_vm(a), 1);

        assert!(sa.ended.is_cancelled());
        assert!(!sb.ended.is_cancelled());
        drop(sa);
        assert_eq!(s.total(), 1);
    }
}
