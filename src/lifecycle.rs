//! Process signals: SIGTERM/SIGINT start a graceful shutdown, SIGHUP reloads the config.
//!
//! A reload reads and validates the whole file first; only a valid config is swapped in
//! (atomically, see `Proxy::reload`). An invalid one is refused with a log line per problem
//! and the running config keeps serving. The settings read once at start (the listener and
//! its connections, the runtime, the caches' sizes: [`keep_start_settings`]) cannot change
//! without a restart; a reload that changes one says so in the log and keeps the running
//! value everywhere, so that no part of the proxy runs with the new one beside another that
//! keeps the old.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::proxy::Proxy;

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment this is made. tokio installs a
/// signal's handler when its stream is made, not when it is first awaited: streams made in
/// a task that has not run yet leave a signal sent meanwhile (say, right after "ifmatch
/// started") to its default action, which kills the process. One stream for every signal
/// after the first too, so that a second one sent at once is not lost between two.
pub struct Shutdown {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    /// Must be called on the runtime.
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind)
                    .map_err(|e| tracing::warn!(error = %e, "cannot listen for {name}"))
                    .ok()
            };
            Self {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Completes on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
                s.as_mut()?.recv().await
            }
            let Self { term, int } = self;
            tokio::select! {
                Some(()) = next(term) => tracing::info!("SIGTERM received"),
                Some(()) = next(int) => tracing::info!("SIGINT received"),
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C), listened for from the call on.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let mut signals = Shutdown::listen();
    async move { signals.recv().await }
}

/// A SIGHUP came while the process was starting ([`hold_sighup`]).
#[cfg(unix)]
static HUP_AT_START: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes a SIGHUP sent while the process starts (it reads its config, makes its runtime,
/// binds its listeners) instead of leaving it to its default action, which kills the
/// process: `systemctl reload` on a `Type=simple` unit, or a sidecar that signals on every
/// change of the config, may send one any time after the exec. [`reload_on_sighup`] takes
/// over from the call on, and reloads once if one came meanwhile: the file may have changed
/// after the start read it. Call it before the config is read.
pub fn hold_sighup() {
    #[cfg(unix)]
    {
        extern "C" fn noted(_: libc::c_int) {
            HUP_AT_START.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // action is a zeroed `sigaction` with its handler, flags and (empty) mask set.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = noted as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut()) == 0
        };
        if !installed {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot hold SIGHUP while starting: one sent now would kill the process"
            );
        }
    }
}

/// Reloads `path` into `proxy` on every SIGHUP, for as long as the process runs. `running`
/// is the config the process started with, to spot settings a reload cannot change.
/// SIGHUP is listened for from the call on, not from the future's first poll (see
/// [`Shutdown`]): its default action kills the process. One that came earlier, while the
/// process started ([`hold_sighup`]), is a reload on the first poll.
pub fn reload_on_sighup(
    path: PathBuf,
    proxy: Arc<Proxy>,
    running: Config,
) -> impl Future<Output = ()> {
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let mut hup = match hup {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload is disabled");
                    return;
                }
            };
            // Taken after the stream is made: a SIGHUP from then on is the stream's.
            if HUP_AT_START.swap(false, std::sync::atomic::Ordering::SeqCst) {
                reload_aside(&path, &proxy, &running).await;
            }
            while hup.recv().await.is_some() {
                reload_aside(&path, &proxy, &running).await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (path, proxy, running);
            std::future::pending::<()>().await;
        }
    }
}

/// [`reload`] on a thread of tokio's blocking pool: reading the files (the config, TLS
/// certificates, CA roots) may block, on a slow disk or a FIFO with no writer yet, and with
/// `workers = 1` that would stall every connection. And a reload that panics is a refused
/// reload, not the end of reloading: the task that listens for SIGHUP lives on.
async fn reload_aside(path: &std::path::Path, proxy: &Arc<Proxy>, running: &Config) {
    let (path, proxy, running) = (path.to_owned(), proxy.clone(), running.clone());
    let metrics = proxy.clone();
    let done = tokio::task::spawn_blocking(move || reload(&path, &proxy, &running)).await;
    if let Err(e) = done {
        metrics.metrics.reload(false);
        tracing::error!(
            error = %e,
            "config reload failed (a bug: please report it); the running config keeps serving"
        );
    }
}

/// One reload attempt: swap in a valid config, or keep the old one and say why.
pub fn reload(path: &std::path::Path, proxy: &Proxy, running: &Config) {
    match Config::load(path) {
        Ok(mut config) => {
            for key in keep_start_settings(
                &mut config,
                running,
                proxy.tls().map(|t| (t, proxy.certificate())),
            ) {
                tracing::warn!("{key} changed: it takes effect after a restart");
            }
            proxy.reload(&config);
            proxy.metrics.reload(true);
            tracing::info!(
                config = %path.display(),
                routes = config.routes.len(),
                "config reloaded"
            );
        }
        // A line per problem: one field holding them all, newlines and all, breaks text
        // logs apart and log pipelines' one-event-per-line.
        Err(ConfigError::Invalid(problems)) => {
            proxy.metrics.reload(false);
            for problem in problems {
                tracing::error!(
                    %problem,
                    "config reload refused; the running config keeps serving"
                );
            }
        }
        Err(e) => {
            proxy.metrics.reload(false);
            tracing::error!(
                config = %path.display(),
                error = %e,
                "config reload refused; the running config keeps serving"
            );
        }
    }
}

