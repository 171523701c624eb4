//! Logging: a tracing subscriber with `RUST_LOG`-style filters, as text or JSON lines.
//! One access line per request comes from `proxy::access_log` (target `ifmatch::access`);
//! no line carries a body or a credential.

use std::fmt::Debug;
use std::io::IsTerminal;

use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{self, FormatFields};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter (`info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
