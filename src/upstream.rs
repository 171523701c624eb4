//! The client to the backends: connection pools per trust root (`pool`), the rewriting of a
//! client's request into the upstream's (URI, hop-by-hop headers, `X-Forwarded-*`),
//! timeouts, and the mapping of upstream failures to the proxy's errors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;

use crate::body::{BodyTooLong, ClientBody, ClientBodyFailed, Hashed, StreamReset};
use crate::config::{Config, Route, Server};
use crate::error::Error;
use crate::etag::{ETag, TagHasher};
use crate::framing::FramingError;
use crate::h1::{RawError, RawPool, UpBody};
use crate::pool::{ConnectionCap, Pool, ReadLimits, SendError};
use crate::tls::ClientTls;
use crate::trust::TrustedProxies;

/// A request body to the upstream: the client's own as it streams in (cut off at the size
/// limit, hashed on the way for `tag_puts`), or bytes in hand: one read whole before its
/// write, or none (revalidation GETs).
pub type UpstreamBody = Either<Hashed<ClientBody>, Full<Bytes>>;

/// A request body read whole already.
pub fn whole(body: Bytes) -> UpstreamBody {
    Either::Right(Full::new(body))
}

/// Who sent a request, as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `"http"` or `"https"`: the scheme of the listener, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// The client's IP as an `X-Forwarded-For` element, formatted once per connection.
    ip: HeaderValue,
    /// `server.trusted_proxies`, when the client is one of them: its `X-Forwarded-Proto`,
    /// `X-Forwarded-Host` and `Forwarded` say what its own client used, and pass on, and its
    /// `X-Forwarded-For` names that client (`TrustedProxies::forwarded_client`).
    pub trusted: Option<TrustedProxies>,
}

impl Peer {
    /// `trusted`: `server.trusted_proxies`, as the connection was accepted under.
    pub fn new(addr: SocketAddr, scheme: &'static str, trusted: &TrustedProxies) -> Self {
        // An IPv4 client of a dual-stack `[::]` listener comes as `::ffff:a.b.c.d`: named
        // as the IPv4 address it is, in `X-Forwarded-For` and the access log.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let ip = HeaderValue::try_from(addr.ip().to_string())
            .expect("an IP address is a valid header value");
        let trusted = trusted.trusts(addr.ip()).then(|| trusted.clone());
        Self {
            addr,
            scheme,
            ip,
            trusted,
        }
    }

    pub fn trusted_proxy(&self) -> bool {
        self.trusted.is_some()
    }
}

type Connector = HttpsConnector<HttpConnector>;

/// Connection pools to the upstreams: one that trusts the platform's roots, and one per
/// `ca_file` a route names. All speak `http://` and `https://` (HTTP/1.1, SNI from the host).
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    pool: Arc<Pool<Connector>>,
    by_ca_file: HashMap<PathBuf, Arc<Pool<Connector>>>,
    /// Every pool by the digest of the roots it trusts (`ClientTls::roots`), and the
    /// settings they were made with: a reload keeps those it would make again, and their
    /// open connections (`reloaded`).
    by_roots: HashMap<[u8; 32], Arc<Pool<Connector>>>,
    /// Also the connect timeout and read limits named in errors.
    settings: PoolSettings,
    max_request_body: u64,
    /// `upstream_max_connections`, shared by the pools, for its metrics.
    cap: Option<Arc<ConnectionCap>>,
    /// The client of body-less GETs and HEADs to plain-http upstreams ([`crate::h1`]);
    /// none under `upstream_max_connections`, whose turns and counts are the pools'.
    raw: Option<Arc<RawPool>>,
}

/// What a pool is made with besides its roots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PoolSettings {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    max_connections: Option<usize>,
    read: ReadLimits,
}

impl PoolSettings {
    fn of(s: &Server) -> Self {
        Self {
            connect_timeout: s.connect_timeout,
            idle_timeout: s.upstream_idle_timeout,
            max_idle: s.upstream_max_idle,
            max_connections: s.upstream_max_connections,
            read: read_limits(s),
        }
    }
}

/// The platform's roots, or none (https upstreams then need `ca_file`). None found is
/// warned of only when `config` has an https route without `ca_file`: a proxy of plain or
/// private-CA upstreams on an image with no roots was told at every start and reload that
/// its https upstreams need a `ca_file`.
pub(crate) fn platform_tls(config: &Config) -> ClientTls {
    let tls = crate::tls::client_config(None).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no platform roots; https upstreams need ca_file");
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        ClientTls {
            config: Arc::new(config),
            roots: [0; 32],
            no_roots: false,
        }
    });
    let needed = |r: &crate::config::Route| {
        r.upstream.scheme == http::uri::Scheme::HTTPS && r.ca_file.is_none()
    };
    if tls.no_roots && config.routes.iter().any(needed) {
        tracing::warn!("no platform CA certificates found; https upstreams need ca_file");
    }
    tls
}

