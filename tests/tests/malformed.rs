//! Malformed messages on every gRPC method of the coordinator and of a worker's peer endpoint:
//! random bytes, and valid messages truncated or with bytes flipped, sent raw (a codec that passes
//! bytes through) with no token checks in the way. Every call must be answered (an error status or a
//! reply) within its method's bound, nothing may panic (a panic hook records any in this process, and the
//! worker's log and exit code show its own), and both keep serving afterwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut};
use prost::Message;
use simclr_proto::wire;
use simclr_tests::{test_config, TestCluster};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Bytes in, bytes out: the request body goes on the wire exactly as given.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// xorshift64*: the same cases on every run.
struct Cases(u64);

impl Cases {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// `n` bodies: random bytes of random lengths, and `valid` truncated or with a few bytes flipped.
    fn bodies(&mut self, valid: &[u8], n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| match i % 3 {
                0 => (0..self.next() % 300).map(|_| self.next() as u8).collect(),
                1 => valid[..(self.next() as usize) % valid.len().max(1)].to_vec(),
                _ => {
                    let mut body = valid.to_vec();
                    for _ in 0..1 + self.next() % 4 {
                        if body.is_empty() {
                            break;
                        }
                        let at = (self.next() as usize) % body.len();
                        body[at] ^= (self.next() as u8) | 1;
                    }
                    body
                }
            })
            .collect()
    }
}

/// Sends every body to `method` of `service` concurrently; each must be answered within `bound`.
async fn hammer(channel: &Channel, service: &str, method: &str, bodies: Vec<Vec<u8>>, bound: Duration) {
    let path = format!("/simclr.cluster.v1.{service}/{method}");
    let streaming = method == "Transfer";
    let calls = bodies.into_iter().map(|body| {
        let (channel, path) = (channel.clone(), path.clone());
        tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let call = async {
                grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
                let path = PathAndQuery::try_from(path.as_str()).map_err(|e| Status::internal(e.to_string()))?;
                if streaming {
                    let chunks = tokio_stream::iter(vec![body.clone(), body]);
                    grpc.client_streaming(Request::new(chunks), path, Raw).await.map(|_| ())
                } else {
                    grpc.unary(Request::new(body), path, Raw).await.map(|_| ())
                }
            };
            tokio::time::timeout(bound, call).await
        })
    });
    for call in calls {
        let answered = call.await.expect("the calling task");
        assert!(answered.is_ok(), "{path}: no answer within {bound:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_answers_not_panics_or_hangs() -> anyhow::Result<()> {
    let panics = Arc::new(Mutex::new(Vec::<String>::new()));
    let recorded = Arc::clone(&panics);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        recorded.lock().unwrap().push(info.to_string());
        previous(info);
    }));

    let mut config = test_config(2);
    // Garbage may register as workers; a short rendezvous bounds how long those calls wait.
    config.cluster.rendezvous_timeout_ms = 8_000;
    let mut cluster = TestCluster::start(config).await?;
    let worker = cluster.spawn_worker(&[])?;
    // The worker's peer endpoint, from its first log line ("... peer 127.0.0.1:PORT, cpu) ...").
    let mut peer = None;
    for _ in 0..200 {
        let log = cluster.workers[worker].log();
        peer = log.split("peer ").nth(1).and_then(|rest| rest.split(',').next()).map(str::to_string);
        if peer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peer = peer.ok_or_else(|| anyhow::anyhow!("no peer address in the worker's log:\n{}", cluster.logs()))?;

    let mut cases = Cases(0x5EED_CAFE_F00D_D00D);
    let bound = Duration::from_secs(20);
    // The worker's endpoint first, while it waits in the rendezvous; Stop last, since a body that
    // happens to decode as a stop notice may legitimately stop it.
    let peer_channel = Channel::from_shared(format!("http://{peer}"))?.connect().await?;
    let ping = wire::PingRequest { from_rank: 0, sequence: 1, payload: vec![7; 64] }.encode_to_vec();
    for method in ["Ping", "Transfer"] {
        hammer(&peer_channel, "Worker", method, cases.bodies(&ping, 24), bound).await;
    }
    let pid = cluster.workers[worker].pid;
    // SAFETY: signal 0 only checks that the process exists.
    assert!(unsafe { libc::kill(pid as i32, 0) } == 0, "the worker died:\n{}", cluster.logs());
    hammer(&peer_channel, "Worker", "Stop", cases.bodies(&ping, 24), bound).await;

    let coordinator = Channel::from_shared(format!("http://{}", cluster.addr))?.connect().await?;
    let info = wire::WorkerInfo { instance_id: "fuzz".into(), host: "h".into(), ..Default::default() };
    let register = wire::RegisterWorkerRequest { worker: Some(info), ..Default::default() }.encode_to_vec();
    let heartbeat =
        wire::HeartbeatRequest { rank: 1, instance_id: "fuzz".into(), ..Default::default() }.encode_to_vec();
    let result =
        wire::ReportProbeResultRequest { rank: 0, instance_id: "fuzz".into(), outcome_json: "{\"task\":".into() }
            .encode_to_vec();
    // Long polls answer within their bound: registration by the rendezvous timeout, a probe task
    // request within its 10 s poll.
    for (method, valid) in [
        ("RegisterWorker", &register),
        ("Heartbeat", &heartbeat),
        ("ReportProgress", &heartbeat),
        ("ReportPeerFailure", &heartbeat),
        ("Deregister", &heartbeat),
        ("GetAssignment", &heartbeat),
        ("ShareValue", &heartbeat),
        ("NextProbeTask", &heartbeat),
        ("ReportProbeResult", &result),
    ] {
        hammer(&coordinator, "Coordinator", method, cases.bodies(valid, 24), bound).await;
    }

    // Both still serve: the coordinator answers a well-formed heartbeat (with an error status for an
    // unknown worker); the job ends one way or another, and nothing panicked anywhere.
    let mut client = simclr_proto::client::coordinator_client(coordinator, Default::default());
    let request = wire::HeartbeatRequest { rank: 0, instance_id: "nobody".into(), ..Default::default() };
    tokio::time::timeout(Duration::from_secs(5), client.heartbeat(request)).await?.unwrap_err();
    cluster.outcome(Duration::from_secs(60)).await?;
    let code = cluster.wait_worker(worker, Duration::from_secs(60)).await?;
    let log = cluster.workers[worker].log();
    assert!(code != 101 && !log.contains("panicked"), "the worker panicked (exit {code}):\n{log}");
    assert!(panics.lock().unwrap().is_empty(), "the coordinator panicked: {:?}", panics.lock().unwrap());
    Ok(())
}
