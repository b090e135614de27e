//! The Kubernetes manifests (`deploy/k8s`): every overlay renders with kustomize (kubectl's own) and
//! validates strictly against the Kubernetes schemas (`kubernetes-validate --strict`); and the pod
//! contract: the coordinator and worker containers of the CPU overlay, started here with exactly the
//! commands, arguments, environment and mounts the rendered manifests give them, form a cluster and run
//! the job to completion.
//!
//! What the test stands in for, as Kubernetes would: each pod gets its own loopback address (its pod IP;
//! `0.0.0.0` in a listen address means that address, as in a pod's network namespace); the Service's
//! name resolves to the coordinator pod's address and its port to the container port it targets; a
//! mount path maps to a directory (ConfigMap volumes hold the ConfigMap's keys as files, a claim is one
//! directory shared by every pod, an emptyDir is the pod's own); `$(VAR)` in arguments expands from the
//! container's environment; `JOB_COMPLETION_INDEX` is set on each pod of the Indexed Job; the Secret
//! `simclr-cluster-token` holds a fresh token, as the command in docs/kubernetes.md makes it.
//!
//! The tools (`kubectl`, `kubernetes-validate`, and PyYAML to read the rendered YAML) come from the
//! project's `.venv` (`scripts/setup.sh --k8s`); without them the tests skip, unless
//! `SIMCLR_EXPECT_TOOLS=1` (scripts/test.sh sets it), which makes their absence a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use simclr_tests::{binaries_dir, exit_code, http_get};
use tokio::process::{Child, Command};

const OVERLAYS: &[&str] = &["cpu", "gpu"];
/// The Secret every pod reads the cluster token from (created by the user, never committed).
const TOKEN_SECRET: &str = "simclr-cluster-token";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `.venv/bin/<name>`, or `None` (a skip) where it is missing and not expected.
fn tool(name: &str) -> Result<Option<PathBuf>> {
    let path = repo().join(".venv/bin").join(name);
    if path.is_file() {
        return Ok(Some(path));
    }
    if simclr_tests::tools_expected() {
        bail!("SIMCLR_EXPECT_TOOLS=1 but {} is missing (scripts/setup.sh --k8s installs it)", path.display());
    }
    eprintln!("skipped: {} missing (scripts/setup.sh --k8s)", path.display());
    Ok(None)
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<(bool, String, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", program.display()))?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.unwrap_or_default().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into()))
}

/// The overlay as `kubectl kustomize` renders it (YAML).
fn render(kubectl: &Path, overlay: &str) -> Result<String> {
    let dir = repo().join("deploy/k8s/overlays").join(overlay);
    let (ok, yaml, err) = run(kubectl, &["kustomize", &dir.to_string_lossy()], None)?;
    ensure!(ok, "kubectl kustomize {}: {err}", dir.display());
    Ok(yaml)
}

/// The rendered documents as JSON, read by PyYAML (kubernetes-validate's own YAML reader).
fn documents(python: &Path, yaml: &str) -> Result<Vec<Value>> {
    let script = "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))";
    let (ok, json, err) = run(python, &["-c", script], Some(yaml))?;
    ensure!(ok, "reading the rendered YAML: {err}");
    Ok(serde_json::from_str(&json)?)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} named {name} in the rendered manifests"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str().with_context(|| format!("{what} is not a string: {v}"))
}

/// The one container of a pod template, and the pod spec around it.
fn container<'a>(workload: &'a Value, name: &str) -> Result<(&'a Value, &'a Value)> {
    let spec = &workload["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no container {name}"))?;
    Ok((spec, c))
}

