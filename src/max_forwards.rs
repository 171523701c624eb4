//! `Max-Forwards` on OPTIONS (RFC 9110 §7.6.2): an intermediary that receives the field
//! with 0 is the request's final recipient and answers it; any other value goes on one
//! lower, so that a client can probe each hop of a chain. Other methods carry the field
//! untouched, as the RFC allows, and TRACE, the other method it is defined for, is not
//! forwarded at all (`proxy::dispatch`).

use http::header::{HeaderMap, HeaderValue, MAX_FORWARDS};

use crate::precondition::HeaderError;

/// What an OPTIONS request's `Max-Forwards` asks of the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// Forward it (the field, if any, was counted down).
    Forward,
    /// The proxy is its final recipient: answer it, do not forward it.
    Answer,
}

/// Counts one hop off an OPTIONS request's `Max-Forwards`, in place. A value that is not one
/// decimal number (two field lines, a list, a sign, nothing) is refused: it cannot be
/// counted down, and forwarded as it is it would reach a server it asked not to.
pub fn take_hop(headers: &mut HeaderMap) -> Result<Hop, HeaderError> {
    let mut values = headers.get_all(MAX_FORWARDS).iter();
    let Some(value) = values.next() else {
        return Ok(Hop::Forward);
    };
    let bad = |reason: &str| HeaderError {
        name: MAX_FORWARDS,
        reason: reason.to_owned(),
    };
    if values.next().is_some() {
        return Err(bad("more than one field line"));
    }
    let digits = value.as_bytes().trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad("not a decimal number of hops (1*DIGIT)"));
    }
    // A number too long for u64 is still a number: it has hops to spare.
    let hops = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if hops == 0 {
        return Ok(Hop::Answer);
    }
    headers.insert(MAX_FORWARDS, HeaderValue::from(hops - 1));
    Ok(Hop::Forward)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(values: &[&str]) -> (Result<Hop, HeaderError>, Vec<String>) {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(MAX_FORWARDS, HeaderValue::from_str(v).unwrap());
        }
        let r = take_hop(&mut h);
        let left = h
            .get_all(MAX_FORWARDS)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        (r, left)
    }

    #[test]
    fn zero_is_answered_others_go_on_one_lower() {
        assert_eq!(hop(&[]), (Ok(Hop::Forward), vec![]));
        assert_eq!(hop(&["0"]).0, Ok(Hop::Answer));
        assert_eq!(hop(&[" 00 "]).0, Ok(Hop::Answer));
        assert_eq!(hop(&["1"]), (Ok(Hop::Forward), vec!["0".to_owned()]));
        assert_eq!(hop(&["10"]), (Ok(Hop::Forward), vec!["9".to_owned()]));
        let huge = "9".repeat(40);
        assert_eq!(
            hop(&[&huge]),
            (Ok(Hop::Forward), vec![(u64::MAX - 1).to_string()])
        );
    }

    #[test]
    fn what_cannot_be_counted_down_is_refused() {
        for values in [
            &["-1"][..],
            &["+1"],
            &["1, 2"],
            &["one"],
            &[""],
            &["1.0"],
            &["1", "2"],
        ] {
            let (r, _) = hop(values);
            let e = r.expect_err(&format!("{values:?} was taken"));
            assert_eq!(e.name, MAX_FORWARDS, "{values:?}");
        }
    }
}
