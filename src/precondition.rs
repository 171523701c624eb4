//! Conditional request headers (RFC 9110 §13.1) and their evaluation in the order of §13.2.2.
//!
//! Pure code: [`Preconditions::parse`] reads the headers, [`evaluate`] decides against the
//! [`Resource`] the proxy believes current. A malformed `If-Match` or `If-None-Match` is an
//! error (the proxy fails closed with 400); a date that is not a valid HTTP-date is ignored, as
//! §13.1.3 and §13.1.4 require.

use std::time::SystemTime;

use http::header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE};
use http::{HeaderMap, HeaderName};

use crate::etag::{trim_ows, ETag, ETagError};

/// The value of `If-Match` or `If-None-Match`: `*` or a list of entity-tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    Any,
    Tags(Vec<ETag>),
}

/// The conditional headers of one request, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preconditions {
    pub if_match: Option<Condition>,
    pub if_none_match: Option<Condition>,
    pub if_unmodified_since: Option<SystemTime>,
    pub if_modified_since: Option<SystemTime>,
    /// `If-Range` is there and is not one HTTP-date: an entity-tag, which the proxy cannot
    /// let the backend judge, or a value that is neither, which matches nothing (§13.1.5)
    /// but which a backend might ignore and answer with a part. Either way the proxy drops
    /// `Range` and serves the whole representation (§14.2 allows it).
    pub if_range_not_a_date: bool,
    /// The request has a field line of one of the five conditional headers, valid or not.
    pub any_present: bool,
}

/// A malformed conditional header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {name} header: {reason}")]
pub struct HeaderError {
    pub name: HeaderName,
    pub reason: String,
}

/// What the proxy knows of the target resource's current state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resource {
    /// The resource has a current representation.
    pub exists: bool,
    /// Its strong tag, when one is known (a body over the tagging limit has none).
    pub tag: Option<ETag>,
    pub last_modified: Option<SystemTime>,
}

/// The outcome of evaluating the preconditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Perform the method.
    Proceed,
    /// 304: a GET or HEAD whose `If-None-Match` or `If-Modified-Since` is false.
    NotModified,
    /// 412: the request must not be performed.
    PreconditionFailed,
}

// === impl Preconditions ===

impl Preconditions {
    /// Parses the conditional headers. Several field lines of one list header are one list.
    pub fn parse(headers: &HeaderMap) -> Result<Self, HeaderError> {
        // Most requests have none: one pass over the names costs less than five lookups.
        let conditional = [
            &IF_MATCH,
            &IF_NONE_MATCH,
            &IF_UNMODIFIED_SINCE,
            &IF_MODIFIED_SINCE,
            &IF_RANGE,
        ];
        if !headers.keys().any(|name| conditional.contains(&name)) {
            return Ok(Self::default());
        }
        Ok(Self {
            any_present: true,
            if_match: parse_condition(headers, &IF_MATCH)?,
            if_none_match: parse_condition(headers, &IF_NONE_MATCH)?,
            if_unmodified_since: parse_date(headers, &IF_UNMODIFIED_SINCE),
            if_modified_since: parse_date(headers, &IF_MODIFIED_SINCE),
            if_range_not_a_date: headers.contains_key(IF_RANGE)
                && parse_date(headers, &IF_RANGE).is_none(),
        })
    }

    /// `If-Unmodified-Since` fails against a representation last modified at
    /// `last_modified`; it is ignored when there is no such date (§13.1.4).
    pub fn unmodified_since_fails(&self, last_modified: Option<SystemTime>) -> bool {
        self.if_unmodified_since
            .is_some_and(|since| last_modified.is_some_and(|lm| lm > since))
    }

