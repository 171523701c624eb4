//! Metrics, kept as atomics and written in the Prometheus text format by the admin server.
//!
//! Label sets are bounded: routes come from the config (`none` when nothing matched),
//! methods outside the common set are `OTHER`, statuses are three digits. A route is named
//! by its prefix, and by its host too when it has one (`route_labels`): two routes may
//! share a prefix for two hosts, and their figures must not be summed into one series.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use http::Method;

use crate::budget::Budget;
use crate::memo::BodyMemo;
use crate::pool::ConnectionCap;
use crate::tags::TagStore;

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The maps here are keyed by what the config names (route prefixes, methods, statuses),
/// never by what a client sends, so they can use a fast hasher instead of SipHash, which
/// exists to resist keys an attacker chooses.
type FastHash = foldhash::fast::RandomState;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Keyed by the route's label set (`route_labels`, made once at config load); looked up
    /// by `&str`, so a request allocates nothing here.
    routes: DashMap<String, RouteMetrics, FastHash>,
    lock_wait: Histogram,
    /// HTTP/1 request heads hyper could not parse: too large, or invalid.
    malformed_too_large: AtomicU64,
    malformed_invalid: AtomicU64,
    /// Connections answered 503 and closed at `max_connections`.
    connections_refused: AtomicU64,
    /// Connections the proxy closed on its client's conduct: HTTP/2 rapid reset (a GOAWAY),
    /// a client that stopped reading its responses (cut off).
    closed_rapid_reset: AtomicU64,
    closed_stalled: AtomicU64,
    /// Client connections open now (served, not refused), and `max_connections`.
    connections_open: AtomicU64,
    connections_limit: AtomicU64,
    /// Config reloads applied and refused, and whether the last one was refused.
    reloads_applied: AtomicU64,
    reloads_refused: AtomicU64,
    last_reload_refused: std::sync::atomic::AtomicBool,
}

/// A client connection counted as open until dropped ([`Metrics::connection_opened`]).
pub struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the proxy closed a client's connection itself.
#[derive(Clone, Copy, Debug)]
pub enum Closed {
    RapidReset,
    Stalled,
}

/// One route's figures.
#[derive(Debug, Default)]
struct RouteMetrics {
    requests: Counters<(&'static str, u16)>,
    proxy_responses: Counters<u16>,
    revalidations: AtomicU64,
    unchanged_writes: AtomicU64,
    untagged_large: AtomicU64,
    /// Bodies not held for want of room in `max_buffered_bytes`: GET responses sent on
    /// untagged, write bodies streamed to the backend.
    over_budget_responses: AtomicU64,
    over_budget_requests: AtomicU64,
    upstream_latency: Histogram,
}

type Counters<K> = DashMap<K, AtomicU64, FastHash>;

/// A body that found no room in `max_buffered_bytes`: a GET's response, sent on untagged,
/// or a write's request body, streamed instead of read whole.
#[derive(Clone, Copy, Debug)]
pub enum Unheld {
    Response,
    Request,
}

impl Unheld {
    /// The `body` label, and the log's field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Response => "response",
            Self::Request => "request",
        }
    }
}

/// Exposition rows: a label set and its value.
type Rows = Vec<(String, u64)>;

fn inc<K: std::hash::Hash + Eq + Copy>(map: &Counters<K>, key: K) {
    if let Some(c) = map.get(&key) {
        c.fetch_add(1, Ordering::Relaxed);
        return;
    }
    map.entry(key).or_default().fetch_add(1, Ordering::Relaxed);
}

/// A fixed-bucket histogram. Each observation lands in one bucket (the first whose bound
/// holds it, or the last, past every bound); the cumulative counts Prometheus wants are
/// summed when rendered, so a request costs one atomic increment here, not one per bucket
/// above its value. `+Inf` and `_count` are that same sum, never a counter of their own: a
/// scrape between an observation's two increments would show a bucket above `+Inf`.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut n = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            n += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
        }
        let count = n + self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// The method as a bounded label.
fn method_label(m: &Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "POST" => "POST",
        "OPTIONS" => "OPTIONS",
        "MKCOL" => "MKCOL",
        "COPY" => "COPY",
        "MOVE" => "MOVE",
        "PROPFIND" => "PROPFIND",
        "PROPPATCH" => "PROPPATCH",
        "LOCK" => "LOCK",
        "UNLOCK" => "UNLOCK",
        _ => "OTHER",
    }
}

