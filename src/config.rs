//! The TOML config, read as plain serde data and validated once into [`Config`].
//!
//! Runtime code only sees the validated types: every address is parsed, every duration and
//! size has its unit applied, every default is filled in. An error names the file, the line
//! and the key; validation reports every problem it finds, not only the first.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::Deserialize;
use toml::Spanned;

use crate::etag::TagKey;

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: Server,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`), if configured.
    pub admin: Option<Admin>,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub listen: SocketAddr,
    /// Entries the tag cache holds at most.
    pub tag_cache_entries: usize,
    /// Bytes of body copies kept so that unchanged bodies are compared, not hashed again.
    pub tag_memo_bytes: usize,
    /// Body bytes held in memory at once across all requests (GET bodies until their tag
    /// is known, write bodies read whole before their lock); past it, bodies stream through
    /// instead (`budget.rs`). At least every route's `max_tag_body`.
    pub max_buffered_bytes: usize,
    /// Time to open a TCP connection to an upstream.
    pub connect_timeout: Duration,
    /// How long an upstream connection may sit idle in the pool before it is closed: set it
    /// below the backend's own keep-alive timeout, so that the backend never closes a
    /// connection a request is being sent on.
    pub upstream_idle_timeout: Duration,
    /// Idle connections kept open per upstream origin (nginx's `keepalive`); more are closed
    /// once their response is read. 0: a new connection for every request.
    pub upstream_max_idle: usize,
    /// Connections open at once per upstream origin, busy and idle together (nginx's
    /// `max_conns`, HAProxy's `maxconn`); a request finding them all busy waits for one up
    /// to `connect_timeout`, then gets 503. `None`: no limit.
    pub upstream_max_connections: Option<usize>,
    /// The most an upstream connection reads at once: the largest response head a backend
    /// may send (a larger one is a 502), and about what each body streaming through holds
    /// in the proxy on its upstream side. Larger reads move large bodies faster.
    pub upstream_read_buffer: usize,
    /// How long in-flight requests may take to finish once shutdown starts.
    pub shutdown_timeout: Duration,
    /// How long the listener keeps serving after a stop signal, `/readyz` already 503, so
    /// that load balancers stop sending before connections are refused.
    pub shutdown_delay: Duration,
    /// Client connections served at once; more get a 503 and are closed.
    pub max_connections: usize,
    /// Longest request head (request line and headers) accepted; longer gets 431.
    pub max_header_bytes: u64,
    /// Most header fields in an HTTP/1.1 head, a client's request (more: 431) or a
    /// backend's response (more: 502). hyper's own default; raising it past that costs every
    /// head a heap allocation.
    pub max_header_fields: usize,
    /// Requests one HTTP/2 connection may have in flight at once (nginx's
    /// `http2_max_concurrent_streams`): each holds its own buffers, so this bounds what one
    /// connection can make the proxy hold, as `max_connections` bounds connections.
    pub http2_max_concurrent_streams: u32,
    /// Bytes of its body an HTTP/2 request may send before the proxy reads them (the
    /// stream's receive window). The connection's window is this times
    /// `http2_max_concurrent_streams`, so that a request whose body waits unread (for its
    /// URL's lock, say) can never hold up another request on the same connection.
    pub http2_stream_window: u32,
    /// Clients may speak HTTP/2 (h2 by ALPN on TLS, prior knowledge on plain TCP) as well as
    /// HTTP/1.1; `false`: HTTP/1.1 only, as nginx's `http2 off` (where h2 is not wanted, or
    /// not yet trusted). A reload applies it to new connections.
    pub http2: bool,
    /// Largest request body forwarded; larger gets 413.
    pub max_request_body: u64,
    /// Time a client has to send a request head, also the longest a connection may sit
    /// with no request in flight (HTTP/1.1 keep-alive and HTTP/2 alike).
    pub header_read_timeout: Duration,
    /// The key of every tag; `None`: a random key made at start (tags change on restart).
    pub tag_key: Option<TagKey>,
    /// The listener's TLS config (`[server.tls]`), built and checked at load.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// When the listener's certificate (the chain's first) may be used, if it could be read.
    pub tls_validity: Option<crate::tls::Validity>,
    /// Runtime worker threads; `None`: one per CPU the process may use.
    pub workers: Option<usize>,
    /// Clients whose `X-Forwarded-Proto`, `X-Forwarded-Host` and `Forwarded` are passed on
    /// (proxies in front, as an ingress); every other client's are replaced or dropped.
    pub trusted_proxies: crate::trust::TrustedProxies,
}

/// How the proxy learns a resource's current tag before a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validation {
    /// Fetch the current representation from the upstream before every conditional write.
    Revalidate,
    /// Trust the tag remembered from the last GET; fetch only on a miss.
    Cached,
}

/// What the proxy makes of a strong `ETag` the upstream sends on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamEtag {
    /// Keep it, and judge writes by it: the upstream vouches that it changes with every
    /// change of bytes (RFC 9110 §8.8.1).
    #[default]
    Keep,
    /// Replace it with the proxy's own tag, as a weak one is: for upstreams whose tags do
    /// not change with every write (nginx's `etag on`: modification time in whole seconds
    /// and size).
    Replace,
}

#[derive(Clone, Debug)]
pub struct Route {
    /// Only requests for this host (the `Host` header or `:authority`, port ignored).
    pub host: Option<String>,
    pub prefix: String,
    pub upstream: Upstream,
    pub validation: Validation,
    pub require_precondition: bool,
    /// Time from sending a request to the upstream's response head.
    pub upstream_timeout: Duration,
    /// How much longer a write whose answer did not come within `upstream_timeout` (its
    /// client got 504), or whose client left, keeps its URL locked while the backend may
    /// still carry it out: its exchange goes on, and the backend's late answer ends the
    /// wait. Zero: the lock goes with the 504.
    pub settle_timeout: Duration,
    /// Longest GET body that is buffered and tagged; longer ones stream through untagged.
    pub max_tag_body: u64,
    /// Longest wait for a URL's write lock before a 503.
    pub lock_timeout: Duration,
    /// Send the client's `Host` to the upstream (true) or the upstream's own authority.
    pub preserve_host: bool,
    /// Representations differ by user: never trust a remembered tag, always revalidate
    /// with the writer's own credentials (for `validation = "cached"`).
    pub per_user: bool,
    /// The backend serves a path whatever its query (static files, WebDAV): the query is
    /// left out of the resource key, so `/doc` and `/doc?v=2` share a lock and a tag.
    pub ignore_query: bool,
    /// The backend reads a path segment's parameters (`;jsessionid=…`) as no part of its
    /// name, as Java servlet containers do: they are left out of the resource key, so
    /// `/doc;jsessionid=A` and `/doc` share a lock and a tag.
    pub strip_path_params: bool,
    /// The backend stores a PUT body as the new representation, byte for byte (WebDAV, object
    /// stores): a successful PUT's body tag is remembered and sent back as its `ETag`, so the
    /// next write needs no revalidation.
    pub tag_puts: bool,
    pub upstream_etag: UpstreamEtag,
    /// For an `https://` upstream: the CA file to trust instead of the platform's roots,
    /// and the client config built from it at load.
    pub ca_file: Option<PathBuf>,
    pub upstream_tls: Option<crate::tls::ClientTls>,
    /// Its metrics' label set (`metrics::route_labels`), made once here.
    pub metric_labels: String,
}

/// An upstream origin: scheme and authority, nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// `scheme://authority` as written: what logs name, and what the backend knows itself
    /// by when it is sent that `Host`.
    pub origin: String,
    /// The origin in one spelling (host in lower case, no default port): the prefix of
    /// every cache and lock key of this upstream.
    pub key_prefix: String,
    /// `scheme://authority/`, what the connector is given to connect to.
    pub uri: Uri,
    /// The authority as a `Host` value: made once here, not on every request.
    pub host: HeaderValue,
}

impl Upstream {
    pub fn new(scheme: Scheme, authority: Authority) -> Self {
        let uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("a scheme and an authority make a valid URI");
        let host = HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        // One spelling per origin for the keys, so that two routes naming one backend as
        // `LOCALHOST` and `localhost:80`, or `[::1]` and `[0:0:0:0:0:0:0:1]`, share its
        // locks, tags and connection cap.
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let written = authority.host();
        let name = ip_literal(written).unwrap_or_else(|| written.to_ascii_lowercase());
        let key_prefix = match authority.port_u16().filter(|&p| p != default_port) {
            Some(port) => format!("{scheme}://{name}:{port}"),
            None => format!("{scheme}://{name}"),
        };
        Self {
            origin: format!("{scheme}://{authority}"),
            key_prefix,
            scheme,
            authority,
            uri,
            host,
        }
    }
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

/// One thing wrong with a config file, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid(p) => p,
            Self::Read { .. } => &[],
        }
    }
}