fn build(tls: &ClientConfig, s: &Server, cap: Option<Arc<ConnectionCap>>) -> Arc<Pool<Connector>> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(s.connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Pool::new(
        https,
        s.upstream_idle_timeout,
        s.upstream_max_idle,
        cap,
        read_limits(s),
        s.connect_timeout,
    )
}

fn read_limits(s: &Server) -> ReadLimits {
    ReadLimits {
        read_buffer: s.upstream_read_buffer,
        max_header_fields: s.max_header_fields,
    }
}

// === impl UpstreamClient ===

impl UpstreamClient {
    pub fn new(config: &Config) -> Self {
        Self::made(config, None)
    }

    /// The client for a reloaded `config`: the pools of this one that it would make again
    /// (the same settings, the same roots) are kept, with their open connections and their
    /// count under `upstream_max_connections`; a reload used to close every kept-alive
    /// backend connection, and the cap's count began again beside the old one's.
    pub fn reloaded(&self, config: &Config) -> Self {
        Self::made(config, Some(self))
    }

    fn made(config: &Config, previous: Option<&Self>) -> Self {
        let s = &config.server;
        let settings = PoolSettings::of(s);
        // One cap for all the pools: it is per origin, whichever roots a route trusts. Kept
        // while its limit is, so that connections of pools a reload replaces still count
        // (and an idle one gives its place to a request of the new pools).
        let cap = match previous {
            Some(p) if p.settings.max_connections == settings.max_connections => p.cap.clone(),
            _ => s.upstream_max_connections.map(ConnectionCap::new),
        };
        let previous = previous.filter(|p| p.settings == settings);
        let raw = match previous {
            Some(p) => p.raw.clone(),
            None => s.upstream_max_connections.is_none().then(|| {
                RawPool::new(
                    s.upstream_idle_timeout,
                    s.upstream_max_idle,
                    read_limits(s),
                    s.connect_timeout,
                )
            }),
        };
        let mut by_roots = HashMap::new();
        let mut pool_for = |tls: &ClientTls| {
            let kept = || previous.and_then(|p| p.by_roots.get(&tls.roots).cloned());
            by_roots
                .entry(tls.roots)
                .or_insert_with(|| kept().unwrap_or_else(|| build(&tls.config, s, cap.clone())))
                .clone()
        };
        let pool = pool_for(&platform_tls(config));
        let by_ca_file = config
            .routes
            .iter()
            .filter_map(|r| Some((r.ca_file.clone()?, r.upstream_tls.as_ref()?)))
            .map(|(path, tls)| (path, pool_for(tls)))
            .collect();
        Self {
            pool,
            by_roots,
            settings,
            cap,
            by_ca_file,
            max_request_body: s.max_request_body,
            raw,
        }
    }

    /// `upstream_max_connections`, when set.
    pub fn cap(&self) -> Option<&Arc<ConnectionCap>> {
        self.cap.as_ref()
    }

    /// The client's body, cut off past `server.max_request_body` (the send then fails with
    /// a 413).
    pub fn limit(&self, body: ClientBody) -> UpstreamBody {
        Either::Left(Hashed::plain(self.limited(body)))
    }

    /// [`limit`](Self::limit), and the slot that holds the tag of the bytes sent once the
    /// whole body has gone upstream, if they were no more than `most`.
    pub fn limit_hashed(
        &self,
        body: ClientBody,
        hasher: TagHasher,
        most: u64,
    ) -> (UpstreamBody, Arc<OnceLock<ETag>>) {
        let (body, sent) = Hashed::tee(self.limited(body), hasher, most);
        (Either::Left(body), sent)
    }

    fn limited(&self, body: ClientBody) -> ClientBody {
        body.limit(self.max_request_body)
    }

