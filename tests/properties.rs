//! Property tests for the pure parts: entity-tag parsing and comparison, conditional header
//! lists, §13.2.2 precedence against a reference model written from the RFC, path
//! normalisation, and the framing inspector's hold on well-framed pipelined requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_UNMODIFIED_SINCE};
use http::{HeaderMap, HeaderValue};
use ifmatch::etag::ETag;
use ifmatch::key::normalize_path;
use ifmatch::precondition::{evaluate, Condition, Decision, Preconditions, Resource};
use proptest::prelude::*;

/// Opaque tag strings: any `etagc` byte (`!`, `#`..`~`, obs-text).
fn opaque() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![8 => prop_oneof![Just(0x21u8), 0x23u8..=0x7e], 1 => 0x80u8..=0xff],
        0..24,
    )
}

/// Tags whose header form is ASCII (obs-text cannot be written as a `&str`).
fn ascii_tag() -> impl Strategy<Value = ETag> {
    tag().prop_filter("ASCII header form", |t| t.to_header().to_str().is_ok())
}

fn tag() -> impl Strategy<Value = ETag> {
    (any::<bool>(), opaque()).prop_map(|(weak, o)| {
        if weak {
            ETag::weak(o).unwrap()
        } else {
            ETag::strong(o).unwrap()
        }
    })
}

/// Tags from a small pool, so that matches are frequent.
fn pooled_tag() -> impl Strategy<Value = ETag> {
    (any::<bool>(), 0u8..4).prop_map(|(weak, i)| {
        let o = format!("t{i}");
        if weak {
            ETag::weak(o).unwrap()
        } else {
            ETag::strong(o).unwrap()
        }
    })
}

fn ows() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just(" "), Just("\t"), Just("  ")]
}

proptest! {
    #[test]
    fn a_tag_round_trips_through_its_header_form(t in tag()) {
        let header = t.to_header();
        prop_assert_eq!(ETag::parse(header.as_bytes()).unwrap(), t);
    }

    #[test]
    fn bytes_outside_etagc_are_refused(o in opaque(), bad in prop_oneof![Just(b'"'), Just(b' '), Just(b'\t'), 0u8..0x20, Just(0x7f)], at in 0usize..24) {
        let mut o = o;
        let at = at.min(o.len());
        o.insert(at, bad);
        let mut quoted = b"\"".to_vec();
        quoted.extend_from_slice(&o);
        quoted.push(b'"');
        prop_assert!(ETag::parse(&quoted).is_err());
        // And unquoted text is never a tag.
        prop_assert!(ETag::parse(&o).is_err() || o.is_empty());
    }

    #[test]
    fn comparison_laws(a in pooled_tag(), b in pooled_tag(), c in pooled_tag()) {
        // Strong implies weak; strong is symmetric and never holds for a weak side.
        if a.strong_eq(&b) { prop_assert!(a.weak_eq(&b)); }
        prop_assert_eq!(a.strong_eq(&b), b.strong_eq(&a));
        if a.is_weak() || b.is_weak() { prop_assert!(!a.strong_eq(&b)); }
        // Weak comparison is an equivalence.
        prop_assert!(a.weak_eq(&a));
        prop_assert_eq!(a.weak_eq(&b), b.weak_eq(&a));
        if a.weak_eq(&b) && b.weak_eq(&c) { prop_assert!(a.weak_eq(&c)); }
    }

    #[test]
    fn a_list_parses_back_to_its_tags_in_order_however_it_is_split(
        tags in prop::collection::vec(ascii_tag(), 1..6),
        seps in prop::collection::vec((ows(), any::<bool>(), ows()), 6),
        split in 0usize..6,
    ) {
        // Join with commas, optional whitespace and empty elements (§5.6.1).
        let mut members: Vec<String> = Vec::new();
        for (i, t) in tags.iter().enumerate() {
            let (l, empty, r) = seps[i];
            let extra = if empty { "," } else { "" };
            members.push(format!("{l}{}{r}{extra}", t.to_header().to_str().unwrap_or("")));
        }
        let one_line = members.join(",");
        let mut h = HeaderMap::new();
        h.insert(IF_MATCH, HeaderValue::from_str(&one_line).unwrap());
        let want = Some(Condition::Tags(tags.clone()));
        prop_assert_eq!(Preconditions::parse(&h).unwrap().if_match, want.clone());
        // The same list over two field lines.
        let split = split.min(members.len());
        if split > 0 && split < members.len() {
            let mut h = HeaderMap::new();
            h.append(IF_NONE_MATCH, HeaderValue::from_str(&members[..split].join(",")).unwrap());
            h.append(IF_NONE_MATCH, HeaderValue::from_str(&members[split..].join(",")).unwrap());
            prop_assert_eq!(Preconditions::parse(&h).unwrap().if_none_match, want);
        }
    }

    #[test]
    fn star_alone_is_any_and_star_with_tags_is_an_error(tags in prop::collection::vec(pooled_tag(), 0..3)) {
        let mut h = HeaderMap::new();
        let list: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        let value = if list.is_empty() { "*".to_owned() } else { format!("*, {}", list.join(", ")) };
        h.insert(IF_MATCH, HeaderValue::from_str(&value).unwrap());
        let parsed = Preconditions::parse(&h);
        if tags.is_empty() {
            prop_assert_eq!(parsed.unwrap().if_match, Some(Condition::Any));
        } else {
            prop_assert!(parsed.is_err());
        }
    }
}

