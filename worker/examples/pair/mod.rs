//! Two processes on loopback for the distributed benchmarks: the first run spawns itself again as
//! rank 1 (arguments passed on); both then hold both CPU collectives to each other, gRPC and the TCP
//! ring.

use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use simclr_proto::client::AttachToken;
use simclr_worker::comm::tcp::{listen, TcpRing};
use simclr_worker::comm::{Collective, GrpcCollective, Mailbox};
use simclr_worker::session::peer::{serve, Control};

pub struct Pair {
    pub grpc: Arc<dyn Collective>,
    pub tcp: Arc<dyn Collective>,
    pub rank: usize,
    child: Option<Child>,
    // Dropped last: the peer server runs on it.
    _runtime: tokio::runtime::Runtime,
}

impl Pair {
    pub fn start() -> Pair {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut child = None;
        let (rank, addrs, listener, tcp_addrs, tcp_listener) = match std::env::var("BENCH_RANK") {
            Ok(r) => {
                let split =
                    |v: &str| -> Vec<String> { std::env::var(v).unwrap().split(',').map(str::to_string).collect() };
                let (addrs, tcp_addrs) = (split("BENCH_ADDRS"), split("BENCH_TCP_ADDRS"));
                let rank: usize = r.parse().unwrap();
                let listener = runtime.block_on(tokio::net::TcpListener::bind(&addrs[rank])).unwrap();
                let tcp_listener = std::net::TcpListener::bind(&tcp_addrs[rank]).unwrap();
                (rank, addrs, listener, tcp_addrs, tcp_listener)
            }
            Err(_) => {
                let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
                let tcp_listener = listen("127.0.0.1".parse().unwrap()).unwrap();
                // Free ports for rank 1, which binds them itself.
                let (other, other_tcp) = (
                    std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
                    std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
                );
                let addrs = vec![listener.local_addr().unwrap().to_string(), other.local_addr().unwrap().to_string()];
                let tcp_addrs =
                    vec![tcp_listener.local_addr().unwrap().to_string(), other_tcp.local_addr().unwrap().to_string()];
                drop((other, other_tcp));
                child = Some(
                    std::process::Command::new(std::env::current_exe().unwrap())
                        .args(std::env::args().skip(1))
                        .env("BENCH_RANK", "1")
                        .env("BENCH_ADDRS", addrs.join(","))
                        .env("BENCH_TCP_ADDRS", tcp_addrs.join(","))
                        .spawn()
                        .unwrap(),
                );
                (0, addrs, listener, tcp_addrs, tcp_listener)
            }
        };
        let mailbox = Arc::new(Mailbox::default());
        runtime.spawn(serve(
            listener,
            Control::new(),
            Arc::clone(&mailbox),
            None,
            tokio_util::sync::CancellationToken::new(),
        ));
        let collective = {
            let _context = runtime.enter();
            GrpcCollective::new(
                "bench",
                rank,
                &addrs,
                mailbox,
                AttachToken::default(),
                Duration::from_secs(60),
                runtime.handle().clone(),
            )
            .unwrap()
        };
        // The peer's server may still be starting: wait until it accepts connections.
        let started = Instant::now();
        let peer = &addrs[1 - rank];
        while std::net::TcpStream::connect(peer).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "peer {peer} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        collective.barrier().unwrap();
        let tcp = TcpRing::connect(rank, tcp_listener, &tcp_addrs, None, Duration::from_secs(60)).unwrap();
        tcp.barrier().unwrap();
        Pair { grpc: Arc::new(collective), tcp: Arc::new(tcp), rank, child, _runtime: runtime }
    }

    /// Both backends, by name.
    pub fn backends(&self) -> [(&'static str, Arc<dyn Collective>); 2] {
        [("TCP ring", Arc::clone(&self.tcp)), ("gRPC ring", Arc::clone(&self.grpc))]
    }

    /// Waits for the other process (rank 0 only).
    pub fn finish(mut self) {
        self.tcp.barrier().unwrap();
        self.grpc.barrier().unwrap();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}
