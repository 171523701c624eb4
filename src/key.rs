//! The key that names one resource for the tag cache and the write locks.
//!
//! Key = upstream origin (in one spelling: `Upstream::key_prefix`) + normalised path +
//! `?query`. The path is normalised as nginx and most servers read it before they look a
//! resource up: every percent-encoding of a byte a path may carry as it is (RFC 3986
//! `pchar`: unreserved characters, sub-delims, `:` and `@`) is decoded, the hex digits of
//! the others are upper-cased, dot-segments are removed (RFC 3986 §6.2.2) and runs of `/`
//! are merged. So `/docs/42`, `/docs/./42`, `/docs/%34%32`, `/docs//42` share one lock and
//! one tag, and so do `/u/a@b` and `/u/a%40b`, which two client libraries spell apart
//! (JavaScript's `encodeURI` keeps `@`, Python's `quote` encodes it). Were they other keys,
//! writes through them would take other locks and slip past each other. RFC 3986 §6.2.2.2
//! decodes unreserved characters only, since a reserved one may mean something else
//! encoded; `%2F` is decoded to `/` too, before dot-segments are removed, as nginx does:
//! `/docs%2F42` and `/x%2F..%2Fdocs/42` are its file `/docs/42`. A backend that tells an
//! encoded reserved character from the plain one gets coarser keys: two of its resources
//! then share a lock (a wait, never a lost write), and under `cached` a remembered tag
//! (README says to keep such a backend on `revalidate`). `%3F` and `%23` stay encoded: a
//! `?` or `#` in the path would read as the start of the query. A `%` that starts no
//! valid escape stands for itself and becomes `%25`, so that the normal form is a fixed
//! point (`/%3%32` would otherwise decode to `/%32`, then to `/2`).
//! Bytes a URI carries only encoded (raw UTF-8, `"`, `{`...), which hyper lets through, are
//! percent-encoded, so that `/é` and `/%C3%A9` share a key.
//! The query is kept byte for byte (an empty one is none): backends disagree on what it
//! means. The request is
//! still forwarded with the path the client sent; only routing and keys use the normal form.

use std::borrow::Cow;
use std::sync::Arc;

use crate::config::Upstream;

/// The cache and lock key of one resource at one upstream.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey(Arc<str>);

// === impl ResourceKey ===

impl ResourceKey {
    /// The key of `normal_path` (already normalised) and `query` at `upstream`.
    pub fn new(upstream: &Upstream, normal_path: &str, query: Option<&str>) -> Self {
        let mut s = String::with_capacity(
            upstream.key_prefix.len() + normal_path.len() + 1 + query.map_or(0, str::len),
        );
        s.push_str(&upstream.key_prefix);
        s.push_str(normal_path);
        // An empty query (`/docs/42?`, as URL builders write) is no query to any backend.
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            s.push('?');
            s.push_str(q);
        }
        Self(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ResourceKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The query that names the resource `method` acts on: `query` as sent, but for a POST,
/// without its `_method=` parameters. Frameworks that honour one (Laravel, Symfony) run
/// `POST /doc?_method=PUT` as a PUT of `/doc`, and the proxy reads it so
/// (`requires_precondition`): keyed with the parameter, it would take another lock than a
/// `PUT /doc` and forget another URL's tag, and both writers holding one tag could win.
/// Borrowed unless there is such a parameter: other requests pay one method compare.
pub fn resource_query<'a>(method: &http::Method, query: Option<&'a str>) -> Option<Cow<'a, str>> {
    let query = query?;
    if !method.as_str().eq_ignore_ascii_case("POST") || !query.contains("_method=") {
        return Some(Cow::Borrowed(query));
    }
    // The pairs `write::form_fields` reads as overrides.
    let kept: Vec<&str> = (query.split('&'))
        .filter(|pair| !pair.starts_with("_method="))
        .collect();
    Some(Cow::Owned(kept.join("&")))
}

