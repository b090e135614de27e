//! Cluster skeleton over real gRPC: an in-process coordinator and real worker processes on loopback.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use simclr_common::ExitStatus;
use simclr_coordinator::JobEvent;
use simclr_tests::{http_get, long_running, test_config, TestCluster};

const GENEROUS: Duration = Duration::from_secs(30);

fn rank_in_log(log: &str) -> Option<u32> {
    // The "joined the job" line carries the worker span, e.g. `worker{rank=1 job=test-job}`.
    let line = log.lines().find(|l| l.contains("joined the job"))?;
    let start = line.find("rank=")? + "rank=".len();
    line[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_of_three_workers_gives_ranks_0_to_2_exactly_once() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(test_config(3)).await?;
    for _ in 0..3 {
        cluster.spawn_worker(&[])?;
    }
    let table = cluster.wait_rendezvous(GENEROUS).await?;
    let outcome = cluster.outcome(GENEROUS).await?;
    assert_eq!(outcome.status, ExitStatus::Success, "{outcome:?}\n{}", cluster.logs());

    // Each process learnt a distinct rank, and the ranks are 0..2.
    let mut seen = BTreeSet::new();
    for i in 0..3 {
        assert_eq!(cluster.wait_worker(i, GENEROUS).await?, 0, "{}", cluster.logs());
        let log = cluster.workers[i].log();
        let rank = rank_in_log(&log).unwrap_or_else(|| panic!("no rank in log:\n{log}"));
        assert!(seen.insert(rank), "rank {rank} given twice\n{}", cluster.logs());
        // The coordinator's table agrees with what the process was told.
        assert_eq!(table.get(rank).map(|w| w.pid), Some(cluster.workers[i].pid));
    }
    assert_eq!(seen, BTreeSet::from([0, 1, 2]));

    // Ranks follow the deterministic order (host, device, peer address), whatever the arrival order.
    let keys: Vec<_> = table.workers.iter().map(|w| w.rank_order_key()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);

    // The run directory holds the cluster table, every rank's preflight results and the summary.
    let dir = cluster.run_dir.path();
    let cluster_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json"))?)?;
    assert_eq!(cluster_json["world_size"], 3);
    let preflight: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("preflight.json"))?)?;
    for rank in 0..3 {
        let metrics = &preflight["ranks"][rank.to_string()];
        for peer in (0..3).filter(|&p| p != rank) {
            assert!(metrics[format!("rtt_median_us.rank{peer}")].as_f64().unwrap_or(-1.0) > 0.0, "{preflight}");
        }
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
    assert_eq!(summary["success"], true, "{summary}");
    assert!(summary["ranks"].as_array().unwrap().iter().all(|r| r["status"] == "left" && r["success"] == true));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_ranks_are_honoured() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(test_config(3)).await?;
    for rank in [2, 0, 1] {
        cluster.spawn_worker(&["--rank", &rank.to_string(), "--world-size", "3"])?;
    }
    let table = cluster.wait_rendezvous(GENEROUS).await?;
    for (i, rank) in [2u32, 0, 1].into_iter().enumerate() {
        assert_eq!(table.get(rank).map(|w| w.pid), Some(cluster.workers[i].pid));
    }
    assert_eq!(cluster.outcome(GENEROUS).await?.status, ExitStatus::Success);
    Ok(())
}

