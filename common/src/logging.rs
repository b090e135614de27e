//! Logging set-up shared by both binaries: tracing-subscriber with an env filter (`RUST_LOG`, default
//! `info`) writing to stderr, as text or as one JSON object per line. Ranks, job ids and steps travel as
//! span fields, so every line can be traced to them.

use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::sync::OnceLock;

use std::cell::RefCell;

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
    let fmt = tracing_subscriber::fmt::layer().with_writer(|| Stderr).with_target(false);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).boxed(),
    };
    // The capture sees parser warnings whatever RUST_LOG says: they end up in the run directory.
    let capture = Capture.with_filter(tracing_subscriber::filter::LevelFilter::WARN);
    let installed =
        tracing_subscriber::registry().with(fmt.with_filter(filter.and(NotCaptured))).with(capture).try_init();
    // A second init (tests in one process) keeps the first subscriber.
    if installed.is_ok() {
        if let Some(warning) = bad_filter {
            tracing::warn!("{warning}");
        }
    }
}

/// Targets of the third-party parsers whose warnings are about one input file (dicom-rs: "Unsupported
/// character set", "MediaStorageSOPClassUID is missing", ...).
const FILE_LEVEL_TARGETS: &[&str] = &["dicom_"];

thread_local! {
    static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

fn is_file_level(meta: &Metadata<'_>) -> bool {
    FILE_LEVEL_TARGETS.iter().any(|t| meta.target().starts_with(t))
}

fn capturing() -> bool {
    CAPTURED.with(|c| c.borrow().is_some())
}

/// Runs `f` and returns, with its result, the third-party parser warnings it raised on this thread,
/// instead of logging them: the caller ties them to the file it was reading and reports them once
/// (a folder of 100,000 files would otherwise log each warning 100,000 times, without a path).
pub fn capture_file_warnings<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let outer = CAPTURED.with(|c| c.borrow_mut().replace(Vec::new()));
    let result = f();
    let captured = CAPTURED.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer)).unwrap_or_default();
    (result, captured)
}

/// Keeps captured events out of the log.
struct NotCaptured;

impl<S> Filter<S> for NotCaptured {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        !(is_file_level(meta) && capturing())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_file_level(meta) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

/// Collects file-level events while [`capture_file_warnings`] runs on the event's thread.
struct Capture;

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !is_file_level(event.metadata()) {
            return;
        }
        CAPTURED.with(|c| {
            if let Some(captured) = c.borrow_mut().as_mut() {
                let mut message = Message(String::new());
                event.record(&mut message);
                captured.push(message.0);
            }
        });
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Counts the events that reach it: the log's place in the subscriber.
    struct Counted(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for Counted {
        fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A parser's warning raised while a file is read goes to the caller, not to the log; the same
    /// warning outside a capture, and every other event, still reaches the log.
    #[test]
    fn file_warnings_are_captured_not_logged() {
        let logged = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(Counted(Arc::clone(&logged)).with_filter(NotCaptured))
            .with(Capture.with_filter(tracing_subscriber::filter::LevelFilter::WARN));
        tracing::subscriber::with_default(subscriber, || {
            let ((), captured) = capture_file_warnings(|| {
                tracing::warn!(target: "dicom_parser::stateful::decode", "Unsupported character set `{}`, ignoring", "X");
                tracing::warn!(target: "simclr", "our own warning");
            });
            assert_eq!(captured, ["Unsupported character set `X`, ignoring"]);
            assert_eq!(logged.load(Ordering::Relaxed), 1, "only our own warning reached the log");
            tracing::warn!(target: "dicom_object::meta", "MediaStorageSOPClassUID is missing");
            assert_eq!(logged.load(Ordering::Relaxed), 2, "outside a capture the warning is logged");
            // Captures nest: the inner one takes its own warnings, the outer one keeps collecting.
            let ((), outer) = capture_file_warnings(|| {
                let ((), inner) = capture_file_warnings(|| tracing::warn!(target: "dicom_parser", "inner"));
                assert_eq!(inner, ["inner"]);
                tracing::warn!(target: "dicom_parser", "outer");
            });
            assert_eq!(outer, ["outer"]);
        });
    }
}
