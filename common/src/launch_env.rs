//! Where a worker learns its place in the job when a launcher started it: rank, world size, local rank
//! and the coordinator's address, from (in this order) explicit flags, the torchrun variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), SLURM (`SLURM_PROCID`, `SLURM_LOCALID`,
//! `SLURM_NTASKS`, the first host of `SLURM_JOB_NODELIST`, a port derived from `SLURM_JOB_ID`) and a
//! Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, with the coordinator's Service address in
//! `SIMCLR_COORDINATOR`). One worker binary serves every launcher.
//!
//! A value the first source gives wins; a later source that gives a different value for the same
//! thing is an error naming both (a worker told two different ranks must not guess).

use std::fmt;

/// The coordinator's port when a launcher names only its host (torchrun without `MASTER_PORT`).
pub const DEFAULT_COORDINATOR_PORT: u16 = 50051;
/// Base of the coordinator port derived from `SLURM_JOB_ID`: 20000 + job id mod 20000, so two jobs
/// sharing a first node rarely collide and every task of one job computes the same port.
pub const SLURM_PORT_BASE: u16 = 20000;

/// Every variable `discover` reads. A launcher that starts workers itself (dev mode) removes them from
/// the workers' environment, so that a dev-mode job inside a SLURM step or a torchrun process does not
/// read its own launcher's placement.
pub const LAUNCHER_VARIABLES: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
    "JOB_COMPLETION_INDEX",
    "SIMCLR_WORLD_SIZE",
];

/// What the launcher said, each value with the source it came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub rank: Option<Sourced<u32>>,
    pub world_size: Option<Sourced<u32>>,
    pub local_rank: Option<Sourced<u32>>,
    pub coordinator: Option<Sourced<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    /// e.g. "--rank", "RANK", "SLURM_PROCID".
    pub source: String,
}

impl<T> Sourced<T> {
    pub fn new(value: T, source: impl Into<String>) -> Sourced<T> {
        Sourced { value, source: source.into() }
    }
}

impl Placement {
    pub fn rank(&self) -> Option<u32> {
        self.rank.as_ref().map(|s| s.value)
    }
    pub fn world_size(&self) -> Option<u32> {
        self.world_size.as_ref().map(|s| s.value)
    }
    pub fn local_rank(&self) -> Option<u32> {
        self.local_rank.as_ref().map(|s| s.value)
    }
    pub fn coordinator(&self) -> Option<&str> {
        self.coordinator.as_ref().map(|s| s.value.as_str())
    }