/// The path a key names on `route`: `normal` (a [`normalize_path`] result) as it is, or,
/// with `strip_path_params`, without its segments' parameters.
pub fn key_path<'a>(route: &crate::config::Route, normal: &'a str) -> Cow<'a, str> {
    match route.strip_path_params {
        true => without_path_params(normal),
        false => Cow::Borrowed(normal),
    }
}

/// `normal` without the parameters of its segments (`/doc;jsessionid=A` is `/doc`), as a
/// Java servlet container reads a path: Tomcat drops them before it maps a request, so a
/// session id rewritten into URLs would otherwise give one document two keys, two locks,
/// and two writers holding one tag could both win. A `..;x` segment is then `..` (Tomcat
/// reads `/a/..;/b` as `/b`), so dot segments are resolved again. An encoded `%3B` is a
/// character of the name, not a separator. Borrowed when there is no `;`.
pub fn without_path_params(normal: &str) -> Cow<'_, str> {
    if !normal.contains(';') {
        return Cow::Borrowed(normal);
    }
    let mut out = String::with_capacity(normal.len());
    for (i, segment) in normal.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or_default());
    }
    Cow::Owned(normalize_path(&out).into_owned())
}

/// Normalises a request path (see the module doc). Always returns a path starting with `/`;
/// borrowed when `path` is normal already, as almost every path is.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    Cow::Owned(normalize_slow(path))
}

/// The normalisation itself, for the paths `is_normal` does not vouch for.
fn normalize_slow(path: &str) -> String {
    let decoded = normalize_percent(path);
    let mut out: Vec<&str> = Vec::new();
    let trailing_slash = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "."
        || decoded == "..";
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len() + 1);
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || trailing_slash {
        s.push('/');
    }
    s
}

/// Whether `path` is already in normal form: the common case, checked in one pass over the
/// bytes (every request pays it): no `%`, and after each `/` neither another `/` nor a
/// `.` or `..` segment.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    b.iter().enumerate().all(|(i, &c)| match c {
        b'%' => false,
        b'/' => !matches!(
            &b[i + 1..],
            [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
        ),
        c => is_pchar(c),
    })
}

/// A byte a path may carry as it is (RFC 3986 §3.3 `pchar` without `%`, and `/`). hyper
/// also lets through raw UTF-8 and a few other bytes (`"`, `{`, `|`...); the normal form
/// encodes them, so that `/é` and `/%C3%A9`, which a backend takes for one resource, share
/// a key, and `/é` cannot collide with what decoding it byte by byte would spell.
fn is_pchar(c: u8) -> bool {
    crate::host::REG_NAME[usize::from(c)] || matches!(c, b':' | b'@' | b'/')
}