/// Workers started the way torchrun or SLURM start them, with no flags: rank, world size and the
/// coordinator's address come from the launcher's variables; conflicting variables stop a worker with
/// a usage error naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_find_their_place_from_launcher_variables() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(test_config(2)).await?;
    cluster.spawn_worker_by_env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")], true)?;
    // The second the SLURM way (its coordinator port would be derived from SLURM_JOB_ID, which this
    // test cannot choose: MASTER_ADDR/MASTER_PORT agree on the address).
    cluster.spawn_worker_by_env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")], true)?;
    let table = cluster.wait_rendezvous(GENEROUS).await?;
    assert_eq!(table.get(1).map(|w| w.pid), Some(cluster.workers[0].pid));
    assert_eq!(table.get(0).map(|w| w.pid), Some(cluster.workers[1].pid));
    assert!(table.workers.iter().all(|w| w.device == "cpu"), "{table:?}");
    assert_eq!(cluster.outcome(GENEROUS).await?.status, ExitStatus::Success);

    let mut cluster = TestCluster::start(test_config(2)).await?;
    let index = cluster.spawn_worker_by_env(&[("RANK", "1"), ("SLURM_PROCID", "0")], true)?;
    let code = cluster.wait_worker(index, GENEROUS).await?;
    let log = cluster.workers[index].log();
    assert_eq!(code, ExitStatus::Usage.code(), "{log}");
    assert!(log.contains("RANK says 1") && log.contains("SLURM_PROCID says 0"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_is_declared_lost_within_the_heartbeat_timeout_and_the_others_are_told() -> anyhow::Result<()>
{
    let config = long_running(test_config(3));
    let heartbeat_timeout = Duration::from_millis(config.cluster.heartbeat_timeout_ms);
    let mut cluster = TestCluster::start(config).await?;
    for _ in 0..3 {
        cluster.spawn_worker(&[])?;
    }
    cluster.wait_rendezvous(GENEROUS).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = cluster.worker_of_rank(1)?;
    let killed_at = Instant::now();
    cluster.signal_rank(1, libc::SIGKILL)?;

    let event = cluster.wait_event(heartbeat_timeout * 3, |e| matches!(e, JobEvent::Lost { .. })).await?;
    let detected_after = killed_at.elapsed();
    assert!(matches!(event, JobEvent::Lost { rank: 1, .. }), "{event:?}");
    // Scheduling slack on a loaded 2-core machine on top of the configured timeout.
    assert!(detected_after <= heartbeat_timeout + Duration::from_secs(1), "declared lost after {detected_after:?}");

    let outcome = cluster.outcome(GENEROUS).await?;
    assert_eq!(outcome.status, ExitStatus::JobAborted);
    assert!(outcome.message.contains("rank 1"), "{}", outcome.message);
    for i in (0..3).filter(|&i| i != victim) {
        assert_eq!(cluster.wait_worker(i, GENEROUS).await?, ExitStatus::JobAborted.code(), "{}", cluster.logs());
        let log = cluster.workers[i].log();
        assert!(log.contains("rank 1") && log.contains("lost"), "survivor {i} was not told:\n{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_declared_lost_too() -> anyhow::Result<()> {
    let config = long_running(test_config(2));
    let heartbeat_timeout = Duration::from_millis(config.cluster.heartbeat_timeout_ms);
    let mut cluster = TestCluster::start(config).await?;
    cluster.spawn_worker(&[])?;
    cluster.spawn_worker(&[])?;
    cluster.wait_rendezvous(GENEROUS).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGSTOP keeps its sockets open: only deadlines can tell it from a slow peer.
    let frozen_at = Instant::now();
    cluster.signal_rank(0, libc::SIGSTOP)?;
    let event = cluster.wait_event(heartbeat_timeout * 3, |e| matches!(e, JobEvent::Lost { .. })).await?;
    assert!(matches!(event, JobEvent::Lost { rank: 0, .. }), "{event:?}");
    assert!(frozen_at.elapsed() <= heartbeat_timeout + Duration::from_secs(1), "after {:?}", frozen_at.elapsed());
    cluster.signal_rank(0, libc::SIGKILL)?;
    let survivor = cluster.worker_of_rank(1)?;
    assert_eq!(cluster.wait_worker(survivor, GENEROUS).await?, ExitStatus::JobAborted.code());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_worker_which_deregisters_and_stops_the_job() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(long_running(test_config(2))).await?;
    cluster.spawn_worker(&[])?;
    cluster.spawn_worker(&[])?;
    cluster.wait_rendezvous(GENEROUS).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leaving = cluster.worker_of_rank(0)?;
    cluster.signal_rank(0, libc::SIGTERM)?;
    let event = cluster.wait_event(GENEROUS, |e| matches!(e, JobEvent::Left { .. } | JobEvent::Lost { .. })).await?;
    match event {
        JobEvent::Left { rank: 0, success: false, reason } => assert!(reason.contains("signal 15"), "{reason}"),
        other => panic!("expected rank 0 to deregister, got {other:?}"),
    }
    assert_eq!(cluster.wait_worker(leaving, GENEROUS).await?, 128 + libc::SIGTERM);
    let other = 1 - leaving;
    assert_eq!(cluster.wait_worker(other, GENEROUS).await?, ExitStatus::JobAborted.code());
    let outcome = cluster.outcome(GENEROUS).await?;
    assert!(outcome.message.contains("rank 0 left"), "{}", outcome.message);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_mismatches_and_late_arrivals_are_rejected_by_name() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(long_running(test_config(2))).await?;
    let wrong = cluster.spawn_worker(&["--world-size", "5"])?;
    assert_eq!(cluster.wait_worker(wrong, GENEROUS).await?, ExitStatus::Rendezvous.code());
    let log = cluster.workers[wrong].log();
    assert!(log.contains("world size 5") && log.contains("world size 2"), "{log}");

    cluster.spawn_worker(&[])?;
    cluster.spawn_worker(&[])?;
    cluster.wait_rendezvous(GENEROUS).await?;
    let late = cluster.spawn_worker(&[])?;
    assert_eq!(cluster.wait_worker(late, GENEROUS).await?, ExitStatus::Rendezvous.code());
    let log = cluster.workers[late].log();
    assert!(log.contains("late registration"), "{log}");
    cluster.job.abort(simclr_common::StopReason::Cancelled, "test over".into(), ExitStatus::Success);
    cluster.outcome(GENEROUS).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_coordinator_is_retried_with_backoff_then_named_in_a_non_zero_exit() -> anyhow::Result<()> {
    // A port that was free a moment ago: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let url = format!("http://{addr}");
    let started = Instant::now();
    let mut worker = simclr_tests::spawn_worker_process(&url, &["--connect-timeout-ms", "1500"], None)?;
    let status = tokio::time::timeout(GENEROUS, worker.wait()).await??;
    let elapsed = started.elapsed();
    let log = worker.log();
    assert_eq!(status, ExitStatus::CoordinatorUnreachable.code(), "{log}");
    assert!(elapsed >= Duration::from_millis(1500), "gave up after {elapsed:?}, before the connect timeout");
    assert!(log.matches("retrying").count() >= 2, "expected several attempts with backoff:\n{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains(&url) && last.contains("could not reach the coordinator"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_that_never_fills_times_out_and_says_who_came() -> anyhow::Result<()> {
    let mut config = test_config(2);
    config.cluster.rendezvous_timeout_ms = 4_000;
    let mut cluster = TestCluster::start(config).await?;
    let only = cluster.spawn_worker(&[])?;
    let outcome = cluster.outcome(GENEROUS).await?;
    assert_eq!(outcome.status, ExitStatus::Rendezvous, "{outcome:?}");
    assert!(outcome.message.contains("1 of 2 workers registered"), "{}", outcome.message);
    assert!(outcome.message.contains(&format!("pid {}", cluster.workers[only].pid)), "{}", outcome.message);
    assert_eq!(cluster.wait_worker(only, GENEROUS).await?, ExitStatus::Rendezvous.code());
    assert!(cluster.workers[only].log().contains("rendezvous timed out"), "{}", cluster.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_the_cluster_token_are_turned_away() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start_with_token(test_config(2), Some("s3cret")).await?;
    let stranger = cluster.spawn_worker_with_token(&[], Some("guess"))?;
    let anonymous = cluster.spawn_worker(&[])?;
    for (i, expected) in [(stranger, "wrong cluster token"), (anonymous, "missing cluster token")] {
        assert_eq!(cluster.wait_worker(i, GENEROUS).await?, ExitStatus::Rendezvous.code());
        assert!(cluster.workers[i].log().contains(expected), "{}", cluster.workers[i].log());
    }
    cluster.spawn_worker_with_token(&[], Some("s3cret"))?;
    cluster.spawn_worker_with_token(&[], Some("s3cret"))?;
    assert_eq!(cluster.outcome(GENEROUS).await?.status, ExitStatus::Success, "{}", cluster.logs());
    Ok(())
}

/// A request over the coordinator's message limit is refused by size, after the token check, and
/// the coordinator goes on serving: the job still forms and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_refused_and_the_coordinator_goes_on() -> anyhow::Result<()> {
    use simclr_proto::client::{coordinator_client, lazy_channel, AttachToken};
    use simclr_proto::wire;
    let mut cluster = TestCluster::start_with_token(test_config(2), Some("s3cret")).await?;
    let channel = lazy_channel(&cluster.addr.to_string(), Duration::from_secs(5), Some(Duration::from_secs(30)))?;
    let huge = "x".repeat(simclr_coordinator::MAX_MESSAGE_BYTES + 1024);
    let request = wire::RegisterWorkerRequest { expected_job_id: huge.clone(), ..Default::default() };
    let mut client = coordinator_client(channel.clone(), AttachToken::new(Some("s3cret"))?);
    let err = client.register_worker(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
    // Without the token, the same request is turned away by the token check, not read.
    let request = wire::RegisterWorkerRequest { expected_job_id: huge, ..Default::default() };
    let mut stranger = coordinator_client(channel, AttachToken::new(None)?);
    assert_eq!(stranger.register_worker(request).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    cluster.spawn_worker_with_token(&[], Some("s3cret"))?;
    cluster.spawn_worker_with_token(&[], Some("s3cret"))?;
    assert_eq!(cluster.outcome(GENEROUS).await?.status, ExitStatus::Success, "{}", cluster.logs());
    Ok(())
}

/// The exposition parsed by the OpenMetrics parser of Prometheus' own Python client (where the test set-up installed it): the
/// samples as "name{labels} value" lines.
fn parsed_by_prometheus_client(body: &str) -> anyhow::Result<Option<Vec<String>>> {
    let script = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
                  for f in parse(sys.stdin.read()):\n    for s in f.samples:\n        \
                  print(s.name + '{' + ','.join(f'{k}={v}' for k, v in sorted(s.labels.items())) + '} ' + repr(float(s.value)))";
    let Some(out) = simclr_tests::run_python("prometheus_client", script, &[], body.as_bytes())? else {
        return Ok(None);
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "prometheus_client could not parse the exposition: {stderr}\n{body}");
    Ok(Some(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_shows_workers_and_progress_in_prometheus_format() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(long_running(test_config(2))).await?;
    let addr = simclr_coordinator::metrics::serve("127.0.0.1:0".parse()?, cluster.jobs()?).await?;
    cluster.spawn_worker(&[])?;
    cluster.spawn_worker(&[])?;
    // Preflight reports progress once a second, from every rank.
    let reported = || {
        let members = cluster.job.members();
        members.len() == 2 && members.iter().all(|m| m.phase == "preflight" && m.step > 0)
    };
    assert!(simclr_tests::eventually(GENEROUS, reported).await, "{}", cluster.logs());
    let (head, body) = http_get(&addr.to_string(), "/metrics").await?;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains(simclr_coordinator::metrics::CONTENT_TYPE), "{head}");
    for line in
        ["simclr_world_size 2", "simclr_workers{state=\"active\"} 2", "simclr_job_running 1", "simclr_restarts_total 0"]
    {
        assert!(body.lines().any(|l| l == line), "no '{line}' in:\n{body}");
    }
    assert!(body.contains("simclr_rank_steps_total{rank=\"1\",phase=\"preflight\"} 1000000"), "{body}");
    if let Some(samples) = parsed_by_prometheus_client(&body)? {
        assert!(samples.contains(&"simclr_workers{state=active} 2.0".to_string()), "{samples:?}");
        assert!(samples.iter().any(|s| s.starts_with("simclr_rank_step{phase=preflight,rank=0} ")), "{samples:?}");
    }
    let (head, _) = http_get(&addr.to_string(), "/nowhere").await?;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    cluster.job.abort(simclr_common::StopReason::Cancelled, "test over".into(), ExitStatus::Interrupted(15));
    cluster.outcome(GENEROUS).await?;
    let (_, body) = http_get(&addr.to_string(), "/metrics").await?;
    assert!(body.lines().any(|l| l == "simclr_job_running 0"), "{body}");
    Ok(())
}
