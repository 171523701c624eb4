//! Which clients are trusted proxies (`server.trusted_proxies`): a proxy in front (an
//! ingress, a load balancer that ends TLS) whose `X-Forwarded-Proto`, `X-Forwarded-Host` and
//! `Forwarded` say what its own client used, so they are passed on rather than replaced by
//! what ifmatch saw (plain HTTP from the ingress). Replaced, they would tell a backend behind
//! an HTTPS ingress that its clients came over `http`: a framework that redirects those to
//! `https` would then redirect every request, for ever.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderValue;

/// An address range: a network address and how many of its leading bits name the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `fd00::/8`, or one address (`10.1.2.3`, `::1`). An IPv4-mapped IPv6
    /// range is taken as the IPv4 range it is, as clients of a dual-stack listener are.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let Ok(net) = addr.trim().parse::<IpAddr>() else {
            return Err(format!(
                "{text:?} is not an IP address or range; expected one such as \"10.0.0.7\" \
                 or \"10.0.0.0/8\""
            ));
        };
        let width = match net {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let bits = match bits {
            None => width,
            Some(b) => match b.trim().parse::<u8>() {
                Ok(b) if b <= width => b,
                _ => {
                    return Err(format!(
                        "{text:?}: the prefix length must be a number from 0 to {width}"
                    ))
                }
            },
        };
        let written = bits;
        let (net, bits) = match net {
            IpAddr::V6(v6) if bits >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), bits - 96),
                None => (net, bits),
            },
            _ => (net, bits),
        };
        let range = Self {
            net: masked(net, bits),
            bits,
        };
        if range.net != net {
            return Err(format!(
                "{text:?} has bits set past its /{written}: the range is \"{range}\""
            ));
        }
        Ok(range)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        std::mem::discriminant(&ip) == std::mem::discriminant(&self.net)
            && masked(ip, self.bits) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

/// `ip` with every bit past the first `bits` cleared.
fn masked(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// The ranges of `server.trusted_proxies`; none by default: every client's forwarding
/// headers are then replaced, as a proxy at the edge must.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Arc<[Cidr]>);

impl TrustedProxies {
    pub fn new(ranges: Vec<Cidr>) -> Self {
        Self(ranges.into())
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|r| r.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client a trusted proxy's `X-Forwarded-For` names (its field lines in order): the
    /// list is walked from its end (the address the nearest proxy added) past addresses of
    /// trusted proxies to the first that is not one; the addresses before it are whatever
    /// that client wrote. `None` at an element that is no address (`unknown`, an obfuscated
    /// name, RFC 7239 §6.3), where the chain can no longer be followed.
    pub fn forwarded_client<'a>(
        &self,
        lines: impl DoubleEndedIterator<Item = &'a HeaderValue>,
    ) -> Option<IpAddr> {
        let mut last = None;
        for line in lines.rev() {
            for element in line.as_bytes().rsplit(|&b| b == b',') {
                let ip = address(element.trim_ascii())?;
                if !self.trusts(ip) {
                    return Some(ip);
                }
                last = Some(ip);
            }
        }
        last
    }
}

/// An `X-Forwarded-For` element: an IP address, with a port or an IPv6 literal's brackets
/// as some proxies write them (`203.0.113.9:4711`, `[2001:db8::1]:4711`).
fn address(element: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(element).ok()?;
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| text.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_range_holds_its_addresses_and_no_others() {
        let r = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(r.contains(ip("10.0.0.0")));
        assert!(r.contains(ip("10.255.255.255")));
        assert!(!r.contains(ip("11.0.0.0")));
        assert!(!r.contains(ip("9.255.255.255")));
        // An IPv4 client of a dual-stack listener, as the socket names it.
        assert!(r.contains(ip("::ffff:10.1.2.3")));
        assert!(
            !r.contains(ip("::a01:203")),
            "an IPv6 address is not an IPv4 one"
        );

        let r = Cidr::parse("fd00::/8").unwrap();
        assert!(r.contains(ip("fd12:3456::1")));
        assert!(!r.contains(ip("fe80::1")));
        assert!(!r.contains(ip("253.0.0.1")));

        let one = Cidr::parse("192.0.2.7").unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains(ip("192.0.2.7")));
        assert!(!one.contains(ip("192.0.2.6")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));

        let everyone = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(everyone.contains(ip("203.0.113.9")));
        assert!(!everyone.contains(ip("2001:db8::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
    }

    #[test]
    fn an_ipv4_mapped_range_is_the_ipv4_range() {
        let r = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(r, Cidr::parse("10.0.0.0/8").unwrap());
        assert!(r.contains(ip("10.9.9.9")));
    }

    #[test]
    fn malformed_ranges_say_what_is_wrong() {
        for (text, says) in [
            ("ingress", "not an IP address or range"),
            ("10.0.0.0/", "prefix length must be a number from 0 to 32"),
            ("10.0.0.0/33", "from 0 to 32"),
            ("fd00::/129", "from 0 to 128"),
            ("10.0.0.0/-1", "from 0 to 32"),
            ("10.0.0.0/8/8", "from 0 to 32"),
            (
                "10.1.2.3/8",
                "has bits set past its /8: the range is \"10.0.0.0/8\"",
            ),
            ("fd00::1/8", "the range is \"fd00::/8\""),
            (
                "::ffff:10.0.0.0/96",
                "past its /96: the range is \"0.0.0.0/0\"",
            ),
            ("[::1]", "not an IP address"),
        ] {
            let e = Cidr::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn the_forwarded_client_is_the_last_address_no_trusted_proxy_has() {
        let trusted = TrustedProxies::new(vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("fd00::/8").unwrap(),
        ]);
        let client = |lines: &[&str]| {
            let values: Vec<HeaderValue> = lines
                .iter()
                .map(|l| HeaderValue::from_str(l).unwrap())
                .collect();
            trusted.forwarded_client(values.iter())
        };
        assert_eq!(client(&["203.0.113.9"]), Some(ip("203.0.113.9")));
        // The client's own claim comes first, and is passed over.
        assert_eq!(
            client(&["6.6.6.6, 203.0.113.9, 10.0.0.3"]),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            client(&["6.6.6.6", "203.0.113.9,10.1.1.1", "10.0.0.3"]),
            Some(ip("203.0.113.9")),
            "field lines are one list"
        );
        assert_eq!(
            client(&["[2001:db8::9]:4711, [fd00::3]"]),
            Some(ip("2001:db8::9"))
        );
        assert_eq!(
            client(&["203.0.113.9:4711, ::ffff:10.0.0.3"]),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            client(&["10.9.9.9, 10.0.0.3"]),
            Some(ip("10.9.9.9")),
            "all proxies: the farthest"
        );
        assert_eq!(client(&["203.0.113.9, unknown"]), None);
        assert_eq!(client(&[]), None);
        assert_eq!(
            client(&["6.6.6.6, 203.0.113.9, "]),
            None,
            "an empty element"
        );
    }

    #[test]
    fn no_ranges_trust_no_one() {
        let none = TrustedProxies::default();
        assert!(none.is_empty());
        assert!(!none.trusts(ip("127.0.0.1")));
        let some = TrustedProxies::new(vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("127.0.0.1").unwrap(),
        ]);
        assert!(some.trusts(ip("127.0.0.1")));
        assert!(some.trusts(ip("10.0.0.1")));
        assert!(!some.trusts(ip("127.0.0.2")));
    }
}