/// Decodes `%XX` of the bytes a path may carry as they are ([`is_pchar`], `/` among them),
/// and upper-cases the hex of the rest.
fn normalize_percent(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h << 4 | l;
                // `%2F` too: nginx, and most servers that map paths to files or routes,
                // decode it before they resolve `..`, so `/a%2Fb` is `/a/b` to them.
                if is_pchar(c) {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        if is_pchar(b[i]) {
            out.push(b[i] as char);
        } else {
            // Not an escape (a `%` stands for itself), or a byte a URI carries encoded.
            out.push('%');
            out.push(HEX[usize::from(b[i] >> 4)] as char);
            out.push(HEX[usize::from(b[i] & 0xF)] as char);
        }
        i += 1;
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The key of `path` at `http://a:1`, for unit tests of the maps keyed by resource.
#[cfg(test)]
pub(crate) fn test_key(path: &str) -> ResourceKey {
    let up = Upstream::new(
        http::uri::Scheme::HTTP,
        "a:1".parse().expect("an authority"),
    );
    ResourceKey::new(&up, path, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_query_is_no_query_and_any_other_is_kept_as_sent() {
        let up = Upstream::new(http::uri::Scheme::HTTP, "a:1".parse().unwrap());
        let bare = ResourceKey::new(&up, "/x", None);
        assert_eq!(ResourceKey::new(&up, "/x", Some("")), bare);
        assert_eq!(
            ResourceKey::new(&up, "/x", Some("a=1")).as_str(),
            "http://a:1/x?a=1"
        );
        assert_ne!(
            ResourceKey::new(&up, "/x", Some("A=1")),
            ResourceKey::new(&up, "/x", Some("a=1"))
        );
    }

    #[test]
    fn a_post_s_method_override_parameters_name_no_resource() {
        let q = |m: &str, q: &str| {
            let m = http::Method::from_bytes(m.as_bytes()).unwrap();
            resource_query(&m, Some(q)).map(Cow::into_owned)
        };
        assert_eq!(q("POST", "_method=PUT").as_deref(), Some(""));
        assert_eq!(q("post", "a=1&_method=put&b=2").as_deref(), Some("a=1&b=2"));
        assert_eq!(q("POST", "my_method=PUT").as_deref(), Some("my_method=PUT"));
        assert_eq!(q("PUT", "_method=PUT").as_deref(), Some("_method=PUT"));
        assert_eq!(resource_query(&http::Method::POST, None), None);
    }

    #[test]
    fn path_parameters_name_no_part_of_a_servlet_path() {
        for (path, want) in [
            ("/doc", "/doc"),
            ("/doc;jsessionid=ABC", "/doc"),
            ("/a;x=1/b;y=2", "/a/b"),
            ("/a/..;/b", "/b"),
            ("/a/.;x/b", "/a/b"),
            ("/a/%3Bb", "/a/%3Bb"),
            ("/;x", "/"),
        ] {
            assert_eq!(without_path_params(path), want, "{path}");
        }
    }

    #[test]
    fn aliases_of_one_resource_normalise_alike() {
        for alias in [
            "/docs/42",
            "/docs/./42",
            "/docs/%34%32",
            "/docs//42",
            "/docs/x/../42",
            "/docs/%2E/42",
            "//docs/42",
            "/docs%2F42",
            "/docs%2f42",
            "/docs/x%2F..%2F42",
            "/x%2F..%2Fdocs/42",
            "/docs%2F%2F42",
        ] {
            assert_eq!(normalize_path(alias), "/docs/42", "{alias}");
        }
    }

    #[test]
    fn a_reserved_character_a_path_may_carry_is_one_key_raw_or_encoded() {
        for (raw, encoded) in [
            ("/u/a@b", "/u/a%40b"),
            ("/u/a:b", "/u/a%3ab"),
            ("/u/a!b", "/u/a%21b"),
            ("/u/a$b", "/u/a%24b"),
            ("/u/a&b", "/u/a%26b"),
            ("/u/a'b", "/u/a%27b"),
            ("/u/a(b)", "/u/a%28b%29"),
            ("/u/a*b", "/u/a%2Ab"),
            ("/u/a+b", "/u/a%2Bb"),
            ("/u/a,b", "/u/a%2cb"),
            ("/u/a;b", "/u/a%3Bb"),
            ("/u/a=b", "/u/a%3Db"),
        ] {
            assert_eq!(normalize_path(encoded), raw, "{encoded}");
            assert_eq!(normalize_path(raw), raw, "{raw}");
        }
        // What would read as the query, a fragment or an escape stays encoded, and the form
        // is a fixed point.
        for (path, normal) in [
            ("/u/a%3fb", "/u/a%3Fb"),
            ("/u/a%23b", "/u/a%23b"),
            ("/u/a%2525", "/u/a%2525"),
            ("/u/a%20b", "/u/a%20b"),
            ("/u/a%5Bb%5D", "/u/a%5Bb%5D"),
        ] {
            assert_eq!(normalize_path(path), normal, "{path}");
            assert_eq!(normalize_path(normal), normal, "{normal}");
        }
        let up = Upstream::new(http::uri::Scheme::HTTP, "a:1".parse().unwrap());
        assert_ne!(
            ResourceKey::new(&up, &normalize_path("/a%3Fb"), None),
            ResourceKey::new(&up, &normalize_path("/a"), Some("b"))
        );
    }

    #[test]
    fn the_fast_check_passes_exactly_the_paths_normalisation_leaves_alone() {
        // Every string of up to 7 of these bytes: each way a `/`, `.` or `%` can stand next
        // to another. A path the check passes must come out of normalisation unchanged, and
        // one without `%` that normalisation leaves alone must pass the check.
        let alphabet = [b'/', b'.', b'a', b'%'];
        let mut paths = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..7 {
            paths = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |&c| format!("{p}{}", c as char)))
                .collect();
            all.extend(paths.iter().cloned());
        }
        for p in &all {
            let unchanged = normalize_slow(p) == *p;
            if is_normal(p) {
                assert!(
                    unchanged,
                    "{p:?} passed the check but normalises to {:?}",
                    normalize_slow(p)
                );
            } else if !p.contains('%') {
                assert!(!unchanged, "{p:?} is normal but failed the check");
            }
        }
    }

    #[test]
    fn raw_utf8_and_other_unencoded_bytes_share_the_key_of_their_encoding_and_no_other() {
        // One resource, raw or encoded, through the fast path or the slow one.
        for alias in [
            "/docs/é",
            "/docs/%C3%A9",
            "/docs/%c3%a9",
            "//docs/é",
            "/docs/./é",
        ] {
            assert_eq!(normalize_path(alias), "/docs/%C3%A9", "{alias}");
        }
        // Two resources: `é` decoded byte by byte would spell `Ã©`.
        assert_ne!(normalize_path("//docs/é"), normalize_path("/docs/Ã©"));
        assert_eq!(normalize_path("/a{b}|c\"d"), "/a%7Bb%7D%7Cc%22d");
        assert_eq!(normalize_path("/a%7bb"), "/a%7Bb");
        // Sub-delimiters, `:` and `@` are path characters and stay as they are.
        assert_eq!(normalize_path("/a:b@c!$&'()*+,;="), "/a:b@c!$&'()*+,;=");
        for p in ["/docs/é", "/a{b", "/x y"] {
            let once = normalize_path(p);
            assert_eq!(normalize_path(&once), once, "a fixed point: {p}");
        }
    }

    #[test]
    fn encodings_of_what_a_path_cannot_carry_stay_encoded_with_upper_case_hex() {
        assert_eq!(normalize_path("/a%3fb"), "/a%3Fb");
        // `;` a path carries as it is: decoded (see the test above).
        assert_eq!(normalize_path("/a%3Bb"), "/a;b");
        assert_eq!(normalize_path("/a%20b"), "/a%20b");
        assert_eq!(normalize_path("/a%2fb"), "/a/b");
        assert_eq!(normalize_path("/a%252Fb"), "/a%252Fb", "decoded once only");
    }

    #[test]
    fn a_percent_that_starts_no_escape_is_encoded_so_the_form_is_a_fixed_point() {
        assert_eq!(normalize_path("/a%zz"), "/a%25zz");
        assert_eq!(normalize_path("/a%4"), "/a%254");
        assert_eq!(normalize_path("/a%"), "/a%25");
        // Found by the normalize_path fuzz target: decoding %32 after a bare %3 made a new
        // escape, so a second pass changed the result.
        let once = normalize_path("/doocs=/%3%32");
        assert_eq!(once, "/doocs=/%2532");
        assert_eq!(normalize_path(&once), once);
    }

    #[test]
    fn dot_segments_cannot_climb_above_the_root_and_keep_directories() {
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path("/docs/"), "/docs/");
        assert_eq!(normalize_path("/docs/a/.."), "/docs/");
        assert_eq!(normalize_path("/docs/."), "/docs/");
        assert_eq!(normalize_path(""), "/");
        assert_eq!(normalize_path("/"), "/");
    }
}
