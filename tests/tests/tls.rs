//! TLS on every gRPC link (`[tls]` in the job config, `--tls-*` for the workers): a whole dev-mode job
//! runs over it, and the coordinator's and the workers' endpoints refuse whoever does not present a
//! certificate of the job's CA (plain connections, no client certificate, another CA's), while a
//! client with the job's certificate gets answers. Certificates made by OpenSSL's command line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use simclr_proto::wire;
use simclr_tests::{binaries_dir, eventually, exit_code};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const GENEROUS: Duration = Duration::from_secs(120);

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().context("running openssl")?;
    ensure!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A CA (`<name>-ca.pem`) and a certificate for `simclr-cluster` it signed (`<name>.pem`,
/// `<name>.key`), in `dir`.
fn make_ca_and_cert(dir: &Path, name: &str) -> Result<()> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (ca, ca_key) = (format!("{name}-ca.pem"), format!("{name}-ca.key"));
    let mut args = vec!["req", "-x509", "-days", "2", "-subj", "/CN=simclr test CA"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca]);
    openssl(dir, &args)?;
    let (key, csr, cert) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    let mut args = vec!["req", "-subj", "/CN=simclr-cluster"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr]);
    openssl(dir, &args)?;
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        "subjectAltName = DNS:simclr-cluster\nextendedKeyUsage = serverAuth, clientAuth\nbasicConstraints = CA:FALSE\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
    )
}

fn tls_section(dir: &Path) -> String {
    let p = |f: &str| dir.join(f).display().to_string();
    format!("[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n", p("job-ca.pem"), p("job.pem"), p("job.key"))
}