/// The world size an overlay sets, checked to be the same in the three places that say it.
fn world_size(docs: &[Value]) -> Result<u32> {
    let workers = find(docs, "Job", "simclr-workers")?;
    let completions = workers["spec"]["completions"].as_u64().context("Job without completions")?;
    let parallelism = workers["spec"]["parallelism"].as_u64().context("Job without parallelism")?;
    let (_, worker) = container(workers, "worker")?;
    let launch_ref = worker["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "SIMCLR_WORLD_SIZE"))
        .map(|e| &e["valueFrom"]["configMapKeyRef"])
        .context("workers without SIMCLR_WORLD_SIZE from a ConfigMap")?;
    let launch = find(docs, "ConfigMap", str_of(&launch_ref["name"], "configMapKeyRef.name")?)?;
    let declared: u64 = str_of(&launch["data"][str_of(&launch_ref["key"], "key")?], "world size")?.parse()?;
    ensure!(workers["spec"]["completionMode"] == "Indexed", "the workers Job is not Indexed");
    ensure!(
        completions == parallelism && parallelism == declared,
        "completions {completions}, parallelism {parallelism} and world size {declared} disagree"
    );
    Ok(declared as u32)
}

#[test]
fn every_overlay_renders_and_validates_strictly_against_the_kubernetes_schemas() -> Result<()> {
    let (Some(kubectl), Some(validate), Some(python)) =
        (tool("kubectl")?, tool("kubernetes-validate")?, tool("python")?)
    else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    for overlay in OVERLAYS {
        let yaml = render(&kubectl, overlay)?;
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &yaml)?;
        let (ok, out, err) = run(&validate, &["--strict", "--quiet", &file.to_string_lossy()], None)?;
        assert!(ok, "{overlay}: kubernetes-validate --strict failed:\n{out}{err}");
        let docs = documents(&python, &yaml)?;
        let kinds: Vec<_> = docs.iter().map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"])).collect();
        for (kind, name) in [
            ("Deployment", "simclr-coordinator"),
            ("Service", "simclr-coordinator"),
            ("Job", "simclr-workers"),
            ("PersistentVolumeClaim", "simclr-data"),
            ("PersistentVolumeClaim", "simclr-runs"),
        ] {
            find(&docs, kind, name).with_context(|| format!("{overlay}: {kinds:?}"))?;
        }
        let world = world_size(&docs).with_context(|| overlay.to_string())?;
        // Every ConfigMap and Secret a container reads exists (rendered) or is the token Secret.
        let text = serde_json::to_string(&docs)?;
        for workload in [find(&docs, "Deployment", "simclr-coordinator")?, find(&docs, "Job", "simclr-workers")?] {
            let spec = &workload["spec"]["template"]["spec"];
            for c in spec["containers"].as_array().into_iter().flatten() {
                for e in c["env"].as_array().into_iter().flatten() {
                    if let Some(name) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                        find(&docs, "ConfigMap", name)?;
                    }
                    if let Some(name) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                        assert_eq!(name, TOKEN_SECRET, "{overlay}");
                    }
                }
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert!(c[probe]["grpc"]["port"].is_u64(), "{overlay}: {} has no gRPC {probe}", c["name"]);
                }
            }
        }
        let (_, worker) = container(find(&docs, "Job", "simclr-workers")?, "worker")?;
        let gpus = &worker["resources"]["limits"]["nvidia.com/gpu"];
        match *overlay {
            "gpu" => assert!(gpus == 1 && world == 4, "gpu overlay: {gpus} GPUs per worker, world size {world}"),
            _ => assert!(gpus.is_null() && !text.contains("nvidia.com/gpu"), "cpu overlay asks for GPUs"),
        }
    }
    // The validation can fail: an unknown field in the workers Job is refused.
    let yaml = std::fs::read_to_string(dir.path().join("cpu.yaml"))?;
    let broken = yaml.replacen("completionMode: Indexed", "completionMode: Indexed\n  completionz: 2", 1);
    assert_ne!(broken, yaml);
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, broken)?;
    let (ok, out, err) = run(&validate, &["--strict", "--quiet", &file.to_string_lossy()], None)?;
    assert!(!ok && format!("{out}{err}").contains("completionz"), "{out}{err}");
    Ok(())
}

/// A pod as this test runs it: its address, its directories, its process.
struct Pod {
    name: String,
    child: Child,
    log: PathBuf,
    ip: String,
    health_port: u16,
}

struct Cluster<'a> {
    docs: &'a [Value],
    root: PathBuf,
    token: String,
    coordinator_ip: String,
}