    /// Sends `req` and waits up to `timeout` (the route's `upstream_timeout`, or longer for a
    /// write that settles) for the response head; `queued` is told of its wait for a turn
    /// ([`crate::pool::Pool::send_queued`]). The response comes back without hop-by-hop
    /// headers, whichever path uses it.
    pub async fn send_within(
        &self,
        route: &Route,
        req: Box<Request<UpstreamBody>>,
        timeout: Duration,
        queued: Option<&crate::pool::Queued>,
    ) -> Result<Response<UpBody>, Error> {
        let upstream = || route.upstream.origin.clone();
        let pool = route
            .ca_file
            .as_ref()
            .and_then(|p| self.by_ca_file.get(p))
            .unwrap_or(&self.pool);
        let sent = match &self.raw {
            Some(raw) if queued.is_none() && crate::h1::takes(&route.upstream, &req) => {
                raw.send(&route.upstream, req, timeout).await
            }
            // Not bound to a name first: the future would be kept twice (see
            // `Proxy::handle`).
            _ => pool
                .send_queued(&route.upstream, req, timeout, queued)
                .await
                .map(|rsp| rsp.map(UpBody::Hyper)),
        };
        match sent {
            // No request goes up with `Upgrade` (it is hop-by-hop): a switch is one nobody
            // asked for, and neither an HTTP/1.1 nor an HTTP/2 client could be given it.
            Ok(rsp) if rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                Err(Error::Upstream {
                    upstream: upstream(),
                    reason: "it answered 101 Switching Protocols to a request that asked for no \
                         upgrade"
                        .into(),
                })
            }
            Ok(mut rsp) => match strip_response(rsp.status(), rsp.headers_mut()) {
                Ok(()) => {
                    // The version is hop-by-hop: hyper's server would answer an HTTP/1.1
                    // client in a 1.0 backend's version, and close its connection.
                    *rsp.version_mut() = Version::HTTP_11;
                    Ok(rsp)
                }
                Err(reason) => Err(Error::Upstream {
                    upstream: upstream(),
                    reason,
                }),
            },
            Err(e) => Err(self.classify(&e, upstream(), route, timeout)),
        }
    }
}

impl UpstreamClient {
    /// Turns a send error into the proxy's error, keeping the innermost cause as the reason.
    /// `route` is the one the request was sent for (its `ca_file`), `timeout` its timeout.
    fn classify(&self, e: &SendError, upstream: String, route: &Route, timeout: Duration) -> Error {
        // hyper says "message head is too large" for both limits alike, and so does h1.rs.
        let too_large = match e {
            SendError::Http(h) => h.is_parse_too_large(),
            SendError::Raw(r) => matches!(r, RawError::TooLarge),
            _ => false,
        };
        if too_large {
            let ReadLimits {
                read_buffer,
                max_header_fields,
            } = self.settings.read;
            return Error::Upstream {
                upstream,
                reason: format!(
                    "its response head is over upstream_read_buffer ({read_buffer} bytes) or \
                     max_header_fields ({max_header_fields})"
                ),
            };
        }
        let (top, is_connect): (&(dyn std::error::Error + 'static), bool) = match e {
            SendError::Connect(c) => (&**c, true),
            SendError::Http(h) => (h, false),
            SendError::Raw(r) => (r, false),
            SendError::Timeout => {
                return Error::UpstreamTimeout {
                    upstream,
                    after: timeout,
                    connecting: false,
                }
            }
            // nginx's `client_body_timeout`: the client's doing, not the backend's.
            SendError::UploadPaused => return Error::BodyTimeout(timeout),
            &SendError::Saturated { limit, waited } => {
                return Error::UpstreamBusy {
                    upstream,
                    limit,
                    waited,
                }
            }
        };
        let mut reason = top.to_string();
        let mut source = Some(top);
        while let Some(s) = source {
            if s.is::<BodyTooLong>() {
                return Error::BodyTooLarge {
                    limit: self.max_request_body,
                };
            }
            // The client's body broke on its way up: a 400 for the client, not a 502 and a
            // warning that blames the backend.
            if s.is::<ClientBodyFailed>() || s.is::<StreamReset>() {
                return Error::BodyRead(crate::error::with_sources(s));
            }
            if let Some(tls) = find_tls_error(s) {
                return Error::UpstreamTls {
                    upstream,
                    reason: tls.to_string(),
                    hint: tls_hint(tls, route.ca_file.is_some()),
                };
            }
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::TimedOut && is_connect {
                    return Error::UpstreamTimeout {
                        upstream,
                        after: self.settings.connect_timeout,
                        connecting: true,
                    };
                }
                // socket() failed: the proxy's limit, which a 502 would pin on the backend.
                // A lookup's failure has no error number: whether descriptors ran out is
                // asked anew.
                let exhausted = match io.raw_os_error() {
                    _ if !is_connect => None,
                    Some(_) => crate::fds::exhausted(io),
                    None => crate::fds::exhausted_now(),
                };
                if let Some(hint) = exhausted {
                    return Error::OutOfFiles {
                        upstream,
                        reason: io.to_string(),
                        hint,
                    };
                }
            }
            reason = s.to_string();
            source = s.source();
        }
        if is_connect {
            Error::UpstreamConnect { upstream, reason }
        } else {
            Error::Upstream { upstream, reason }
        }
    }
}

