//! The standard gRPC health service (`grpc.health.v1.Health`) on a port of its own, for Kubernetes'
//! `grpc` liveness and readiness probes (`--health-listen` on both binaries). It needs no cluster token
//! (the kubelet has none) and answers nothing but health, so it is served apart from the job's
//! services: the process stays probe-able while those start, and after they have stopped.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds `addr` and serves the health service (overall status SERVING) in the background for the rest
/// of the process. An address that cannot be bound is an error naming it.
pub async fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (--health-listen): {e}")))?;
    let bound = listener.local_addr()?;
    let (_reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await {
            tracing::error!(%bound, "health service stopped: {e}");
        }
    });
    tracing::info!(%bound, "gRPC health service listening");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    #[tokio::test]
    async fn answers_serving_without_a_token() {
        let addr = super::serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let reply = client.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32);
        // A name this process does not serve is NOT_FOUND, as the protocol says.
        let err = client.check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn a_busy_address_is_an_error_naming_it() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let err = super::serve(addr).await.unwrap_err().to_string();
        assert!(err.contains(&addr.to_string()) && err.contains("--health-listen"), "{err}");
    }
}
