//! Pure-Rust pieces that both binaries share: the job config and its validation, the domain types of
//! cluster membership, exit codes, logging set-up and retry with backoff. Must never depend on libtorch:
//! the coordinator links it.

pub mod atomic_file;
pub mod config;
pub mod crc32c;
pub mod exit;
pub mod launch_env;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod pretrain;
pub mod probe;
pub mod retry;

pub use config::{ConfigError, JobConfig};
pub use exit::ExitStatus;
pub use membership::{PeerTable, StopNotice, StopReason, WorkerIdentity};

/// The phases every worker runs after rendezvous, in order; the coordinator advances through them once
/// every rank has finished the current one.
pub const PHASES: &[&str] = &["preflight", "decode", "pretrain", "probe"];

/// Version of this build, sent at registration so that mixed deployments are caught at rendezvous.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Environment variable holding the cluster token; when set, every call between the processes of a job
/// must carry it.
pub const TOKEN_ENV: &str = "SIMCLR_CLUSTER_TOKEN";
/// Environment variable naming a file that holds the cluster token (a mounted Secret, a file readable
/// only by the job's user); the alternative to `SIMCLR_CLUSTER_TOKEN`. Never a command-line flag: a
/// flag's value is visible to every user of the host in the process list.
pub const TOKEN_FILE_ENV: &str = "SIMCLR_CLUSTER_TOKEN_FILE";

/// The cluster token from `SIMCLR_CLUSTER_TOKEN` or the file `SIMCLR_CLUSTER_TOKEN_FILE` names
/// (surrounding white space trimmed); `None` when neither is set. Both set, an unreadable or empty
/// file, or a token that is not printable ASCII (gRPC metadata) are errors naming the variable.
pub fn cluster_token(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>, String> {
    let direct = env(TOKEN_ENV).filter(|t| !t.is_empty());
    let file = env(TOKEN_FILE_ENV).filter(|f| !f.is_empty());
    let token = match (direct, file) {
        (Some(_), Some(_)) => return Err(format!("both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set; set one")),
        (Some(token), None) => token.trim().to_string(),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read the cluster token from {path} ({TOKEN_FILE_ENV}): {e}"))?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(format!("the cluster token file {path} ({TOKEN_FILE_ENV}) is empty"));
            }
            token
        }
        (None, None) => return Ok(None),
    };
    if !token.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("the cluster token ({TOKEN_ENV} or {TOKEN_FILE_ENV}) must be printable ASCII"));
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_cluster_token_comes_from_the_variable_or_a_file() {
        assert_eq!(cluster_token(&env(&[])).unwrap(), None);
        assert_eq!(cluster_token(&env(&[(TOKEN_ENV, "abc")])).unwrap().as_deref(), Some("abc"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(cluster_token(&env(&[(TOKEN_FILE_ENV, path)])).unwrap().as_deref(), Some("s3cret"));
        let both = cluster_token(&env(&[(TOKEN_ENV, "a"), (TOKEN_FILE_ENV, path)])).unwrap_err();
        assert!(both.contains(TOKEN_ENV) && both.contains(TOKEN_FILE_ENV), "{both}");
        std::fs::write(&file, "  \n").unwrap();
        assert!(cluster_token(&env(&[(TOKEN_FILE_ENV, path)])).unwrap_err().contains("empty"));
        let missing = dir.path().join("nope");
        let err = cluster_token(&env(&[(TOKEN_FILE_ENV, missing.to_str().unwrap())])).unwrap_err();
        assert!(err.contains("nope") && err.contains(TOKEN_FILE_ENV), "{err}");
        assert!(cluster_token(&env(&[(TOKEN_ENV, "tab\there")])).unwrap_err().contains("printable"));
    }
}
