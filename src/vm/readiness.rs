//! Is the guest up? The guest agent answers `guest-ping`, and the guest accepts TCP on port 22
//! at its primary address, checked from inside the data-plane namespace. Both wait up to a
//! configured timeout and stop at once when their task is cancelled.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Ctx, Op, VmError};
use crate::hypervisor::{guest, HypervisorError};
use crate::network;
use crate::tasks::StepCtx;

const POLL: Duration = Duration::from_secs(2);

/// Sleeps for `d`, or returns `Cancelled` as soon as the task is cancelled.
pub(crate) async fn pause(step: &StepCtx, d: Duration) -> Result<(), VmError> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = step.cancel.cancelled() => Err(VmError::Cancelled),
    }
}

fn fail(op: Op, message: String) -> VmError {
    VmError::Failed { op, message }
}

pub(crate) async fn wait_for_guest_agent(
    ctx: &Ctx,
    id: Uuid,
    template_id: &str,
    step: &StepCtx,
    op: Op,
) -> Result<(), VmError> {
    // A template whose manifest says it has no guest agent (a stock cloud image) is ready
    // when its SSH port answers; waiting here would only time out.
    if let Ok(t) = ctx.images.get(template_id).await {
        if !t.guest_agent {
            tracing::info!(vps = %id, template = template_id,
                "template has no guest agent; not waiting for one");
            return Ok(());
        }
    }
    let timeout = Duration::from_secs(ctx.config.tasks.guest_agent_timeout_s);
    let started = Instant::now();
    loop {
        let ping = guest::ping(ctx.hv.as_ref(), id, 5).await;
        match ping {
            Ok(_) => return Ok(()),
            Err(HypervisorError::NoDomain(_)) => {
                return Err(fail(
                    op,
                    "the domain vanished while waiting for its guest agent".into(),
                ))
            }
            Err(e) if started.elapsed() > timeout => {
                return Err(fail(
                    op,
                    format!(
                        "guest agent did not answer within {} s: {e}",
                        timeout.as_secs()
                    ),
                ))
            }
            Err(_) => pause(step, POLL).await?,
        }
    }
}

pub(crate) async fn verify_connectivity(
    ctx: &Ctx,
    ip: Option<IpAddr>,
    step: &StepCtx,
    op: Op,
) -> Result<(), VmError> {
    if !ctx.config.tasks.verify_connectivity {
        return Ok(());
    }
    let Some(ip) = ip else {
        return Err(fail(op, "the VPS has no primary address".into()));
    };
    let timeout = Duration::from_secs(ctx.config.tasks.connectivity_timeout_s);
    let started = Instant::now();
    let target = SocketAddr::new(ip, 22);
    loop {
        let attempt =
            network::netns::tcp_connect(&ctx.config.network.netns, target, Duration::from_secs(3))
                .await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > timeout => {
                return Err(fail(
                    op,
                    format!(
                        "{target} did not accept a TCP connection within {} s: {e}",
                        timeout.as_secs()
                    ),
                ))
            }
            Err(_) => pause(step, POLL).await?,
        }
    }
}