/// What an operator can do about a TLS failure with an upstream, where it is one thing.
fn tls_hint(e: &rustls::Error, has_ca_file: bool) -> &'static str {
    use rustls::CertificateError;
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) if has_ca_file => {
            "; the route's ca_file holds no CA that issued it"
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "; if it uses a private CA, set the route's ca_file"
        }
        // webpki's error, which rustls passes on as `Other`: `openssl req -x509` makes a
        // self-signed certificate a CA (basicConstraints CA:TRUE) unless told otherwise.
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.to_string().contains("CaUsedAsEndEntity") =>
        {
            "; the backend's certificate is a CA certificate (basicConstraints CA:TRUE), which \
             may not serve a connection: give it one issued by that CA, or make the \
             self-signed one with -addext basicConstraints=critical,CA:FALSE"
        }
        _ => "",
    }
}

/// The rustls error inside `e`, looking through I/O errors: they wrap their cause without
/// showing it as `source()` (the TLS connector nests two of them).
fn find_tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    find_tls_error(inner)
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// proxy-only ones: none of them is forwarded in either direction. `Connection` first.
/// (`Trailer` is not one: it announces the message's trailer fields end to end, §6.6.2, and
/// hyper's HTTP/1.1 server sends only the trailers it names.)
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// `Transfer-Encoding`'s place in [`HOP_BY_HOP`], as a bit of [`Scan::present`].
const TRANSFER_ENCODING_BIT: u16 = 1 << 4;

/// The forwarding headers the proxy sets (`prepare`), and reads from a trusted proxy.
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The headers the proxy sets (`X-Forwarded-*`, `prepare`) or judges by name (the method
/// overrides), whose spellings with `_` for `-` are not passed on: CGI, WSGI, Rack and PHP
/// name a header by its `HTTP_X_FORWARDED_PROTO` variable, where `X_Forwarded_Proto` and
/// `X-Forwarded-Proto` are one, so a client's `X_Forwarded_Host` went up as the proxy's
/// `X-Forwarded-Host` (Puma before 6.4.3 let it clobber the proxy's, CVE-2024-45614), and its
/// `X_HTTP_Method_Override: DELETE` ran a POST as a DELETE (Rack's `MethodOverride`) past
/// `require_precondition`. nginx drops every name with `_` by default
/// (`underscores_in_headers off`), gunicorn 22 too; other names pass here as sent.
const OWN_NAMES: [&str; 6] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    METHOD_OVERRIDES[0],
    METHOD_OVERRIDES[1],
    METHOD_OVERRIDES[2],
];

/// Whether a client's header would pass for one the proxy sets: a name of [`OWN_NAMES`]
/// spelled with underscores, or `Forwarded` (RFC 7239), which says what `X-Forwarded-*`
/// say and which Rack 3 (`forwarded_priority`) and Spring's `ForwardedHeaderFilter` read
/// before them: a client's `host=evil.example;proto=https` stood for the proxy's
/// `X-Forwarded-Host` and `-Proto`. The length is looked at first: one compare for nearly
/// every name.
fn passes_for_the_proxys(name: &HeaderName) -> bool {
    let n = name.as_str();
    may_pass_for_the_proxys(n) && passes_by_its_spelling(n)
}

/// Whether a name is of a length one of [`passes_for_the_proxys`]' names has: a shift and a
/// test turn away nearly every name, inline.
#[inline(always)]
fn may_pass_for_the_proxys(name: &str) -> bool {
    const LENGTHS: u32 = 1 << 9 | 1 << 13 | 1 << 15 | 1 << 16 | 1 << 17 | 1 << 22;
    name.len() < 32 && LENGTHS & (1 << name.len()) != 0
}

/// The rest of [`passes_for_the_proxys`], out of line: what the scan inlines stays small.
#[inline(never)]
fn passes_by_its_spelling(name: &str) -> bool {
    name == header::FORWARDED.as_str() || spells_own_name_with_underscores(name)
}

/// Whether `name` (lower case, as every `HeaderName` is) is one of [`OWN_NAMES`] with `_` for
/// some `-`.
fn spells_own_name_with_underscores(name: &str) -> bool {
    // Compared byte by byte (another name differs within a byte or two), without a search
    // for `_` first: a memchr call costs more than the compare on names this short.
    OWN_NAMES.iter().any(|own| {
        let mut underscored = false;
        own.len() == name.len()
            && own.bytes().zip(name.bytes()).all(|(o, n)| {
                underscored |= n == b'_';
                o == n || (o == b'-' && n == b'_')
            })
            && underscored
    })
}

/// Which hop-by-hop headers a head has, found in one pass over it: most heads carry none or
/// only `Connection: keep-alive`, and each lookup or removal costs a hash.
#[derive(Clone, Copy, Debug)]
struct Scan {
    /// Bit `i` for `HOP_BY_HOP[i]`.
    present: u16,
    /// `Connection` names headers beyond the hop-by-hop ones.
    names_more: bool,
    /// A header that would pass for the proxy's own is there ([`passes_for_the_proxys`]).
    claimed: bool,
}

