//! Console tickets: random, single-use, bound to one VM and one console type, short-lived.
//!
//! A ticket is 32 random bytes (256 bits) from the OS, hex-encoded. The store keeps only
//! its SHA-256, and finds a ticket by that hash: the lookup's timing depends on the hash,
//! which says nothing usable about the ticket, and the hash comparison itself runs in
//! constant time. Expired tickets are swept whenever one is issued.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    Novnc,
    Serial,
}

impl ConsoleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleKind::Novnc => "novnc",
            ConsoleKind::Serial => "serial",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub vm: Uuid,
    pub kind: ConsoleKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("unknown console ticket")]
    Unknown,
    #[error("the console ticket has expired")]
    Expired,
    #[error("the console ticket was already used")]
    Used,
}

struct Entry {
    hash: [u8; 32],
    grant: Grant,
    expires: Instant,
    used: bool,
}

/// Used tickets are remembered (as hashes) until they would have expired, so that reuse
/// is told apart from an unknown ticket.
#[derive(Default)]
pub struct Tickets {
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

fn digest(ticket: &str) -> [u8; 32] {
    Sha256::digest(ticket.as_bytes()).into()
}

impl Tickets {
    pub fn issue(&self, grant: Grant, ttl: Duration) -> String {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let ticket = hex::encode(raw);
        let hash = digest(&ticket);
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, e| e.expires > now);
        entries.insert(
            hash,
            Entry {
                hash,
                grant,
                expires: now + ttl,
                used: false,
            },
        );
        ticket
    }

    /// The grant of a valid ticket, without using it up (loading the console page).
    pub fn peek(&self, ticket: &str) -> Result<Grant, TicketError> {
        self.with_entry(ticket, |e| Ok(e.grant))
    }

    /// Uses the ticket up: the WebSocket upgrade.
    pub fn redeem(&self, ticket: &str) -> Result<Grant, TicketError> {
        self.with_entry(ticket, |e| {
            e.used = true;
            Ok(e.grant)
        })
    }

    fn with_entry(
        &self,
        ticket: &str,
        f: impl FnOnce(&mut Entry) -> Result<Grant, TicketError>,
    ) -> Result<Grant, TicketError> {
        if ticket.len() != 64 || !ticket.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TicketError::Unknown);
        }
        let hash = digest(ticket);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get_mut(&hash).ok_or(TicketError::Unknown)?;
        if !bool::from(entry.hash.ct_eq(&hash)) {
            return Err(TicketError::Unknown);
        }
        if entry.used {
            return Err(TicketError::Used);
        }
        if entry.expires <= Instant::now() {
            return Err(TicketError::Expired);
        }
        f(entry)
    }

    /// Forgets every ticket of `vm` (it was deleted).
    pub fn revoke_vm(&self, vm: Uuid) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, e| e.grant.vm != vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            vm: Uuid::new_v4(),
            kind: ConsoleKind::Novnc,
        }
    }

    #[test]
    fn a_ticket_is_256_random_bits_and_single_use() {
        let t = Tickets::default();
        let g = grant();
        let a = t.issue(g, Duration::from_secs(60));
        let b = t.issue(g, Duration::from_secs(60));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(t.peek(&a), Ok(g), "peeking does not use it up");
        assert_eq!(t.redeem(&a), Ok(g));
        assert_eq!(t.redeem(&a), Err(TicketError::Used));
        assert_eq!(t.peek(&a), Err(TicketError::Used));
        assert_eq!(t.redeem(&b), Ok(g));
    }

    #[test]
    fn expired_unknown_and_malformed_tickets_are_refused() {
        let t = Tickets::default();
        let a = t.issue(grant(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.redeem(&a), Err(TicketError::Expired));
        assert_eq!(t.redeem(&"0".repeat(64)), Err(TicketError::Unknown));
        assert_eq!(t.redeem("short"), Err(TicketError::Unknown));
        assert_eq!(t.redeem(&"zz".repeat(32)), Err(TicketError::Unknown));
    }

    #[test]
    fn revoking_a_vm_forgets_its_tickets() {
        let t = Tickets::default();
        let g = grant();
        let a = t.issue(g, Duration::from_secs(60));
        t.revoke_vm(g.vm);
        assert_eq!(t.peek(&a), Err(TicketError::Unknown));
    }
}