    /// The request carries a precondition that can stop a write (for 428, RFC 6585 §3).
    pub fn guards_write(&self) -> bool {
        // An empty `If-None-Match` holds whatever the state: it guards nothing, and a blind
        // write that sends one is still refused with 428 where a precondition is required.
        // (An empty `If-Match` fails whatever the state: 412.)
        self.if_match.is_some()
            || self
                .if_none_match
                .as_ref()
                .is_some_and(|c| *c != Condition::Tags(Vec::new()))
            || self.if_unmodified_since.is_some()
    }

    /// The write's one guard is `If-Unmodified-Since`: no `If-Match`, and no `If-None-Match`
    /// that could stop it.
    pub fn guards_only_by_date(&self) -> bool {
        self.if_unmodified_since.is_some()
            && self.if_match.is_none()
            && self
                .if_none_match
                .as_ref()
                .is_none_or(|c| *c == Condition::Tags(Vec::new()))
    }

    /// A write's outcome depends on the modification date: `If-Unmodified-Since` without
    /// an `If-Match` to take precedence (§13.2.2).
    pub fn compares_dates(&self) -> bool {
        self.if_match.is_none() && self.if_unmodified_since.is_some()
    }

    /// The write's one condition is an `If-Match` that lists `tag` (a date condition aside,
    /// which `If-Match` overrides, §13.2.2).
    pub fn only_matches(&self, tag: &ETag) -> bool {
        self.if_none_match.is_none()
            && matches!(&self.if_match, Some(Condition::Tags(tags)) if tags.iter().any(|t| t.strong_eq(tag)))
    }

    /// A GET's outcome depends on the representation's tag: an `If-Match` or
    /// `If-None-Match` that lists tags (`*` needs only that the resource exists).
    pub fn compares_tags(&self) -> bool {
        names_tags(&self.if_match) || names_tags(&self.if_none_match)
    }

    /// Evaluating these preconditions needs the resource's current state.
    pub fn needs_current(&self) -> bool {
        self.guards_write() || self.if_modified_since.is_some()
    }
}

/// A condition lists entity-tags (not `*`).
pub fn names_tags(condition: &Option<Condition>) -> bool {
    matches!(condition, Some(Condition::Tags(_)))
}

fn parse_condition(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<Condition>, HeaderError> {
    let mut lines = headers.get_all(name).iter().peekable();
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    // One line with one tag, as a client sends the ETag it read: parsed without the list
    // split. Anything else, errors included, takes the general path below. (A comma inside
    // a tag would not separate anything, but a list, which has one, is sent there at once
    // rather than after a failed parse.)
    if lines.peek().is_none() && memchr::memchr(b',', first.as_bytes()).is_none() {
        if let Ok(tag) = ETag::parse(first.as_bytes()) {
            return Ok(Some(Condition::Tags(vec![tag])));
        }
    }
    let err = |reason: String| HeaderError {
        name: name.clone(),
        reason,
    };
    let mut any = false;
    let mut tags = Vec::new();
    for line in std::iter::once(first).chain(lines) {
        for member in split_list(line.as_bytes()).map_err(err)? {
            if member == b"*" {
                any = true;
            } else {
                let tag = ETag::parse(member).map_err(|e| match e {
                    ETagError::NotQuoted => err(format!(
                        "{:?} is not an entity-tag; expected \"tag\", W/\"tag\" or *",
                        String::from_utf8_lossy(member)
                    )),
                    e => err(e.to_string()),
                })?;
                tags.push(tag);
            }
        }
    }
    match (any, tags.is_empty()) {
        (true, true) => Ok(Some(Condition::Any)),
        (true, false) => Err(err("* cannot be combined with entity-tags".into())),
        (false, false) => Ok(Some(Condition::Tags(tags))),
        // `#entity-tag` allows no element at all (§5.6.1.2), which clients send for "no tag
        // yet" (`If-None-Match: `): a list no tag is in.
        (false, true) => Ok(Some(Condition::Tags(Vec::new()))),
    }
}

/// Splits `#entity-tag` into members. Commas inside quoted tags belong to the tag, and empty
/// members are skipped as §5.6.1 requires of recipients.
fn split_list(value: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut members = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, &b) in value.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                members.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("an entity-tag is missing its closing quote".into());
    }
    members.push(&value[start..]);
    Ok(members
        .into_iter()
        .map(trim_ows)
        .filter(|m| !m.is_empty())
        .collect())
}