/// One pass over a head. `REQUEST`: a client's, whose headers that would pass for the
/// proxy's own are looked for too (a response's pass as sent: not looked at, not paid for).
fn scan<const REQUEST: bool>(headers: &HeaderMap) -> Scan {
    let mut found = Scan {
        present: 0,
        names_more: false,
        claimed: false,
    };
    for (name, value) in headers.iter() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            found.present |= 1 << i;
            found.names_more |= i == 0 && !names_nothing(value);
        } else if REQUEST {
            let name = name.as_str();
            found.claimed |= may_pass_for_the_proxys(name) && passes_by_its_spelling(name);
        }
    }
    found
}

/// Removes hop-by-hop headers, every header named in `Connection`, and those that would
/// pass for the proxy's own ([`passes_for_the_proxys`]). True if `Connection` named any
/// beyond the hop-by-hop ones (which may be any header, `Host` too).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    strip_request(headers, false)
}

/// [`strip_hop_by_hop`], keeping `Forwarded` when the client is a trusted proxy: its value
/// is then that proxy's word about its own client, as its `X-Forwarded-*` are.
fn strip_request(headers: &mut HeaderMap, trusted_proxy: bool) -> bool {
    let found = scan::<true>(headers);
    strip_scanned(headers, found, trusted_proxy)
}

/// A response head from an upstream, made fit to send on: hyper read its body by its
/// transfer coding, which wins over a `Content-Length` (RFC 9112 §6.3) but leaves that
/// field in place; sent on, it would frame the body anew, wrongly, so it goes. A coding
/// besides the final `chunked` cannot be passed on (the field goes as hop-by-hop): the
/// error names it, for a 502, as nginx gives. A length repeated becomes one, and a 1xx or
/// 204 loses the one it must not have (RFC 9110 §8.6; hyper leaves it on a HEAD's). Then
/// the hop-by-hop headers go.
fn strip_response(status: http::StatusCode, headers: &mut HeaderMap) -> Result<(), String> {
    let found = scan::<false>(headers);
    if found.present & TRANSFER_ENCODING_BIT != 0 {
        if let Err(e) = crate::framing::check_codings(headers) {
            return Err(match e {
                FramingError::UnsupportedEncoding(codings) => format!(
                    "its response has Transfer-Encoding {codings:?}, which the proxy cannot \
                     pass on (only \"chunked\")"
                ),
                e => e.to_string(),
            });
        }
        headers.remove(header::CONTENT_LENGTH);
    } else if status == http::StatusCode::NO_CONTENT || status.is_informational() {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        collapse_repeated_length(headers);
    }
    strip_scanned(headers, found, false);
    Ok(())
}

fn strip_scanned(headers: &mut HeaderMap, found: Scan, keep_forwarded: bool) -> bool {
    let Scan {
        present,
        names_more,
        claimed,
    } = found;
    if claimed {
        let spoofed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| passes_for_the_proxys(n) && !(keep_forwarded && **n == header::FORWARDED))
            .cloned()
            .collect();
        for name in &spoofed {
            headers.remove(name);
        }
    }
    if present == 0 {
        return false;
    }
    // The names `Connection` lists beyond the fixed ones (and its `close` option): rare,
    // so only they cost a `HeaderName` each.
    let named: Vec<HeaderName> = if names_more {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter(|v| !names_nothing(v))
            // By bytes: a line with one non-ASCII token still names the others (§7.6.1).
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| {
                !t.eq_ignore_ascii_case(b"close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| t.eq_ignore_ascii_case(h.as_str().as_bytes()))
            })
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect()
    } else {
        Vec::new()
    };
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
    !named.is_empty()
}

/// Whether a `Connection` value is one of the two almost every head carries, which name no
/// header to remove: `keep-alive` (itself hop-by-hop) and `close`. Checked whole, they skip
/// the token scan (~200 instructions a head, callgrind).
fn names_nothing(v: &HeaderValue) -> bool {
    let v = v.as_bytes();
    v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
}