// === §13.2.2 against a reference model ===

/// Dates from a small pool of whole seconds, so that comparisons go both ways.
fn date() -> impl Strategy<Value = SystemTime> {
    (0u64..4).prop_map(|i| UNIX_EPOCH + Duration::from_secs(1_000_000_000 + i * 60))
}

fn condition() -> impl Strategy<Value = Option<Condition>> {
    prop_oneof![
        Just(None),
        Just(Some(Condition::Any)),
        prop::collection::vec(pooled_tag(), 1..3).prop_map(|t| Some(Condition::Tags(t))),
    ]
}

fn preconditions() -> impl Strategy<Value = Preconditions> {
    (
        condition(),
        condition(),
        prop::option::of(date()),
        prop::option::of(date()),
    )
        .prop_map(
            |(if_match, if_none_match, if_unmodified_since, if_modified_since)| Preconditions {
                if_match,
                if_none_match,
                if_unmodified_since,
                if_modified_since,
                if_range_not_a_date: false,
                any_present: true,
            },
        )
}

fn resource() -> impl Strategy<Value = Resource> {
    (
        any::<bool>(),
        prop::option::of(pooled_tag()),
        prop::option::of(date()),
    )
        .prop_map(|(exists, tag, last_modified)| Resource {
            exists,
            // A missing resource has neither tag nor date.
            tag: tag.filter(|_| exists),
            last_modified: last_modified.filter(|_| exists),
        })
}

/// RFC 9110 §13.2.2, transcribed step by step, with §13.1.1–§13.1.4 inlined.
fn model(p: &Preconditions, get_or_head: bool, r: &Resource) -> Decision {
    // 1. If-Match: true if "*" and a current representation exists, or if any listed tag
    //    matches the current one by the strong comparison.
    if let Some(c) = &p.if_match {
        let holds = match c {
            Condition::Any => r.exists,
            Condition::Tags(ts) => ts.iter().any(|t| {
                r.tag.as_ref().is_some_and(|cur| {
                    !t.is_weak() && !cur.is_weak() && t.to_string() == cur.to_string()
                })
            }),
        };
        if !holds {
            return Decision::PreconditionFailed;
        }
    }
    // 2. Else If-Unmodified-Since: false if the last modification is after the date;
    //    ignored without a modification date.
    if p.if_match.is_none() {
        if let (Some(since), Some(lm)) = (p.if_unmodified_since, r.last_modified) {
            if lm > since {
                return Decision::PreconditionFailed;
            }
        }
    }
    // 3. If-None-Match: false if "*" and a representation exists, or if any listed tag
    //    matches by the weak comparison (opaque strings equal). False: 304 for GET/HEAD.
    if let Some(c) = &p.if_none_match {
        let matches = match c {
            Condition::Any => r.exists,
            Condition::Tags(ts) => ts.iter().any(|t| {
                r.tag.as_ref().is_some_and(|cur| {
                    t.to_string().trim_start_matches("W/")
                        == cur.to_string().trim_start_matches("W/")
                })
            }),
        };
        if matches {
            return if get_or_head {
                Decision::NotModified
            } else {
                Decision::PreconditionFailed
            };
        }
    }
    // 4. Else, GET/HEAD with If-Modified-Since: false (304) if not modified since the date.
    if p.if_none_match.is_none() && get_or_head {
        if let (Some(since), Some(lm)) = (p.if_modified_since, r.last_modified) {
            if lm <= since {
                return Decision::NotModified;
            }
        }
    }
    Decision::Proceed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn evaluation_follows_the_rfc_order(p in preconditions(), read in any::<bool>(), r in resource()) {
        prop_assert_eq!(evaluate(&p, read, &r), model(&p, read, &r), "{:?} read={} {:?}", p, read, r);
    }

    #[test]
    fn parsed_dates_are_evaluated_like_the_model(ius in prop::option::of(date()), ims in prop::option::of(date()), r in resource()) {
        let mut h = HeaderMap::new();
        if let Some(d) = ius { h.insert(IF_UNMODIFIED_SINCE, HeaderValue::from_str(&httpdate::fmt_http_date(d)).unwrap()); }
        if let Some(d) = ims { h.insert(IF_MODIFIED_SINCE, HeaderValue::from_str(&httpdate::fmt_http_date(d)).unwrap()); }
        let p = Preconditions::parse(&h).unwrap();
        prop_assert_eq!(p.if_unmodified_since, ius);
        prop_assert_eq!(evaluate(&p, true, &r), model(&p, true, &r));
    }
}

