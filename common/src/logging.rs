//! Logging set-up shared by both binaries: tracing-subscriber with an env filter (`RUST_LOG`, default
//! `info`) writing to stderr, as text or as one JSON object per line. Ranks, job ids and steps travel as
//! span fields, so every line can be traced to them.

use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::sync::OnceLock;

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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| Stderr).with_target(false);
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

/// Takes down whatever is drawn below the log on the terminal (the coordinator's progress bar), runs
/// the closure (which writes lines), and draws it again.
pub type Suspend = fn(&mut dyn FnMut());

static SUSPEND: OnceLock<Suspend> = OnceLock::new();

/// Installs the process's [`Suspend`] (once; later calls are ignored).
pub fn set_suspend(suspend: Suspend) {
    let _ = SUSPEND.set(suspend);
}

fn suspended(mut write: impl FnMut()) {
    match SUSPEND.get() {
        Some(suspend) => suspend(&mut write),
        None => write(),
    }
}

/// Writes one line to stderr above any progress bar (the launcher relays workers' lines with it).
pub fn eprint_line(line: &str) {
    suspended(|| {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    });
}

/// The log's writer: stderr, above any progress bar. tracing writes each event in one call.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut result = Ok(buf.len());
        suspended(|| result = std::io::stderr().write_all(buf).map(|()| buf.len()));
        result
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