/// One valid HTTP-date, or `None`: an invalid or repeated date field is ignored (§13.1.3).
fn parse_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    crate::date::parse(first.to_str().ok()?.trim())
}

// === evaluation ===

/// Evaluates `pre` against `current` in the order of RFC 9110 §13.2.2.
///
/// `read` is true for GET and HEAD, where a false `If-None-Match` or `If-Modified-Since`
/// means 304 rather than 412.
pub fn evaluate(pre: &Preconditions, read: bool, current: &Resource) -> Decision {
    // Step 1 and 2: If-Match, else If-Unmodified-Since.
    if let Some(cond) = &pre.if_match {
        if !if_match_holds(cond, current) {
            return Decision::PreconditionFailed;
        }
    } else if pre.unmodified_since_fails(current.last_modified) {
        return Decision::PreconditionFailed;
    }
    // Step 3 and 4: If-None-Match, else If-Modified-Since (GET and HEAD only).
    if let Some(cond) = &pre.if_none_match {
        if !if_none_match_holds(cond, current) {
            return if read {
                Decision::NotModified
            } else {
                Decision::PreconditionFailed
            };
        }
    } else if let (true, Some(since)) = (read, pre.if_modified_since) {
        if current.exists && current.last_modified.is_some_and(|lm| lm <= since) {
            return Decision::NotModified;
        }
    }
    Decision::Proceed
}

/// Which condition a request that [`evaluate`] refused (412) failed: the 412's `detail`
/// says it, and what to send instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `If-Match`: no current representation.
    Gone,
    /// `If-Match` naming tags: the resource exists with no tag to match (a body over
    /// `max_tag_body`, an answer that is not a whole 200).
    Untagged,
    /// `If-Match`: its tag is none the request names.
    Changed,
    /// `If-Match`: the request names its tag only as a weak one (`W/`), which `If-Match`
    /// never matches (it compares strongly), or names none at all (an empty list).
    WeakOrEmpty,
    /// `If-Unmodified-Since`: modified after the date.
    ModifiedSince,
    /// `If-None-Match: *`: it exists.
    Exists,
    /// `If-None-Match` naming tags, on a write: its tag is one of them.
    Matches,
}

/// Why `evaluate` refused `pre` against `current` (call it only when it did).
pub fn failure(pre: &Preconditions, current: &Resource) -> Failure {
    match &pre.if_match {
        Some(cond) if !if_match_holds(cond, current) => {
            return match (current.exists, &current.tag, cond) {
                (false, _, _) => Failure::Gone,
                (true, None, Condition::Tags(_)) => Failure::Untagged,
                (true, Some(cur), Condition::Tags(tags))
                    if tags.is_empty() || tags.iter().any(|t| t.weak_eq(cur)) =>
                {
                    Failure::WeakOrEmpty
                }
                _ => Failure::Changed,
            };
        }
        Some(_) => {}
        None if pre.unmodified_since_fails(current.last_modified) => {
            return Failure::ModifiedSince;
        }
        None => {}
    }
    match pre.if_none_match {
        Some(Condition::Any) => Failure::Exists,
        _ => Failure::Matches,
    }
}

/// §13.1.1: `*` holds when a current representation exists; a list holds when one member
/// matches the current tag by the strong comparison.
fn if_match_holds(cond: &Condition, current: &Resource) -> bool {
    match cond {
        Condition::Any => current.exists,
        Condition::Tags(tags) => {
            current.exists
                && current
                    .tag
                    .as_ref()
                    .is_some_and(|cur| tags.iter().any(|t| t.strong_eq(cur)))
        }
    }
}

