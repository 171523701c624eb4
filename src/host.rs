//! The request's `Host` header, checked as RFC 9112 §3.2 requires of a server: 400 for an
//! HTTP/1.1 request without one, for any request with more than one, and for one whose value
//! is not `uri-host [":" port]` (RFC 3986 §3.2.2). ifmatch routes by `Host` and passes it
//! on, so a value that the router and the backend could read differently (`a@b`, `a/b`, two
//! lines) is refused before either sees it, as nginx refuses it.

use http::header::HOST;
use http::request::Parts;
use http::{HeaderValue, Method, Version};

use crate::error::Error;
use crate::precondition::HeaderError;

/// Refuses the two request-target forms that belong to one method each (RFC 9112 §3.2.3,
/// §3.2.4; RFC 9113 §8.3.1) when another method uses them: authority-form (`GET b:80`),
/// whose authority would otherwise replace `Host` for the router and the backend alike,
/// and asterisk-form (`GET *`), which names no resource. CONNECT is refused before this.
pub fn check_target(parts: &Parts) -> Result<(), Error> {
    let uri = &parts.uri;
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Err(Error::BadTarget(format!(
            "{} is in authority-form, which only CONNECT may use (RFC 9112 §3.2.3)",
            quoted(uri.to_string().as_bytes())
        )));
    }
    if uri.path() == "*" && parts.method != Method::OPTIONS {
        return Err(Error::BadTarget(
            "\"*\" names no resource: only OPTIONS may use it (RFC 9112 §3.2.4)".into(),
        ));
    }
    Ok(())
}

/// The request's one `Host` value, if it has one; refuses a request whose `Host` is missing
/// (HTTP/1.1), repeated or malformed. The value is read here once, for the router and for
/// the upstream request.
pub fn check(parts: &Parts) -> Result<Option<HeaderValue>, HeaderError> {
    // The authority of an absolute-form target (or HTTP/2's `:authority`) takes the place of
    // `Host` for routing and upstream: it is held to the same form (no `user@`).
    if let Some(authority) = parts.uri.authority() {
        if let Some(why) = invalid(authority.as_str().as_bytes()) {
            let reason = format!(
                "the request target's authority {} {why}",
                quoted(authority.as_str().as_bytes())
            );
            return Err(HeaderError { name: HOST, reason });
        }
    }
    let mut lines = parts.headers.get_all(HOST).iter();
    let reason = match (lines.next(), lines.next()) {
        // HTTP/1.0 may omit it, and HTTP/2 carries the authority in `:authority`, but
        // needs one or the other (RFC 9110 §7.2; an `http` URI has a host, §4.2.1).
        (None, _) if parts.version == Version::HTTP_11 => {
            "an HTTP/1.1 request must carry a Host header".to_owned()
        }
        (None, _) if parts.version == Version::HTTP_2 && parts.uri.authority().is_none() => {
            "an HTTP/2 request must carry :authority or a Host header".to_owned()
        }
        (None, _) => return Ok(None),
        (Some(_), Some(_)) => "a request may carry only one Host header".to_owned(),
        (Some(value), None) => match invalid(value.as_bytes()) {
            None => return Ok(Some(value.clone())),
            Some(why) => format!("{} {why}", quoted(value.as_bytes())),
        },
    };
    Err(HeaderError { name: HOST, reason })
}

/// `value` quoted for a problem's detail, unless it carries userinfo: `user:password@host`
/// is not echoed back (nor into a log), only named.
fn quoted(value: &[u8]) -> String {
    match value.contains(&b'@') {
        true => "(its user@ part left out)".to_owned(),
        false => format!("{:?}", String::from_utf8_lossy(value)),
    }
}

/// Why `value` is not `uri-host [":" port]`, or `None` when it is.
pub(crate) fn invalid(value: &[u8]) -> Option<&'static str> {
    // Userinfo first: split at its `:`, `u:pw@a` would read as a host with a bad port.
    if value.contains(&b'@') {
        return Some("carries userinfo (user@), which a request may not (RFC 9110 §4.2.4)");
    }
    let (host_ok, port) = match value.strip_prefix(b"[") {
        // IP-literal: an IPv6 address (IPvFuture has never been assigned).
        Some(rest) => {
            let Some(end) = rest.iter().position(|&b| b == b']') else {
                return Some("opens an IP literal with [ and does not close it");
            };
            let ok = std::str::from_utf8(&rest[..end])
                .is_ok_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
            match &rest[end + 1..] {
                [] => (ok, &[][..]),
                [b':', port @ ..] => (ok, port),
                _ => return Some("has characters after its IP literal other than a port"),
            }
        }
        // reg-name or IPv4address (whose characters reg-name includes); no `:` in either.
        None => match reg_name(value) {
            Some((name, port)) => (!name.is_empty(), port),
            None => (false, &[][..]),
        },
    };
    if !host_ok {
        return Some("is not a host name or IP address (RFC 3986 §3.2.2)");
    }
    if !port.iter().all(u8::is_ascii_digit) {
        return Some("has a port that is not a decimal number");
    }
    None
}

/// Splits `value` at its first `:` into a `reg-name = *( unreserved / pct-encoded /
/// sub-delims )` and the port after it, or `None` if a byte before the `:` is not reg-name's.
/// One table lookup a byte: this runs on every request.
fn reg_name(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let hex = |j: usize| value.get(j).is_some_and(u8::is_ascii_hexdigit);
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if !REG_NAME[usize::from(b)] {
            match b {
                b':' => return Some((&value[..i], &value[i + 1..])),
                b'%' if hex(i + 1) && hex(i + 2) => i += 2,
                _ => return None,
            }
        }
        i += 1;
    }
    Some((value, &[]))
}

