//! Decoding libvirt's bulk domain statistics (`virConnectGetAllDomainStats`).
//!
//! The safe `virt` wrapper hands back raw records and never frees them, so the agent calls
//! `virt::sys` directly: one call for every running domain, each record's typed
//! parameters folded into a `DomainStats`, and the whole list freed with
//! `virDomainStatsRecordListFree` before returning.

use std::ffi::CStr;

use uuid::Uuid;
use virt::sys;

use super::{DomainStats, OffReason, PowerState};

/// The statistics groups asked for in every sweep.
pub const GROUPS: u32 = sys::VIR_DOMAIN_STATS_STATE
    | sys::VIR_DOMAIN_STATS_CPU_TOTAL
    | sys::VIR_DOMAIN_STATS_BALLOON
    | sys::VIR_DOMAIN_STATS_VCPU
    | sys::VIR_DOMAIN_STATS_INTERFACE
    | sys::VIR_DOMAIN_STATS_BLOCK;

/// Running domains only, and never wait for a domain whose monitor is busy: a hung guest
/// must not stall the sweep of all the others. Such a domain is still reported, without
/// the figures that need its monitor (block counters, the guest's memory statistics); the
/// sampler carries those over from its previous sample.
pub const FLAGS: u32 =
    sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT;

/// A typed parameter's value, as far as the stats we read need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Signed(i64),
    Unsigned(u64),
    Other,
}

impl Value {
    fn as_u64(self) -> Option<u64> {
        match self {
            Value::Signed(v) => u64::try_from(v).ok(),
            Value::Unsigned(v) => Some(v),
            Value::Other => None,
        }
    }
}