// === the file as written ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigToml {
    server: Spanned<ServerToml>,
    admin: Option<Spanned<AdminToml>>,
    #[serde(default)]
    route: Vec<Spanned<RouteToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminToml {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerToml {
    listen: Spanned<String>,
    tag_cache_entries: Option<Spanned<i64>>,
    tag_memo_bytes: Option<Spanned<toml::Value>>,
    max_buffered_bytes: Option<Spanned<toml::Value>>,
    connect_timeout: Option<Spanned<String>>,
    upstream_idle_timeout: Option<Spanned<String>>,
    upstream_max_idle: Option<Spanned<i64>>,
    upstream_max_connections: Option<Spanned<i64>>,
    upstream_read_buffer: Option<Spanned<toml::Value>>,
    shutdown_timeout: Option<Spanned<String>>,
    shutdown_delay: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<toml::Value>>,
    max_header_fields: Option<Spanned<i64>>,
    http2_max_concurrent_streams: Option<Spanned<i64>>,
    http2_stream_window: Option<Spanned<toml::Value>>,
    http2: Option<Spanned<bool>>,
    max_request_body: Option<Spanned<toml::Value>>,
    header_read_timeout: Option<Spanned<String>>,
    tag_key: Option<Spanned<String>>,
    tag_key_file: Option<Spanned<String>>,
    tls: Option<Spanned<TlsToml>>,
    workers: Option<Spanned<i64>>,
    trusted_proxies: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsToml {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteToml {
    host: Option<Spanned<String>>,
    prefix: Spanned<String>,
    upstream: Spanned<String>,
    validation: Option<Spanned<Validation>>,
    #[serde(default)]
    require_precondition: bool,
    upstream_timeout: Option<Spanned<String>>,
    settle_timeout: Option<Spanned<String>>,
    max_tag_body: Option<Spanned<toml::Value>>,
    lock_timeout: Option<Spanned<String>>,
    #[serde(default = "default_true")]
    preserve_host: bool,
    #[serde(default)]
    per_user: bool,
    #[serde(default)]
    ignore_query: bool,
    #[serde(default)]
    strip_path_params: bool,
    tag_puts: Option<Spanned<bool>>,
    #[serde(default)]
    upstream_etag: UpstreamEtag,
    ca_file: Option<Spanned<String>>,
}

fn default_true() -> bool {
    true
}

pub const DEFAULT_TAG_CACHE_ENTRIES: usize = 100_000;
pub const DEFAULT_TAG_MEMO_BYTES: u64 = 32 * 1024 * 1024;
/// Raised to the largest route's `max_tag_body` when that is larger and the key is not set.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 128 * 1024 * 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_UPSTREAM_MAX_IDLE: usize = 256;
/// Measured against hyper's own default (~400 KiB): 64 streams of 4 MiB bodies took 15 MiB
/// less RSS, and 4 MiB GETs 4% less req/s (BENCHMARKS.md, *Upstream read buffer*).
pub const DEFAULT_UPSTREAM_READ_BUFFER: u64 = 256 * 1024;
/// Room for any response head a backend sends in practice (nginx's default allows 4 KiB).
pub const MIN_UPSTREAM_READ_BUFFER: u64 = 16 * 1024;
pub const MAX_UPSTREAM_READ_BUFFER: u64 = 16 * 1024 * 1024;
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_TAG_BODY: u64 = 8 * 1024 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
/// hyper's, Envoy's and (near enough) HAProxy's default.
pub const DEFAULT_MAX_HEADER_FIELDS: usize = 100;
pub const MAX_MAX_HEADER_FIELDS: u32 = 10_000;
/// nginx's default; hyper's is 200.
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: usize = 128;
/// Far past any browser's or gRPC client's need; more only multiplies what one connection
/// can hold.
pub const MAX_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 10_000;
/// What the proxy reads upstream at once (`DEFAULT_UPSTREAM_READ_BUFFER`): a stream holds
/// about as much of a request body as of a response. hyper's default, 1 MiB, equal to its
/// connection window, let one waiting upload stall a connection's others.
pub const DEFAULT_HTTP2_STREAM_WINDOW: u64 = 256 * 1024;
/// One DATA frame of the default size must fit.
pub const MIN_HTTP2_STREAM_WINDOW: u64 = 16 * 1024;
pub const MAX_HTTP2_STREAM_WINDOW: u64 = 16 * 1024 * 1024;
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 64 * 1024 * 1024;
pub const MIN_MAX_HEADER_BYTES: u64 = 1024;
pub const MAX_WORKERS: u32 = 1024;
/// The longest duration any key takes: far past any sensible timeout, far short of what
/// `Instant` arithmetic overflows at.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The shortest duration a key takes, besides zero where zero is allowed.
const MIN_DURATION: Duration = Duration::from_millis(1);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether two listeners would take one port: the same address, or a wildcard one that
/// covers the other (`0.0.0.0` every IPv4 address, `[::]` every address, as Linux binds it
/// dual-stack). Port 0 asks for a free port each: two different ones.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, x: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || x.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

// === impl Config ===

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::file::read_text(path, crate::file::MAX_FILE).map_err(|source| {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Validates config text; `file` names it in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let mut v = Validator {
            text,
            file,
            base: Path::new(file)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            problems: Vec::new(),
        };
        let raw = match schema_pass(&mut v) {
            Some(raw) => raw,
            None => {
                v.problems.sort_by_key(|p| p.line);
                return Err(ConfigError::Invalid(v.problems));
            }
        };
        let server = v.server(&raw.server);
        // Compared with the address as written, valid or not the rest of `[server]`: the
        // README promises every value problem in one round.
        let server_listen = raw.server.get_ref().listen.get_ref().parse::<SocketAddr>();
        let admin = raw.admin.as_ref().map(|a| {
            let at = &a.get_ref().listen;
            let listen = v.address(at, "admin.listen")?;
            // Caught here, not by a bind that fails at start.
            if let Some(&main) = server_listen.as_ref().ok().filter(|&&s| overlap(s, listen)) {
                let what = match main == listen {
                    true => "is server.listen too".to_owned(),
                    false => format!("shares its port with server.listen {main}, which one of them binds on every address"),
                };
                v.push(
                    at,
                    "admin.listen",
                    format!("{listen} {what}; give the admin endpoints their own port"),
                );
                return None;
            }
            Some(Admin { listen })
        });
        if raw.route.is_empty() {
            v.push_at_line(
                v.line_of(raw.server.span().start),
                "route",
                "no [[route]] is defined; add at least one".into(),
            );
        }
        let mut seen: HashMap<(Option<String>, String), usize> = HashMap::new();
        let mut routes = Vec::new();
        for r in &raw.route {
            // Duplicates are checked on the raw values, so that they are reported even when
            // the same route has other problems; a prefix in the normal form requests are
            // matched in, so that two spellings of one path (`/docs/./`, `/d%C3%A9/` and
            // `/dé/`) are one route, of which the second could never be reached.
            let line = v.line_of(r.span().start);
            let raw_route = r.get_ref();
            let host = raw_route
                .host
                .as_ref()
                .map(|h| host_name(h.get_ref()).to_ascii_lowercase());
            let prefix = raw_route.prefix.get_ref();
            let normal = crate::key::normalize_path(prefix).into_owned();
            if let Some(first) = seen.insert((host.clone(), normal.clone()), line) {
                let for_host = host.map(|h| format!(" for host {h:?}")).unwrap_or_default();
                let same = match normal == *prefix {
                    true => String::new(),
                    false => format!(" ({normal:?} once normalised)"),
                };
                v.push(
                    &raw_route.prefix,
                    "route.prefix",
                    format!("duplicate route: prefix {prefix:?}{same}{for_host} is already defined at line {first}"),
                );
            }
            routes.extend(v.route(r));
        }
        let server = v.buffer_bound(server, &raw);
        v.problems.sort_by_key(|p| p.line);
        match (server, v.problems.is_empty()) {
            (Some(server), true) => Ok(Config {
                server,
                admin: admin.flatten(),
                routes,
            }),
            _ => Err(ConfigError::Invalid(v.problems)),
        }
    }
}

/// Deserialises the file into its schema, reporting every schema problem rather than only
/// the first: serde stops at one error, so each error's line is recorded, blanked out, and
/// the text parsed again (at most 50 times). A field reported missing only because its line
/// was blanked is not reported again. `None` when any schema problem was found.
fn schema_pass(v: &mut Validator<'_>) -> Option<ConfigToml> {
    let mut text = v.text.to_owned();
    let mut blanked_keys: Vec<String> = Vec::new();
    for pass in 0..50 {
        // A syntax error ends the search: what follows it cannot be read reliably. (Blanking
        // a line could break a multi-line value, so later passes stop quietly instead.)
        if let Err(e) = text.parse::<toml::Table>() {
            if pass == 0 {
                let line = e.span().map_or(1, |s| v.line_of(s.start));
                // The key of the line, when it is one (`listen = 0.0.0.0:8080`, an address
                // left unquoted, reads "invalid float" alone otherwise); none for a header.
                let key = e.span().map(|s| v.key_at(s.start)).unwrap_or_default();
                let mut message = e.message().trim_end().to_owned();
                // "duplicate key" names none: the span holds it (a key, or a table header).
                if message.starts_with("duplicate") {
                    if let Some(what) = e.span().and_then(|s| text.get(s)) {
                        message = format!("{message} `{}`", what.trim());
                    }
                }
                v.push_at_line(line, &key, message);
            }
            return None;
        }
        let e = match toml::from_str::<ConfigToml>(&text) {
            Ok(raw) if v.problems.is_empty() => return Some(raw),
            Ok(_) => return None,
            Err(e) => e,
        };
        let message = e.message().trim_end().to_owned();
        let consequence = blanked_keys
            .iter()
            .any(|k| message == format!("missing field `{k}`"));
        let Some(span) = e.span() else {
            if !consequence {
                v.push_at_line(1, "", message);
            }
            return None;
        };
        let line = v.line_of(span.start);
        let start = text[..span.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        // A table's own problem (a missing key, `[route]` for `[[route]]`) points at its
        // header. The header is never blanked alone, which would put the table's keys in the
        // table above, each then reported as unknown there: the table goes with its keys.
        // A missing top-level table (`[server]`) is the document's problem, the last one
        // looked for too: its span is the whole file, from whatever line 1 holds.
        let top_level = ["missing field `server`", "missing field `route`"];
        if span.start == 0 && top_level.contains(&message.as_str()) {
            if !consequence {
                v.push_at_line(1, "", message);
            }
            return None;
        }
        if let Some(table) = table_header(&text[start..end]) {
            let unknown = message.starts_with("unknown field");
            if !consequence {
                let key = match message.strip_prefix("missing field `") {
                    Some(field) => format!("{table}.{}", field.trim_end_matches('`')),
                    None => table.to_owned(),
                };
                let message = match (table, message.contains("expected a sequence")) {
                    ("route", true) => format!("{message}: write each route as [[route]]"),
                    _ => message,
                };
                v.push_at_line(line, &key, message);
            }
            // A table that should not be there at all (`[[routes]]`), or one with a problem
            // of its own (a route without `prefix`, `[admin]` without `listen`): blanked with
            // its keys, the search goes on. serde reports tables in the order of their names,
            // not of the file, so ending here would hide every problem of a table named later
            // (`[server]`'s, behind a route's). Only `[server]` ends it: blanked, it would be
            // reported missing, and it is the last table read.
            if !unknown && table == "server" {
                return None;
            }
            let next_header = text[end..]
                .split_inclusive('\n')
                .scan(end, |at, l| {
                    let here = *at;
                    *at += l.len();
                    Some((here, l))
                })
                .find(|(_, l)| table_header(l).is_some_and(|t| !t.is_empty()))
                .map_or(text.len(), |(at, _)| at);
            // A space a byte, not a character: every later span must keep its offset.
            let blank: String = text[start..next_header]
                .bytes()
                .map(|b| if b == b'\n' { '\n' } else { ' ' })
                .collect();
            text.replace_range(start..next_header, &blank);
            continue;
        }
        let key = v.key_at(span.start);
        if !consequence {
            v.push_at_line(line, &key, message);
        }
        // Blank the offending line (keeping offsets) and look for the next problem.
        if start == end || text[start..end].trim().is_empty() {
            return None;
        }
        if let Some(k) = key.rsplit('.').next().filter(|k| !k.is_empty()) {
            blanked_keys.push(k.to_owned());
        }
        let blank = " ".repeat(end - start);
        text.replace_range(start..end, &blank);
    }
    None
}

/// The table a header line opens (`[server.tls]` → `server.tls`, `[[route]]` → `route`).
fn table_header(line: &str) -> Option<&str> {
    let line = line.trim();
    let inner = line.strip_prefix('[')?.split(']').next()?;
    Some(inner.trim_start_matches('[').trim())
}

/// Turns spans into lines and collects every problem.
struct Validator<'a> {
    text: &'a str,
    file: &'a str,
    /// The config file's directory: relative paths in the file start there.
    base: PathBuf,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The key written on the line holding `offset`, qualified by its table (`route.prefix`),
    /// for serde's errors, which carry a span but no key.
    fn key_at(&self, offset: usize) -> String {
        // A syntax error's span may fall inside a character: back to its start.
        let mut end = offset.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let start = self.text[..end].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next().unwrap_or("");
        let Some((key, _)) = line.split_once('=') else {
            return String::new();
        };
        // Read as a header is (`[server]  # the proxy` opens `server`).
        let table = self.text[..start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .and_then(table_header);
        match table {
            Some(t) => format!("{t}.{}", key.trim()),
            None => key.trim().to_owned(),
        }
    }

    fn push_at_line(&mut self, line: usize, key: &str, message: String) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line,
            key: key.to_owned(),
            message,
        });
    }

    fn push<T>(&mut self, at: &Spanned<T>, key: &str, message: String) {
        let line = self.line_of(at.span().start);
        self.push_at_line(line, key, message);
    }

    fn server(&mut self, s: &Spanned<ServerToml>) -> Option<Server> {
        let s = s.get_ref();
        let listen = self.address(&s.listen, "server.listen");
        let entries = self.count(
            &s.tag_cache_entries,
            "server.tag_cache_entries",
            DEFAULT_TAG_CACHE_ENTRIES,
        );
        let memo = self
            .size(
                &s.tag_memo_bytes,
                "server.tag_memo_bytes",
                DEFAULT_TAG_MEMO_BYTES,
            )
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let buffered = self.size(
            &s.max_buffered_bytes,
            "server.max_buffered_bytes",
            DEFAULT_MAX_BUFFERED_BYTES,
        );
        let connections = self
            .count(
                &s.max_connections,
                "server.max_connections",
                DEFAULT_MAX_CONNECTIONS,
            )
            .and_then(|n| {
                // The listener's semaphore and its drain count connections in u32.
                self.at_most(&s.max_connections, "server.max_connections", n, u32::MAX)
            });
        let connect = self.duration(
            &s.connect_timeout,
            "server.connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
        );
        let upstream_idle = self.duration(
            &s.upstream_idle_timeout,
            "server.upstream_idle_timeout",
            DEFAULT_UPSTREAM_IDLE_TIMEOUT,
        );
        let max_idle = self.at_least(
            &s.upstream_max_idle,
            "server.upstream_max_idle",
            DEFAULT_UPSTREAM_MAX_IDLE,
            0,
        );
        let max_upstream = match &s.upstream_max_connections {
            None => Some(None),
            Some(_) => {
                let key = "server.upstream_max_connections";
                self.count(&s.upstream_max_connections, key, 0)
                    .and_then(|n| self.at_most(&s.upstream_max_connections, key, n, u32::MAX))
                    .map(Some)
            }
        };
        let read_buffer = self
            .size(
                &s.upstream_read_buffer,
                "server.upstream_read_buffer",
                DEFAULT_UPSTREAM_READ_BUFFER,
            )
            .and_then(|n| {
                self.within(
                    &s.upstream_read_buffer,
                    "server.upstream_read_buffer",
                    n,
                    (MIN_UPSTREAM_READ_BUFFER, MAX_UPSTREAM_READ_BUFFER),
                )
            });
        let shutdown = self.duration(
            &s.shutdown_timeout,
            "server.shutdown_timeout",
            DEFAULT_SHUTDOWN_TIMEOUT,
        );
        let shutdown_delay = self.pause(&s.shutdown_delay, "server.shutdown_delay");
        let header_read = self.duration(
            &s.header_read_timeout,
            "server.header_read_timeout",
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        let header_bytes = self
            .size(
                &s.max_header_bytes,
                "server.max_header_bytes",
                DEFAULT_MAX_HEADER_BYTES,
            )
            .filter(|&n| {
                // Below it no browser's head fits: every request would get 431.
                let fits = n >= MIN_MAX_HEADER_BYTES;
                if let (false, Some(v)) = (fits, &s.max_header_bytes) {
                    let msg =
                        format!("{n} bytes is too small: at least {MIN_MAX_HEADER_BYTES} (1KiB)");
                    self.push(v, "server.max_header_bytes", msg);
                }
                fits
            });
        let header_fields = self
            .count(
                &s.max_header_fields,
                "server.max_header_fields",
                DEFAULT_MAX_HEADER_FIELDS,
            )
            .and_then(|n| {
                self.at_most(
                    &s.max_header_fields,
                    "server.max_header_fields",
                    n,
                    MAX_MAX_HEADER_FIELDS,
                )
            });
        let h2_streams = self
            .count(
                &s.http2_max_concurrent_streams,
                "server.http2_max_concurrent_streams",
                DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
            )
            .and_then(|n| {
                self.at_most(
                    &s.http2_max_concurrent_streams,
                    "server.http2_max_concurrent_streams",
                    n,
                    MAX_HTTP2_MAX_CONCURRENT_STREAMS,
                )
            });
        let h2_window = self
            .size(
                &s.http2_stream_window,
                "server.http2_stream_window",
                DEFAULT_HTTP2_STREAM_WINDOW,
            )
            .and_then(|n| {
                self.within(
                    &s.http2_stream_window,
                    "server.http2_stream_window",
                    n,
                    (MIN_HTTP2_STREAM_WINDOW, MAX_HTTP2_STREAM_WINDOW),
                )
            });
        let request_body = self
            .size(
                &s.max_request_body,
                "server.max_request_body",
                DEFAULT_MAX_REQUEST_BODY,
            )
            .filter(|&n| match (&s.max_request_body, n) {
                // nginx's `client_max_body_size 0` means no limit; here it would refuse
                // every body, which no one writes on purpose.
                (Some(v), 0) => {
                    let msg = "0 would refuse every request body (413); it is not \"no limit\" \
                               as nginx's client_max_body_size 0 is: write the largest body to \
                               take"
                        .to_owned();
                    self.push(v, "server.max_request_body", msg);
                    false
                }
                _ => true,
            });
        let tag_key = self.tag_key(s);
        let tls = match &s.tls {
            None => Some(None),
            Some(t) => {
                let t = t.get_ref();
                let (cert, key) = (
                    self.base.join(t.cert.get_ref()),
                    self.base.join(t.key.get_ref()),
                );
                match crate::tls::server_config(&cert, &key) {
                    Ok(c) => Some(Some(c)),
                    Err((crate::tls::PemFile::Cert, e)) => {
                        self.push(&t.cert, "server.tls.cert", e);
                        // The key judged too: both files wrong are told in one round.
                        if let Some(e) = crate::tls::key_problem(&key) {
                            self.push(&t.key, "server.tls.key", e);
                        }
                        None
                    }
                    Err((crate::tls::PemFile::Key, e)) => {
                        self.push(&t.key, "server.tls.key", e);
                        None
                    }
                }
            }
        };
        let workers = match &s.workers {
            None => Some(None),
            // A thread each: a typo of a few digits more would exhaust memory at start.
            Some(_) => self
                .count(&s.workers, "server.workers", 1)
                .and_then(|n| self.at_most(&s.workers, "server.workers", n, MAX_WORKERS))
                .map(Some),
        };
        // Judged before any `?` below: every value problem comes in one round, a broken
        // `[server.tls]` hides none of them.
        let trusted_proxies = self.trusted_proxies(s.trusted_proxies.as_deref());
        let (tls, tls_validity) = tls?.unzip();
        Some(Server {
            trusted_proxies: trusted_proxies?,
            workers: workers?,
            tls,
            tls_validity: tls_validity.flatten(),
            tag_key: tag_key?,
            listen: listen?,
            tag_cache_entries: entries?,
            tag_memo_bytes: memo?,
            max_buffered_bytes: usize::try_from(buffered?).unwrap_or(usize::MAX),
            connect_timeout: connect?,
            upstream_idle_timeout: upstream_idle?,
            upstream_max_idle: max_idle?,
            upstream_max_connections: max_upstream?,
            upstream_read_buffer: read_buffer?,
            shutdown_timeout: shutdown?,
            shutdown_delay: shutdown_delay?,
            max_connections: connections?,
            max_header_bytes: header_bytes?,
            max_header_fields: header_fields?,
            http2_max_concurrent_streams: u32::try_from(h2_streams?).unwrap_or(u32::MAX),
            http2_stream_window: u32::try_from(h2_window?).unwrap_or(u32::MAX),
            http2: s.http2.as_ref().is_none_or(|v| *v.get_ref()),
            max_request_body: request_body?,
            header_read_timeout: header_read?,
        })
    }

    /// `tag_key` (inline) or `tag_key_file` (raw bytes of a file; a relative path is taken
    /// from the config file's directory), at least `TagKey::MIN_LEN` bytes.
    fn tag_key(&mut self, s: &ServerToml) -> Option<Option<TagKey>> {
        let (secret, at, key) = match (&s.tag_key, &s.tag_key_file) {
            (None, None) => return Some(None),
            (Some(_), Some(f)) => {
                self.push(
                    f,
                    "server.tag_key_file",
                    "set tag_key or tag_key_file, not both".into(),
                );
                return None;
            }
            (Some(k), None) => (k.get_ref().trim().as_bytes().to_vec(), k, "server.tag_key"),
            (None, Some(f)) => {
                let path = self.base.join(f.get_ref());
                match crate::file::read(&path, crate::file::MAX_KEY_FILE) {
                    Ok(bytes) => (trim_ascii(&bytes).to_vec(), f, "server.tag_key_file"),
                    Err(e) => {
                        let msg = format!("cannot read {}: {e}", path.display());
                        self.push(f, "server.tag_key_file", msg);
                        return None;
                    }
                }
            }
        };
        if secret.len() < TagKey::MIN_LEN {
            let msg = format!(
                "the key is {} bytes; use at least {} random bytes (e.g. `openssl rand -hex 32`)",
                secret.len(),
                TagKey::MIN_LEN
            );
            self.push(at, key, msg);
            return None;
        }
        Some(Some(TagKey::new(&secret)))
    }

    /// `server.trusted_proxies`: addresses and ranges, each checked (all are reported).
    fn trusted_proxies(
        &mut self,
        entries: Option<&[Spanned<String>]>,
    ) -> Option<crate::trust::TrustedProxies> {
        let mut ranges = Vec::new();
        let mut ok = true;
        for entry in entries.unwrap_or_default() {
            match crate::trust::Cidr::parse(entry.get_ref()) {
                Ok(r) => ranges.push(r),
                Err(msg) => {
                    self.push(entry, "server.trusted_proxies", msg);
                    ok = false;
                }
            }
        }
        ok.then(|| crate::trust::TrustedProxies::new(ranges))
    }

    fn address(&mut self, v: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let msg = format!(
                    "{:?} is not an address; expected IP:PORT such as \"127.0.0.1:8080\"",
                    v.get_ref()
                );
                self.push(v, key, msg);
                None
            }
        }
    }

    /// A count that must be at least 1.
    fn count(&mut self, v: &Option<Spanned<i64>>, key: &str, default: usize) -> Option<usize> {
        self.at_least(v, key, default, 1)
    }

    /// A whole number of at least `min`, or `default` when absent.
    fn at_least(
        &mut self,
        v: &Option<Spanned<i64>>,
        key: &str,
        default: usize,
        min: usize,
    ) -> Option<usize> {
        let Some(n) = v else { return Some(default) };
        match usize::try_from(*n.get_ref()) {
            Ok(c) if c >= min => Some(c),
            _ => {
                self.push(n, key, format!("must be at least {min}"));
                None
            }
        }
    }

    /// `max_buffered_bytes` against the routes: an explicit bound must hold any one body a
    /// route may tag; the default grows to do so. Judged on the values as written, so that
    /// it is reported beside the file's other problems (a bad `[server]` key, a route's bad
    /// `upstream`), not in a round of its own once they are fixed.
    fn buffer_bound(&mut self, server: Option<Server>, raw: &ConfigToml) -> Option<Server> {
        let widest = raw
            .route
            .iter()
            .filter_map(|r| {
                let r = r.get_ref();
                let n = match &r.max_tag_body {
                    None => DEFAULT_MAX_TAG_BODY,
                    Some(v) => size_value(v.get_ref())?,
                };
                Some((usize::try_from(n).unwrap_or(usize::MAX), r.prefix.get_ref()))
            })
            .max_by_key(|(n, _)| *n);
        let Some((needed, prefix)) = widest else {
            return server;
        };
        match &raw.server.get_ref().max_buffered_bytes {
            None => server.map(|mut s| {
                s.max_buffered_bytes = s.max_buffered_bytes.max(needed);
                s
            }),
            Some(v) => {
                let bound =
                    size_value(v.get_ref()).map(|n| usize::try_from(n).unwrap_or(usize::MAX));
                if let Some(bound) = bound.filter(|&b| b < needed) {
                    self.push(
                        v,
                        "server.max_buffered_bytes",
                        format!(
                            "{bound} bytes is less than route {prefix:?}'s max_tag_body ({needed} \
                             bytes): no body that large could ever be tagged; raise it or lower \
                             max_tag_body"
                        ),
                    );
                }
                server
            }
        }
    }

    /// A size of `n` bytes as read from `v`, within its bounds (KiB and MiB).
    fn within(
        &mut self,
        v: &Option<Spanned<toml::Value>>,
        key: &str,
        n: u64,
        (min, max): (u64, u64),
    ) -> Option<usize> {
        match v {
            Some(spanned) if !(min..=max).contains(&n) => {
                let (kib, mib) = (min >> 10, max >> 20);
                let msg =
                    format!("{n} bytes is out of range: from {min} ({kib}KiB) to {max} ({mib}MiB)");
                self.push(spanned, key, msg);
                None
            }
            _ => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }

    /// `n`, read from `v`, if it is at most `max`.
    fn at_most(
        &mut self,
        v: &Option<Spanned<i64>>,
        key: &str,
        n: usize,
        max: u32,
    ) -> Option<usize> {
        match v {
            Some(spanned) if n > max as usize => {
                self.push(spanned, key, format!("must be at most {max}"));
                None
            }
            _ => Some(n),
        }
    }

    fn route(&mut self, r: &Spanned<RouteToml>) -> Option<Route> {
        let r = r.get_ref();
        let prefix = r.prefix.get_ref();
        let prefix_ok = prefix.starts_with('/') && prefix.parse::<Uri>().is_ok();
        if !prefix.starts_with('/') {
            self.push(
                &r.prefix,
                "route.prefix",
                format!("{prefix:?} is not a path prefix; it must start with \"/\""),
            );
        } else if !prefix_ok {
            self.push(
                &r.prefix,
                "route.prefix",
                format!(
                    "{prefix:?} is not a path prefix: it holds a character a path cannot \
                     (a space, a quote, a control byte); percent-encode it"
                ),
            );
        } else if prefix.contains(['?', '#']) {
            // Paths are matched without their query, and a fragment never reaches a server:
            // such a route could never match.
            self.push(
                &r.prefix,
                "route.prefix",
                format!("{prefix:?} is not a path prefix: it holds a query or a fragment"),
            );
        }
        let upstream = self.upstream(&r.upstream);
        // Held to the rule requests' `Host` is: a route for a host no request may name
        // (`user@host`) would never match.
        let unfit = r
            .host
            .as_ref()
            .and_then(|h| crate::host::invalid(h.get_ref().as_bytes()));
        // `None` when refused: the route's other keys are still checked, so that their
        // problems come in the same round.
        let host = match &r.host {
            Some(h) if h.get_ref().parse::<Authority>().is_err() || h.get_ref().contains('/') => {
                let hint = match h.get_ref().parse::<std::net::Ipv6Addr>() {
                    Ok(a) => format!("; an IPv6 address is written in brackets: \"[{a}]\""),
                    Err(_) => String::new(),
                };
                self.push(
                    h,
                    "route.host",
                    format!("{:?} is not a host name{hint}", h.get_ref()),
                );
                None
            }
            Some(h) if unfit.is_some() => {
                let why = unfit.unwrap_or_default();
                let msg = format!("{:?} {why}: requests naming it are refused", h.get_ref());
                self.push(h, "route.host", msg);
                None
            }
            // nginx's `*.example.com` is a wildcard; here it would match only a literal `*`.
            Some(h) if h.get_ref().contains('*') => {
                let msg = format!(
                    "{:?}: wildcards are not supported; give each host name its own route",
                    h.get_ref()
                );
                self.push(h, "route.host", msg);
                None
            }
            Some(h) => {
                let name = host_name(h.get_ref());
                Some(Some(
                    ip_literal(name).unwrap_or_else(|| name.to_ascii_lowercase()),
                ))
            }
            None => Some(None),
        };
        let upstream_timeout = self.duration(
            &r.upstream_timeout,
            "route.upstream_timeout",
            DEFAULT_UPSTREAM_TIMEOUT,
        );
        // By default the backend gets as long again to finish a write nobody waits for.
        let settle_timeout = self.duration_from(
            &r.settle_timeout,
            "route.settle_timeout",
            upstream_timeout.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT),
            true,
        );
        let lock_timeout =
            self.duration(&r.lock_timeout, "route.lock_timeout", DEFAULT_LOCK_TIMEOUT);
        let max_tag_body = self.size(&r.max_tag_body, "route.max_tag_body", DEFAULT_MAX_TAG_BODY);
        let ca_file = r.ca_file.as_ref().map(|f| self.base.join(f.get_ref()));
        let https = upstream.as_ref().is_some_and(|u| u.scheme == Scheme::HTTPS);
        let upstream_tls = match (&r.ca_file, https) {
            (Some(f), false) => {
                self.push(
                    f,
                    "route.ca_file",
                    "ca_file is for https:// upstreams".into(),
                );
                None
            }
            (Some(f), true) => match crate::tls::client_config(ca_file.as_deref()) {
                Ok(c) => Some(Some(c)),
                Err(e) => {
                    self.push(f, "route.ca_file", e);
                    None
                }
            },
            (None, _) => Some(None),
        };
        let tag_puts = r.tag_puts.as_ref().is_some_and(|t| *t.get_ref());
        if let Some(t) = r.tag_puts.as_ref().filter(|_| tag_puts && r.per_user) {
            self.push(
                t,
                "route.tag_puts",
                "tag_puts cannot be used with per_user = true: a per-user representation is \
                 not the PUT body every user reads back"
                    .into(),
            );
            return None;
        }
        // In the form request paths are matched in (`key::normalize_path`): `/docs/é`
        // must match the requests for it, which arrive as `/docs/%C3%A9` or raw.
        let prefix = prefix_ok.then(|| crate::key::normalize_path(prefix).into_owned())?;
        let host = host?;
        Some(Route {
            metric_labels: crate::metrics::route_labels(host.as_deref(), &prefix),
            host,
            prefix,
            upstream: upstream?,
            validation: r
                .validation
                .as_ref()
                .map_or(Validation::Revalidate, |v| *v.get_ref()),
            require_precondition: r.require_precondition,
            upstream_timeout: upstream_timeout?,
            settle_timeout: settle_timeout?,
            max_tag_body: max_tag_body?,
            lock_timeout: lock_timeout?,
            preserve_host: r.preserve_host,
            per_user: r.per_user,
            ignore_query: r.ignore_query,
            strip_path_params: r.strip_path_params,
            tag_puts,
            upstream_etag: r.upstream_etag,
            ca_file,
            upstream_tls: upstream_tls?,
        })
    }

    fn upstream(&mut self, s: &Spanned<String>) -> Option<Upstream> {
        let text = s.get_ref();
        let bad = |why: &str| format!("{text:?} is not an upstream URL: {why}");
        let uri = match text.parse::<Uri>() {
            Ok(u) => u,
            Err(e) => {
                self.push(s, "route.upstream", bad(&e.to_string()));
                return None;
            }
        };
        // Held to the rule requests' `Host` is: `http::Uri` takes an authority with no host
        // (`http://:80`), an IP literal that is no address (`[zz]`) or a port with a sign
        // (`:+80`), none of which any connection could be made to as written.
        let unfit = uri
            .authority()
            .and_then(|a| crate::host::invalid(a.as_str().as_bytes()));
        let problem = match (uri.scheme(), uri.authority()) {
            (None, _) | (_, None) => {
                Some("expected http://HOST:PORT or https://HOST:PORT".to_owned())
            }
            (Some(scheme), _) if scheme != &Scheme::HTTP && scheme != &Scheme::HTTPS => Some(
                format!("the scheme {scheme} is not supported; use http:// or https://"),
            ),
            (_, Some(a)) if a.as_str().contains('@') => {
                Some("credentials in the URL are not supported".to_owned())
            }
            (_, Some(a)) if unfit.is_some() => {
                Some(format!("{:?} {}", a.as_str(), unfit.unwrap_or_default()))
            }
            _ if !matches!(uri.path(), "" | "/") || uri.query().is_some() => {
                Some("an upstream is an origin only; requests keep their own path".to_owned())
            }
            // `http::Uri` keeps a port it cannot read (`:99999`) as text: every request
            // would then fail to connect.
            (_, Some(a))
                if written_port(a).is_some_and(|p| !matches!(p.parse::<u16>(), Ok(1..))) =>
            {
                Some("the port must be from 1 to 65535".to_owned())
            }
            _ => None,
        };
        if let Some(why) = problem {
            self.push(s, "route.upstream", bad(&why));
            return None;
        }
        let scheme = uri.scheme().cloned()?;
        let authority = uri.authority().cloned()?;
        Some(Upstream::new(scheme, authority))
    }

    fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Option<Duration> {
        self.duration_from(v, key, default, false)
    }

    /// A duration that may be zero (none), and is by default.
    fn pause(&mut self, v: &Option<Spanned<String>>, key: &str) -> Option<Duration> {
        self.duration_from(v, key, Duration::ZERO, true)
    }

    fn duration_from(
        &mut self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        zero: bool,
    ) -> Option<Duration> {
        let Some(v) = v else { return Some(default) };
        match humantime::parse_duration(v.get_ref()) {
            // Deadlines are `now + d`: humantime reads up to ~584 billion years, and past
            // ~292 billion the sum overflows, a panic on every request.
            Ok(d) if d > MAX_DURATION => {
                self.push(v, key, "must be at most 365 days".into());
                None
            }
            // Under a millisecond is a slip of the unit ("30ns" for "30ms"): every timeout
            // would fire before any answer could come, and every wait would be none.
            Ok(d) if !d.is_zero() && d < MIN_DURATION => {
                self.push(
                    v,
                    key,
                    format!(
                        "{:?} is under a millisecond; durations are from \"1ms\" up{}",
                        v.get_ref(),
                        if zero { " (or \"0s\" for none)" } else { "" }
                    ),
                );
                None
            }
            Ok(d) if zero || !d.is_zero() => Some(d),
            Ok(_) => {
                self.push(v, key, "must be longer than zero".into());
                None
            }
            Err(e) => {
                self.push(
                    v,
                    key,
                    format!(
                        "{:?} is not a duration ({e}); write it like \"30s\" or \"500ms\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn size(&mut self, v: &Option<Spanned<toml::Value>>, key: &str, default: u64) -> Option<u64> {
        let Some(v) = v else { return Some(default) };
        let parsed = size_value(v.get_ref());
        if parsed.is_none() {
            self.push(
                v,
                key,
                format!(
                    "{} is not a size; write bytes (1048576) or a string like \"8MiB\"",
                    v.get_ref()
                ),
            );
        }
        parsed
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

/// A size as written: a whole number of bytes, or a string [`parse_size`] reads.
fn size_value(v: &toml::Value) -> Option<u64> {
    match v {
        toml::Value::Integer(n) => u64::try_from(*n).ok(),
        toml::Value::String(s) => parse_size(s),
        _ => None,
    }
}

/// `"8MiB"`, `"512KiB"`, `"1GiB"`, `"100B"` or a plain number of bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" | "k" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The name a `Host` (or a route's `host`) stands for: no port, and no final dot, as
/// nginx reads it: `example.com.` is the same fully qualified name as `example.com`, and a
/// client must not step around its host's route by adding the dot.
pub(crate) fn host_name(host: &str) -> &str {
    let name = strip_port(host);
    name.strip_suffix('.').unwrap_or(name)
}

/// An IPv6 literal (`[2001:DB8:0::1]`) in its one spelling (RFC 5952: `[2001:db8::1]`;
/// an IPv4-mapped one, `[::ffff:10.0.0.1]`, as the IPv4 address it names), if `name` is one
/// written otherwise: the address is what a route or a backend is, so other spellings must
/// not step around a host's route nor split a backend's keys. `None` for a name, or a
/// literal already so written (as nearly all are).
pub(crate) fn ip_literal(name: &str) -> Option<String> {
    let inner = name.strip_prefix('[')?.strip_suffix(']')?;
    let addr = inner.parse::<std::net::Ipv6Addr>().ok()?;
    let one = match addr.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => format!("[{addr}]"),
    };
    (one != name).then_some(one)
}

/// The port of `a` as written, if one is (IPv6 literals' colons are not ports; `host:`,
/// an empty port, is the scheme's default, RFC 3986 §3.2.3).
fn written_port(a: &Authority) -> Option<&str> {
    let text = a.as_str();
    let port = text[strip_port(text).len()..].strip_prefix(':')?;
    (!port.is_empty()).then_some(port)
}

/// `example.com:8080` → `example.com`; IPv6 literals keep their brackets.
pub(crate) fn strip_port(host: &str) -> &str {
    // Every routed request pays this: bytes, not `char` searches.
    match host.bytes().rposition(|b| b == b':') {
        Some(i) if !host.as_bytes()[i..].contains(&b']') => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"

[[route]]
prefix = "/docs/"
upstream = "http://127.0.0.1:9000"
validation = "cached"
require_precondition = true
max_tag_body = "1MiB"
upstream_timeout = "2s"
upstream_etag = "replace"

[[route]]
prefix = "/"
upstream = "http://localhost:9001/"
"#;

    #[test]
    fn a_good_file_validates_with_defaults_filled_in() {
        let c = Config::parse(GOOD, "good.toml").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.tag_cache_entries, DEFAULT_TAG_CACHE_ENTRIES);
        assert_eq!(c.server.tag_memo_bytes as u64, DEFAULT_TAG_MEMO_BYTES);
        assert_eq!(c.server.upstream_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.upstream_max_idle, 256);
        assert_eq!(c.server.upstream_max_connections, None, "no limit");
        assert_eq!(c.server.upstream_read_buffer, 256 * 1024);
        assert_eq!(c.server.max_header_fields, 100);
        assert_eq!(c.server.http2_max_concurrent_streams, 128);
        assert!(c.server.http2, "HTTP/2 is on unless turned off");
        assert!(c.server.trusted_proxies.is_empty(), "no client is trusted");
        let docs = &c.routes[0];
        assert_eq!(docs.validation, Validation::Cached);
        assert_eq!(docs.upstream_etag, UpstreamEtag::Replace);
        assert!(docs.require_precondition);
        assert_eq!(docs.max_tag_body, 1 << 20);
        assert_eq!(docs.upstream_timeout, Duration::from_secs(2));
        assert_eq!(
            docs.settle_timeout,
            Duration::from_secs(2),
            "upstream_timeout's"
        );
        assert_eq!(c.routes[1].settle_timeout, DEFAULT_UPSTREAM_TIMEOUT);
        assert_eq!(docs.upstream.origin, "http://127.0.0.1:9000");
        let root = &c.routes[1];
        assert_eq!(root.validation, Validation::Revalidate);
        assert_eq!(root.upstream_etag, UpstreamEtag::Keep);
        assert!(!root.require_precondition);
        assert_eq!(root.max_tag_body, DEFAULT_MAX_TAG_BODY);
        assert_eq!(root.upstream.origin, "http://localhost:9001");
        // Keys take one spelling of an origin.
        for (written, key) in [
            ("http://LocalHost:80", "http://localhost"),
            ("http://localhost", "http://localhost"),
            ("https://a.example:443", "https://a.example"),
            ("https://a.example:80", "https://a.example:80"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            // One IPv6 address, however written (RFC 5952's form): one backend's locks,
            // tags and connection cap, as for `LOCALHOST` and `localhost`.
            ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
            ("http://[2001:DB8:0::1]", "http://[2001:db8::1]"),
            ("http://[::ffff:127.0.0.1]:8080", "http://127.0.0.1:8080"),
        ] {
            let uri: Uri = written.parse().unwrap();
            let up = Upstream::new(
                uri.scheme().unwrap().clone(),
                uri.authority().unwrap().clone(),
            );
            assert_eq!(up.key_prefix, key, "{written}");
            assert_eq!(up.origin, written, "logged as written");
        }
        assert_eq!(
            c.server.max_buffered_bytes as u64,
            DEFAULT_MAX_BUFFERED_BYTES
        );
    }

    #[test]
    fn the_default_buffer_bound_holds_the_largest_tagged_body_and_a_set_one_is_kept() {
        let with = |server: &str, tag_body: &str| {
            let text = format!("[server]\nlisten = \"127.0.0.1:1\"\n{server}\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nmax_tag_body = \"{tag_body}\"\n");
            Config::parse(&text, "t.toml")
                .unwrap()
                .server
                .max_buffered_bytes
        };
        assert_eq!(with("", "1GiB"), 1 << 30, "the default grows to one body");
        assert_eq!(with("", "1MiB") as u64, DEFAULT_MAX_BUFFERED_BYTES);
        assert_eq!(with("max_buffered_bytes = \"1MiB\"", "1MiB"), 1 << 20);
    }

    fn problems(text: &str) -> Vec<Problem> {
        Config::parse(text, "bad.toml")
            .unwrap_err()
            .problems()
            .to_vec()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let cases: &[(&str, usize, &str, &str)] = &[
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nmax_connections = 9223372036854775807\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.max_connections",
                "at most 4294967295",
            ),
            (
                "[server]\nlisten = \"nope\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                2,
                "server.listen",
                "not an address",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"10.1.2.3/16\",\n]\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                5,
                "server.trusted_proxies",
                "\"10.1.2.3/16\" has bits set past its /16: the range is \"10.1.0.0/16\"",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"ingress.local\"]\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.trusted_proxies",
                "not an IP address or range",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"ftp://a:1\"\n",
                5,
                "route.upstream",
                "not supported",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1/base\"\n",
                5,
                "route.upstream",
                "origin only",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"docs\"\nupstream = \"http://a:1\"\n",
                4,
                "route.prefix",
                "must start with",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nvalidation = \"sometimes\"\n",
                6,
                "route.validation",
                "unknown variant",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nupstream_etag = \"trust\"\n",
                6,
                "route.upstream_etag",
                "expected `keep` or `replace`",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nupstrem_timeout = \"1s\"\n",
                6,
                "route.upstrem_timeout",
                "unknown field",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nlock_timeout = \"soon\"\n",
                6,
                "route.lock_timeout",
                "not a duration",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nupstream_idle_timeout = \"0s\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.upstream_idle_timeout",
                "longer than zero",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nupstream_timeout = \"30ns\"\n",
                6,
                "route.upstream_timeout",
                "\"30ns\" is under a millisecond; durations are from \"1ms\" up",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nshutdown_delay = \"999us\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.shutdown_delay",
                "under a millisecond; durations are from \"1ms\" up (or \"0s\" for none)",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nheader_read_timeout = \"500000000000y\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.header_read_timeout",
                "at most 365 days",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nupstream_timeout = \"366d\"\n",
                6,
                "route.upstream_timeout",
                "at most 365 days",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:99999\"\n",
                5,
                "route.upstream",
                "the port must be from 1 to 65535",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:0\"\n",
                5,
                "route.upstream",
                "the port must be from 1 to 65535",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:00\"\n",
                5,
                "route.upstream",
                "the port must be from 1 to 65535",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nmax_header_bytes = 0\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.max_header_bytes",
                "too small: at least 1024",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/a?b\"\nupstream = \"http://a:1\"\n",
                4,
                "route.prefix",
                "holds a query or a fragment",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nhost = \"*.example.com\"\nupstream = \"http://a:1\"\n",
                5,
                "route.host",
                "wildcards are not supported",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nhost = \"user@a.example\"\nupstream = \"http://a:1\"\n",
                5,
                "route.host",
                "carries userinfo (user@), which a request may not (RFC 9110 §4.2.4): requests naming it are refused",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/a b/\"\nupstream = \"http://a:1\"\n",
                4,
                "route.prefix",
                "holds a character a path cannot",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                4,
                "admin.listen",
                "is server.listen too",
            ),
            (
                "[server]\nlisten = \"0.0.0.0:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                4,
                "admin.listen",
                "shares its port with server.listen 0.0.0.0:9000",
            ),
            (
                "[server]\nlisten = \"0.0.0.0:9000\"\n[admin]\nlisten = \"[::]:9000\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                4,
                "admin.listen",
                "shares its port with server.listen",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nmax_header_fields = 0\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.max_header_fields",
                "must be at least 1",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nmax_header_fields = 10001\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.max_header_fields",
                "must be at most 10000",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nhttp2_max_concurrent_streams = 0\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.http2_max_concurrent_streams",
                "must be at least 1",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nhttp2_max_concurrent_streams = 10001\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.http2_max_concurrent_streams",
                "must be at most 10000",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nupstream_read_buffer = \"8KiB\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.upstream_read_buffer",
                "8192 bytes is out of range: from 16384 (16KiB) to 16777216 (16MiB)",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nupstream_read_buffer = \"17MiB\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.upstream_read_buffer",
                "out of range",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nmax_request_body = 0\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.max_request_body",
                "0 would refuse every request body (413)",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nhttp2_stream_window = \"8KiB\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.http2_stream_window",
                "8192 bytes is out of range: from 16384 (16KiB) to 16777216 (16MiB)",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nhttp2_stream_window = \"1GiB\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.http2_stream_window",
                "out of range",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nhttp2_stream_window = true\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.http2_stream_window",
                "is not a size",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nupstream_max_idle = -1\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.upstream_max_idle",
                "must be at least 0",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nupstream_max_connections = 0\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.upstream_max_connections",
                "must be at least 1",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nupstream_max_connections = 4294967296\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.upstream_max_connections",
                "must be at most 4294967295",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nshutdown_delay = \"soon\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.shutdown_delay",
                "is not a duration",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nmax_tag_body = \"lots\"\n",
                6,
                "route.max_tag_body",
                "not a size",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nmax_buffered_bytes = \"1MiB\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nmax_tag_body = \"1MiB\"\n[[route]]\nprefix = \"/big\"\nupstream = \"http://a:1\"\nmax_tag_body = \"2MiB\"\n",
                3,
                "server.max_buffered_bytes",
                "1048576 bytes is less than route \"/big\"'s max_tag_body (2097152 bytes)",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\ntag_memo_bytes = -1\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.tag_memo_bytes",
                "not a size",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nper_user = true\ntag_puts = true\n",
                7,
                "route.tag_puts",
                "cannot be used with per_user",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\ntag_puts = \"yes\"\n",
                6,
                "route.tag_puts",
                "invalid type",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nsettle_timeout = \"later\"\n",
                6,
                "route.settle_timeout",
                "is not a duration",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nhttp2 = \"off\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
                3,
                "server.http2",
                "invalid type",
            ),
            ("[server]\nlisten = \"127.0.0.1:1\"\n", 1, "route", "no [[route]]"),
            ("[server\nlisten = 1\n", 1, "", "unclosed table"),
        ];
        for (text, line, key, needle) in cases {
            let p = problems(text);
            assert_eq!(p.len(), 1, "{text}: {p:?}");
            let p = &p[0];
            assert_eq!((p.line, p.key.as_str()), (*line, *key), "{text}: {p}");
            assert!(p.message.contains(needle), "{text}: {p}");
            assert!(
                p.to_string().starts_with(&format!("bad.toml:{line}: ")),
                "{p}"
            );
        }
    }

    /// An upstream whose authority names no host a connection could reach (no host at all,
    /// an IP literal that is not an address, a port spelled with a sign) is refused at load:
    /// taken, every request to it was a 502.
    #[test]
    fn an_upstream_with_no_host_to_connect_to_is_refused() {
        for upstream in ["http://:80", "http://:", "http://[zz]:9000", "http://a:+80"] {
            let p = problems(&format!(
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"{upstream}\"\n"
            ));
            assert_eq!(p.len(), 1, "{upstream}: {p:?}");
            assert_eq!(
                (p[0].line, p[0].key.as_str()),
                (5, "route.upstream"),
                "{p:?}"
            );
            assert!(p[0].message.contains("is not an upstream URL"), "{}", p[0]);
        }
        // An IPv6 literal that is one, and an empty port (the scheme's), are taken.
        for upstream in ["http://[::1]:9000", "http://[::1]", "http://a:"] {
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"{upstream}\"\n"
            );
            Config::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{upstream}: {e}"));
        }
    }

    /// The README promises every problem of the file's values in one round: a
    /// `[server.tls]` whose files cannot be read used to hide a bad `trusted_proxies`
    /// until it was mended.
    #[test]
    fn a_broken_tls_table_hides_no_other_value_problem() {
        let p = problems(
            "[server]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"ingress.local\"]\n[server.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n",
        );
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (3, "server.trusted_proxies"),
                (5, "server.tls.cert"),
                (6, "server.tls.key")
            ],
            "{p:?}"
        );
    }

    /// A table header may carry a comment (`[server]  # the proxy`): the key a schema
    /// problem names is the table's, not the header line's text.
    #[test]
    fn a_comment_after_a_table_header_is_not_part_of_the_key() {
        let p = problems(
            "[server]  # the proxy\nlisten = \"127.0.0.1:1\"\nlistne = 5\n[[route]] # docs\nprefix = \"/\"\nupstream = \"http://a:1\"\nretries = 3\n",
        );
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(got, [(3, "server.listne"), (7, "route.retries")], "{p:?}");
    }

    #[test]
    fn duplicate_prefixes_are_refused_naming_both_lines() {
        let p = problems(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/a/\"\nupstream = \"http://a:1\"\n[[route]]\nprefix = \"/a/\"\nupstream = \"http://b:1\"\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].line, 7);
        assert!(
            p[0].message.contains("already defined at line 3"),
            "{}",
            p[0]
        );
        // Two spellings of one path: the second could never be reached.
        for (first, second) in [("/docs/", "/docs/./"), ("/d%C3%A9/", "/dé/")] {
            let p = problems(&format!(
                "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"{first}\"\nupstream = \"http://a:1\"\n[[route]]\nprefix = \"{second}\"\nupstream = \"http://b:1\"\n"
            ));
            assert_eq!(p.len(), 1, "{second}: {p:?}");
            assert!(p[0].message.contains("once normalised"), "{}", p[0]);
            assert!(
                p[0].message.contains("already defined at line 3"),
                "{}",
                p[0]
            );
        }
    }

    #[test]
    fn every_schema_problem_is_reported_not_only_the_first() {
        let p = problems(
            "[server]\nlisten = \"127.0.0.1:1\"\nlistne = 1\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nvalidation = \"never\"\nretries = 3\n",
        );
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (3, "server.listne"),
                (7, "route.validation"),
                (8, "route.retries")
            ],
            "{p:?}"
        );
    }

    /// serde reads the tables in the order of their names (`admin`, `route`, `server`):
    /// a table's own problem, or one that leaves a table without a required key, used to
    /// end the search, hiding every problem of the tables named after it.
    #[test]
    fn a_table_missing_a_key_hides_no_problem_of_another_table() {
        let p = problems(
            "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\nworkers = \"x\"\n[server.tls]\ncert = \"a\"\nkee = \"b\"\n[admin]\nlisten = 5\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nfrob = true\n[[route]]\nupstream = \"http://a:1\"\n",
        );
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (3, "server.bogus"),
                (4, "server.workers"),
                (5, "server.tls.key"),
                (7, "server.tls.kee"),
                (9, "admin.listen"),
                (13, "route.frob"),
                (14, "route.prefix"),
            ],
            "{p:?}"
        );
    }

    /// TOML's "duplicate key" names no key: the problem does.
    #[test]
    fn a_duplicate_key_or_table_is_named() {
        let route = "[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n";
        for (text, named) in [
            (
                format!("[server]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n{route}"),
                "duplicate key `listen`",
            ),
            (
                format!("[server]\nlisten = \"127.0.0.1:1\"\n[server]\n{route}"),
                "duplicate key `server`",
            ),
        ] {
            let p = problems(&text);
            assert_eq!((p.len(), p[0].line), (1, 3), "{p:?}");
            assert_eq!(p[0].message, named, "{p:?}");
        }
    }

    /// A table that should not be there does not hide the problems after it.
    #[test]
    fn an_unknown_table_is_reported_and_the_search_goes_on() {
        let p = problems(
            "[server]\nlisten = \"127.0.0.1:1\"\nfoo = 1\n[[routes]]\nprefix = \"/\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nbar = 2\n",
        );
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            got,
            vec![(3, "server.foo"), (4, "routes"), (9, "route.bar")],
            "{p:?}"
        );
    }

    /// An unknown table blanked out keeps every byte's place, whatever it holds: a comment
    /// of dashes (`—`, 3 bytes each) used to shift the problems after it, onto the wrong line
    /// and key, or into the middle of a character, a panic (at start, in `--check`, and in
    /// the SIGHUP task, after which no reload ran).
    #[test]
    fn an_unknown_table_holding_non_ascii_text_keeps_the_places_of_later_problems() {
        for dashes in 1..=6 {
            let d = "—".repeat(dashes);
            let p = problems(&format!(
                "[metrics]\n# {d}\n[server]\nlisten = \"127.0.0.1:1\"  # {d}\nfoo = 1\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n"
            ));
            let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
            assert_eq!(got, [(1, "metrics"), (5, "server.foo")], "{dashes}: {p:?}");
        }
    }

    /// One mistake, one problem: a table's own problem (a missing key, a table written
    /// `[route]` for `[[route]]`) used to be followed by its keys reported as unknown in the
    /// table above it, and a value of the wrong type by "missing field `server`".
    #[test]
    fn a_mistake_in_a_table_is_one_problem_named_where_it_is() {
        let route = "[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n";
        let cases = [
            (
                format!("[server]\nlisten = 8080\n{route}"),
                (2, "server.listen"),
                "expected a string",
            ),
            (
                format!("[server]\nlisten = \"127.0.0.1:1\"\n[server.tls]\ncert = \"c.pem\"\n{route}"),
                (3, "server.tls.key"),
                "missing field `key`",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[route]\nprefix = \"/\"\nupstream = \"http://a:1\"\n"
                    .to_owned(),
                (3, "route"),
                "write each route as [[route]]",
            ),
        ];
        // An empty port is the scheme's default (RFC 3986 §3.2.3), not a bad one.
        let empty_port = "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:\"\n";
        let c = Config::parse(empty_port, "t").unwrap();
        assert_eq!(c.routes[0].upstream.key_prefix, "http://a");
        // A key missing from a `[server]` on line 1 is still that table's.
        let p = problems(&format!("[server]\nmax_connections = 5\n{route}"));
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(got, [(1, "server.listen")], "{p:?}");
        // No `[server]` at all is the file's problem, not one of the first table's keys.
        for first in ["[[route]]", "[admin]\nlisten = \"127.0.0.1:2\"\n[[route]]"] {
            let p = problems(&format!(
                "{first}\nprefix = \"/\"\nupstream = \"http://a:1\"\n"
            ));
            let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
            assert_eq!(got, [(1, "")], "{p:?}");
            assert!(p[0].message.contains("missing field `server`"), "{p:?}");
        }
        for (text, at, says) in cases {
            let p = problems(&text);
            let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
            assert_eq!(got, [at], "{text}\n{p:?}");
            assert!(p[0].message.contains(says), "{p:?}");
        }
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let p = problems(
            "[server]\nlisten = \"x\"\n[[route]]\nprefix = \"a\"\nupstream = \"b\"\nlock_timeout = \"0s\"\n",
        );
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 4, 5, 6], "{p:?}");
    }

    /// `TagKey::MIN_LEN` bytes is the shortest key taken: one byte less is refused at
    /// load, naming the key, so that a truncated secret never signs tags unnoticed.
    #[test]
    fn a_tag_key_one_byte_short_of_the_minimum_is_refused() {
        let base = "[server]\nlisten = \"127.0.0.1:1\"\n";
        let route = "[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n";
        let short = "k".repeat(TagKey::MIN_LEN - 1);
        let p = problems(&format!("{base}tag_key = \"{short}\"\n{route}"));
        assert_eq!(
            (p.len(), p[0].line, p[0].key.as_str()),
            (1, 3, "server.tag_key"),
            "{p:?}"
        );
        let enough = "k".repeat(TagKey::MIN_LEN);
        let text = format!("{base}tag_key = \"{enough}\"\n{route}");
        assert!(Config::parse(&text, "t.toml").is_ok());
    }

    #[test]
    fn tag_keys_are_read_inline_or_from_a_file_and_must_be_long() {
        let base = "[server]\nlisten = \"127.0.0.1:1\"\n";
        let route = "[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n";
        let key = "k".repeat(32);
        let c = Config::parse(&format!("{base}tag_key = \"{key}\"\n{route}"), "t.toml").unwrap();
        assert_eq!(c.server.tag_key, Some(TagKey::new(key.as_bytes())));
        let p = problems(&format!("{base}tag_key = \"short\"\n{route}"));
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (3, "server.tag_key"),
            "{p:?}"
        );
        let dir = std::env::temp_dir().join(format!("ifmatch-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tag.key"), format!("{key}\n")).unwrap();
        let file = dir.join("ifmatch.toml");
        let text = format!("{base}tag_key_file = \"tag.key\"\n{route}");
        let c = Config::parse(&text, file.to_str().unwrap()).unwrap();
        assert_eq!(
            c.server.tag_key,
            Some(TagKey::new(key.as_bytes())),
            "relative to the file"
        );
        let text = format!("{base}tag_key_file = \"missing.key\"\n{route}");
        let e = Config::parse(&text, file.to_str().unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("server.tag_key_file: cannot read"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listeners_overlap_on_one_port_where_a_wildcard_covers_the_other() {
        let o = |a: &str, b: &str| overlap(a.parse().unwrap(), b.parse().unwrap());
        for (a, b) in [
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("127.0.0.1:9000", "0.0.0.0:9000"),
            ("[::]:9000", "127.0.0.1:9000"),
            ("[::]:9000", "[::1]:9000"),
            ("0.0.0.0:9000", "[::]:9000"),
        ] {
            assert!(o(a, b), "{a} {b}");
        }
        for (a, b) in [
            ("127.0.0.1:9000", "127.0.0.1:9001"),
            ("127.0.0.1:9000", "127.0.0.2:9000"),
            ("127.0.0.1:9000", "[::1]:9000"),
            ("0.0.0.0:9000", "[::1]:9000"),
            ("0.0.0.0:0", "127.0.0.1:0"),
        ] {
            assert!(!o(a, b), "{a} {b}");
        }
    }

    #[test]
    fn workers_default_to_the_cpu_count_and_must_be_positive() {
        let route = "[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n";
        let c =
            Config::parse(&format!("[server]\nlisten = \"127.0.0.1:1\"\n{route}"), "t").unwrap();
        assert_eq!(c.server.workers, None);
        let text = format!("[server]\nlisten = \"127.0.0.1:1\"\nworkers = 1\n{route}");
        assert_eq!(Config::parse(&text, "t").unwrap().server.workers, Some(1));
        let p = problems(&format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nworkers = 0\n{route}"
        ));
        assert_eq!((p[0].line, p[0].key.as_str()), (3, "server.workers"));
        let p = problems(&format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nworkers = 100000\n{route}"
        ));
        assert_eq!((p[0].line, p[0].key.as_str()), (3, "server.workers"));
        assert_eq!(p[0].message, "must be at most 1024");
    }

    #[test]
    fn a_timeout_of_a_millisecond_is_taken() {
        let c = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\nupstream_timeout = \"1ms\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.routes[0].upstream_timeout, Duration::from_millis(1));
    }

    #[test]
    fn a_shutdown_delay_is_none_unless_set_and_may_be_zero() {
        let toml = |extra: &str| {
            format!("[server]\nlisten = \"127.0.0.1:1\"\n{extra}\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n")
        };
        for (extra, want) in [
            ("", Duration::ZERO),
            ("shutdown_delay = \"0s\"", Duration::ZERO),
            ("shutdown_delay = \"5s\"", Duration::from_secs(5)),
            ("shutdown_delay = \"1ms\"", Duration::from_millis(1)),
        ] {
            let c =
                Config::parse(&toml(extra), "t.toml").unwrap_or_else(|e| panic!("{extra}: {e}"));
            assert_eq!(c.server.shutdown_delay, want, "{extra}");
        }
    }

    #[test]
    fn an_upstream_read_buffer_within_its_bounds_is_kept() {
        for (v, want) in [
            ("\"16KiB\"", 16 << 10),
            ("\"1MiB\"", 1 << 20),
            ("16777216", 16 << 20),
        ] {
            let toml = format!("[server]\nlisten = \"127.0.0.1:1\"\nupstream_read_buffer = {v}\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n");
            let c = Config::parse(&toml, "t.toml").unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(c.server.upstream_read_buffer, want, "{v}");
        }
    }

    #[test]
    fn an_http2_stream_window_within_its_bounds_is_kept() {
        for (v, want) in [
            ("", 256 << 10),
            ("http2_stream_window = \"16KiB\"", 16 << 10),
            ("http2_stream_window = 1048576", 1 << 20),
            ("http2_stream_window = \"16MiB\"", 16 << 20),
        ] {
            let toml = format!("[server]\nlisten = \"127.0.0.1:1\"\n{v}\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n");
            let c = Config::parse(&toml, "t.toml").unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(c.server.http2_stream_window, want, "{v}");
        }
    }

    #[test]
    fn route_prefixes_are_kept_in_the_normal_form_paths_are_matched_in() {
        for (prefix, normal) in [
            ("/docs/", "/docs/"),
            ("/docs/é", "/docs/%C3%A9"),
            ("/a/./b", "/a/b"),
        ] {
            let toml = format!("[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"{prefix}\"\nupstream = \"http://a:1\"\n");
            let c = Config::parse(&toml, "t.toml").unwrap_or_else(|e| panic!("{prefix}: {e}"));
            assert_eq!(c.routes[0].prefix, normal);
        }
    }

    #[test]
    fn sizes_and_hosts() {
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("512 KiB"), Some(512 << 10));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1.5MiB"), None);
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(host_name("example.com.:80"), "example.com");
        assert_eq!(host_name("example.com."), "example.com");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(ip_literal("[0:0:0:0:0:0:0:1]").as_deref(), Some("[::1]"));
        assert_eq!(
            ip_literal("[2001:DB8:0::1]").as_deref(),
            Some("[2001:db8::1]")
        );
        assert_eq!(ip_literal("[::1]"), None, "already in its one spelling");
        assert_eq!(
            ip_literal("[::FFFF:a00:1]").as_deref(),
            Some("10.0.0.1"),
            "an IPv4-mapped address is the IPv4 one"
        );
        assert_eq!(ip_literal("a.example"), None);
    }

    /// A route for an IPv6 literal is found by every spelling of its address, in the
    /// config and in `Host`: a client must not step around it (its `require_precondition`)
    /// by writing `[2001:db8:0::1]` for `[2001:db8::1]`.
    #[test]
    fn a_route_for_an_ip_literal_takes_every_spelling_of_its_address() {
        let c = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n\
             [[route]]\nprefix = \"/\"\nhost = \"[2001:DB8:0::1]\"\nupstream = \"http://b:1\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.routes[1].host.as_deref(), Some("[2001:db8::1]"));
        let router = crate::router::Router::new(c.routes);
        for host in [
            "[2001:db8::1]",
            "[2001:DB8::1]:80",
            "[2001:db8:0:0::1]",
            "[2001:0db8::0001]:8080",
        ] {
            let r = router.route(Some(host), "/x").unwrap();
            assert_eq!(r.upstream.origin, "http://b:1", "{host}");
        }
        assert_eq!(
            router
                .route(Some("[2001:db8::2]"), "/x")
                .unwrap()
                .upstream
                .origin,
            "http://a:1"
        );
    }

    /// An IPv4 address written as an IPv4-mapped IPv6 literal is that IPv4 address: a route
    /// for `10.0.0.1` is not stepped around by `Host: [::ffff:10.0.0.1]`.
    #[test]
    fn a_route_for_an_ipv4_address_takes_its_ipv4_mapped_spellings() {
        let c = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n\
             [[route]]\nprefix = \"/\"\nhost = \"10.0.0.1\"\nupstream = \"http://b:1\"\n\
             [[route]]\nprefix = \"/\"\nhost = \"[::ffff:10.0.0.2]\"\nupstream = \"http://c:1\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.routes[2].host.as_deref(), Some("10.0.0.2"));
        let router = crate::router::Router::new(c.routes);
        let origin = |host| &router.route(Some(host), "/x").unwrap().upstream.origin;
        for host in ["10.0.0.1", "[::ffff:10.0.0.1]", "[::FFFF:a00:1]:8080"] {
            assert_eq!(origin(host), "http://b:1", "{host}");
        }
        for host in ["10.0.0.2:80", "[::ffff:10.0.0.2]"] {
            assert_eq!(origin(host), "http://c:1", "{host}");
        }
        assert_eq!(origin("[::a00:1]"), "http://a:1", "not a mapped address");
    }

    #[test]
    fn an_ipv6_route_host_without_brackets_is_told_to_take_them() {
        let e = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nhost = \"::1\"\nupstream = \"http://a:1\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.toml:5: route.host: \"::1\" is not a host name; an IPv6 address is written in brackets: \"[::1]\""),
            "{e}"
        );
    }
}
