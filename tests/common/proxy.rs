//! The real proxy server (`ifmatch::server::serve`) on 127.0.0.1:0, shut down on drop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ifmatch::config::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct Proxy {
    pub addr: SocketAddr,
    /// The proxy's shared state, to look at its tag cache and locks.
    pub state: Arc<ifmatch::proxy::Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    /// Starts the proxy with `routes` (TOML `[[route]]` tables; `{upstream}` is replaced by
    /// `upstream`) and optional extra `[server]` keys.
    pub async fn start(routes: &str, upstream: &str) -> Self {
        Self::start_with(routes, upstream, "").await
    }

    pub async fn start_with(routes: &str, upstream: &str, server_keys: &str) -> Self {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server_keys}\n{}",
            routes.replace("{upstream}", upstream)
        );
        let config = Config::parse(&toml, "test.toml").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ifmatch::proxy::Proxy::new(&config));
        let (stop, stopped) = oneshot::channel::<()>();
        let mut limits = config.server.clone();
        limits.shutdown_timeout = Duration::from_secs(5);
        let state2 = state.clone();
        let task = tokio::spawn(async move {
            ifmatch::server::serve(listener, state2, &limits, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The URL by name, for a TLS listener whose certificate names `localhost`.
    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Stops accepting and waits for in-flight requests to drain.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

/// One route to `{upstream}` with the given extra keys.
pub fn route(prefix: &str, extra: &str) -> String {
    format!("[[route]]\nprefix = \"{prefix}\"\nupstream = \"{{upstream}}\"\n{extra}\n")
}

/// The tag-cache key the proxy uses for `path` (already normal) at `origin`.
pub fn key(origin: &str, path: &str) -> ifmatch::key::ResourceKey {
    let uri: http::Uri = origin.parse().unwrap();
    let upstream = ifmatch::config::Upstream::new(
        uri.scheme().unwrap().clone(),
        uri.authority().unwrap().clone(),
    );
    assert_eq!(upstream.origin, origin, "an origin is scheme://authority");
    ifmatch::key::ResourceKey::new(&upstream, path, None)
}

impl Proxy {
    /// The tag this proxy gives `body` (with its key).
    pub fn tag_of(&self, body: impl AsRef<[u8]>) -> String {
        self.state.tag_key().tag_of(body.as_ref()).to_string()
    }
}
