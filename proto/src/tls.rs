//! Optional TLS (rustls) on every gRPC link of a job: worker to coordinator, coordinator to worker,
//! worker to worker. Mutual: each process presents a certificate signed by the job's CA and accepts
//! only peers that present one too, so a stranger without one cannot even open a call. Every process
//! checks the others' certificates against the CA for one name, `server_name` (default
//! `simclr-cluster`), which the certificates carry as a DNS name; processes dial each other by IP
//! address, so the name, not the address, is what is verified.
//!
//! Set once per process at start-up (`configure`), before any channel or server is made; every channel
//! (`client::lazy_channel`, `client::data_channel`) and server (`server_builder`) follows it. The
//! health service stays plain (Kubernetes' gRPC probes speak no TLS) and carries nothing of the job.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};

/// The name the certificates are checked for unless the configuration names another.
pub const DEFAULT_SERVER_NAME: &str = "simclr-cluster";

/// Where a process finds its TLS material (PEM files).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// The CA that signed every process's certificate.
    pub ca: PathBuf,
    /// This process's certificate (chain) and its private key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The DNS name every certificate carries.
    pub server_name: String,
}

struct Tls {
    client: ClientTlsConfig,
    /// A server builder with the TLS acceptor already made (and so checked).
    server: Server,
}

static TLS: OnceLock<Option<Tls>> = OnceLock::new();

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(format!("the TLS {what} {} is not a PEM file", path.display()));
    }
    Ok(bytes)
}

/// Turns TLS on for this process (`Some`) or records that it is off (`None`). Once per process: a
/// second call with other settings is an error.
pub fn configure(files: Option<&TlsFiles>) -> Result<(), String> {
    let tls = match files {
        None => None,
        Some(f) => {
            if f.server_name.is_empty() {
                return Err("the TLS server name is empty".into());
            }
            let ca = Certificate::from_pem(read(&f.ca, "CA certificate")?);
            let identity = Identity::from_pem(read(&f.cert, "certificate")?, read(&f.key, "private key")?);
            let server = ServerTlsConfig::new().identity(identity.clone()).client_ca_root(ca.clone());
            // A key that does not fit its certificate shows here, not at the first connection.
            let server = Server::builder()
                .tls_config(server)
                .map_err(|e| format!("TLS certificate {} with key {}: {e}", f.cert.display(), f.key.display()))?;
            Some(Tls {
                server,
                client: ClientTlsConfig::new()
                    .ca_certificate(ca.clone())
                    .identity(identity.clone())
                    .domain_name(f.server_name.clone()),
            })
        }
    };
    let on = tls.is_some();
    if TLS.set(tls).is_err() && enabled() != on {
        return Err("TLS was already configured differently in this process".into());
    }
    Ok(())
}

/// Whether this process's links use TLS.
pub fn enabled() -> bool {
    matches!(TLS.get(), Some(Some(_)))
}

/// The client settings, when TLS is on.
pub(crate) fn client_config() -> Option<ClientTlsConfig> {
    TLS.get().and_then(Option::as_ref).map(|t| t.client.clone())
}

/// A server builder, with TLS when it is on.
pub fn server_builder() -> Server {
    match TLS.get().and_then(Option::as_ref) {
        Some(tls) => tls.server.clone(),
        None => Server::builder(),
    }
}