fn dev(dir: &Path, run_dir: &Path, config: &str) -> Result<tokio::process::Child> {
    let path = dir.join("job.toml");
    std::fs::write(&path, config)?;
    Ok(tokio::process::Command::new(binaries_dir()?.join("simclr-coordinator"))
        .args(["dev", "--workers", "2", "--config"])
        .arg(&path)
        .arg("--run-dir")
        .arg(run_dir)
        .env("SIMCLR_CACHE_DIR", dir.join("cache"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

/// A pretraining and probe sweep of a tiny encoder, every link over TLS: completes, with the CPU
/// collectives over the peers' gRPC links (the TCP ring has no TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_job_runs_with_tls_on_every_link() -> Result<()> {
    let dir = tempfile::tempdir()?;
    make_ca_and_cert(dir.path(), "job")?;
    let config = format!(
        "{}[data]\nsynthetic_studies = 24\nsynthetic_size = 64\n[pretrain]\narch = \"tiny\"\nhead_out = 8\n\
         input_size = 32\nbatch_size = 4\nepochs = 1\n[probe]\nhidden = [8]\nepochs = [5]\nseeds = 1\nbootstrap = 0\n",
        tls_section(dir.path())
    );
    let run_dir = dir.path().join("run");
    let child = dev(dir.path(), &run_dir, &config)?;
    let out = tokio::time::timeout(GENEROUS, child.wait_with_output()).await??;
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(exit_code(out.status), 0, "{log}");
    assert!(log.contains("TLS on every gRPC link"), "{log}");
    assert!(log.contains("collectives phase=\"pretrain\" backend=grpc tls=true"), "{log}");
    assert!(run_dir.join("encoder.safetensors").is_file() && run_dir.join("results.csv").is_file());
    Ok(())
}

/// Calls `Heartbeat` on `addr` through `endpoint`; the status code of the answer (Ok: the call got
/// through to the service).
async fn heartbeat_through(endpoint: Endpoint) -> Result<tonic::Code> {
    let channel = match endpoint.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(5)).connect().await
    {
        Ok(channel) => channel,
        Err(_) => return Ok(tonic::Code::Unavailable),
    };
    let mut client = wire::coordinator_client::CoordinatorClient::new(channel);
    let request = wire::HeartbeatRequest { rank: 0, instance_id: "stranger".into(), phase: String::new() };
    Ok(match client.heartbeat(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    })
}

/// Whether `code` is a refused connection rather than the service's answer.
fn refused(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Cancelled)
}

fn pem(dir: &Path, name: &str) -> Result<Vec<u8>> {
    Ok(std::fs::read(dir.join(name))?)
}

/// While a TLS job runs: a plain client, a TLS client without a certificate and one with another CA's
/// certificate are all turned away by the coordinator before any call reaches the service; the job's
/// own certificate gets the service's answer (PERMISSION_DENIED: no such worker). A worker's peer
/// endpoint refuses a plain connection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_refuse_clients_without_a_certificate_of_the_jobs_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    make_ca_and_cert(dir.path(), "job")?;
    make_ca_and_cert(dir.path(), "other")?;
    let config = format!(
        "{}[data]\nsynthetic_studies = 24\nsynthetic_size = 64\n[preflight]\nrounds = 1000000\ninterval_ms = 20\n\
         [pretrain]\nenabled = false\n",
        tls_section(dir.path())
    );
    let run_dir = dir.path().join("run");
    let mut child = dev(dir.path(), &run_dir, &config)?;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
    let mut log = String::new();
    let addr = tokio::time::timeout(GENEROUS, async {
        while let Some(line) = lines.next_line().await? {
            log.push_str(&line);
            log.push('\n');
            if line.contains("coordinator listening") {
                if let Some(addr) = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next()) {
                    return Ok::<_, anyhow::Error>(addr.to_string());
                }
            }
        }
        anyhow::bail!("no listening address in:\n{log}")
    })
    .await??;
    let cluster = run_dir.join("cluster.json");
    ensure!(eventually(GENEROUS, || cluster.is_file()).await, "the workers never joined");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cluster)?)?;
    let peer = doc["ranks"][0]["peer_addr"].as_str().context("no peer address")?.to_string();
    let d = dir.path();
    let tls = |ca: &str, identity: Option<(&str, &str)>| -> Result<ClientTlsConfig> {
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(d, ca)?)).domain_name("simclr-cluster");
        if let Some((cert, key)) = identity {
            config = config.identity(Identity::from_pem(pem(d, cert)?, pem(d, key)?));
        }
        Ok(config)
    };
    let https = |addr: &str| Endpoint::from_shared(format!("https://{addr}"));

    let plain = heartbeat_through(Endpoint::from_shared(format!("http://{addr}"))?).await?;
    assert!(refused(plain), "a plain connection was not refused: {plain:?}");
    let anonymous = heartbeat_through(https(&addr)?.tls_config(tls("job-ca.pem", None)?)?).await?;
    assert!(refused(anonymous), "a client without a certificate was not refused: {anonymous:?}");
    let stranger =
        heartbeat_through(https(&addr)?.tls_config(tls("job-ca.pem", Some(("other.pem", "other.key")))?)?).await?;
    assert!(refused(stranger), "another CA's certificate was not refused: {stranger:?}");
    let member = heartbeat_through(https(&addr)?.tls_config(tls("job-ca.pem", Some(("job.pem", "job.key")))?)?).await?;
    assert_eq!(member, tonic::Code::PermissionDenied, "the job's own certificate did not reach the service");
    // The worker's peer endpoint: plain refused, the job's certificate answered.
    let channel = Endpoint::from_shared(format!("http://{peer}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let ping = wire::PingRequest { from_rank: 1, sequence: 0, payload: vec![] };
    let plain_ping = match channel.connect().await {
        Ok(ch) => wire::worker_client::WorkerClient::new(ch).ping(ping.clone()).await.err().map(|s| s.code()),
        Err(_) => Some(tonic::Code::Unavailable),
    };
    assert!(plain_ping.is_some_and(refused), "the peer endpoint answered a plain connection: {plain_ping:?}");
    let ch = https(&peer)?.tls_config(tls("job-ca.pem", Some(("job.pem", "job.key")))?)?.connect().await?;
    let answer = wire::worker_client::WorkerClient::new(ch).ping(ping).await;
    assert!(answer.is_ok(), "the peer endpoint refused the job's certificate: {answer:?}");

    // SAFETY: plain syscall on our child.
    unsafe { libc::kill(child.id().context("pid")? as i32, libc::SIGINT) };
    let mut rest = String::new();
    tokio::time::timeout(GENEROUS, async {
        while let Some(line) = lines.next_line().await? {
            rest.push_str(&line);
            rest.push('\n');
        }
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            stdout.read_to_string(&mut out).await?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await??;
    child.wait().await?;
    Ok(())
}

/// Runs `binary` with `args`; asserts it exits 2 (bad usage) and returns its stderr.
fn usage_error(binary: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = std::process::Command::new(binaries_dir()?.join(binary)).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.code() == Some(2), "{binary} exited with {:?}:\n{text}", out.status.code());
    Ok(text)
}

/// A half-given TLS setting is a usage error naming what is missing, for both binaries.
#[test]
fn incomplete_tls_settings_are_refused_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("job.toml");
    let dev = ["dev".as_ref(), "--config".as_ref(), config.as_os_str()];
    std::fs::write(&config, "[tls]\ncert = \"x.pem\"\n")?;
    let text = usage_error("simclr-coordinator", &dev)?;
    assert!(text.contains("tls.ca"), "{text}");
    let worker = ["--coordinator", "127.0.0.1:1", "--tls-cert", "x.pem"].map(std::ffi::OsStr::new);
    let text = usage_error("simclr-worker", &worker)?;
    assert!(text.contains("--tls-ca"), "{text}");
    std::fs::write(&config, "[cluster]\ncollective = \"tcp\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")?;
    let text = usage_error("simclr-coordinator", &dev)?;
    assert!(text.contains("TCP ring has no TLS"), "{text}");
    Ok(())
}
