//! Picks the route for a request: the longest path prefix that matches, a route for the
//! request's host before a route for any host. It knows nothing of ETags.

use std::sync::Arc;

use crate::config::{strip_port, Route};

#[derive(Debug, Default)]
pub struct Router {
    /// Longest prefix first; at equal length, host-specific routes first.
    routes: Vec<Arc<Route>>,
}

// === impl Router ===

impl Router {
    pub fn new(routes: impl IntoIterator<Item = Route>) -> Self {
        let mut routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then_with(|| b.host.is_some().cmp(&a.host.is_some()))
        });
        Self { routes }
    }

    /// The route for `path` (normalised) on `host` (as sent, port allowed).
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let host = host.map(strip_port);
        self.routes.iter().find(|r| {
            path.starts_with(r.prefix.as_str())
                && r.host
                    .as_deref()
                    .is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want)))
        })
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router() -> Router {
        let c = Config::parse(
            r#"
[server]
listen = "127.0.0.1:1"
[[route]]
prefix = "/"
upstream = "http://root:1"
[[route]]
prefix = "/docs/"
upstream = "http://docs:1"
[[route]]
prefix = "/docs/"
host = "admin.example"
upstream = "http://admin:1"
[[route]]
prefix = "/docs/private/"
upstream = "http://private:1"
"#,
            "t.toml",
        )
        .unwrap();
        Router::new(c.routes)
    }

    fn pick(host: Option<&str>, path: &str) -> String {
        router().route(host, path).unwrap().upstream.origin.clone()
    }

    #[test]
    fn longest_prefix_wins_and_host_routes_come_first() {
        assert_eq!(pick(None, "/docs/a"), "http://docs:1");
        assert_eq!(pick(None, "/docs/private/a"), "http://private:1");
        assert_eq!(pick(None, "/other"), "http://root:1");
        assert_eq!(
            pick(Some("admin.example:8080"), "/docs/a"),
            "http://admin:1"
        );
        assert_eq!(pick(Some("ADMIN.example"), "/docs/a"), "http://admin:1");
        assert_eq!(pick(Some("other.example"), "/docs/a"), "http://docs:1");
    }

    #[test]
    fn no_route_without_a_match() {
        let c = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/docs/\"\nupstream = \"http://a:1\"\n",
            "t.toml",
        )
        .unwrap();
        let r = Router::new(c.routes);
        assert!(r.route(None, "/doc").is_none());
        assert!(r.route(None, "/docs/").is_some());
    }
}