    /// The device a worker uses when none is given: the CPU without CUDA; `cuda:<local rank>` when the
    /// process sees several GPUs (one process per GPU on a node that shows it all of them). A launcher
    /// that binds GPUs to tasks (`srun --gpus-per-task`, a pod's `nvidia.com/gpu: 1`) leaves each
    /// process fewer devices than local ranks, numbered from 0: then `cuda:<local rank mod visible>`.
    pub fn default_device(&self, cuda_devices: usize) -> String {
        match (cuda_devices, self.local_rank()) {
            (0, _) => "cpu".into(),
            (n, Some(local)) => format!("cuda:{}", local as usize % n),
            (_, None) => "cuda:0".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum LaunchError {
    /// Two sources disagree.
    Conflict { what: &'static str, first: String, second: String },
    /// A variable is set but unusable.
    Invalid { variable: String, value: String, reason: String },
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::Conflict { what, first, second } => {
                write!(f, "conflicting {what}: {first} but {second}; unset one of them")
            }
            LaunchError::Invalid { variable, value, reason } => write!(f, "{variable}={value:?}: {reason}"),
        }
    }
}

impl std::error::Error for LaunchError {}

/// Reads the placement from `flags` (already parsed) and the environment `env`.
pub fn discover(flags: &Placement, env: &dyn Fn(&str) -> Option<String>) -> Result<Placement, LaunchError> {
    let mut placement = flags.clone();
    for source in [torchrun(env)?, slurm(env)?, kubernetes(env)?] {
        merge(&mut placement, source)?;
    }
    if let (Some(rank), Some(world)) = (&placement.rank, &placement.world_size) {
        if rank.value >= world.value {
            return Err(LaunchError::Conflict {
                what: "rank and world size",
                first: format!("rank {} (from {})", rank.value, rank.source),
                second: format!("world size {} (from {})", world.value, world.source),
            });
        }
    }
    Ok(placement)
}

/// The process environment, for `discover`.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn merge(into: &mut Placement, from: Placement) -> Result<(), LaunchError> {
    fn one<T: PartialEq + fmt::Display + Clone>(
        what: &'static str,
        into: &mut Option<Sourced<T>>,
        from: Option<Sourced<T>>,
    ) -> Result<(), LaunchError> {
        match (into.as_ref(), from) {
            (_, None) => Ok(()),
            (None, Some(v)) => {
                *into = Some(v);
                Ok(())
            }
            (Some(a), Some(b)) if a.value == b.value => Ok(()),
            (Some(a), Some(b)) => Err(LaunchError::Conflict {
                what,
                first: format!("{} says {}", a.source, a.value),
                second: format!("{} says {}", b.source, b.value),
            }),
        }
    }
    one("ranks", &mut into.rank, from.rank)?;
    one("world sizes", &mut into.world_size, from.world_size)?;
    one("local ranks", &mut into.local_rank, from.local_rank)?;
    one("coordinator addresses", &mut into.coordinator, from.coordinator)
}

fn number(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<Sourced<u32>>, LaunchError> {
    match env(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<u32>().map(|n| Some(Sourced::new(n, name))).map_err(|_| LaunchError::Invalid {
            variable: name.into(),
            value: v,
            reason: "expected a non-negative integer".into(),
        }),
    }
}

fn torchrun(env: &dyn Fn(&str) -> Option<String>) -> Result<Placement, LaunchError> {
    let coordinator = match (env("MASTER_ADDR"), env("MASTER_PORT")) {
        (Some(host), port) => {
            let port = match port {
                None => DEFAULT_COORDINATOR_PORT,
                Some(p) => p.trim().parse().map_err(|_| LaunchError::Invalid {
                    variable: "MASTER_PORT".into(),
                    value: p,
                    reason: "expected a port number".into(),
                })?,
            };
            Some(Sourced::new(host_port(&host, port), "MASTER_ADDR/MASTER_PORT"))
        }
        (None, _) => None,
    };
    Ok(Placement {
        rank: number(env, "RANK")?,
        world_size: number(env, "WORLD_SIZE")?,
        local_rank: number(env, "LOCAL_RANK")?,
        coordinator,
    })
}

fn slurm(env: &dyn Fn(&str) -> Option<String>) -> Result<Placement, LaunchError> {
    let coordinator = match (env("SLURM_JOB_NODELIST"), env("SLURM_JOB_ID")) {
        (Some(list), Some(job)) => {
            let hosts = expand_nodelist(&list).map_err(|reason| LaunchError::Invalid {
                variable: "SLURM_JOB_NODELIST".into(),
                value: list.clone(),
                reason,
            })?;
            let job = slurm_job_id(&job)?;
            let first = hosts.into_iter().next().ok_or_else(|| LaunchError::Invalid {
                variable: "SLURM_JOB_NODELIST".into(),
                value: list,
                reason: "names no host".into(),
            })?;
            Some(Sourced::new(host_port(&first, slurm_port(job)), "SLURM_JOB_NODELIST/SLURM_JOB_ID"))
        }
        _ => None,
    };
    Ok(Placement {
        rank: number(env, "SLURM_PROCID")?,
        world_size: number(env, "SLURM_NTASKS")?,
        local_rank: number(env, "SLURM_LOCALID")?,
        coordinator,
    })
}

/// The coordinator port of SLURM job `job_id` (the sbatch script starts the coordinator on it).
pub fn slurm_port(job_id: u64) -> u16 {
    SLURM_PORT_BASE + (job_id % 20000) as u16
}

/// Where the coordinator listens when `--listen` is not given: inside a SLURM job (overriding
/// `cluster.listen`), every interface on the port its workers derive from `SLURM_JOB_ID`, so the
/// sbatch script passes no port; `None` elsewhere. An unparsable job id is an error naming the variable.
pub fn coordinator_listen(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Sourced<String>>, LaunchError> {
    let Some(job) = env("SLURM_JOB_ID") else { return Ok(None) };
    Ok(Some(Sourced::new(format!("0.0.0.0:{}", slurm_port(slurm_job_id(&job)?)), "SLURM_JOB_ID")))
}

fn slurm_job_id(value: &str) -> Result<u64, LaunchError> {
    value.trim().parse().map_err(|_| LaunchError::Invalid {
        variable: "SLURM_JOB_ID".into(),
        value: value.to_string(),
        reason: "expected a job number".into(),
    })
}

fn kubernetes(env: &dyn Fn(&str) -> Option<String>) -> Result<Placement, LaunchError> {
    let rank = number(env, "JOB_COMPLETION_INDEX")?;
    // An Indexed Job's pods learn the world size and the Service from the manifest's environment.
    let world_size = if rank.is_some() { number(env, "SIMCLR_WORLD_SIZE")? } else { None };
    let local_rank = rank.as_ref().map(|_| Sourced::new(0, "a Kubernetes pod (one GPU each)"));
    Ok(Placement { rank, world_size, local_rank, coordinator: None })
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Expands a SLURM host list: `gpu[01-03,07],login1` -> gpu01, gpu02, gpu03, gpu07, login1 (zero
/// padding kept; several bracket groups in one name multiply out).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for name in split_top_level(list)? {
        hosts.extend(expand_name(&name)?);
    }
    Ok(hosts)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<String>, String> {
    let (mut parts, mut current, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in list.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced or nested brackets".into());
        }
        if c == ',' && depth == 0 {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    if depth != 0 {
        return Err("unclosed bracket".into());
    }
    parts.push(current);
    let parts: Vec<String> = parts.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err("empty host list".into());
    }
    Ok(parts)
}

fn expand_name(name: &str) -> Result<Vec<String>, String> {
    let Some(open) = name.find('[') else { return Ok(vec![name.to_string()]) };
    let close = name[open..].find(']').map(|i| open + i).ok_or("unclosed bracket")?;
    let (prefix, ranges, rest) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
    let mut out = Vec::new();
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let (a, b): (u64, u64) = match (lo.trim().parse(), hi.trim().parse()) {
            (Ok(a), Ok(b)) if a <= b => (a, b),
            _ => return Err(format!("bad range '{range}' in '{name}'")),
        };
        if b - a > 100_000 {
            return Err(format!("range '{range}' in '{name}' is implausibly large"));
        }
        let width = lo.trim().len();
        for n in a..=b {
            for tail in expand_name(rest)? {
                out.push(format!("{prefix}{n:0width$}{tail}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn bracket_ranges_expand_with_their_padding() {
        assert_eq!(expand_nodelist("gpu[01-03,07]").unwrap(), ["gpu01", "gpu02", "gpu03", "gpu07"]);
        assert_eq!(expand_nodelist("node7").unwrap(), ["node7"]);
        assert_eq!(expand_nodelist("a[1-2],b3,c[9]").unwrap(), ["a1", "a2", "b3", "c9"]);
        assert_eq!(expand_nodelist("r[1-2]-n[08-09]").unwrap(), ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]);
        assert_eq!(expand_nodelist("gpu[9-11]").unwrap(), ["gpu9", "gpu10", "gpu11"]);
        for bad in ["gpu[01-", "gpu[3-1]", "gpu[a-b]", "", "x[[1]]", "gpu]1["] {
            assert!(expand_nodelist(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn flags_come_first_and_missing_sources_leave_gaps() {
        let flags = Placement { rank: Some(Sourced::new(2, "--rank")), ..Placement::default() };
        let p = discover(&flags, &env(&[("WORLD_SIZE", "4")])).unwrap();
        assert_eq!((p.rank(), p.world_size(), p.local_rank(), p.coordinator()), (Some(2), Some(4), None, None));
        assert_eq!(discover(&Placement::default(), &env(&[])).unwrap(), Placement::default());
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.5"),
            ("MASTER_PORT", "29500"),
        ]);
        let p = discover(&Placement::default(), &e).unwrap();
        assert_eq!((p.rank(), p.world_size(), p.local_rank()), (Some(3), Some(8), Some(1)));
        assert_eq!(p.coordinator(), Some("10.0.0.5:29500"));
        assert_eq!(p.default_device(2), "cuda:1");
        assert_eq!(p.default_device(0), "cpu");
        let p = discover(&Placement::default(), &env(&[("MASTER_ADDR", "fd00::1")])).unwrap();
        assert_eq!(p.coordinator(), Some("[fd00::1]:50051"));
        let e = discover(&Placement::default(), &env(&[("RANK", "one")])).unwrap_err().to_string();
        assert!(e.contains("RANK") && e.contains("one"), "{e}");
    }

    #[test]
    fn slurm_variables() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[01-03,07]"),
            ("SLURM_JOB_ID", "123456"),
        ]);
        let p = discover(&Placement::default(), &e).unwrap();
        assert_eq!((p.rank(), p.world_size(), p.local_rank()), (Some(5), Some(8), Some(1)));
        assert_eq!(p.coordinator(), Some(format!("gpu01:{}", 20000 + 123456 % 20000).as_str()));
        assert_eq!(slurm_port(123456), 23456);
        // The coordinator inside the same job listens on that port.
        assert_eq!(coordinator_listen(&e).unwrap().unwrap().value, "0.0.0.0:23456");
        assert_eq!(coordinator_listen(&env(&[])).unwrap(), None);
        let err = coordinator_listen(&env(&[("SLURM_JOB_ID", "12a")])).unwrap_err().to_string();
        assert!(err.contains("SLURM_JOB_ID") && err.contains("12a"), "{err}");
    }

    #[test]
    fn kubernetes_indexed_job() {
        let e = env(&[("JOB_COMPLETION_INDEX", "2"), ("SIMCLR_WORLD_SIZE", "4")]);
        let p = discover(&Placement::default(), &e).unwrap();
        assert_eq!((p.rank(), p.world_size(), p.local_rank()), (Some(2), Some(4), Some(0)));
        assert_eq!(p.default_device(1), "cuda:0");
    }

    #[test]
    fn a_task_bound_to_its_own_gpu_uses_cuda_0() {
        // srun --gpus-per-task=1: local rank 3 sees one device, its own.
        let p = Placement { local_rank: Some(Sourced::new(3, "SLURM_LOCALID")), ..Placement::default() };
        assert_eq!(p.default_device(1), "cuda:0");
        assert_eq!(p.default_device(4), "cuda:3");
        assert_eq!(p.default_device(2), "cuda:1");
        assert_eq!(Placement::default().default_device(8), "cuda:0");
    }

    #[test]
    fn conflicting_sources_are_an_error_naming_both() {
        let e = env(&[("RANK", "1"), ("SLURM_PROCID", "2")]);
        let err = discover(&Placement::default(), &e).unwrap_err().to_string();
        assert!(err.contains("RANK says 1") && err.contains("SLURM_PROCID says 2"), "{err}");
        let flags = Placement { rank: Some(Sourced::new(0, "--rank")), ..Placement::default() };
        let err = discover(&flags, &env(&[("JOB_COMPLETION_INDEX", "3")])).unwrap_err().to_string();
        assert!(err.contains("--rank says 0") && err.contains("JOB_COMPLETION_INDEX says 3"), "{err}");
        // Agreeing sources are fine.
        assert!(discover(&Placement::default(), &env(&[("RANK", "2"), ("SLURM_PROCID", "2")])).is_ok());
        let err = discover(&Placement::default(), &env(&[("RANK", "4"), ("WORLD_SIZE", "4")])).unwrap_err().to_string();
        assert!(err.contains("rank 4 (from RANK)") && err.contains("world size 4 (from WORLD_SIZE)"), "{err}");
    }
}