/// Escapes a label value (route prefixes are paths, but a config may hold anything).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The label set that names a route in every per-route series: `route="<prefix>"`, and
/// `host="<host>"` beside it for a route that serves one host only. Routes for any host
/// keep the one label they always had, so their series and the queries on them stay as
/// they were.
pub fn route_labels(host: Option<&str>, prefix: &str) -> String {
    match host {
        Some(host) => format!("route=\"{}\",host=\"{}\"", esc(prefix), esc(host)),
        None => format!("route=\"{}\"", esc(prefix)),
    }
}

/// The gauges of `upstream_max_connections`, per origin that has had a connection under it.
pub fn write_connection_cap(out: &mut String, cap: &ConnectionCap) {
    let rows = cap.snapshot();
    let mut gauge = |name: &str, help: &str, value: &dyn Fn(&(String, usize, usize)) -> usize| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for row in &rows {
            let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", esc(&row.0), value(row));
        }
    };
    gauge(
        "ifmatch_upstream_connections_limit",
        "upstream_max_connections: the most connections open at once to each backend origin.",
        &|_| cap.limit(),
    );
    gauge(
        "ifmatch_upstream_connections_open",
        "Connections open now to each backend origin, busy and idle, under upstream_max_connections.",
        &|r| r.1,
    );
    gauge(
        "ifmatch_upstream_connections_waiting",
        "Requests waiting now for a connection to each backend origin, under upstream_max_connections.",
        &|r| r.2,
    );
}

/// The writes whose clients stopped waiting that the backend has not answered
/// (`settling.rs`).
pub fn write_settling(out: &mut String, writes: usize) {
    let name = "ifmatch_writes_settling";
    let _ = writeln!(
        out,
        "# HELP {name} Writes the backend has not answered whose clients stopped waiting (told 504, or gone): their URLs stay locked until it answers or settle_timeout ends, and a stop waits for them.\n# TYPE {name} gauge\n{name} {writes}"
    );
}

/// When the TLS listener's certificate in use expires, as Envoy's
/// `days_until_first_cert_expiring` and the blackbox exporter's
/// `probe_ssl_earliest_cert_expiry` tell it: alert on it minus `time()`. Absent without TLS
/// (or when the certificate's dates could not be read).
pub fn write_certificate(out: &mut String, certificate: Option<crate::tls::Validity>) {
    let Some(v) = certificate else { return };
    let name = "ifmatch_tls_certificate_expiry_timestamp_seconds";
    let at = v
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let _ = writeln!(
        out,
        "# HELP {name} When the TLS listener's certificate in use (the chain's first) expires, in seconds since the Unix epoch.\n# TYPE {name} gauge\n{name} {at}"
    );
}

/// The label set of requests no route took.
pub const NO_ROUTE: &str = "route=\"none\"";

// === impl Metrics ===

impl Metrics {
    /// One finished request; `by_proxy` when the proxy made the response itself. `route` is
    /// the route's label set (`Route::metric_labels`, or [`NO_ROUTE`]), as in every method
    /// here.
    pub fn request(&self, route: &str, method: &Method, status: u16, by_proxy: bool) {
        self.route(route, |m| {
            inc(&m.requests, (method_label(method), status));
            if by_proxy {
                inc(&m.proxy_responses, status);
            }
        });
    }

    pub fn revalidation(&self, route: &str) {
        self.route(route, |m| m.revalidations.fetch_add(1, Ordering::Relaxed));
    }

    pub fn unchanged_write(&self, route: &str) {
        self.route(route, |m| {
            m.unchanged_writes.fetch_add(1, Ordering::Relaxed)
        });
    }

    pub fn untagged_large_body(&self, route: &str) {
        self.route(route, |m| m.untagged_large.fetch_add(1, Ordering::Relaxed));
    }

    /// A body not held for want of room in the budget.
    pub fn over_budget(&self, route: &str, body: Unheld) {
        self.route(route, |m| {
            let n = match body {
                Unheld::Request => &m.over_budget_requests,
                Unheld::Response => &m.over_budget_responses,
            };
            n.fetch_add(1, Ordering::Relaxed)
        });
    }

    pub fn upstream_latency(&self, route: &str, d: Duration) {
        self.route(route, |m| m.upstream_latency.observe(d));
    }

    /// Runs `f` on the route's figures, creating them on the route's first request.
    fn route<T>(&self, route: &str, f: impl FnOnce(&RouteMetrics) -> T) -> T {
        if let Some(m) = self.routes.get(route) {
            return f(&m);
        }
        f(&self.routes.entry(route.to_owned()).or_default())
    }

