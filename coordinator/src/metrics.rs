//! The job's metrics in Prometheus' text format (version 0.0.4) at `GET /metrics` on the address
//! `--metrics-listen` names: the world size, the workers by state, whether the job still runs, each
//! rank's phase, step and total steps (from its progress reports), the restarts so far, and for each
//! phase every metric rank 0 reported last (loss, contrastive accuracy, learning rate, images/s, seconds in collectives, the
//! probe sweep's last AUC, ...). A small HTTP/1.1 responder on the job's runtime: one request
//! per connection, nothing but `GET /metrics` (and `/` pointing there).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;

use crate::job::{Job, JobEvent, MemberStatus};
use crate::Jobs;

/// Rank 0's latest metrics per phase.
type Latest = Arc<Mutex<BTreeMap<String, BTreeMap<String, f64>>>>;

const MAX_REQUEST: usize = 8 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves the metrics of the current attempt of the job in the background; the bound
/// address.
pub async fn serve(addr: SocketAddr, jobs: Arc<Jobs>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (--metrics-listen): {e}")))?;
    let bound = listener.local_addr()?;
    let latest: Latest = Arc::default();
    let collected = Arc::clone(&latest);
    let mut attempts = jobs.watch();
    tokio::spawn(async move {
        loop {
            let mut events = attempts.borrow_and_update().subscribe();
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(JobEvent::Progress { phase, metrics, .. }) => {
                            let mut latest = collected.lock().unwrap_or_else(|p| p.into_inner());
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
    });
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::debug!("metrics endpoint cannot accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (jobs, latest) = (Arc::clone(&jobs), Arc::clone(&latest));
            tokio::spawn(async move {
                if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &jobs, &latest)).await {
                    tracing::debug!("metrics request timed out: {e}");
                }
            });
        }
    });
    tracing::info!(%bound, "Prometheus metrics at http://{bound}/metrics");
    Ok(bound)
}

async fn answer(mut stream: TcpStream, jobs: &Jobs, latest: &Latest) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "request too large\n")
                .await;
        }
    }
    let head = String::from_utf8_lossy(&request);
    let mut line = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (line.next().unwrap_or_default(), line.next().unwrap_or_default());
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => {
            let body = render(&jobs.get(), jobs.restarts(), latest);
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        ("GET", "/") => respond(&mut stream, "200 OK", "text/plain", "simclr-coordinator: see /metrics\n").await,
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found; see /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A label value as the text format wants it (backslash, quote and newline escaped).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// The text exposition of the job's state now.
fn render(job: &Job, restarts: u32, latest: &Latest) -> String {
    let mut out = String::new();
    family(&mut out, "simclr_world_size", "Workers the job runs with (cluster.world_size).");
    let _ = writeln!(out, "simclr_world_size {}", job.config.cluster.world_size);
    let members = job.members();
    let mut states = BTreeMap::from([("active", 0u32), ("left", 0), ("lost", 0)]);
    for member in &members {
        let state = match &member.status {
            MemberStatus::Active => "active",
            MemberStatus::Left { .. } => "left",
            MemberStatus::Lost { .. } => "lost",
        };
        *states.entry(state).or_default() += 1;
    }
    family(&mut out, "simclr_workers", "Workers that joined the job, by state (active: alive and working).");
    for (state, n) in &states {
        let _ = writeln!(out, "simclr_workers{{state=\"{state}\"}} {n}");
    }
    family(&mut out, "simclr_job_running", "1 while the job runs, 0 once it has stopped.");
    let _ = writeln!(out, "simclr_job_running {}", u8::from(job.stop_notice().is_none()));
    let _ = writeln!(
        out,
        "# HELP simclr_restarts_total Restarts of the job from its last checkpoint after a retryable failure.\n\
         # TYPE simclr_restarts_total counter\nsimclr_restarts_total {restarts}"
    );
    let latest = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
    family(&mut out, "simclr_rank_step", "Each rank's latest reported step, in the phase it runs.");
    for (rank, m) in members.iter().enumerate().filter(|(_, m)| !m.phase.is_empty()) {
        let _ = writeln!(out, "simclr_rank_step{{rank=\"{rank}\",phase=\"{}\"}} {}", label(&m.phase), m.step);
    }
    family(&mut out, "simclr_rank_steps_total", "Steps of the phase each rank runs, in all (0: not known).");
    for (rank, m) in members.iter().enumerate().filter(|(_, m)| !m.phase.is_empty()) {
        let _ = writeln!(out, "simclr_rank_steps_total{{rank=\"{rank}\",phase=\"{}\"}} {}", label(&m.phase), m.total);
    }
    family(
        &mut out,
        "simclr_phase_metric",
        "Rank 0's latest value of each metric of each phase (pretrain: loss, contrastive_accuracy, lr, \
         images_per_s, epoch, comm_s; probe: the last task's AUC).",
    );
    for (phase, metrics) in &latest {
        for (name, value) in metrics.iter().filter(|(_, v)| v.is_finite()) {
            let _ = writeln!(out, "simclr_phase_metric{{phase=\"{}\",name=\"{}\"}} {value}", label(phase), label(name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