// === path normalisation ===

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2E".to_owned()),
            Just("%61".to_owned()),
            Just("%2f".to_owned()),
            Just("..%2F".to_owned()),
            Just("%2F..%2Fa".to_owned()),
            Just("x%20y".to_owned()),
            // Reserved characters a path carries as they are, raw and encoded, and the two
            // that must stay encoded (`?`, `#`).
            Just("a@b".to_owned()),
            Just("a%40b".to_owned()),
            Just("%3bx=1".to_owned()),
            Just("a+b%2B".to_owned()),
            Just("%3F%23".to_owned()),
            // Bare and broken escapes next to real ones (a fuzz find: "%3%32").
            "[%23]{1,6}",
        ],
        0..8,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

proptest! {
    #[test]
    fn normalisation_is_idempotent_and_leaves_no_dot_or_empty_segments(p in path()) {
        let n = normalize_path(&p);
        prop_assert_eq!(normalize_path(&n), n.clone());
        prop_assert!(n.starts_with('/'));
        prop_assert!(!n.contains("//"), "{}", n);
        prop_assert!(!n.split('/').any(|s| s == "." || s == ".."), "{}", n);
        prop_assert!(!n.contains("%61") && !n.contains("%2E"), "unreserved stays decoded: {}", n);
        // nginx decodes `%2F` before it resolves `..`: so does the key.
        prop_assert!(!n.contains("%2F"), "an encoded slash is a slash: {}", n);
        for kept in ["%40", "%3B", "%2B"] {
            prop_assert!(!n.contains(kept), "a character a path carries raw is decoded: {}", n);
        }
        prop_assert!(!n.contains('?') && !n.contains('#'), "`?` and `#` stay encoded: {}", n);
    }

    #[test]
    fn dot_segments_and_doubled_slashes_do_not_change_the_key(p in path(), at in 0usize..8, how in 0u8..3) {
        let segs: Vec<&str> = p.split('/').collect();
        // Before the last segment: a trailing "." or ".." makes a directory ("/a/." is "/a/").
        let at = 1 + at % (segs.len() - 1);
        let mut v: Vec<&str> = segs.clone();
        match how {
            0 => v.insert(at, "."),
            1 => v.insert(at, ""),
            _ => { v.insert(at, ".."); v.insert(at, "zz"); }
        }
        let aliased = v.join("/");
        prop_assert_eq!(normalize_path(&aliased), normalize_path(&p));
    }
}

// === request framing ===

/// Body bytes that look like line ends and request heads when read as such.
fn tricky_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            Just(b"\r\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r\n\r\n".to_vec()),
            Just(b"0\r\n\r\n".to_vec()),
            Just(b"GET /s HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n".to_vec()),
            prop::collection::vec(any::<u8>(), 0..8),
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