/// Rewrites a client's request head into the upstream's, in place. `host` is the client's
/// one `Host` value (`host::check`), still in `parts`.
pub fn prepare(parts: &mut Parts, host: Option<HeaderValue>, route: &Route, peer: &Peer) {
    let from_uri = parts
        .uri
        .authority()
        .map(|a| HeaderValue::from_str(a.as_str()))
        .and_then(Result::ok);
    let host_in_head = from_uri.is_none() && host.is_some();
    let original_host = from_uri.or(host);

    // Origin-form, as an HTTP/1.1 origin server expects (RFC 9112 §3.2.1): what HTTP/1.1
    // clients send already; HTTP/2's and absolute-form requests carry scheme and authority.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = origin_form(&parts.uri);
    }
    let from_h2 = parts.version == Version::HTTP_2;
    parts.version = Version::HTTP_11;

    let h = &mut parts.headers;
    let named_removed = strip_request(h, peer.trusted_proxy());
    if from_h2 {
        join_cookies(h);
        collapse_repeated_length(h);
    }
    // The proxy answers `Expect: 100-continue` itself (hyper sends the 100 when the body is
    // first read, i.e. only once the write passed its precondition).
    h.remove(header::EXPECT);

    match (&original_host, route.preserve_host) {
        // The client's `Host` is in the head already (an insert is a hash and a probe).
        (Some(_), true) if host_in_head && !named_removed => {}
        (Some(host), true) => {
            h.insert(header::HOST, host.clone());
        }
        _ => {
            h.insert(header::HOST, route.upstream.host.clone());
        }
    }

    let xff = X_FORWARDED_FOR;
    // Every field line, in order (§5.3: they are one list): a proxy in front may have added
    // its own line rather than joined the first, and keeping only that first line would
    // let the client's own value pass for the last hop's.
    let mut prior = h.get_all(&xff).iter();
    let forwarded_for = match (prior.next(), prior.next()) {
        (None, _) => peer.ip.clone(),
        (Some(one), second) => {
            let mut list = one.as_bytes().to_vec();
            for v in second.into_iter().chain(prior) {
                list.extend_from_slice(b", ");
                list.extend_from_slice(v.as_bytes());
            }
            list.extend_from_slice(b", ");
            list.extend_from_slice(peer.ip.as_bytes());
            HeaderValue::from_bytes(&list).expect("valid values joined by commas stay valid")
        }
    };
    h.insert(xff, forwarded_for);
    // A trusted proxy's own say passes (the scheme and host its client used, where ifmatch
    // saw plain HTTP from that proxy); what it left out is set, as for any client.
    let xfp = X_FORWARDED_PROTO;
    if !(peer.trusted_proxy() && h.contains_key(&xfp)) {
        h.insert(xfp, HeaderValue::from_static(peer.scheme));
    }
    let xfh = X_FORWARDED_HOST;
    if peer.trusted_proxy() && h.contains_key(&xfh) {
        return;
    }
    match original_host {
        Some(host) => {
            h.insert(xfh, host);
        }
        // No host to name (HTTP/1.0 may omit `Host`): the client's own would pass for the
        // proxy's, and a backend that trusts it builds its links on it.
        None => {
            h.remove(xfh);
        }
    }
}

/// HTTP/2 lets a client split `Cookie` into several fields, for compression (browsers do);
/// before an HTTP/1.1 hop they are joined into one with `"; "` (RFC 9113 §8.2.3), since an
/// HTTP/1.1 server expects one (RFC 6265 §5.4) and many read only the first.
fn join_cookies(h: &mut HeaderMap) {
    let mut fields = h.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (fields.next(), fields.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in h.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    let joined =
        HeaderValue::from_bytes(&joined).expect("valid values joined by \"; \" stay valid");
    h.insert(header::COOKIE, joined);
}

/// A `Content-Length` repeated, as fields or as a list in one (`5, 5`), whose values hyper
/// found equal before framing the body by them. One field with the one number goes on:
/// HTTP/2 lets a request's repeats through (an HTTP/1.1 client's get 400 from the framing
/// check) and a backend may refuse two; a backend's list, sent on as it came, is no number
/// to clients that parse one (Python's `http.client`, Go), which then read to a close that
/// a kept-alive connection never gives.
fn collapse_repeated_length(h: &mut HeaderMap) {
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return;
    };
    if lengths.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    let number = first
        .as_bytes()
        .split(|&b| b == b',')
        .next()
        .unwrap_or_default();
    let number = HeaderValue::from_bytes(number.trim_ascii())
        .expect("a part of a valid value between commas is valid");
    h.insert(header::CONTENT_LENGTH, number);
}

/// The origin the client addressed, `scheme://authority`, when it named one.
/// Behind a trusted proxy, that is the one its `X-Forwarded-Proto` and `X-Forwarded-Host`
/// name, where they are an `http` or `https` and a `host[:port]`: the ingress's `https://`
/// origin, not the plain HTTP one ifmatch saw. Of a list, the last value: the one the
/// nearest proxy gave (Rack reads it so too); one before it may be what a client wrote.
pub fn client_origin(parts: &Parts, host: Option<&HeaderValue>, peer: &Peer) -> Option<String> {
    let forwarded = |name: &HeaderName| {
        let v = parts.headers.get_all(name).iter().next_back();
        let last = v.filter(|_| peer.trusted_proxy())?.to_str().ok()?;
        let last = last.rsplit(',').next()?.trim();
        (!last.is_empty()).then_some(last)
    };
    let scheme = match forwarded(&X_FORWARDED_PROTO) {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(p) if p.eq_ignore_ascii_case("http") => "http",
        _ => peer.scheme,
    };
    let authority = match forwarded(&X_FORWARDED_HOST)
        .filter(|a| crate::host::invalid(a.as_bytes()).is_none())
    {
        Some(a) => a,
        None => match parts.uri.authority() {
            Some(a) => a.as_str(),
            None => host?.to_str().ok()?,
        },
    };
    Some(format!("{scheme}://{authority}"))
}