impl Cluster<'_> {
    /// `name: value` of a container's environment, resolved as the kubelet does.
    fn env(&self, c: &Value, ip: &str, extra: &[(&str, String)]) -> Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = str_of(&e["name"], "env name")?.to_string();
            let from = &e["valueFrom"];
            let value = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if from["configMapKeyRef"].is_object() {
                let r = &from["configMapKeyRef"];
                let map = find(self.docs, "ConfigMap", str_of(&r["name"], "configMapKeyRef.name")?)?;
                str_of(&map["data"][str_of(&r["key"], "key")?], "ConfigMap value")?.to_string()
            } else if from["secretKeyRef"].is_object() {
                ensure!(from["secretKeyRef"]["name"] == TOKEN_SECRET && from["secretKeyRef"]["key"] == "token");
                self.token.clone()
            } else if from["fieldRef"]["fieldPath"] == "status.podIP" {
                ip.to_string()
            } else {
                bail!("env {name}: a source this test does not stand in for: {e}");
            };
            env.push((name, value));
        }
        Ok(env)
    }

    /// The pod's mounts: mount path -> directory here.
    fn mounts(&self, pod: &str, spec: &Value, c: &Value) -> Result<Vec<(String, PathBuf)>> {
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = str_of(&m["name"], "volumeMount name")?;
            let volume = spec["volumes"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["name"] == name))
                .with_context(|| format!("{pod}: volume {name} is mounted but not declared"))?;
            let dir = if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                find(self.docs, "PersistentVolumeClaim", claim)?;
                self.root.join("claims").join(claim)
            } else if let Some(map) = volume["configMap"]["name"].as_str() {
                let dir = self.root.join(pod).join(name);
                std::fs::create_dir_all(&dir)?;
                for (key, value) in find(self.docs, "ConfigMap", map)?["data"].as_object().into_iter().flatten() {
                    std::fs::write(dir.join(key), str_of(value, key)?)?;
                }
                dir
            } else if volume["emptyDir"].is_object() {
                self.root.join(pod).join(name)
            } else {
                bail!("{pod}: volume {name} of a kind this test does not stand in for: {volume}");
            };
            std::fs::create_dir_all(&dir)?;
            mounts.push((str_of(&m["mountPath"], "mountPath")?.to_string(), dir));
        }
        // Longest mount path first, so /runs/cache would win over /runs.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Ok(mounts)
    }

    /// The Service `host:port` a pod dials, resolved as cluster DNS and kube-proxy would: the
    /// coordinator pod's address and the container port the Service targets.
    fn resolve_service(&self, value: &str) -> Result<String> {
        let Some((host, port)) = value.rsplit_once(':') else { return Ok(value.to_string()) };
        let Ok(service) = find(self.docs, "Service", host) else { return Ok(value.to_string()) };
        let port: u64 = port.parse()?;
        let entry = service["spec"]["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["port"] == port))
            .with_context(|| format!("Service {host} has no port {port}"))?;
        let target = match &entry["targetPort"] {
            Value::Number(n) => n.as_u64().context("targetPort")?,
            Value::String(named) => {
                let (_, c) = container(find(self.docs, "Deployment", host)?, "coordinator")?;
                c["ports"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| &p["name"] == named))
                    .and_then(|p| p["containerPort"].as_u64())
                    .with_context(|| {
                        format!("Service {host} targets port {named}, which the coordinator does not name")
                    })?
            }
            _ => port,
        };
        Ok(format!("{}:{target}", self.coordinator_ip))
    }

    /// Starts a container of `workload` as pod `pod` at address `ip`.
    fn start(&self, pod: &str, workload: &Value, name: &str, ip: &str, extra: &[(&str, String)]) -> Result<Pod> {
        let (spec, c) = container(workload, name)?;
        let mounts = self.mounts(pod, spec, c)?;
        let to_host = |value: &str| -> String {
            for (path, dir) in &mounts {
                if value == path || value.starts_with(&format!("{path}/")) {
                    return format!("{}{}", dir.display(), &value[path.len()..]);
                }
            }
            value.replace("0.0.0.0:", &format!("{ip}:"))
        };
        let mut env = self.env(c, ip, extra)?;
        for (name, value) in &mut env {
            *value = if name == "SIMCLR_COORDINATOR" { self.resolve_service(value)? } else { to_host(value) };
        }
        let command: Vec<&str> =
            c["command"].as_array().context("no command")?.iter().filter_map(Value::as_str).collect();
        ensure!(command.len() == 1, "{pod}: command {command:?}");
        ensure!(["simclr-coordinator", "simclr-worker"].contains(&command[0]), "{pod}: runs {}", command[0]);
        let args: Vec<String> = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|a| {
                let a = expand(a, &env);
                match a.split_once('=') {
                    Some((flag, value)) if flag.starts_with("--") => format!("{flag}={}", to_host(value)),
                    _ => to_host(&a),
                }
            })
            .collect();
        let health_port =
            c["readinessProbe"]["grpc"]["port"].as_u64().with_context(|| format!("{pod}: no gRPC readiness probe"))?;
        let log = self.root.join(format!("{pod}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(binaries_dir()?.join(command[0]))
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {pod}"))?;
        Ok(Pod { name: pod.to_string(), child, log, ip: ip.to_string(), health_port: health_port as u16 })
    }
}

/// `$(VAR)` references expanded from the variables defined so far (undefined ones stay as written).
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (name, v) in env {
        out = out.replace(&format!("$({name})"), v);
    }
    out
}