/// unreserved and sub-delims (RFC 3986 §2.2, §2.3): the bytes a reg-name takes as they are.
pub(crate) static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~!$&'()*+,;=";
    let mut i = 0;
    while i < others.len() {
        t[others[i] as usize] = true;
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn parts(version: Version, uri: &str, hosts: &[&[u8]]) -> Parts {
        let mut b = Request::get(uri).version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// An authority-form target is refused, and a password in it is not echoed.
    #[test]
    fn an_authority_form_target_is_refused_without_echoing_userinfo() {
        for (target, shown) in [("a:80", "\"a:80\""), ("u:secret@a:80", "user@ part")] {
            let p = Request::get("/")
                .uri(target)
                .header(HOST, "a")
                .body(())
                .unwrap()
                .into_parts()
                .0;
            let e = check_target(&p).unwrap_err().to_string();
            assert!(e.contains("authority-form") && e.contains(shown), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn an_absolute_form_target_s_authority_is_held_to_the_host_form() {
        let ok = parts(Version::HTTP_11, "http://a:1/b", &[b"a"]);
        assert!(check(&ok).is_ok());
        for target in ["http://user@a:1/b", "http://u:secret@a/b"] {
            let e = check(&parts(Version::HTTP_11, target, &[b"a"])).unwrap_err();
            assert_eq!(e.name, HOST, "{target}");
            assert!(e.reason.contains("authority"), "{target}: {}", e.reason);
            // Said for what it is, and a password is not echoed.
            assert!(e.reason.contains("userinfo"), "{target}: {}", e.reason);
            assert!(!e.reason.contains("secret"), "{target}: {}", e.reason);
        }
    }

    #[test]
    fn valid_hosts_pass() {
        for host in [
            &b"a"[..],
            b"docs.example",
            b"docs.example:8080",
            b"127.0.0.1:19080",
            b"[::1]",
            b"[::1]:443",
            b"[2001:db8::7]:80",
            b"[::ffff:192.0.2.1]",
            b"xn--bcher-kva.example",
            b"a%20b.example",
            b"under_score.example:",
            b"weird!$&'()*+,;=.example",
        ] {
            let p = parts(Version::HTTP_11, "/x", &[host]);
            let got = check(&p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.as_ref().map(|v| v.as_bytes()), Some(host));
        }
    }

    #[test]
    fn malformed_hosts_are_refused_with_the_value_and_why() {
        let cases: [(&[u8], &str); 13] = [
            (b"", "not a host name"),
            (b":80", "not a host name"),
            (b"a b", "not a host name"),
            (b"a/b", "not a host name"),
            (b"docs.example?x", "not a host name"),
            (b"docs.example#x", "not a host name"),
            (b"a\\b", "not a host name"),
            (b"a%2", "not a host name"),
            (b"a%zz", "not a host name"),
            (b"docs.example:80:81", "port"),
            (b"docs.example:http", "port"),
            (b"[::1", "does not close"),
            (b"[::1]x", "after its IP literal"),
        ];
        for (host, why) in cases {
            let p = parts(Version::HTTP_11, "/x", &[host]);
            let e = check(&p).expect_err(&String::from_utf8_lossy(host));
            assert_eq!(e.name, HOST);
            assert!(e.reason.contains(why), "{host:?}: {}", e.reason);
            assert!(
                e.reason
                    .starts_with(&format!("{:?}", String::from_utf8_lossy(host))),
                "{}",
                e.reason
            );
        }
        // Userinfo is named, and its value (a password, perhaps) not echoed.
        for host in [&b"user@docs.example"[..], b"u:secret@docs.example"] {
            let e = check(&parts(Version::HTTP_11, "/x", &[host])).unwrap_err();
            assert!(e.reason.contains("userinfo"), "{}", e.reason);
            assert!(!e.reason.contains("secret"), "{}", e.reason);
        }
        for literal in [&b"[]"[..], b"[::g]", b"[v1.x]", b"[1.2.3.4]", b"[1::2::3]"] {
            assert!(check(&parts(Version::HTTP_11, "/x", &[literal])).is_err());
        }
    }

    #[test]
    fn two_host_lines_are_refused_whatever_the_version_or_form() {
        for (version, uri) in [
            (Version::HTTP_11, "/x"),
            (Version::HTTP_10, "/x"),
            (Version::HTTP_11, "http://a.example/x"),
        ] {
            let p = parts(version, uri, &[b"a.example", b"a.example"]);
            let e = check(&p).unwrap_err();
            assert!(e.reason.contains("only one Host"), "{}", e.reason);
        }
    }

    #[test]
    fn only_http_1_1_must_carry_a_host() {
        let e = check(&parts(Version::HTTP_11, "/x", &[])).unwrap_err();
        assert!(e.reason.contains("must carry a Host"), "{}", e.reason);
        // RFC 9112 §3.2 asks it of absolute-form too, whose authority the proxy uses.
        assert!(check(&parts(Version::HTTP_11, "http://a.example/x", &[])).is_err());
        assert_eq!(check(&parts(Version::HTTP_10, "/x", &[])), Ok(None));
        assert_eq!(
            check(&parts(Version::HTTP_2, "https://a.example/x", &[])),
            Ok(None)
        );
    }
}
