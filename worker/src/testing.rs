//! Test support shared by the unit tests, the integration tests and the benchmarks: groups of real
//! collectives on loopback in one process, and tensor read-backs for formulas. Built for `cfg(test)` and
//! with the `testing` feature only, never into the worker binary.

use tch::Tensor;

/// A tensor's values as f64, for the tests' formulas.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(tch::Kind::Double).flatten(0, -1)).unwrap_or_default()
}

/// A group of gRPC collectives on loopback in this process, each with its own peer server: the
/// collectives' tests and the world-size invariance tests use it.
pub mod loopback {
    use std::sync::Arc;
    use std::time::Duration;

    use simclr_proto::client::AttachToken;
    use tokio_util::sync::CancellationToken;

    use crate::comm::{Collective, GrpcCollective, Mailbox};

    pub struct Group {
        pub members: Vec<Arc<dyn Collective>>,
        shutdown: CancellationToken,
        // Dropped last: the servers run on it.
        _runtime: Option<tokio::runtime::Runtime>,
    }

    impl Drop for Group {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    /// `world` gRPC ranks, each with its own peer server on 127.0.0.1, all alive until the group is
    /// dropped.
    pub fn group(world: usize, timeout: Duration) -> Group {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let shutdown = CancellationToken::new();
        let mut addrs = Vec::new();
        let mut mailboxes = Vec::new();
        for _ in 0..world {
            let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            addrs.push(listener.local_addr().unwrap().to_string());
            let mailbox = Arc::new(Mailbox::default());
            mailboxes.push(Arc::clone(&mailbox));
            let control = crate::session::peer::Control::new();
            runtime.spawn(crate::session::peer::serve(listener, control, mailbox, None, shutdown.clone()));
        }
        let members = {
            let _context = runtime.enter();
            mailboxes
                .into_iter()
                .enumerate()
                .map(|(rank, mailbox)| {
                    let c = GrpcCollective::new(
                        "test",
                        rank,
                        &addrs,
                        mailbox,
                        AttachToken::default(),
                        timeout,
                        runtime.handle().clone(),
                    );
                    Arc::new(c.unwrap()) as Arc<dyn Collective>
                })
                .collect()
        };
        Group { members, shutdown, _runtime: Some(runtime) }
    }

    /// `world` TCP-ring ranks on 127.0.0.1.
    pub fn tcp_group(world: usize, timeout: Duration) -> Group {
        let listeners: Vec<_> =
            (0..world).map(|_| crate::comm::tcp::listen("127.0.0.1".parse().unwrap()).unwrap()).collect();
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let members = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let addrs = &addrs;
                    s.spawn(move || crate::comm::tcp::TcpRing::connect(rank, listener, addrs, Some("t0ken"), timeout))
                })
                .collect();
            handles.into_iter().map(|h| Arc::new(h.join().unwrap().unwrap()) as Arc<dyn Collective>).collect()
        });
        Group { members, shutdown: CancellationToken::new(), _runtime: None }
    }

    /// Runs `f(rank, collective)` on one thread per rank and returns the results in rank order.
    pub fn run<T: Send>(group: &Group, f: impl Fn(usize, &dyn Collective) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .members
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn({
                        let f = &f;
                        move || f(r, &**c)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
        })
    }
}