/// §13.1.2: `*` is false when a current representation exists; a list is false when one
/// member matches the current tag by the weak comparison.
fn if_none_match_holds(cond: &Condition, current: &Resource) -> bool {
    match cond {
        Condition::Any => !current.exists,
        Condition::Tags(tags) => {
            !(current.exists
                && current
                    .tag
                    .as_ref()
                    .is_some_and(|cur| tags.iter().any(|t| t.weak_eq(cur))))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn tag(s: &str) -> ETag {
        ETag::parse(s.as_bytes()).unwrap()
    }

    fn existing(t: &str) -> Resource {
        Resource {
            exists: true,
            tag: Some(tag(t)),
            last_modified: None,
        }
    }

    fn missing() -> Resource {
        Resource::default()
    }

    #[test]
    fn parses_lists_stars_and_multiple_lines() {
        let p = Preconditions::parse(&headers(&[
            (&IF_MATCH, "\"a\", W/\"b\""),
            (&IF_MATCH, " ,\"c,d\" ,"),
            (&IF_NONE_MATCH, "*"),
        ]))
        .unwrap();
        assert_eq!(
            p.if_match,
            Some(Condition::Tags(vec![
                tag("\"a\""),
                tag("W/\"b\""),
                tag("\"c,d\"")
            ]))
        );
        assert_eq!(p.if_none_match, Some(Condition::Any));
        assert!(p.guards_write());
    }

    /// An empty list (`If-None-Match: `, `If-Match: ,`) is a list, not a malformed header:
    /// no tag is in it. It fails an `If-Match`; it holds for an `If-None-Match`, which then
    /// guards no write.
    #[test]
    fn an_empty_list_is_a_list_no_tag_is_in() {
        for value in ["", " ", ",", " , ,"] {
            let p = Preconditions::parse(&headers(&[(&IF_MATCH, value)])).unwrap();
            assert_eq!(p.if_match, Some(Condition::Tags(vec![])), "{value:?}");
            assert!(p.guards_write(), "{value:?}");
            // Its 412 says so, not that the resource changed.
            let failed = failure(&p, &existing("\"a\""));
            assert!(matches!(failed, Failure::WeakOrEmpty), "{value:?}");
            let p = Preconditions::parse(&headers(&[(&IF_NONE_MATCH, value)])).unwrap();
            assert_eq!(p.if_none_match, Some(Condition::Tags(vec![])), "{value:?}");
            assert!(!p.guards_write(), "{value:?}");
        }
    }

    #[test]
    fn malformed_tag_headers_are_errors_naming_the_header() {
        for (name, value) in [
            (&IF_MATCH, "abc"),
            (&IF_MATCH, "\"abc"),
            (&IF_MATCH, "*, \"a\""),
            (&IF_NONE_MATCH, "W/abc"),
            (&IF_NONE_MATCH, "\"a\" \"b\""),
            (&IF_NONE_MATCH, "**"),
        ] {
            let err = Preconditions::parse(&headers(&[(name, value)])).unwrap_err();
            assert_eq!(&err.name, name, "{value:?}");
            assert!(err.to_string().contains(name.as_str()), "{err}");
        }
    }

    /// A single-line `If-Match` takes a shorter path; it must decide as the list path does.
    /// An empty second line (skipped as an empty list member) sends the same value there.
    #[test]
    fn one_line_values_parse_as_the_list_path_parses_them() {
        for value in [
            "\"abc\"",
            " \"abc\"\t",
            "W/\"abc\"",
            "\"\"",
            "*",
            "\"a,b\"",
            "\"a\", \"b\"",
            "abc",
            "\"abc",
            "\"a\" \"b\"",
            "\"a\"b\"",
            "\"a b\"",
            "",
        ] {
            let one = parse_condition(&headers(&[(&IF_MATCH, value)]), &IF_MATCH);
            let list = parse_condition(&headers(&[(&IF_MATCH, value), (&IF_MATCH, "")]), &IF_MATCH);
            assert_eq!(one, list, "{value:?}");
        }
    }

    #[test]
    fn invalid_or_repeated_dates_are_ignored() {
        let p = Preconditions::parse(&headers(&[(&IF_UNMODIFIED_SINCE, "yesterday")])).unwrap();
        assert_eq!(p.if_unmodified_since, None);
        let d = "Sun, 06 Nov 1994 08:49:37 GMT";
        let p = Preconditions::parse(&headers(&[
            (&IF_MODIFIED_SINCE, d),
            (&IF_MODIFIED_SINCE, d),
        ]))
        .unwrap();
        assert_eq!(p.if_modified_since, None);
        let p = Preconditions::parse(&headers(&[(&IF_UNMODIFIED_SINCE, d)])).unwrap();
        assert_eq!(
            p.if_unmodified_since,
            Some(UNIX_EPOCH + Duration::from_secs(784111777))
        );
    }

    #[test]
    fn if_range_with_anything_but_a_date_is_noticed() {
        for value in ["\"a\"", "W/\"a\"", "a", "yesterday", ""] {
            let p = Preconditions::parse(&headers(&[(&IF_RANGE, value)])).unwrap();
            assert!(p.if_range_not_a_date, "{value:?}");
        }
        let p = Preconditions::parse(&headers(&[(&IF_RANGE, "Sun, 06 Nov 1994 08:49:37 GMT")]))
            .unwrap();
        assert!(!p.if_range_not_a_date);
    }

    #[test]
    fn a_conditional_header_is_noticed_even_when_ignored() {
        let plain = headers(&[(&http::header::ACCEPT, "*/*")]);
        assert_eq!(
            Preconditions::parse(&plain).unwrap(),
            Preconditions::default()
        );
        for name in [
            &IF_MATCH,
            &IF_NONE_MATCH,
            &IF_UNMODIFIED_SINCE,
            &IF_MODIFIED_SINCE,
            &IF_RANGE,
        ] {
            // An invalid date is ignored (§13.1.3) but is still there to be stripped.
            let value = if name.as_str().ends_with("match") {
                "*"
            } else {
                "yesterday"
            };
            let p = Preconditions::parse(&headers(&[(name, value)])).unwrap();
            assert!(p.any_present, "{name}");
        }
        let p = Preconditions::parse(&headers(&[(&IF_MODIFIED_SINCE, "yesterday")])).unwrap();
        assert_eq!(p.if_modified_since, None);
    }

    fn pre(pairs: &[(&HeaderName, &str)]) -> Preconditions {
        Preconditions::parse(&headers(pairs)).unwrap()
    }

    type Row<'a> = (
        &'a [(&'a HeaderName, &'a str)],
        bool,
        &'a Resource,
        Decision,
    );

    #[test]
    fn decision_table() {
        use Decision::*;
        let a = existing("\"a\"");
        let rows: &[Row] = &[
            (&[], false, &a, Proceed),
            // If-Match: strong comparison, * means "exists".
            (&[(&IF_MATCH, "\"a\"")], false, &a, Proceed),
            (&[(&IF_MATCH, "\"x\", \"a\"")], false, &a, Proceed),
            (&[(&IF_MATCH, "W/\"a\"")], false, &a, PreconditionFailed),
            (&[(&IF_MATCH, "\"b\"")], false, &a, PreconditionFailed),
            (&[(&IF_MATCH, "*")], false, &a, Proceed),
            (&[(&IF_MATCH, "*")], false, &missing(), PreconditionFailed),
            (
                &[(&IF_MATCH, "\"a\"")],
                false,
                &missing(),
                PreconditionFailed,
            ),
            (&[(&IF_MATCH, "\"b\"")], true, &a, PreconditionFailed),
            // If-None-Match: weak comparison, * means "does not exist".
            (&[(&IF_NONE_MATCH, "\"a\"")], true, &a, NotModified),
            (&[(&IF_NONE_MATCH, "W/\"a\"")], true, &a, NotModified),
            (
                &[(&IF_NONE_MATCH, "W/\"a\"")],
                false,
                &a,
                PreconditionFailed,
            ),
            (&[(&IF_NONE_MATCH, "\"b\"")], false, &a, Proceed),
            (&[(&IF_NONE_MATCH, "*")], false, &missing(), Proceed),
            (&[(&IF_NONE_MATCH, "*")], false, &a, PreconditionFailed),
            (&[(&IF_NONE_MATCH, "*")], true, &a, NotModified),
            (&[(&IF_NONE_MATCH, "\"a\"")], false, &missing(), Proceed),
            // §13.2.2 order: a false If-Match wins over a false If-None-Match on a GET.
            (
                &[(&IF_MATCH, "\"b\""), (&IF_NONE_MATCH, "\"a\"")],
                true,
                &a,
                PreconditionFailed,
            ),
            (
                &[(&IF_MATCH, "\"a\""), (&IF_NONE_MATCH, "\"a\"")],
                true,
                &a,
                NotModified,
            ),
        ];
        for (i, (h, read, cur, want)) in rows.iter().enumerate() {
            assert_eq!(evaluate(&pre(h), *read, cur), *want, "row {i}: {h:?}");
        }
    }

    #[test]
    fn untagged_existing_resource_fails_tag_lists_but_not_star() {
        let big = Resource {
            exists: true,
            tag: None,
            last_modified: None,
        };
        let d = |h| evaluate(&pre(h), false, &big);
        assert_eq!(d(&[(&IF_MATCH, "\"a\"")]), Decision::PreconditionFailed);
        assert_eq!(d(&[(&IF_MATCH, "*")]), Decision::Proceed);
        assert_eq!(d(&[(&IF_NONE_MATCH, "\"a\"")]), Decision::Proceed);
        assert_eq!(d(&[(&IF_NONE_MATCH, "*")]), Decision::PreconditionFailed);
    }

    #[test]
    fn dates_follow_the_precedence_of_13_2_2() {
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let date = |s: u64| httpdate::fmt_http_date(t(s));
        let cur = Resource {
            exists: true,
            tag: Some(tag("\"a\"")),
            last_modified: Some(t(2_000_000_000)),
        };
        let old = date(1_000_000_000);
        let new = date(2_000_000_000);
        let d = |h: &[(&HeaderName, &str)], read| evaluate(&pre(h), read, &cur);
        // If-Unmodified-Since alone.
        assert_eq!(
            d(&[(&IF_UNMODIFIED_SINCE, &old)], false),
            Decision::PreconditionFailed
        );
        assert_eq!(d(&[(&IF_UNMODIFIED_SINCE, &new)], false), Decision::Proceed);
        // ... is ignored when If-Match is present.
        assert_eq!(
            d(&[(&IF_MATCH, "\"a\""), (&IF_UNMODIFIED_SINCE, &old)], false),
            Decision::Proceed
        );
        // If-Modified-Since: only on reads, and ignored when If-None-Match is present.
        assert_eq!(
            d(&[(&IF_MODIFIED_SINCE, &new)], true),
            Decision::NotModified
        );
        assert_eq!(d(&[(&IF_MODIFIED_SINCE, &old)], true), Decision::Proceed);
        assert_eq!(d(&[(&IF_MODIFIED_SINCE, &new)], false), Decision::Proceed);
        assert_eq!(
            d(
                &[(&IF_NONE_MATCH, "\"b\""), (&IF_MODIFIED_SINCE, &new)],
                true
            ),
            Decision::Proceed
        );
        // A resource without a modification date ignores both.
        let undated = existing("\"a\"");
        assert_eq!(
            evaluate(&pre(&[(&IF_UNMODIFIED_SINCE, &old)]), false, &undated),
            Decision::Proceed
        );
    }
}
