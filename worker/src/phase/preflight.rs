//! The preflight phase: every rank pings every other rank's peer endpoint for `preflight.rounds`
//! rounds. It proves the peer table works (each address answers, as the rank it should be) before any
//! long computation, and measures round-trip times, which the coordinator writes to preflight.json.
//! A peer that does not answer is reported to the coordinator, which checks it and decides.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use simclr_proto::client::{lazy_channel, worker_client, WorkerClient};
use simclr_proto::wire;

use crate::phase::PhaseContext;

const PHASE: &str = "preflight";

pub async fn run(ctx: &PhaseContext) -> Result<BTreeMap<String, f64>, String> {
    let p = &ctx.config.preflight;
    let timeout = Duration::from_millis(ctx.config.cluster.peer_timeout_ms);
    let peers: Vec<(u32, String, WorkerClient)> = ctx
        .table
        .workers
        .iter()
        .enumerate()
        .filter(|(r, _)| *r as u32 != ctx.rank)
        .map(|(r, w)| {
            let channel = lazy_channel(&w.peer_addr, timeout, Some(timeout)).map_err(|e| e.message().to_string())?;
            Ok((r as u32, w.peer_addr.clone(), worker_client(channel, ctx.token.clone())))
        })
        .collect::<Result<_, String>>()?;
    let payload: Vec<u8> = (0..p.payload_bytes).map(|i| (i % 251) as u8).collect();
    let mut rtts: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    let mut last_report = Instant::now();
    for round in 0..p.rounds {
        for (peer, addr, client) in &peers {
            let sequence = u64::from(round) << 32 | u64::from(*peer);
            let start = Instant::now();
            let answer = client
                .clone()
                .ping(wire::PingRequest { from_rank: ctx.rank, sequence, payload: payload.clone() })
                .await;
            let rtt_us = start.elapsed().as_secs_f64() * 1e6;
            let error = match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.rank == *peer && r.sequence == sequence && r.payload == payload {
                        rtts.entry(*peer).or_default().push(rtt_us);
                        continue;
                    }
                    format!("{addr} answered as rank {} with a wrong echo; the peer table is stale", r.rank)
                }
                Err(status) => format!("{addr} did not answer: {}", status.message()),
            };
            return Err(peer_failure(ctx, *peer, error).await);
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            ctx.report_progress(PHASE, u64::from(round) + 1, u64::from(p.rounds)).await;
            last_report = Instant::now();
        }
        if p.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(p.interval_ms)).await;
        }
    }
    let mut metrics = BTreeMap::new();
    for (peer, mut samples) in rtts {
        samples.sort_by(f64::total_cmp);
        metrics.insert(format!("rtt_median_us.rank{peer}"), median(&samples));
        metrics.insert(format!("rtt_max_us.rank{peer}"), samples.last().copied().unwrap_or_default());
    }
    tracing::info!(peers = peers.len(), rounds = p.rounds, "preflight done: every peer answered");
    Ok(metrics)
}

/// Tells the coordinator, which checks the peer itself; returns the phase's error message.
async fn peer_failure(ctx: &PhaseContext, peer: u32, error: String) -> String {
    tracing::error!(peer_rank = peer, %error, "peer unreachable");
    let request = wire::ReportPeerFailureRequest {
        rank: ctx.rank,
        instance_id: ctx.instance_id.clone(),
        peer_rank: peer,
        error: error.clone(),
    };
    match ctx.coordinator.clone().report_peer_failure(request).await {
        Ok(r) if r.get_ref().declared_lost => format!("peer rank {peer} lost: {error}"),
        Ok(_) => format!("peer rank {peer} unreachable from rank {} (but answers the coordinator): {error}", ctx.rank),
        Err(e) => format!("peer rank {peer} unreachable: {error} (and the report failed: {})", e.message()),
    }
}

/// Median of sorted samples.
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(super::median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert_eq!(super::median(&[]), 0.0);
    }
}
