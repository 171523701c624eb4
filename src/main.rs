//! The `ifmatch` binary: parses flags, starts logging, loads the config and runs the server
//! until SIGTERM or SIGINT. It holds no logic of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ifmatch::admin::Ready;
use ifmatch::config::Config;
use ifmatch::lifecycle::{self, shutdown_signal, Shutdown};
use ifmatch::proxy::Proxy;
use ifmatch::telemetry::{self, LogFormat};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A reverse proxy that gives ETag-less HTTP services strong ETags and race-free conditional writes"
)]
struct Args {
    /// The TOML config file.
    #[arg(long, env = "IFMATCH_CONFIG", required_unless_present = "demo")]
    config: Option<PathBuf>,

    /// Validate the config file, print every problem found, and exit (0 when valid).
    #[arg(long, requires = "config")]
    check: bool,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Start a small legacy document store (no ETags) behind the proxy and print curl
    /// commands to try. Needs no config file (IFMATCH_CONFIG, set in the image, is ignored).
    #[arg(long, conflicts_with = "check")]
    demo: bool,

    /// Where the demo proxy listens.
    #[arg(long, default_value = "127.0.0.1:8080", requires = "demo")]
    listen: SocketAddr,
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    // `--config` and `--demo` given together are a mistake; `IFMATCH_CONFIG` from the
    // environment (the image sets it) beside `--demo` is not.
    let config_flag = matches.value_source("config") == Some(ValueSource::CommandLine);
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if args.demo && config_flag {
        Args::command()
            .error(
                ErrorKind::ArgumentConflict,
                "the argument '--demo' cannot be used with '--config <CONFIG>'",
            )
            .exit();
    }
    // clap's `requires` on `--listen` is not enforced beside `--check` (which conflicts
    // with `--demo`): a flag silently dropped would mislead, so it is refused here too.
    if !args.demo && matches.value_source("listen") == Some(ValueSource::CommandLine) {
        Args::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "the argument '--listen <LISTEN>' is the demo's: it needs '--demo'",
            )
            .exit();
    }
    if args.check {
        // Warnings at load (a shadowed host route, no platform roots) are shown too.
        telemetry::init(args.log_format);
        return check(
            args.config
                .as_deref()
                .expect("clap requires --config with --check"),
        );
    }
    telemetry::init(args.log_format);
    if !args.demo {
        // Before the config is read: a SIGHUP from now on reloads once the proxy runs.
        lifecycle::hold_sighup();
    }
    // The config is loaded before the runtime exists: it says how many workers to start.
    let config = match args.config.as_deref().filter(|_| !args.demo) {
        Some(path) => match Config::load(path) {
            Ok(c) => Some((path.to_owned(), c)),
            Err(e) => {
                telemetry::fatal(args.log_format, &e);
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let workers = config.as_ref().and_then(|(_, c)| c.server.workers);
    let runtime = match ifmatch::runtime::build(workers) {
        Ok(rt) => rt,
        Err(e) => {
            let e = format!("cannot start the runtime: {e}");
            telemetry::fatal(args.log_format, &e);
            return ExitCode::FAILURE;
        }
    };
    // Spawned, not run by `block_on` itself: on a runtime's worker, so that with one worker
    // the listener and every connection share its thread (the main thread only waits).
    let serving = runtime.spawn(async move {
        match config {
            Some((path, config)) => run(path, config).await,
            None => ifmatch::demo::run_demo(args.listen, shutdown_signal()).await,
        }
    });
    let result = runtime
        .block_on(serving)
        .unwrap_or_else(|e| Err(format!("the server task failed: {e}").into()));
    // Not a plain drop, which waits for the blocking pool without end: a reload there may
    // wait on its file for ever (`lifecycle::reload_aside`). The drain is over; the workers
    // get a moment to drop what they hold (a cut-off request logs its line then).
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            telemetry::fatal(args.log_format, &e);
            ExitCode::FAILURE
        }
    }
}

/// How long the runtime's threads have to end once the drain is over.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            ifmatch::proxy::warn_about(&c);
            println!(
                "{}: ok ({} route{})",
                path.display(),
                c.routes.len(),
                if c.routes.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

async fn run(
    path: PathBuf,
    config: Config,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    ifmatch::fds::raise_limit(config.server.max_connections);
    let proxy = Arc::new(Proxy::new(&config));
    let ready = Ready::default();
    // The admin listener is bound first (a bound proxy port then implies a bound admin
    // port) and outlives the drain, so that /readyz can say 503 meanwhile.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(admin) = &config.admin {
        let admin_listener = TcpListener::bind(admin.listen)
            .await
            .map_err(|e| format!("cannot listen on {} (admin): {e}", admin.listen))?;
        // The bound address, which differs from the configured one for port 0.
        let bound = admin_listener.local_addr()?;
        tracing::info!(listen = %bound, "admin endpoints: /healthz /readyz /metrics");
        tokio::spawn(ifmatch::admin::serve(
            admin_listener,
            proxy.clone(),
            ready.clone(),
            config.server.header_read_timeout,
            async {
                let _ = admin_stopped.await;
            },
        ));
    }
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    // Ready once bound (connections made before the first accept wait in the backlog), and
    // before two things: the line "ifmatch started", so that whoever reads it finds /readyz
    // at 200, and the signal task, so that a SIGTERM always leaves it not ready. Signals
    // are listened for from here on, before that line: one sent just after it is handled,
    // not left to kill the process.
    ready.store(true, Ordering::Release);
    let mut signals = Shutdown::listen();
    tokio::spawn(lifecycle::reload_on_sighup(
        path,
        proxy.clone(),
        config.clone(),
    ));
    // One shutdown signal: readiness drops first; the listener goes on serving for
    // `shutdown_delay`, so that load balancers polling /readyz stop sending before any
    // connection is refused; then it stops accepting and drains. A second signal cuts the
    // delay short, and one during the drain ends it.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<()>();
    let not_ready = ready.clone();
    let delay = config.server.shutdown_delay;
    tokio::spawn(async move {
        signals.recv().await;
        not_ready.store(false, Ordering::Release);
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutdown begun: /readyz says 503; new connections are served until the delay ends (a second signal ends it now)"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = signals.recv() => tracing::info!("second signal: delay cut short"),
            }
        }
        let _ = stop_tx.send(true);
        // A signal during the drain ends it now, as a second Ctrl-C does elsewhere.
        signals.recv().await;
        let _ = cut_tx.send(());
    });
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = config.server.tls.is_some(),
        http2 = config.server.http2,
        routes = config.routes.len(),
        "ifmatch started"
    );
    let stopped = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    };
    let serving = proxy.clone();
    tokio::select! {
        served = ifmatch::server::serve(listener, serving, &config.server, stopped) => served?,
        Ok(()) = cut_rx => {
            tracing::warn!("another signal during the drain: requests still in flight are cut off");
            proxy.cut_off_in_flight();
            ifmatch::server::name_unanswered(&proxy);
        }
    }
    let _ = admin_stop.send(());
    tracing::info!("stopped");
    Ok(())
}
