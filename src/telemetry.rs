//! Logging: a tracing subscriber with `RUST_LOG`-style filters, as text or JSON lines.
//! One access line per request comes from `proxy::access_log` (target `ifmatch::access`);
//! no line carries a body or a credential.

use std::fmt::{Debug, Write as _};
use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{self, FormatFields};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber (and, for JSON, a panic hook that keeps to its format).
/// `RUST_LOG` overrides the default filter (`info`); one that cannot be read is logged and
/// `info` used instead.
pub fn init(format: LogFormat) {
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, unread) = match EnvFilter::try_new(&env) {
        Ok(f) if !env.trim().is_empty() => (f, None),
        Ok(_) => (EnvFilter::new("info"), None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    // rustls logs what a peer did wrong at `warn`, once per handshake (an IP address sent
    // as SNI: wrk and `openssl s_client` do it): any client could fill the log. Errors
    // only, unless `RUST_LOG` names rustls and could be read: a mistyped one gets `info`
    // and the same quiet rustls as none at all.
    let filter = match unread.is_none() && names_rustls(&env) {
        true => filter,
        false => filter.add_directive(QUIET_RUSTLS.parse().expect("a valid directive")),
    };
    // Colour only for a person at a terminal; a pipe or a log collector gets plain text.
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    let _ = match format {
        LogFormat::Text if terminal => builder.try_init(),
        // The default field writer styles each name even without colour, through layers of
        // formatting that cost a third of an access line: plain `name=value` pairs instead,
        // the same text.
        LogFormat::Text => builder.fmt_fields(plain_fields()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if format == LogFormat::Json {
        log_panics_as_json();
    }
    if let Some(error) = unread {
        tracing::warn!(%error, rust_log = env, "RUST_LOG cannot be read: logging at info");
    }
}

const QUIET_RUSTLS: &str = "rustls=error";

/// Says why the process cannot go on (a config it cannot load, a port it cannot bind), in
/// the log's format, whatever `RUST_LOG` filters: the last line an operator reads. As JSON,
/// a line of the error is an `ERROR` object of its own (a config's problems come a line
/// each): a pipeline that reads JSON lines would take plain text for garbage, and this is
/// the line that says why a pod is in a crash loop.
pub fn fatal(format: LogFormat, error: &dyn std::fmt::Display) {
    let text = error.to_string();
    if format == LogFormat::Text {
        eprintln!("ifmatch: {text}");
        return;
    }
    let mut out = String::new();
    for line in text.lines() {
        let _ = writeln!(out, "{}", error_line("ifmatch", line, &[]));
    }
    let _ = std::io::stderr().write_all(out.as_bytes());
}

/// An `ERROR` event as the JSON format writes one, on one line whatever `message` holds.
fn error_line(target: &str, message: &str, fields: &[(&str, &str)]) -> String {
    let mut timestamp = String::new();
    let _ = SystemTime.format_time(&mut format::Writer::new(&mut timestamp));
    let mut event = serde_json::json!({
        "timestamp": timestamp,
        "level": "ERROR",
        "message": message,
        "target": target,
    });
    for &(name, value) in fields {
        event[name] = value.into();
    }
    event.to_string()
}

/// With `--log-format json`, a panic is logged as one JSON `ERROR` line (target
/// `ifmatch::panic`, whatever `RUST_LOG` filters), not the default hook's plain text, which
/// a JSON log pipeline reads as garbage or splits. A panic ends only the connection or task
/// it happens in, so the process goes on and the line is all an operator sees of it.
fn log_panics_as_json() {
    std::panic::set_hook(Box::new(|info| {
        let line = panic_line(info);
        let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
    }));
}

/// The JSON line of a panic: its message, where it happened and the thread's name.
fn panic_line(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let what = (payload.downcast_ref::<&str>().copied())
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic with no message");
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let message = format!("panicked (a bug: please report it): {what}");
    let fields = [
        ("location", location.as_str()),
        ("thread", thread.name().unwrap_or("unnamed")),
    ];
    error_line("ifmatch::panic", &message, &fields)
}

/// `message name=value …`, as the default text format without colour writes them.
fn plain_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    format::debug_fn(
        |w: &mut format::Writer<'_>, field: &Field, value: &dyn Debug| match field.name() {
            "message" => write!(w, "{value:?}"),
            name if name.starts_with("r#") => write!(w, "{}={value:?}", &name[2..]),
            name => write!(w, "{name}={value:?}"),
        },
    )
    .delimited(" ")
}

/// A warning that is news the first time and noise every time after (a bound reached under
/// load, which the metrics count one by one): due the first time, then at most once a
/// `period`. Lock-free, for callers on any thread.
#[derive(Debug)]
pub struct Every {
    born: Instant,
    period: Duration,
    /// Milliseconds after `born` of the last time it was due (`u64::MAX`: never).
    last: AtomicU64,
}

impl Every {
    pub fn new(period: Duration) -> Self {
        Self {
            born: Instant::now(),
            period,
            last: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether the warning is due now; if so, the next one is a `period` away.
    pub fn due(&self) -> bool {
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let every = u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX);
        let due =
            |last: u64| (last == u64::MAX || now >= last.saturating_add(every)).then_some(now);
        self.last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, due)
            .is_ok()
    }
}

/// Whether a directive of `RUST_LOG` is for rustls's own targets (`rustls`, `rustls::…`),
/// not for a crate whose name only contains it (`hyper_rustls`, `tokio_rustls`), whose
/// debug lines an operator may ask for without asking for every client's mistakes.
fn names_rustls(env: &str) -> bool {
    env.split(',').any(|directive| {
        let target = directive.split(['[', '=']).next().unwrap_or_default();
        // Not trimmed: EnvFilter keeps the spaces around a target (` rustls` matches no
        // target), so a directive written so is not for rustls either.
        target == "rustls" || target.starts_with("rustls::")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One JSON line, whatever the message holds (quotes, newlines), with where it happened.
    /// The hook is the process's: set for this test alone and taken back at once.
    #[test]
    fn a_panic_is_one_json_error_line_saying_where() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            s.lock().unwrap().push(panic_line(info))
        }));
        let panicked = std::thread::Builder::new()
            .name("worker-7".into())
            .spawn(|| panic!("boom: \"quoted\"\nand a second line"))
            .unwrap()
            .join();
        std::panic::set_hook(before);
        assert!(panicked.is_err());
        let lines = seen.lock().unwrap().clone();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(!lines[0].contains('\n'), "one line: {}", lines[0]);
        let event: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(event["level"], "ERROR");
        assert_eq!(event["target"], "ifmatch::panic");
        assert_eq!(event["thread"], "worker-7");
        let message = event["message"].as_str().unwrap();
        assert!(
            message.ends_with("boom: \"quoted\"\nand a second line"),
            "{message}"
        );
        assert!(event["location"]
            .as_str()
            .unwrap()
            .starts_with("src/telemetry.rs:"));
    }

    #[test]
    fn only_a_directive_for_rustls_itself_names_it() {
        for (env, named) in [
            ("rustls=warn", true),
            ("info,rustls::server::hs=debug", true),
            ("info,rustls", true),
            ("info, rustls", false),
            ("rustls[handshake]=debug", true),
            ("info", false),
            ("info,hyper_rustls=debug,tokio_rustls=trace", false),
            ("rustls_pemfile=debug", false),
            ("ifmatch=debug,h2=info", false),
        ] {
            assert_eq!(names_rustls(env), named, "{env}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_warning_is_due_the_first_time_then_once_a_period() {
        let every = Every::new(Duration::from_secs(60));
        assert!(every.due(), "the first time");
        assert!(!every.due());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!every.due());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(every.due(), "a period on");
        assert!(!every.due());
    }
}