/// Puts back into `new` the settings the process read once when it started (`running`'s),
/// and names those that differed. They shape the listener and each client connection as it
/// is accepted (hyper's buffers and limits, the idle timer, the connection bound, TLS or
/// not), the drain, the runtime and the caches' sizes. `max_header_bytes` and
/// `max_header_fields` are kept for the routes and upstream connections too: the proxy's
/// own check of a head's size must agree with the buffer hyper read it into. TLS stays on or
/// off as it started (a plain listener turned TLS would fail every client at once); the
/// certificates of a TLS listener are reloaded, so the ones kept are those in use now
/// (`tls_now`, with the certificate's validity), not those of the start.
fn keep_start_settings(
    new: &mut Config,
    running: &Config,
    tls_now: Option<(Arc<rustls::ServerConfig>, Option<crate::tls::Validity>)>,
) -> Vec<&'static str> {
    let mut kept = Vec::new();
    let (n, r) = (&mut new.server, &running.server);
    macro_rules! keep {
        ($($field:ident),* $(,)?) => {$(
            if n.$field != r.$field {
                kept.push(concat!("server.", stringify!($field)));
                n.$field = r.$field.clone();
            }
        )*};
    }
    keep!(
        listen,
        workers,
        tag_cache_entries,
        tag_memo_bytes,
        max_connections,
        header_read_timeout,
        shutdown_timeout,
        shutdown_delay,
        max_header_bytes,
        max_header_fields,
        http2_max_concurrent_streams,
        http2_stream_window,
    );
    if n.tls.is_some() != r.tls.is_some() {
        kept.push("server.tls (on or off)");
        (n.tls, n.tls_validity) = match tls_now {
            Some((tls, validity)) => (Some(tls), validity),
            None => (None, None),
        };
    }
    if new.admin.as_ref().map(|a| a.listen) != running.admin.as_ref().map(|a| a.listen) {
        kept.push("admin.listen");
        new.admin = running.admin.clone();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "ifmatch.toml").expect("valid")
    }

    const ROUTE: &str = "[[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n";

    #[test]
    fn settings_read_at_start_are_kept_and_named_and_the_rest_are_taken() {
        let running = parse(&format!("[server]\nlisten = \"127.0.0.1:8080\"\n{ROUTE}"));
        let mut new = parse(&format!(
            "[server]\nlisten = \"127.0.0.1:8081\"\nmax_connections = 7\n\
             max_header_bytes = \"256KiB\"\nheader_read_timeout = \"3s\"\n\
             http2_max_concurrent_streams = 16\n\
             max_buffered_bytes = \"64MiB\"\n[admin]\nlisten = \"127.0.0.1:9901\"\n{ROUTE}"
        ));
        let kept = keep_start_settings(&mut new, &running, None);
        assert_eq!(
            kept,
            [
                "server.listen",
                "server.max_connections",
                "server.header_read_timeout",
                "server.max_header_bytes",
                "server.http2_max_concurrent_streams",
                "admin.listen",
            ]
        );
        let (n, r) = (&new.server, &running.server);
        assert_eq!(n.listen, r.listen);
        assert_eq!(n.max_connections, r.max_connections);
        assert_eq!(n.max_header_bytes, r.max_header_bytes);
        assert_eq!(n.header_read_timeout, r.header_read_timeout);
        assert_eq!(n.http2_max_concurrent_streams, 128);
        assert!(new.admin.is_none());
        assert_eq!(n.max_buffered_bytes, 64 << 20, "a reload applies it");
        assert!(keep_start_settings(&mut new.clone(), &running, None).is_empty());
    }

    /// Every setting read once at start is named when a reload changes it, and kept: an
    /// operator who changes `shutdown_timeout`, `workers` or a cache's size and sends SIGHUP
    /// must read in the log that it waits for a restart, not believe it applied.
    #[test]
    fn every_setting_read_at_start_is_named_when_a_reload_changes_it() {
        let running = parse(&format!("[server]\nlisten = \"127.0.0.1:8080\"\n{ROUTE}"));
        let mut new = parse(&format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\nworkers = 3\ntag_cache_entries = 5\n\
             tag_memo_bytes = \"1MiB\"\nshutdown_timeout = \"7s\"\nshutdown_delay = \"2s\"\n\
             max_header_fields = 50\nhttp2_stream_window = \"1MiB\"\n{ROUTE}"
        ));
        let kept = keep_start_settings(&mut new, &running, None);
        assert_eq!(
            kept,
            [
                "server.workers",
                "server.tag_cache_entries",
                "server.tag_memo_bytes",
                "server.shutdown_timeout",
                "server.shutdown_delay",
                "server.max_header_fields",
                "server.http2_stream_window",
            ]
        );
        let (n, r) = (&new.server, &running.server);
        assert_eq!(n.workers, r.workers);
        assert_eq!(n.tag_cache_entries, r.tag_cache_entries);
        assert_eq!(n.tag_memo_bytes, r.tag_memo_bytes);
        assert_eq!(n.shutdown_timeout, r.shutdown_timeout);
        assert_eq!(n.shutdown_delay, r.shutdown_delay);
        assert_eq!(n.max_header_fields, r.max_header_fields);
        assert_eq!(n.http2_stream_window, r.http2_stream_window);
    }
}