    /// A request head hyper refused itself (its bare 400, 414 or 431, then close): no route,
    /// method or status of the proxy's to count it under.
    pub fn malformed_head(&self, too_large: bool) {
        let n = match too_large {
            true => &self.malformed_too_large,
            false => &self.malformed_invalid,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection refused at `max_connections`.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A client's connection closed for its conduct.
    pub fn connection_closed(&self, why: Closed) {
        let n = match why {
            Closed::RapidReset => &self.closed_rapid_reset,
            Closed::Stalled => &self.closed_stalled,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// The server's `max_connections`, for the gauge beside the open ones.
    pub fn connection_limit(&self, limit: usize) {
        self.connections_limit
            .store(limit as u64, Ordering::Relaxed);
    }

    /// A client connection taken in: open until the guard drops.
    pub fn connection_opened(&self) -> OpenConnection<'_> {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self)
    }

    /// A config reload, applied or refused.
    pub fn reload(&self, applied: bool) {
        let n = match applied {
            true => &self.reloads_applied,
            false => &self.reloads_refused,
        };
        n.fetch_add(1, Ordering::Relaxed);
        self.last_reload_refused.store(!applied, Ordering::Relaxed);
    }

    pub fn lock_wait(&self, d: Duration) {
        self.lock_wait.observe(d);
    }

    /// The Prometheus text exposition (format 0.0.4), cache figures read from `tags`.
    pub fn render(&self, tags: &TagStore, memo: &BodyMemo, budget: &Budget) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, rows: Rows| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let mut rows = rows;
            rows.sort();
            for (labels, n) in rows {
                let _ = writeln!(out, "{name}{labels} {n}");
            }
        };
        // Rows of one figure across routes, each with its label set.
        let rows = |f: &dyn Fn(&str, &RouteMetrics) -> Rows| -> Rows {
            self.routes
                .iter()
                .flat_map(|e| f(e.key(), e.value()))
                .collect()
        };
        let value = |n: &AtomicU64| n.load(Ordering::Relaxed);
        counter(
            "ifmatch_requests_total",
            "Requests answered, by route, method and status.",
            rows(&|r, m| {
                m.requests
                    .iter()
                    .map(|e| {
                        let (method, status) = e.key();
                        let labels = format!("{{{r},method=\"{method}\",status=\"{status}\"}}");
                        (labels, value(e.value()))
                    })
                    .collect()
            }),
        );
        counter(
            "ifmatch_proxy_responses_total",
            "Responses the proxy made itself (304, 400, 412, 428, 502, 503, 504, ...), by route and status.",
            rows(&|r, m| {
                m.proxy_responses
                    .iter()
                    .map(|e| (format!("{{{r},status=\"{}\"}}", e.key()), value(e.value())))
                    .collect()
            }),
        );
        counter(
            "ifmatch_revalidations_total",
            "GETs sent upstream to learn a resource's current tag before a write, by route.",
            rows(&|r, m| vec![(format!("{{{r}}}"), value(&m.revalidations))]),
        );
        counter(
            "ifmatch_unchanged_writes_total",
            "tag_puts PUTs that sent a resource's current bytes again and ran beside one another, the URL's lock shared, by route.",
            rows(&|r, m| vec![(format!("{{{r}}}"), value(&m.unchanged_writes))]),
        );
        counter(
            "ifmatch_untagged_large_bodies_total",
            "GET bodies over max_tag_body, streamed through untagged, by route.",
            rows(&|r, m| vec![(format!("{{{r}}}"), value(&m.untagged_large))]),
        );
        counter(
            "ifmatch_over_budget_bodies_total",
            "Bodies not held because max_buffered_bytes was reached, by route: body=\"response\", a GET sent on untagged; body=\"request\", a write's body streamed to the backend instead of read whole first.",
            rows(&|r, m| {
                vec![
                    (
                        format!("{{{r},body=\"request\"}}"),
                        value(&m.over_budget_requests),
                    ),
                    (
                        format!("{{{r},body=\"response\"}}"),
                        value(&m.over_budget_responses),
                    ),
                ]
            }),
        );
        counter(
            "ifmatch_malformed_requests_total",
            "HTTP/1 request heads the parser refused before any route saw them (too_large: 431 or 414; invalid: 400), each ending its connection.",
            vec![
                (
                    "{reason=\"too_large\"}".to_owned(),
                    value(&self.malformed_too_large),
                ),
                (
                    "{reason=\"invalid\"}".to_owned(),
                    value(&self.malformed_invalid),
                ),
            ],
        );
        counter(
            "ifmatch_connections_refused_total",
            "Client connections refused because max_connections were open: answered 503 and closed on plain HTTP, closed at once on TLS.",
            vec![(String::new(), value(&self.connections_refused))],
        );
        counter(
            "ifmatch_connections_closed_total",
            "Client connections the proxy closed for their conduct: rapid_reset, an HTTP/2 client resetting its requests in progress (GOAWAY); stalled, a client that took nothing of its responses for header_read_timeout (cut off).",
            vec![
                (
                    "{reason=\"rapid_reset\"}".to_owned(),
                    value(&self.closed_rapid_reset),
                ),
                (
                    "{reason=\"stalled\"}".to_owned(),
                    value(&self.closed_stalled),
                ),
            ],
        );
        counter(
            "ifmatch_config_reloads_total",
            "Config reloads (SIGHUP): applied, or refused with the running config kept (the log names each problem).",
            vec![
                (
                    "{result=\"applied\"}".to_owned(),
                    value(&self.reloads_applied),
                ),
                (
                    "{result=\"refused\"}".to_owned(),
                    value(&self.reloads_refused),
                ),
            ],
        );
        let s = &tags.stats;
        counter(
            "ifmatch_tag_cache_hits_total",
            "Tag cache lookups that found a tag.",
            vec![(String::new(), s.hits.load(Ordering::Relaxed))],
        );
        counter(
            "ifmatch_tag_cache_misses_total",
            "Tag cache lookups that found none.",
            vec![(String::new(), s.misses.load(Ordering::Relaxed))],
        );
        counter(
            "ifmatch_tag_cache_evictions_total",
            "Entries evicted from the tag cache to keep it within tag_cache_entries.",
            vec![(String::new(), s.evictions.load(Ordering::Relaxed))],
        );
        let m = &memo.stats;
        counter(
            "ifmatch_tag_memo_hits_total",
            "Tagged bodies found equal to the copy kept of the URL's last body: compared, not hashed.",
            vec![(String::new(), m.hits.load(Ordering::Relaxed))],
        );
        counter(
            "ifmatch_tag_memo_misses_total",
            "Tagged bodies that could be kept but had no copy or differed from it: hashed.",
            vec![(String::new(), m.misses.load(Ordering::Relaxed))],
        );
        counter(
            "ifmatch_tag_memo_evictions_total",
            "Body copies dropped to keep within tag_memo_bytes.",
            vec![(String::new(), m.evictions.load(Ordering::Relaxed))],
        );
        let refused = self.last_reload_refused.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP ifmatch_config_last_reload_successful 1 unless the last reload was refused (the running config is then older than the file).\n# TYPE ifmatch_config_last_reload_successful gauge\nifmatch_config_last_reload_successful {}",
            u8::from(!refused)
        );
        let _ = writeln!(
            out,
            "# HELP ifmatch_connections_open Client connections open now.\n# TYPE ifmatch_connections_open gauge\nifmatch_connections_open {}\n# HELP ifmatch_connections_limit max_connections.\n# TYPE ifmatch_connections_limit gauge\nifmatch_connections_limit {}",
            value(&self.connections_open),
            value(&self.connections_limit)
        );
        let _ = writeln!(
            out,
            "# HELP ifmatch_tag_cache_entries Entries in the tag cache now.\n# TYPE ifmatch_tag_cache_entries gauge\nifmatch_tag_cache_entries {}",
            tags.len()
        );
        let _ = writeln!(
            out,
            "# HELP ifmatch_buffered_bytes Body bytes held now by requests in flight (GET bodies until tagged, write bodies read whole).\n# TYPE ifmatch_buffered_bytes gauge\nifmatch_buffered_bytes {}",
            budget.held()
        );
        let _ = writeln!(
            out,
            "# HELP ifmatch_buffered_bytes_limit max_buffered_bytes: the most ifmatch_buffered_bytes may reach.\n# TYPE ifmatch_buffered_bytes_limit gauge\nifmatch_buffered_bytes_limit {}",
            budget.limit()
        );
        let _ = writeln!(
            out,
            "# HELP ifmatch_tag_memo_bytes Bytes charged for the body copies held now (bodies, keys and a fixed overhead each), within tag_memo_bytes.\n# TYPE ifmatch_tag_memo_bytes gauge\nifmatch_tag_memo_bytes {}",
            memo.bytes()
        );
        let _ = writeln!(
            out,
            "# HELP ifmatch_lock_wait_seconds Time writes waited for their URL's lock.\n# TYPE ifmatch_lock_wait_seconds histogram"
        );
        self.lock_wait
            .write(&mut out, "ifmatch_lock_wait_seconds", "");
        let _ = writeln!(
            out,
            "# HELP ifmatch_upstream_latency_seconds Time from sending a request upstream to its response head, by route; a request that timed out counts with the time it waited.\n# TYPE ifmatch_upstream_latency_seconds histogram"
        );
        let mut routes: Vec<String> = self.routes.iter().map(|e| e.key().clone()).collect();
        routes.sort();
        for r in routes {
            // Only routes that have sent something upstream (not `none`, say).
            if let Some(m) = self
                .routes
                .get(&r)
                .filter(|m| m.upstream_latency.count() > 0)
            {
                m.upstream_latency
                    .write(&mut out, "ifmatch_upstream_latency_seconds", &r);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms_in_the_text_format() {
        let m = Metrics::default();
        let docs = route_labels(None, "/docs/");
        let docs = docs.as_str();
        // The same prefix for one host only: a route of its own, a series of its own.
        let a_docs = route_labels(Some("a.example"), "/docs/");
        m.request(docs, &Method::PUT, 412, true);
        m.request(docs, &Method::PUT, 412, true);
        m.request(docs, &Method::from_bytes(b"BREW").unwrap(), 200, false);
        m.request(&a_docs, &Method::PUT, 412, true);
        m.request(NO_ROUTE, &Method::GET, 404, true);
        m.lock_wait(Duration::from_millis(3));
        m.lock_wait(Duration::from_millis(300));
        m.lock_wait(Duration::from_secs(9));
        m.upstream_latency(docs, Duration::from_millis(20));
        m.upstream_latency(&a_docs, Duration::from_millis(2));
        m.over_budget(docs, Unheld::Request);
        let budget = Budget::new(100);
        let _held = budget.take(30).unwrap();
        let text = m.render(&TagStore::new(10), &BodyMemo::new(100), &budget);
        for line in [
            "ifmatch_over_budget_bodies_total{route=\"/docs/\",body=\"request\"} 1",
            "ifmatch_over_budget_bodies_total{route=\"/docs/\",body=\"response\"} 0",
            "ifmatch_buffered_bytes 30",
            "ifmatch_buffered_bytes_limit 100",
            "ifmatch_requests_total{route=\"/docs/\",method=\"PUT\",status=\"412\"} 2",
            "ifmatch_requests_total{route=\"/docs/\",method=\"OTHER\",status=\"200\"} 1",
            "ifmatch_proxy_responses_total{route=\"/docs/\",status=\"412\"} 2",
            "ifmatch_requests_total{route=\"/docs/\",host=\"a.example\",method=\"PUT\",status=\"412\"} 1",
            "ifmatch_proxy_responses_total{route=\"/docs/\",host=\"a.example\",status=\"412\"} 1",
            "ifmatch_requests_total{route=\"none\",method=\"GET\",status=\"404\"} 1",
            "ifmatch_upstream_latency_seconds_count{route=\"/docs/\",host=\"a.example\"} 1",
            "ifmatch_upstream_latency_seconds_bucket{route=\"/docs/\",host=\"a.example\",le=\"0.0025\"} 1",
            "ifmatch_lock_wait_seconds_bucket{le=\"0.0025\"} 0",
            "ifmatch_lock_wait_seconds_bucket{le=\"0.005\"} 1",
            "ifmatch_lock_wait_seconds_bucket{le=\"0.25\"} 1",
            "ifmatch_lock_wait_seconds_bucket{le=\"0.5\"} 2",
            "ifmatch_lock_wait_seconds_bucket{le=\"5\"} 2",
            "ifmatch_lock_wait_seconds_bucket{le=\"+Inf\"} 3",
            "ifmatch_lock_wait_seconds_count 3",
            "ifmatch_upstream_latency_seconds_bucket{route=\"/docs/\",le=\"0.01\"} 0",
            "ifmatch_upstream_latency_seconds_bucket{route=\"/docs/\",le=\"5\"} 1",
            "ifmatch_upstream_latency_seconds_bucket{route=\"/docs/\",le=\"0.025\"} 1",
            "ifmatch_upstream_latency_seconds_count{route=\"/docs/\"} 1",
            "ifmatch_tag_cache_entries 0",
            "ifmatch_tag_memo_hits_total 0",
            "ifmatch_tag_memo_bytes 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
