//! Picks the route for a request: the longest path prefix that matches, a route for the
//! request's host before a route for any host. It computes no ETags; it only tells, on a
//! reload, whether a route now trusts remembered ones for requests no route trusted them for.

use std::sync::Arc;

use crate::config::{host_name, ip_literal, Route, Validation};

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
        let host = host.map(host_name);
        // An IPv6 literal in another spelling than the routes' (rare: one byte looked at).
        let literal = host.filter(|h| h.starts_with('[')).and_then(ip_literal);
        let host = literal.as_deref().or(host);
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

    /// Host routes that a longer host-less prefix takes requests from: for `(host_route,
    /// other)`, requests for `host_route`'s host under `other`'s prefix go to `other`, since
    /// the longest prefix wins. nginx and Envoy pick the host first, so an operator may not
    /// mean it; the proxy says so at load (see `Proxy::new`).
    pub fn shadowed_host_routes(&self) -> Vec<(&Arc<Route>, &Arc<Route>)> {
        let mut found: Vec<(&Arc<Route>, &Arc<Route>)> = Vec::new();
        for h in self.routes.iter().filter(|r| r.host.is_some()) {
            for g in self.routes.iter().filter(|r| r.host.is_none()) {
                if g.prefix.len() <= h.prefix.len() || !g.prefix.starts_with(h.prefix.as_str()) {
                    continue;
                }
                // The route that requests for that host under `g`'s prefix really get.
                let taken = self.route(h.host.as_deref(), &g.prefix);
                if let Some(other) = taken.filter(|r| r.host.is_none()) {
                    if !found
                        .iter()
                        .any(|(a, b)| Arc::ptr_eq(a, h) && Arc::ptr_eq(b, other))
                    {
                        found.push((h, other));
                    }
                }
            }
        }
        found
    }

    /// Whether some request is keyed with its query under one of this router and `old`
    /// and without it under the other (`ignore_query` turned on or off, or a path moved
    /// between routes that differ in it). Each route's prefix on its host stands for the
    /// paths under it, as in `trusts_more_than`.
    pub fn keys_queries_unlike(&self, old: &Router) -> bool {
        let unlike = |a: &Router, b: &Router| {
            a.routes.iter().any(|r| {
                let (host, path) = (r.host.as_deref(), r.prefix.as_str());
                let (mine, other) = (a.route(host, path), b.route(host, path));
                mine.zip(other)
                    .is_some_and(|(m, o)| m.ignore_query != o.ignore_query)
            })
        };
        unlike(self, old) || unlike(old, self)
    }

    /// A route of this router that trusts remembered tags (`cached`, not `per_user`) for
    /// some requests that `old` did not send to such a route of the same upstream, taking
    /// its `ETag`s the same way (`upstream_etag`: a tag remembered under "keep" is the
    /// backend's, which "replace" no longer sends or accepts) and keying them as finely
    /// (`ignore_query` turned on merges keys: a write to `/doc?v=2` did not forget `/doc`'s
    /// tag, which now stands for both; so does `strip_path_params`); `None`
    /// if there is none. For those requests, writes may have reached the backend without
    /// the proxy while `old` was in force, so a tag remembered then may be stale.
    ///
    /// Exact without enumerating paths: a request's route depends only on its host and on
    /// which prefixes of the routes that host may take its path starts with, and the
    /// longest of those, taken as a path, starts with the same ones. So on every host either
    /// router names, and on any other host, the prefixes of the routes for it (its own and
    /// the host-less) stand for all the paths there are. Only those are tried: every prefix
    /// on every host made a reload of 1,000 host routes take 18 s.
    pub fn trusts_more_than(&self, old: &Router) -> Option<&Arc<Route>> {
        let both = || self.routes.iter().chain(&old.routes);
        let mut hosts: Vec<&str> = both().filter_map(|r| r.host.as_deref()).collect();
        hosts.sort_unstable_by_key(|h| h.to_ascii_lowercase());
        hosts.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        let trusting = |r: &&Arc<Route>| r.validation == Validation::Cached && !r.per_user;
        let for_host = |host: Option<&str>, r: &Arc<Route>| match (&r.host, host) {
            (None, _) => true,
            (Some(want), Some(h)) => want.eq_ignore_ascii_case(h),
            (Some(_), None) => false,
        };
        hosts
            .into_iter()
            .map(Some)
            .chain([None])
            .flat_map(|host| {
                both()
                    .filter(move |r| for_host(host, r))
                    .map(move |r| (host, r.prefix.as_str()))
            })
            .find_map(|(host, path)| {
                let new = self.route(host, path).filter(trusting)?;
                let kept = old.route(host, path).filter(trusting).is_some_and(|o| {
                    o.upstream.origin == new.upstream.origin
                        && o.upstream_etag == new.upstream_etag
                        && (o.ignore_query || !new.ignore_query)
                        && (o.strip_path_params || !new.strip_path_params)
                });
                (!kept).then_some(new)
            })
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

    /// `admin.example.` is the same name, as nginx takes it: a client adding the final dot
    /// must not step around the host's route (its `require_precondition`, its validation).
    #[test]
    fn a_host_with_its_final_dot_gets_its_route() {
        assert_eq!(pick(Some("admin.example."), "/docs/a"), "http://admin:1");
        assert_eq!(
            pick(Some("Admin.Example.:8080"), "/docs/a"),
            "http://admin:1"
        );
    }

    #[test]
    fn a_host_route_that_a_longer_hostless_prefix_takes_requests_from_is_named() {
        let shadowed: Vec<(String, String)> = router()
            .shadowed_host_routes()
            .into_iter()
            .map(|(h, g)| (h.prefix.clone(), g.prefix.clone()))
            .collect();
        // admin.example's /docs/ loses /docs/private/ to the host-less route.
        assert_eq!(
            shadowed,
            [("/docs/".to_owned(), "/docs/private/".to_owned())]
        );
        // Not once the host has its own route there.
        let own = routes(&[
            (Some("admin.example"), "/", "http://admin:1", ""),
            (None, "/docs/", "http://docs:1", ""),
            (Some("admin.example"), "/docs/", "http://admin:1", ""),
        ]);
        assert!(own.shadowed_host_routes().is_empty());
    }

    /// A router of `routes`: (host, prefix, upstream, extra keys).
    fn routes(routes: &[(Option<&str>, &str, &str, &str)]) -> Router {
        let mut toml = String::from("[server]\nlisten = \"127.0.0.1:1\"\n");
        for (host, prefix, upstream, extra) in routes {
            toml.push_str(&format!(
                "[[route]]\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\n{extra}\n"
            ));
            if let Some(h) = host {
                toml.push_str(&format!("host = \"{h}\"\n"));
            }
        }
        Router::new(Config::parse(&toml, "t.toml").unwrap().routes)
    }

    const CACHED: &str = "validation = \"cached\"";

    /// The prefix of the route `new` trusts for more than `old` did, if any.
    fn newly_trusted(old: &Router, new: &Router) -> Option<String> {
        new.trusts_more_than(old).map(|r| r.prefix.clone())
    }

    #[test]
    fn a_route_trusts_more_only_where_no_cached_route_of_its_upstream_was() {
        let docs = routes(&[(None, "/docs/", "http://a:1", CACHED)]);
        let docs_and_shared = routes(&[
            (None, "/docs/", "http://a:1", CACHED),
            (None, "/docs/shared/", "http://a:1", ""),
        ]);
        let none = routes(&[(None, "/other/", "http://a:1", "")]);
        let revalidated = routes(&[(None, "/docs/", "http://a:1", "")]);
        let elsewhere = routes(&[(None, "/docs/", "http://b:1", CACHED)]);
        let per_user = routes(&[(
            None,
            "/docs/",
            "http://a:1",
            "per_user = true\nvalidation = \"cached\"",
        )]);

        assert_eq!(newly_trusted(&docs, &docs), None, "nothing changed");
        assert_eq!(newly_trusted(&docs, &none), None, "a cached route removed");
        assert_eq!(
            newly_trusted(&none, &docs).as_deref(),
            Some("/docs/"),
            "and added"
        );
        assert_eq!(
            newly_trusted(&revalidated, &docs).as_deref(),
            Some("/docs/")
        );
        assert_eq!(newly_trusted(&docs, &revalidated), None);
        assert_eq!(
            newly_trusted(&elsewhere, &docs).as_deref(),
            Some("/docs/"),
            "another upstream"
        );
        assert_eq!(newly_trusted(&per_user, &docs).as_deref(), Some("/docs/"));
        assert_eq!(
            newly_trusted(&docs, &docs_and_shared),
            None,
            "a route carved out"
        );
        assert_eq!(
            newly_trusted(&docs_and_shared, &docs).as_deref(),
            Some("/docs/"),
            "the carved-out part falls to the cached route"
        );
        let merged = routes(&[(
            None,
            "/docs/",
            "http://a:1",
            "validation = \"cached\"\nignore_query = true",
        )]);
        assert_eq!(
            newly_trusted(&docs, &merged).as_deref(),
            Some("/docs/"),
            "queries merged into one key"
        );
        assert_eq!(newly_trusted(&merged, &docs), None, "and split again");
        let servlet = routes(&[(
            None,
            "/docs/",
            "http://a:1",
            "validation = \"cached\"\nstrip_path_params = true",
        )]);
        assert_eq!(
            newly_trusted(&docs, &servlet).as_deref(),
            Some("/docs/"),
            "path parameters merged into one key"
        );
        assert_eq!(newly_trusted(&servlet, &docs), None, "and split again");
    }

    #[test]
    fn hosts_are_told_apart_when_trust_is_compared() {
        let any_host = routes(&[(None, "/docs/", "http://a:1", CACHED)]);
        let admin_revalidated = routes(&[
            (None, "/docs/", "http://a:1", CACHED),
            (Some("admin.example"), "/docs/", "http://a:1", ""),
        ]);
        let admin_cached = routes(&[
            (None, "/docs/", "http://a:1", ""),
            (Some("admin.example"), "/docs/", "http://a:1", CACHED),
        ]);
        assert_eq!(newly_trusted(&any_host, &admin_revalidated), None);
        assert_eq!(
            newly_trusted(&admin_revalidated, &any_host).as_deref(),
            Some("/docs/"),
            "admin.example's requests fall to the cached route"
        );
        assert_eq!(
            newly_trusted(&any_host, &admin_cached),
            None,
            "trust narrowed to one host"
        );
        assert_eq!(
            newly_trusted(&admin_cached, &any_host).as_deref(),
            Some("/docs/")
        );
        // Each host is tried with its own routes' prefixes (and the host-less ones'), in
        // whatever case the two files spell it.
        let a = (Some("a.example"), "/", "http://a:1", CACHED);
        let b_cached = (Some("B.example"), "/b/", "http://a:1", CACHED);
        let b_revalidated = (Some("b.example"), "/b/", "http://a:1", "");
        assert_eq!(
            newly_trusted(&routes(&[a]), &routes(&[a, b_cached])).as_deref(),
            Some("/b/"),
            "a cached host route added"
        );
        assert_eq!(
            newly_trusted(&routes(&[a, b_revalidated]), &routes(&[a, b_cached])).as_deref(),
            Some("/b/"),
            "a host route turned cached"
        );
        assert_eq!(
            newly_trusted(&routes(&[a, b_cached]), &routes(&[a, b_cached])),
            None
        );
        // The tags remembered under "keep" are the backend's, which "replace" does not take.
        let replacing = (
            None,
            "/",
            "http://a:1",
            "validation = \"cached\"\nupstream_etag = \"replace\"",
        );
        let keeping = (None, "/", "http://a:1", CACHED);
        assert_eq!(
            newly_trusted(&routes(&[keeping]), &routes(&[replacing])).as_deref(),
            Some("/")
        );
        assert_eq!(
            newly_trusted(&routes(&[replacing]), &routes(&[keeping])).as_deref(),
            Some("/")
        );
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
