//! The worker's own gRPC server: the endpoint peers dial (ping today; the collectives build on it) and
//! the coordinator's control calls (stop). Shares a `Control` with the rest of the worker.

use std::sync::Arc;

use simclr_common::StopNotice;
use simclr_proto::client::{RequireToken, DATA_CONNECTION_WINDOW, DATA_FRAME_SIZE, DATA_STREAM_WINDOW};
use simclr_proto::wire::{self, worker_server::Worker, worker_server::WorkerServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::comm::Mailbox;

/// How long a Ping waits for this worker's rank before answering UNAVAILABLE: longer than any peer's
/// preflight deadline, short enough that a caller without a deadline is not held forever.
const RANK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// State the server shares with the worker's main task.
pub struct Control {
    /// Set once the rendezvous has given this worker its rank.
    rank: watch::Sender<Option<u32>>,
    stop: watch::Sender<Option<StopNotice>>,
}

impl Control {
    pub fn new() -> Arc<Control> {
        Arc::new(Control { rank: watch::channel(None).0, stop: watch::channel(None).0 })
    }

    pub fn set_rank(&self, rank: u32) {
        self.rank.send_replace(Some(rank));
    }

    /// This worker's rank, once assigned. Peers learn the rendezvous result at nearly the same moment,
    /// so a peer may call before this worker has read its own answer: the call waits for it (bounded by
    /// the caller's deadline, and by `RANK_WAIT` for a caller without one) instead of answering
    /// without a rank. `None`: still no rank after that wait.
    pub async fn assigned_rank(&self) -> Option<u32> {
        let mut rx = self.rank.subscribe();
        let rank = match tokio::time::timeout(RANK_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(rank)) => *rank,
            _ => None,
        };
        rank
    }

    /// Records a stop notice; the first one wins (the push and the heartbeat answer carry the same).
    pub fn notify_stop(&self, notice: StopNotice) {
        self.stop.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(notice);
            true
        });
    }

    pub fn stop_notice(&self) -> Option<StopNotice> {
        self.stop.borrow().clone()
    }

    /// Resolves once a stop notice has arrived.
    pub async fn stopped(&self) -> StopNotice {
        let mut rx = self.stop.subscribe();
        loop {
            if let Some(notice) = rx.borrow_and_update().clone() {
                return notice;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`; unreachable in practice.
                std::future::pending::<()>().await;
            }
        }
    }
}

pub struct PeerService {
    pub control: Arc<Control>,
    pub mailbox: Arc<Mailbox>,
}

/// Serves the worker endpoint on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    mailbox: Arc<Mailbox>,
    token: Option<String>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    simclr_proto::tls::server_builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(DATA_STREAM_WINDOW)
        .initial_connection_window_size(DATA_CONNECTION_WINDOW)
        .max_frame_size(DATA_FRAME_SIZE)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            WorkerServer::new(PeerService { control, mailbox })
                .max_decoding_message_size(65 << 20)
                .max_encoding_message_size(65 << 20),
            RequireToken::new(token.as_deref()),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}

#[tonic::async_trait]
impl Worker for PeerService {
    async fn ping(&self, request: Request<wire::PingRequest>) -> Result<Response<wire::PingResponse>, Status> {
        let req = request.into_inner();
        let rank = self.control.assigned_rank().await.ok_or_else(|| {
            Status::unavailable("this worker has no rank yet (its rendezvous has not completed); try again later")
        })?;
        Ok(Response::new(wire::PingResponse { rank, sequence: req.sequence, payload: req.payload }))
    }

    async fn stop(&self, request: Request<wire::StopRequest>) -> Result<Response<wire::StopResponse>, Status> {
        let notice =
            request.into_inner().notice.ok_or_else(|| Status::invalid_argument("StopRequest.notice is missing"))?;
        let notice: StopNotice = notice.into();
        tracing::info!(rank = ?self.control.rank.borrow().as_ref(), %notice, "stop notice from the coordinator");
        self.control.notify_stop(notice);
        Ok(Response::new(wire::StopResponse {}))
    }

    async fn transfer(
        &self,
        request: Request<Streaming<wire::TransferChunk>>,
    ) -> Result<Response<wire::TransferAck>, Status> {
        self.mailbox.receive(request.into_inner()).await?;
        Ok(Response::new(wire::TransferAck {}))
    }
}
