//! Client and server plumbing shared by both binaries: channels with deadlines, and the cluster token
//! attached to every call (client side) and checked on every call (server side).

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::wire;
use crate::TOKEN_METADATA_KEY;

/// Attaches the cluster token (if the job has one) to every outgoing call.
#[derive(Clone, Debug, Default)]
pub struct AttachToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl AttachToken {
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        token
            .map(|t| t.parse().map_err(|_| Status::invalid_argument("cluster token must be printable ASCII")))
            .transpose()
            .map(AttachToken)
    }
}

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert(TOKEN_METADATA_KEY, token.clone());
        }
        Ok(req)
    }
}

/// Rejects calls without the job's cluster token (when it has one).
#[derive(Clone, Debug, Default)]
pub struct RequireToken(Option<String>);

impl RequireToken {
    pub fn new(token: Option<&str>) -> Self {
        RequireToken(token.map(str::to_string))
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else { return Ok(req) };
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "an unknown address".into());
        match req.metadata().get(TOKEN_METADATA_KEY).and_then(|v| v.to_str().ok()) {
            Some(got) if same_secret(got.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => {
                tracing::warn!(%peer, "refused a call with a wrong cluster token");
                Err(Status::unauthenticated("wrong cluster token (SIMCLR_CLUSTER_TOKEN)"))
            }
            None => {
                tracing::warn!(%peer, "refused a call without the cluster token");
                Err(Status::unauthenticated("missing cluster token (set SIMCLR_CLUSTER_TOKEN)"))
            }
        }
    }
}

/// Compares two secrets (the cluster token) in time that depends on their lengths only, not on where
/// they first differ (`subtle`'s constant-time equality).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

pub type CoordinatorClient = wire::coordinator_client::CoordinatorClient<InterceptedService<Channel, AttachToken>>;
pub type WorkerClient = wire::worker_client::WorkerClient<InterceptedService<Channel, AttachToken>>;

/// Normalises "host:port" or "http://host:port" to a URI tonic can dial: `https://` when this process
/// uses TLS (`crate::tls`), whatever scheme the address was given with.
pub fn endpoint_uri(addr: &str) -> String {
    let bare = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let scheme = if crate::tls::enabled() { "https" } else { "http" };
    format!("{scheme}://{bare}")
}

/// `endpoint` with this process's TLS settings, when it has them.
fn with_tls(endpoint: Endpoint, addr: &str) -> Result<Endpoint, Status> {
    match crate::tls::client_config() {
        Some(config) => {
            endpoint.tls_config(config).map_err(|e| Status::invalid_argument(format!("TLS settings for '{addr}': {e}")))
        }
        None => Ok(endpoint),
    }
}

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// An endpoint with a connect deadline and, if given, a deadline for every call; connection happens on
/// first use. Long-polling calls (registration) need a channel without a per-call deadline.
pub fn lazy_channel(addr: &str, connect_timeout: Duration, call_timeout: Option<Duration>) -> Result<Channel, Status> {
    let mut endpoint = Endpoint::from_shared(endpoint_uri(addr))
        .map_err(|e| Status::invalid_argument(format!("bad address '{addr}': {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        // HTTP/2 pings detect a peer that vanished without closing its connection (a host that
        // lost power or network) even while a long call such as registration is in flight.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    Ok(with_tls(endpoint, addr)?.connect_lazy())
}

/// HTTP/2 flow-control windows of the links that carry collectives: large enough that a multi-megabyte
/// transfer streams without waiting for window updates on every few frames.
pub const DATA_STREAM_WINDOW: u32 = 8 << 20;
pub const DATA_CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame on those links (the protocol's default is 16 KiB: a megabyte chunk would take
/// 64 frames, each a separate write).
pub const DATA_FRAME_SIZE: u32 = 1 << 20;

/// A channel for collective traffic to a peer: large flow-control windows, a connect deadline, no
/// per-call deadline (the collective applies its own).
pub fn data_channel(addr: &str, connect_timeout: Duration) -> Result<Channel, Status> {
    let endpoint = Endpoint::from_shared(endpoint_uri(addr))
        .map_err(|e| Status::invalid_argument(format!("bad address '{addr}': {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(DATA_STREAM_WINDOW)
        .initial_connection_window_size(DATA_CONNECTION_WINDOW)
        .max_frame_size(DATA_FRAME_SIZE)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(with_tls(endpoint, addr)?.connect_lazy())
}

pub fn coordinator_client(channel: Channel, token: AttachToken) -> CoordinatorClient {
    wire::coordinator_client::CoordinatorClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20)
}

pub fn worker_client(channel: Channel, token: AttachToken) -> WorkerClient {
    wire::worker_client::WorkerClient::with_interceptor(channel, token)
        .max_decoding_message_size(128 << 20)
        .max_encoding_message_size(128 << 20)
}