/// Folds one record's parameters into a `DomainStats`.
pub fn fold<'a>(id: Uuid, params: impl IntoIterator<Item = (&'a str, Value)>) -> DomainStats {
    let mut s = DomainStats {
        id,
        state: PowerState::Unknown,
        cpu_time_ns: 0,
        vcpus: 0,
        balloon_current_kib: 0,
        balloon_maximum_kib: 0,
        guest_available_kib: None,
        guest_usable_kib: None,
        guest_unused_kib: None,
        rss_kib: None,
        block_read_bytes: 0,
        block_write_bytes: 0,
        block_reported: false,
        net_rx_bytes: 0,
        net_tx_bytes: 0,
        off_reason: None,
    };
    let mut reason = 0;
    for (field, value) in params {
        let Some(v) = value.as_u64() else { continue };
        match field {
            "state.state" => s.state = state(v),
            "state.reason" => reason = v,
            "cpu.time" => s.cpu_time_ns = v,
            "vcpu.current" => s.vcpus = u32::try_from(v).unwrap_or(u32::MAX),
            "balloon.current" => s.balloon_current_kib = v,
            "balloon.maximum" => s.balloon_maximum_kib = v,
            "balloon.available" => s.guest_available_kib = Some(v),
            "balloon.usable" => s.guest_usable_kib = Some(v),
            "balloon.unused" => s.guest_unused_kib = Some(v),
            "balloon.rss" => s.rss_kib = Some(v),
            f => {
                // "block.<n>.rd.bytes", "net.<n>.rx.bytes", …
                let mut parts = f.splitn(3, '.');
                let (Some(group), Some(index), Some(rest)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if index.parse::<u32>().is_err() {
                    continue;
                }
                match (group, rest) {
                    ("block", "rd.bytes") => {
                        s.block_read_bytes += v;
                        s.block_reported = true;
                    }
                    ("block", "wr.bytes") => s.block_write_bytes += v,
                    ("net", "rx.bytes") => s.net_rx_bytes += v,
                    ("net", "tx.bytes") => s.net_tx_bytes += v,
                    _ => {}
                }
            }
        }
    }
    if s.state == PowerState::Shutoff {
        s.off_reason = Some(OffReason::from_libvirt(reason));
    }
    s
}

fn state(v: u64) -> PowerState {
    match v {
        1 | 2 => PowerState::Running,
        3 => PowerState::Paused,
        4 => PowerState::ShuttingDown,
        5 => PowerState::Shutoff,
        6 => PowerState::Crashed,
        7 => PowerState::PmSuspended,
        _ => PowerState::Unknown,
    }
}

/// One bulk call on `conn` for the sampler (`GROUPS` of running domains). Records of
/// domains whose UUID cannot be read are skipped.
///
/// # Safety
/// `conn` must be a valid, open libvirt connection.
pub unsafe fn collect(conn: sys::virConnectPtr) -> Result<Vec<DomainStats>, ()> {
    // SAFETY: forwarded from the caller.
    unsafe { collect_with(conn, GROUPS, FLAGS) }
}

/// The power state of every domain, running or not, in one call: what a listing of all
/// VMs needs, without a round trip to libvirtd per domain.
///
/// # Safety
/// `conn` must be a valid, open libvirt connection.
pub unsafe fn states(conn: sys::virConnectPtr) -> Result<Vec<DomainStats>, ()> {
    // SAFETY: forwarded from the caller.
    unsafe { collect_with(conn, sys::VIR_DOMAIN_STATS_STATE, 0) }
}

/// # Safety
/// `conn` must be a valid, open libvirt connection.
unsafe fn collect_with(
    conn: sys::virConnectPtr,
    groups: u32,
    flags: u32,
) -> Result<Vec<DomainStats>, ()> {
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: conn is valid (caller); records receives a list libvirt allocates.
    let n = unsafe { sys::virConnectGetAllDomainStats(conn, groups, &mut records, flags) };
    if n < 0 {
        return Err(());
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: libvirt returned n valid record pointers.
        let rec = unsafe { &**records.add(i) };
        let mut uuid = [0 as std::os::raw::c_char; 37];
        // SAFETY: rec.dom is valid while the list lives; the buffer holds VIR_UUID_STRING_BUFLEN.
        if unsafe { sys::virDomainGetUUIDString(rec.dom, uuid.as_mut_ptr()) } < 0 {
            continue;
        }
        // SAFETY: libvirt wrote a NUL-terminated string.
        let Ok(id) = unsafe { CStr::from_ptr(uuid.as_ptr()) }
            .to_str()
            .unwrap_or_default()
            .parse::<Uuid>()
        else {
            continue;
        };
        let params = (0..rec.nparams.max(0) as usize).map(|j| {
            // SAFETY: params has nparams entries; field is NUL-terminated; the union member
            // read is the one type_ names.
            let p = unsafe { &*rec.params.add(j) };
            let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }
                .to_str()
                .unwrap_or("");
            let value = match p.type_ as u32 {
                sys::VIR_TYPED_PARAM_INT => Value::Signed(unsafe { p.value.i } as i64),
                sys::VIR_TYPED_PARAM_UINT => Value::Unsigned(unsafe { p.value.ui } as u64),
                sys::VIR_TYPED_PARAM_LLONG => Value::Signed(unsafe { p.value.l }),
                sys::VIR_TYPED_PARAM_ULLONG => Value::Unsigned(unsafe { p.value.ul }),
                _ => Value::Other,
            };
            (field, value)
        });
        out.push(fold(id, params));
    }
    // SAFETY: frees the records (and their domain references) and the list itself.
    unsafe { sys::virDomainStatsRecordListFree(records) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_counters_and_sums_devices() {
        let id = Uuid::nil();
        let s = fold(
            id,
            [
                ("state.state", Value::Signed(1)),
                ("cpu.time", Value::Unsigned(5_000_000_000)),
                ("vcpu.current", Value::Unsigned(2)),
                ("balloon.current", Value::Unsigned(524_288)),
                ("balloon.available", Value::Unsigned(500_000)),
                ("balloon.usable", Value::Unsigned(400_000)),
                ("block.count", Value::Unsigned(2)),
                ("block.0.name", Value::Other),
                ("block.0.rd.bytes", Value::Unsigned(100)),
                ("block.1.rd.bytes", Value::Unsigned(20)),
                ("block.0.wr.bytes", Value::Unsigned(7)),
                ("net.0.rx.bytes", Value::Unsigned(1000)),
                ("net.1.rx.bytes", Value::Unsigned(1)),
                ("net.0.tx.bytes", Value::Unsigned(50)),
                ("net.0.rx.pkts", Value::Unsigned(9)),
            ],
        );
        assert_eq!(s.state, PowerState::Running);
        assert_eq!(s.cpu_time_ns, 5_000_000_000);
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.balloon_current_kib, 524_288);
        assert_eq!(s.guest_available_kib, Some(500_000));
        assert_eq!(s.guest_usable_kib, Some(400_000));
        assert_eq!(s.guest_unused_kib, None);
        assert_eq!((s.block_read_bytes, s.block_write_bytes), (120, 7));
        assert_eq!((s.net_rx_bytes, s.net_tx_bytes), (1001, 50));
    }

    #[test]
    fn a_shut_off_domain_says_why() {
        let off = |reason| {
            fold(
                Uuid::nil(),
                [
                    ("state.state", Value::Signed(5)),
                    ("state.reason", Value::Signed(reason)),
                ],
            )
            .off_reason
        };
        assert_eq!(off(1), Some(OffReason::Shutdown));
        assert_eq!(off(2), Some(OffReason::Destroyed));
        assert_eq!(off(3), Some(OffReason::Crashed));
        assert_eq!(off(6), Some(OffReason::Failed));
        assert_eq!(off(99), Some(OffReason::Unknown));
        let running = fold(Uuid::nil(), [("state.state", Value::Signed(1))]);
        assert_eq!(running.off_reason, None);
    }

    #[test]
    fn paused_and_unknown_states() {
        assert_eq!(state(3), PowerState::Paused);
        assert_eq!(state(42), PowerState::Unknown);
    }
}
