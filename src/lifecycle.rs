//! Process signals: SIGTERM/SIGINT start a graceful shutdown, SIGHUP reloads the config.
//!
//! A reload reads and validates the whole file first; only a valid config is swapped in
//! (atomically, see `Proxy::reload`). An invalid one is refused with a log line per problem
//! and the running config keeps serving. `listen`, `workers`, `tag_cache_entries` and
//! `tag_memo_bytes` cannot change without a restart; a reload that changes them says so in
//! the log.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::proxy::Proxy;

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reloads `path` into `proxy` on every SIGHUP, for as long as the process runs. `running`
/// is the config the process started with, to spot settings a reload cannot change.
pub async fn reload_on_sighup(path: PathBuf, proxy: Arc<Proxy>, running: Config) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload is disabled");
                return;
            }
        };
        while hup.recv().await.is_some() {
            reload(&path, &proxy, &running);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, proxy, running);
        std::future::pending::<()>().await;
    }
}

/// One reload attempt: swap in a valid config, or keep the old one and say why.
pub fn reload(path: &std::path::Path, proxy: &Proxy, running: &Config) {
    match Config::load(path) {
        Ok(config) => {
            if config.server.listen != running.server.listen {
                tracing::warn!(
                    old = %running.server.listen,
                    new = %config.server.listen,
                    "server.listen changed: it takes effect after a restart"
                );
            }
            if config.server.tag_cache_entries != running.server.tag_cache_entries {
                tracing::warn!("server.tag_cache_entries changed: it takes effect after a restart");
            }
            if config.server.tag_memo_bytes != running.server.tag_memo_bytes {
                tracing::warn!("server.tag_memo_bytes changed: it takes effect after a restart");
            }
            if config.server.workers != running.server.workers {
                tracing::warn!("server.workers changed: it takes effect after a restart");
            }
            proxy.reload(&config);
            tracing::info!(
                config = %path.display(),
                routes = config.routes.len(),
                "config reloaded"
            );
        }
        Err(e) => {
            tracing::error!(
                config = %path.display(),
                error = %e,
                "config reload refused; the running config keeps serving"
            );
        }
    }
}