/// With `preserve_host = false` the backend knows itself by the upstream's address, and a
/// `Location` or `Content-Location` it makes points there (`http://10.0.0.5:8080/docs/1`),
/// where the client cannot follow. As nginx's `proxy_redirect default` does, such a value
/// is pointed back at the origin the client used; any other value passes unchanged.
pub fn point_back(headers: &mut HeaderMap, route: &Route, client_origin: &str) {
    let origin = route.upstream.origin.as_bytes();
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name) else {
            continue;
        };
        let v = value.as_bytes();
        let Some((head, rest)) = v.split_at_checked(origin.len()) else {
            continue;
        };
        // `http://a:80` must not take `http://a:8080/x` for its own.
        if !head.eq_ignore_ascii_case(origin)
            || !matches!(rest.first(), None | Some(b'/' | b'?' | b'#'))
        {
            continue;
        }
        let pointed = [client_origin.as_bytes(), rest].concat();
        if let Ok(pointed) = HeaderValue::from_bytes(&pointed) {
            headers.insert(name, pointed);
        }
    }
}

/// `/path?query` of an absolute URI.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// The headers by which a POST asks a backend to run it as another method.
pub(crate) const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The methods a request's override headers name, each with its header's name: one pass
/// over the fields, where a lookup by each name would parse and hash it (about 370
/// instructions a name, on every write). A value that is not visible ASCII names "".
pub fn method_overrides(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .iter()
        .filter(|(name, _)| METHOD_OVERRIDES.contains(&name.as_str()))
        .flat_map(|(name, v)| {
            let methods = v.to_str().unwrap_or_default().split(',');
            methods.map(move |m| (name.as_str(), m.trim()))
        })
}

/// Takes out a request's method overrides, for one forwarded as its own method. One look at
/// the names first: removing by name parses and hashes each of the three, 1.1k instructions
/// a GET (2.7%), for headers hardly any request carries.
pub fn strip_method_overrides(headers: &mut HeaderMap) {
    if headers
        .keys()
        .any(|name| METHOD_OVERRIDES.contains(&name.as_str()))
    {
        for h in METHOD_OVERRIDES {
            headers.remove(h);
        }
    }
}

