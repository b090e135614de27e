//! The job's metrics at `GET /metrics` on the address `--metrics-listen` names: the world size, the
//! workers by state, whether the job still runs, each rank's phase, step and total steps (from its
//! progress reports), the restarts so far, and for each phase every metric rank 0 reported last (loss,
//! contrastive accuracy, learning rate, images/s, seconds in collectives, the probe sweep's last AUC,
//! ...). Served by axum (the HTTP stack tonic already brings); the exposition is written by
//! `prometheus-client` in the OpenMetrics text format, which Prometheus scrapes natively.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

use crate::job::{Job, JobEvent, MemberStatus};
use crate::Jobs;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Rank 0's latest metrics per phase.
type Latest = Arc<Mutex<BTreeMap<String, BTreeMap<String, f64>>>>;

#[derive(Clone)]
struct Endpoint {
    jobs: Arc<Jobs>,
    latest: Latest,
}

/// Binds `addr` and serves the metrics of the current attempt of the job in the background; the bound
/// address.
pub async fn serve(addr: SocketAddr, jobs: Arc<Jobs>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (--metrics-listen): {e}")))?;
    let bound = listener.local_addr()?;
    let latest: Latest = Arc::default();
    tokio::spawn(collect_progress(Arc::clone(&jobs), Arc::clone(&latest)));
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(|| async { "simclr-coordinator: see /metrics\n" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; see /metrics\n") })
        .with_state(Endpoint { jobs, latest });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    tracing::info!(%bound, "Prometheus metrics at http://{bound}/metrics");
    Ok(bound)
}

/// Keeps rank 0's latest progress metrics of every phase, following the job from attempt to attempt.
async fn collect_progress(jobs: Arc<Jobs>, latest: Latest) {
    let mut attempts = jobs.watch();
    loop {
        let mut events = attempts.borrow_and_update().subscribe();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(JobEvent::Progress { phase, metrics, .. }) => {
                        let mut latest = latest.lock().unwrap_or_else(|p| p.into_inner());
                        latest.entry(phase).or_default().extend(metrics);
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                },
                changed = attempts.changed() => match changed {
                    Ok(()) => break,
                    Err(_) => return,
                },
            }
        }
    }
}

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let latest = endpoint.latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match render(&endpoint.jobs.get(), endpoint.jobs.restarts(), &latest) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankPhase {
    rank: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseMetric {
    phase: String,
    name: String,
}

/// The exposition of the job's state now: a registry filled from the job and encoded at once.
fn render(
    job: &Job,
    restarts: u32,
    latest: &BTreeMap<String, BTreeMap<String, f64>>,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let world_size = Gauge::<i64>::default();
    world_size.set(i64::from(job.config.cluster.world_size));
    registry.register("simclr_world_size", "Workers the job runs with (cluster.world_size)", world_size);

    let members = job.members();
    let workers = Family::<StateLabel, Gauge>::default();
    for state in ["active", "left", "lost"] {
        let _ = workers.get_or_create(&StateLabel { state: state.into() });
    }
    for member in &members {
        let state = match &member.status {
            MemberStatus::Active => "active",
            MemberStatus::Left { .. } => "left",
            MemberStatus::Lost { .. } => "lost",
        };
        workers.get_or_create(&StateLabel { state: state.into() }).inc();
    }
    registry.register("simclr_workers", "Workers that joined the job, by state (active: alive and working)", workers);

    let running = Gauge::<i64>::default();
    running.set(i64::from(job.stop_notice().is_none()));
    registry.register("simclr_job_running", "1 while the job runs, 0 once it has stopped", running);

    let restarts_total = Counter::<u64>::default();
    restarts_total.inc_by(u64::from(restarts));
    registry.register(
        "simclr_restarts",
        "Restarts of the job from its last checkpoint after a retryable failure",
        restarts_total,
    );

    let (steps, totals) = (Family::<RankPhase, Gauge>::default(), Family::<RankPhase, Gauge>::default());
    for (rank, m) in members.iter().enumerate().filter(|(_, m)| !m.phase.is_empty()) {
        let labels = RankPhase { rank: rank.to_string(), phase: m.phase.clone() };
        steps.get_or_create(&labels).set(m.step as i64);
        totals.get_or_create(&labels).set(m.total as i64);
    }
    registry.register("simclr_rank_step", "Each rank's latest reported step, in the phase it runs", steps);
    registry.register("simclr_rank_steps_total", "Steps of the phase each rank runs, in all (0: not known)", totals);

    let phase_metrics = Family::<PhaseMetric, Gauge<f64, AtomicU64>>::default();
    for (phase, metrics) in latest {
        for (name, value) in metrics.iter().filter(|(_, v)| v.is_finite()) {
            phase_metrics.get_or_create(&PhaseMetric { phase: phase.clone(), name: name.clone() }).set(*value);
        }
    }
    registry.register(
        "simclr_phase_metric",
        "Rank 0's latest value of each metric of each phase (pretrain: loss, contrastive_accuracy, lr, \
         images_per_s, epoch, comm_s; probe: the last task's AUC)",
        phase_metrics,
    );

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}