/// One well-framed request: no body, a `Content-Length` body, or a chunked body whose
/// sizes carry any number of leading zeros and extensions of any length, with trailers.
fn framed_request() -> impl Strategy<Value = Vec<u8>> {
    let chunk = (tricky_bytes(), 0usize..6000, 0usize..6000)
        .prop_filter("a chunk has data", |(d, _, _)| !d.is_empty());
    prop_oneof![
        Just(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        tricky_bytes().prop_map(|body| {
            let mut r = format!(
                "PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend(body);
            r
        }),
        (
            prop::collection::vec(chunk, 0..4),
            0usize..6000,
            any::<bool>()
        )
            .prop_map(|(chunks, last_zeros, trailer)| {
                let mut r =
                    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for (data, zeros, ext) in chunks {
                    r.extend(std::iter::repeat_n(b'0', zeros));
                    r.extend(format!("{:x}", data.len()).as_bytes());
                    if ext > 0 {
                        r.push(b';');
                        r.extend(std::iter::repeat_n(b'e', ext));
                    }
                    r.extend(b"\r\n");
                    r.extend(data);
                    r.extend(b"\r\n");
                }
                r.extend(std::iter::repeat_n(b'0', last_zeros + 1));
                r.extend(b"\r\n");
                if trailer {
                    r.extend(b"X-Trailer: 1\r\n");
                }
                r.extend(b"\r\n");
                r
            },),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The framing inspector follows well-framed pipelined requests however their bodies
    /// look and however the reads split them: exactly one `Ok` verdict per request, so no
    /// verdict can land on another request.
    #[test]
    fn the_framing_inspector_keeps_one_verdict_per_request(
        requests in prop::collection::vec(framed_request(), 1..5),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let stream = requests.concat();
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        let verdicts = ifmatch::framing::Verdicts::default();
        let mut tracker = ifmatch::framing::Tracker::new(verdicts.clone());
        for w in at.windows(2) {
            tracker.feed(&stream[w[0]..w[1]]);
        }
        let got: Vec<_> = verdicts.lock().unwrap().drain(..).collect();
        prop_assert_eq!(got, vec![Ok(()); requests.len()]);
    }
}

/// Any bytes a client may send, built from the pieces framing is made of, so that heads,
/// lengths, chunk sizes and line ends come up often, between random bytes.
fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"GET /a HTTP/1.1\r\n".to_vec()),
        Just(b"PUT /b HTTP/1.1\r\n".to_vec()),
        Just(b"Host: x\r\n".to_vec()),
        Just(b"Content-Length: ".to_vec()),
        Just(b"content-length:".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"Transfer-Encoding: gzip, chunked\r\n".to_vec()),
        Just(b"0\r\n\r\n".to_vec()),
        Just(b"PRI * HTTP/2.0\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b";ext".to_vec()),
        Just(b",".to_vec()),
        Just(b" ".to_vec()),
        (0u8..16).prop_map(|d| format!("{d:x}").into_bytes()),
        prop::collection::vec(any::<u8>(), 0..4),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
}

fn inspect(reads: &[&[u8]]) -> Vec<ifmatch::framing::Verdict> {
    let verdicts = ifmatch::framing::Verdicts::default();
    let mut tracker = ifmatch::framing::Tracker::new(verdicts.clone());
    for r in reads {
        tracker.feed(r);
    }
    let got = verdicts.lock().unwrap().drain(..).collect();
    got
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a client sends, well framed or not, the framing inspector's verdicts do not
    /// depend on how the kernel split the bytes into reads: the same stream read whole, a
    /// byte at a time, or cut anywhere is judged alike. (A verdict that did would let a
    /// request through or refuse it by the timing of its segments.)
    #[test]
    fn the_framing_inspector_judges_any_bytes_alike_however_the_reads_split_them(
        stream in client_bytes(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let whole = inspect(&[&stream]);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        prop_assert_eq!(&inspect(&bytes), &whole, "a byte at a time");
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        at.extend([0, stream.len()]);
        at.sort_unstable();
        let reads: Vec<&[u8]> = at.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
        prop_assert_eq!(&inspect(&reads), &whole, "cut at {:?}", at);
    }
}