/// The GET that fetches a resource's current representation for a writer: the writer's own
/// head (its credentials, cookies and `Accept*` select the same representation it read),
/// without its body or its conditions, nor a method override: a backend that honours one on
/// any method (CakePHP) would run the GET as the write, unjudged.
pub fn revalidation_request(parts: &Parts) -> Request<UpstreamBody> {
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        let n = name.as_str();
        let drop = n.starts_with("content-")
            || n.starts_with("if-")
            || METHOD_OVERRIDES.contains(&n)
            || matches!(
                n,
                "range" | "expect" | "transfer-encoding" | "trailer" | "destination" | "overwrite"
            );
        if !drop {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut req = Request::new(Either::Right(Full::default()));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA certificate in PEM, a new one each call.
    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_reload_keeps_the_pools_it_would_make_again() {
        let dir = std::env::temp_dir().join(format!("ifmatch-pools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_pem()).unwrap();
        let text = |server: &str, routes: &str| {
            format!(
                "[server]\nlisten = \"127.0.0.1:1\"\nupstream_max_connections = 4\n{server}\n\
                 [[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n\
                 [[route]]\nprefix = \"/s/\"\nupstream = \"https://localhost:9\"\nca_file = \"{}\"\n{routes}",
                ca.display()
            )
        };
        let file = dir.join("t.toml");
        let parse = |t: String| Config::parse(&t, file.to_str().unwrap()).unwrap();
        let same = |a: &UpstreamClient, b: &UpstreamClient| {
            let ca_pool = |c: &UpstreamClient| c.by_ca_file[&ca].clone();
            (
                Arc::ptr_eq(&a.pool, &b.pool),
                Arc::ptr_eq(&ca_pool(a), &ca_pool(b)),
                Arc::ptr_eq(a.cap.as_ref().unwrap(), b.cap.as_ref().unwrap()),
            )
        };
        let first = UpstreamClient::new(&parse(text("", "")));
        // Routes changed, nothing the pools are made with: all kept, the cap's count too.
        let more = "[[route]]\nprefix = \"/x/\"\nupstream = \"http://127.0.0.1:8\"\n";
        let second = first.reloaded(&parse(text("", more)));
        assert_eq!(same(&first, &second), (true, true, true));
        // The CA file rewritten with another CA: its pool is made anew, the rest kept.
        std::fs::write(&ca, ca_pem()).unwrap();
        let third = second.reloaded(&parse(text("", more)));
        assert_eq!(same(&second, &third), (true, false, true));
        // An upstream setting changed: every pool made anew; the cap kept, its limit unchanged.
        let fourth = third.reloaded(&parse(text("connect_timeout = \"4s\"", more)));
        assert_eq!(same(&third, &fourth), (false, false, true));
        // The limit changed: a new cap.
        let fifth = fourth.reloaded(&parse(
            text("connect_timeout = \"4s\"", more).replace("= 4\n", "= 5\n"),
        ));
        assert!(!same(&fourth, &fifth).2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `[::]` listener takes IPv4 clients too (Linux binds it dual-stack): they are
    /// named as the IPv4 addresses they are, not `::ffff:10.0.0.7`, which a backend's IPv4
    /// allow-list or trusted-proxy range does not match.
    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_forwarded_as_ipv4() {
        let v4: SocketAddr = "[::ffff:10.0.0.7]:5000".parse().unwrap();
        let peer = Peer::new(v4, "http", &TrustedProxies::default());
        assert_eq!(peer.ip, "10.0.0.7");
        assert_eq!(peer.addr, "10.0.0.7:5000".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        assert_eq!(
            Peer::new(v6, "http", &TrustedProxies::default()).ip,
            "2001:db8::7",
            "no brackets, as nginx writes it"
        );
    }

    #[test]
    fn requests_go_upstream_in_origin_form() {
        let u: Uri = "http://a:1/docs/x?y=1".parse().unwrap();
        assert_eq!(origin_form(&u), "/docs/x?y=1");
        let u: Uri = "http://a:1".parse().unwrap();
        assert_eq!(origin_form(&u), "/");
    }

    #[test]
    fn the_transfer_encoding_bit_is_its_place_in_the_list() {
        assert_eq!(
            HOP_BY_HOP[TRANSFER_ENCODING_BIT.trailing_zeros() as usize],
            header::TRANSFER_ENCODING
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn every_connection_field_line_counts_and_its_names_are_case_blind() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "close, UPGRADE".parse().unwrap());
        h.append(header::CONNECTION, " X-One ,x-absent,, ".parse().unwrap());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert("x-one", "1".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic eDp5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::ETAG, "\"a\"".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::ETAG], "{h:?}");

        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, "a".parse().unwrap());
        plain.insert(header::ACCEPT, "*/*".parse().unwrap());
        let before = plain.clone();
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
    }

    #[test]
    fn forwarded_and_underscore_spellings_of_the_proxys_own_names_are_removed_and_no_others() {
        for n in [
            "x_forwarded_for",
            "x-forwarded_proto",
            "x_forwarded-host",
            "x_http_method_override",
            "x_http_method",
            "x-method_override",
        ] {
            assert!(spells_own_name_with_underscores(n), "{n}");
        }
        for n in [
            "x-forwarded-for",
            "x-http-method",
            "accept_encoding",
            "x_forwarded_fox",
            "x_forwarded_for_",
            "x__forwarded_for",
            "x_custom",
        ] {
            assert!(!spells_own_name_with_underscores(n), "{n}");
        }
        let mut h = HeaderMap::new();
        h.append("x_forwarded_proto", "https".parse().unwrap());
        h.append("x_forwarded_proto", "https".parse().unwrap());
        h.insert(
            header::FORWARDED,
            "for=192.0.2.1;proto=https".parse().unwrap(),
        );
        h.insert("x_custom", "1".parse().unwrap());
        h.insert(header::ETAG, "\"a\"".parse().unwrap());
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x_custom"));
    }

    #[test]
    fn only_a_whole_keep_alive_or_close_skips_the_token_scan() {
        for v in ["keep-alive", "Keep-Alive", "close", "CLOSE"] {
            assert!(names_nothing(&HeaderValue::from_static(v)), "{v}");
        }
        for v in ["keep-alive, x-a", "close,x-a", "x-a", "keep-alive "] {
            assert!(!names_nothing(&HeaderValue::from_static(v)), "{v}");
        }
        // Along with the common value, the headers of another field line still go.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "Keep-Alive".parse().unwrap());
        h.append(header::CONNECTION, "x-two".parse().unwrap());
        h.insert("x-two", "2".parse().unwrap());
        h.insert(header::ETAG, "\"a\"".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::ETAG], "{h:?}");
    }
}