/// Waits until the pod's gRPC health service (the port of its readiness probe) answers SERVING.
async fn wait_ready(pod: &mut Pod, timeout: Duration) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let deadline = Instant::now() + timeout;
    let url = format!("http://{}:{}", pod.ip, pod.health_port);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.clone())?.connect().await {
            let reply = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
            if reply.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = pod.child.try_wait() {
            bail!("{} exited ({status}) before it was ready:\n{}", pod.name, read(&pod.log));
        }
        ensure!(Instant::now() < deadline, "{} not ready within {timeout:?}:\n{}", pod.name, read(&pod.log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn a_cluster_forms_from_nothing_but_what_the_cpu_manifests_say() -> Result<()> {
    let (Some(kubectl), Some(python)) = (tool("kubectl")?, tool("python")?) else {
        return Ok(());
    };
    let docs = documents(&python, &render(&kubectl, "cpu")?)?;
    let world = world_size(&docs)?;
    let dir = tempfile::tempdir()?;
    // A fresh token, as `kubectl create secret generic simclr-cluster-token --from-literal=token=...`.
    let token: String = (0..32).map(|i| format!("{:02x}", (std::process::id() as usize * 31 + i * 97) % 251)).collect();
    let cluster = Cluster { docs: &docs, root: dir.path().to_path_buf(), token, coordinator_ip: "127.0.0.10".into() };

    let deployment = find(&docs, "Deployment", "simclr-coordinator")?;
    let mut coordinator = cluster.start("coordinator", deployment, "coordinator", &cluster.coordinator_ip, &[])?;
    let job = find(&docs, "Job", "simclr-workers")?;
    let mut workers = Vec::new();
    for index in 0..world {
        let ip = format!("127.0.0.{}", 20 + index);
        let extra = [("JOB_COMPLETION_INDEX", index.to_string())];
        workers.push(cluster.start(&format!("simclr-workers-{index}"), job, "worker", &ip, &extra)?);
    }
    wait_ready(&mut coordinator, Duration::from_secs(60)).await?;
    for pod in &mut workers {
        wait_ready(pod, Duration::from_secs(60)).await?;
    }
    // The Job completes: every pod exits 0.
    for pod in &mut workers {
        let status = tokio::time::timeout(Duration::from_secs(240), pod.child.wait()).await.with_context(|| {
            format!("{} still running:\n{}\ncoordinator:\n{}", pod.name, read(&pod.log), read(&coordinator.log))
        })??;
        assert_eq!(exit_code(status), 0, "{}:\n{}\ncoordinator:\n{}", pod.name, read(&pod.log), read(&coordinator.log));
        // SIMCLR_LOG_FORMAT=json: one JSON object per line.
        for line in read(&pod.log).lines().filter(|l| !l.trim().is_empty()) {
            serde_json::from_str::<Value>(line).with_context(|| format!("{}: not JSON: {line}", pod.name))?;
        }
    }
    // The coordinator lingers (--linger), healthy, until told to stop; then exits with the job's status.
    assert!(coordinator.child.try_wait()?.is_none(), "the coordinator exited:\n{}", read(&coordinator.log));
    wait_ready(&mut coordinator, Duration::from_secs(5)).await?;
    let log = read(&coordinator.log);
    assert!(log.contains(&format!("all {world} ranks finished")), "{log}");
    // Its metrics, on the port the manifest names "metrics": every worker has left, none was lost.
    let (_, c) = container(deployment, "coordinator")?;
    let port = c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "metrics"))
        .and_then(|p| p["containerPort"].as_u64())
        .context("the coordinator names no metrics port")?;
    let (head, metrics) = http_get(&format!("{}:{port}", cluster.coordinator_ip), "/metrics").await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for line in [format!("simclr_workers{{state=\"left\"}} {world}"), "simclr_workers{state=\"lost\"} 0".into()] {
        assert!(metrics.lines().any(|l| l == line), "no '{line}' in:\n{metrics}");
    }
    let run_dir = dir.path().join("claims/simclr-runs/simclr");
    for file in ["summary.json", "results.csv", "results.md", "encoder.safetensors", "cluster.json"] {
        assert!(run_dir.join(file).is_file(), "{file} missing from the runs claim:\n{log}");
    }
    // Peers dialled each other at the pod addresses the manifests advertise.
    let cluster_json = read(&run_dir.join("cluster.json"));
    for index in 0..world {
        assert!(cluster_json.contains(&format!("127.0.0.{}:50061", 20 + index)), "{cluster_json}");
    }
    let pid = coordinator.child.id().context("coordinator pid")?;
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(20), coordinator.child.wait()).await??;
    assert_eq!(exit_code(status), 0, "{}", read(&coordinator.log));
    Ok(())
}
