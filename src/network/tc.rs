//! Bandwidth limits on a VM's tap, through netlink.
//!
//! A tap's egress is what the guest downloads: a TBF root qdisc shapes it. A tap's ingress
//! is what the guest uploads: its ingress qdisc redirects every frame (u32 match-all +
//! mirred) to an IFB device whose own TBF root qdisc shapes it. That avoids the `police`
//! action, which not every kernel has, and shapes (queues) instead of dropping bursts.
//!
//! rtnetlink covers the ingress qdisc, the filter and the IFB device; TBF needs its
//! parameters as raw attributes (`struct tc_tbf_qopt`, `TCA_TBF_BURST`), built here.

use rtnetlink::packet_core::{
    DefaultNla, NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

use super::netlink;
use super::NetworkError;

type Result<T, E = NetworkError> = std::result::Result<T, E>;

const TC_LINKLAYER_ETHERNET: u8 = 1;
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
/// psched ticks are 64 ns.
const PSCHED_SHIFT: u32 = 6;

/// The shaping of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub rate_bytes: u64,
    pub burst: u32,
    pub limit: u32,
}

impl Shape {
    /// A rate in Mbit/s, with a burst of 10 ms (at least 32 KiB) and a queue of 50 ms (at
    /// least 64 KiB): enough for TCP to fill the rate without a standing queue.
    pub fn mbps(mbps: u32) -> Shape {
        let rate_bytes = mbps as u64 * 1_000_000 / 8;
        Shape {
            rate_bytes,
            burst: (rate_bytes / 100).clamp(32 * 1024, u32::MAX as u64) as u32,
            limit: (rate_bytes / 20).clamp(64 * 1024, u32::MAX as u64) as u32,
        }
    }
}

/// `struct tc_ratespec`.
fn ratespec(rate: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = TC_LINKLAYER_ETHERNET;
    b[8..12].copy_from_slice(&(rate.min(u32::MAX as u64) as u32).to_ne_bytes());
    b
}

fn ticks(bytes: u64, rate: u64) -> u32 {
    let ns = bytes as u128 * 1_000_000_000 / rate.max(1) as u128;
    ((ns >> PSCHED_SHIFT) as u64).min(u32::MAX as u64) as u32
}

/// The options of `tc qdisc … tbf rate R burst B limit L`.
pub fn tbf_options(s: Shape) -> Vec<TcOption> {
    let mut parms = Vec::with_capacity(36);
    parms.extend_from_slice(&ratespec(s.rate_bytes));
    parms.extend_from_slice(&[0u8; 12]); // no peak rate
    parms.extend_from_slice(&s.limit.to_ne_bytes());
    parms.extend_from_slice(&ticks(s.burst as u64, s.rate_bytes).to_ne_bytes());
    parms.extend_from_slice(&0u32.to_ne_bytes()); // mtu: only with a peak rate
    let mut opts = vec![
        TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, parms)),
        TcOption::Other(DefaultNla::new(
            TCA_TBF_BURST,
            s.burst.to_ne_bytes().to_vec(),
        )),
    ];
    if s.rate_bytes > u32::MAX as u64 {
        opts.push(TcOption::Other(DefaultNla::new(
            TCA_TBF_RATE64,
            s.rate_bytes.to_ne_bytes().to_vec(),
        )));
    }
    opts
}

async fn tbf_replace(h: &Handle, ifindex: u32, s: Shape) -> Result<()> {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.parent = TcHandle::ROOT;
    m.header.handle = TcHandle { major: 1, minor: 0 };
    m.attributes.push(TcAttribute::Kind("tbf".into()));
    m.attributes.push(TcAttribute::Options(tbf_options(s)));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(m));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    netlink::send(h, req, "tbf qdisc").await
}

async fn qdisc_del(h: &Handle, ifindex: u32, parent: TcHandle) -> Result<()> {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.parent = parent;
    if parent == TcHandle::INGRESS {
        m.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
    }
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelQueueDiscipline(m));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    match netlink::send(h, req, "delete qdisc").await {
        // Nothing to delete.
        Err(NetworkError::Netlink { message, .. })
            if message.contains("No such file") || message.contains("Invalid argument") =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Limits `tap` to `mbps` in both directions, shaping uploads on `ifb` (created here).
pub async fn limit(h: &Handle, tap: &str, ifb: &str, mbps: u32) -> Result<()> {
    let shape = Shape::mbps(mbps);
    let tap_index = netlink::link(h, tap)
        .await?
        .ok_or_else(|| NetworkError::NoLink(tap.to_owned()))?
        .index;
    let ifb_index = netlink::ensure_ifb(h, ifb).await?;
    // Download: the tap's own egress.
    tbf_replace(h, tap_index, shape).await?;
    // Upload: redirect the tap's ingress to the IFB and shape its egress. Re-created from
    // scratch so that a repeated call never stacks filters.
    qdisc_del(h, tap_index, TcHandle::INGRESS).await?;
    h.qdisc()
        .add(tap_index as i32)
        .ingress()
        .execute()
        .await
        .map_err(|e| NetworkError::Netlink {
            op: "ingress qdisc",
            message: e.to_string(),
        })?;
    h.traffic_filter(tap_index as i32)
        .add()
        .parent(0xffff_0000)
        .priority(1)
        // tcm_info's protocol is big-endian.
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(ifb_index)
        .map_err(|e| NetworkError::Netlink {
            op: "redirect filter",
            message: e.to_string(),
        })?
        .execute()
        .await
        .map_err(|e| NetworkError::Netlink {
            op: "redirect filter",
            message: e.to_string(),
        })?;
    tbf_replace(h, ifb_index, shape).await
}

/// Removes the limits from `tap` (if it still exists) and deletes its IFB device.
pub async fn unlimit(h: &Handle, tap: &str, ifb: &str) -> Result<()> {
    if let Some(t) = netlink::link(h, tap).await? {
        qdisc_del(h, t.index, TcHandle::ROOT).await?;
        qdisc_del(h, t.index, TcHandle::INGRESS).await?;
    }
    netlink::delete_link(h, ifb).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifty_mbit_shapes_with_a_bounded_burst_and_queue() {
        let s = Shape::mbps(50);

        assert_eq!(s.rate_bytes, 6_250_000);
        assert_eq!(s.burst, 62_500);
        assert_eq!(s.limit, 312_500);
    }

    #[test]
    fn small_rates_keep_a_usable_burst() {
        let s = Shape::mbps(1);

        assert_eq!(s.burst, 32 * 1024);
        assert_eq!(s.limit, 64 * 1024);
    }

    #[test]
    fn tbf_parameters_are_the_kernel_struct() {
        let opts = tbf_options(Shape::mbps(50));

        let TcOption::Other(parms) = &opts[0] else {
            panic!("parms first")
        };
        let mut buf = vec![0u8; 40];
        rtnetlink::packet_core::Emitable::emit(parms, &mut buf);
        // nla header (4) + tc_tbf_qopt (36)
        assert_eq!(buf.len(), 40);
        assert_eq!(&buf[4 + 8..4 + 12], &6_250_000u32.to_ne_bytes());
        assert_eq!(opts.len(), 2);
    }
}
