//! Logging set-up shared by both binaries: tracing-subscriber with an env filter (`RUST_LOG`, default
//! `info`) writing to stderr, as text or as one JSON object per line. Ranks, job ids and steps travel as
//! span fields, so every line can be traced to them.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format '{other}' (expected text or json)")),
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default `info`); an invalid filter falls back
/// to `info` with a warning rather than silencing the process.
pub fn init(format: LogFormat) {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => match EnvFilter::from_str(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("ignoring RUST_LOG='{spec}': {e}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
    // A second init (tests in one process) keeps the first subscriber.
    if installed.is_ok() {
        if let Some(warning) = bad_filter {
            tracing::warn!("{warning}");
        }
    }
}
