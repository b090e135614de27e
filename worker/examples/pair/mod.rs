//! Two processes on loopback for the distributed benchmarks: the first run spawns itself again as
//! rank 1 (arguments passed on); both then hold both CPU collectives to each other, gRPC and the TCP
//! ring, each twice (the second a channel of its own for the gradient buckets).

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
    /// Second channels of each backend (another gRPC phase, another TCP ring).
    pub grpc_gradients: Arc<dyn Collective>,
    pub tcp_gradients: Arc<dyn Collective>,
    pub rank: usize,
    child: Option<Child>,
    // Dropped last: the peer server runs on it.
    _runtime: tokio::runtime::Runtime,
}

impl Pair {
    pub fn start() -> Pair {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut child = None;
        let (rank, addrs, listener, tcp_addrs, tcp_listener, tcp2_addrs, tcp2_listener) =
            match std::env::var("BENCH_RANK") {
                Ok(r) => {
                    let split =
                        |v: &str| -> Vec<String> { std::env::var(v).unwrap().split(',').map(str::to_string).collect() };
                    let (addrs, tcp_addrs, tcp2_addrs) =
                        (split("BENCH_ADDRS"), split("BENCH_TCP_ADDRS"), split("BENCH_TCP2_ADDRS"));
                    let rank: usize = r.parse().unwrap();
                    let listener = runtime.block_on(tokio::net::TcpListener::bind(&addrs[rank])).unwrap();
                    let tcp_listener = std::net::TcpListener::bind(&tcp_addrs[rank]).unwrap();
                    let tcp2_listener = std::net::TcpListener::bind(&tcp2_addrs[rank]).unwrap();
                    (rank, addrs, listener, tcp_addrs, tcp_listener, tcp2_addrs, tcp2_listener)
                }
                Err(_) => {
                    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
                    let tcp_listener = listen("127.0.0.1".parse().unwrap()).unwrap();
                    let tcp2_listener = listen("127.0.0.1".parse().unwrap()).unwrap();
                    // Free ports for rank 1, which binds them itself.
                    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                    let (other, other_tcp, other_tcp2) = (free(), free(), free());
                    let addr = |l: &std::net::TcpListener| l.local_addr().unwrap().to_string();
                    let addrs = vec![listener.local_addr().unwrap().to_string(), addr(&other)];
                    let tcp_addrs = vec![addr(&tcp_listener), addr(&other_tcp)];
                    let tcp2_addrs = vec![addr(&tcp2_listener), addr(&other_tcp2)];
                    drop((other, other_tcp, other_tcp2));
                    child = Some(
                        std::process::Command::new(std::env::current_exe().unwrap())
                            .args(std::env::args().skip(1))
                            .env("BENCH_RANK", "1")
                            .env("BENCH_ADDRS", addrs.join(","))
                            .env("BENCH_TCP_ADDRS", tcp_addrs.join(","))
                            .env("BENCH_TCP2_ADDRS", tcp2_addrs.join(","))
                            .spawn()
                            .unwrap(),
                    );
                    (0, addrs, listener, tcp_addrs, tcp_listener, tcp2_addrs, tcp2_listener)
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
        let grpc = |phase: &str| {
            let _context = runtime.enter();
            GrpcCollective::new(
                phase,
                rank,
                &addrs,
                Arc::clone(&mailbox),
                AttachToken::default(),
                Duration::from_secs(60),
                runtime.handle().clone(),
            )
            .unwrap()
        };
        let (collective, grpc_gradients) = (grpc("bench"), grpc("bench/gradients"));
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
        let tcp2 = TcpRing::connect(rank, tcp2_listener, &tcp2_addrs, None, Duration::from_secs(60)).unwrap();
        tcp2.barrier().unwrap();
        Pair {
            grpc: Arc::new(collective),
            tcp: Arc::new(tcp),
            grpc_gradients: Arc::new(grpc_gradients),
            tcp_gradients: Arc::new(tcp2),
            rank,
            child,
            _runtime: runtime,
        }
    }

    /// Both backends, by name.
    pub fn backends(&self) -> [(&'static str, Arc<dyn Collective>); 2] {
        [("TCP ring", Arc::clone(&self.tcp)), ("gRPC ring", Arc::clone(&self.grpc))]
    }

    /// The second channel of the backend `name` names.
    #[allow(dead_code)] // not every example that includes this module uses it
    pub fn gradients_of(&self, name: &str) -> Arc<dyn Collective> {
        if name.starts_with("TCP") {
            Arc::clone(&self.tcp_gradients)
        } else {
            Arc::clone(&self.grpc_gradients)
        }
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
