//! Any bytes as one client connection's stream, through the framing inspector
//! (`framing::Tracker`, what `framing::Inspected` feeds every read to).
//!
//! Input: byte 0 is a count `n` of cuts (mod 16), the next `2 * n` bytes are the cuts (u16,
//! little-endian, taken mod the stream's length + 1, in any order, repeats giving empty
//! reads), the rest is the stream. Checks, beside no panic:
//! - split invariance: the stream fed whole, one byte at a time, and in the fuzzer's pieces
//!   gives the same verdicts, and after each piece exactly the verdicts that the same
//!   prefix fed a byte at a time gives (a head is judged when its last byte is read, never
//!   later and never before);
//! - a verdict is given only on the LF of a line, at most one per byte; `Ok` only where the
//!   head ended with CRLF CRLF; nothing is judged after a refusal (the proxy closes);
//! - each refusal is backed by the bytes read so far (a bare LF, that many
//!   `Content-Length` lines, both framing fields), and a stream that opens with the HTTP/2
//!   preface gets no verdict.
#![no_main]
use ifmatch::framing::{FramingError, Tracker, Verdict, Verdicts};
use libfuzzer_sys::fuzz_target;

/// Feeds `pieces` in turn; after each, the number of verdicts queued so far.
fn feed(pieces: &[&[u8]]) -> (Vec<Verdict>, Vec<usize>) {
    let v = Verdicts::default();
    let mut t = Tracker::new(v.clone());
    let mut counts = Vec::with_capacity(pieces.len());
    for p in pieces {
        t.feed(p);
        counts.push(v.lock().unwrap().len());
    }
    let out = v.lock().unwrap().drain(..).collect();
    (out, counts)
}

/// Lines (after an LF, so not a request line) whose field name is `name`, any case.
fn fields(stream: &[u8], name: &[u8]) -> usize {
    stream
        .windows(name.len() + 1)
        .filter(|w| w[0] == b'\n' && w[1..].eq_ignore_ascii_case(name))
        .count()
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16);
    if rest.len() < 2 * n {
        return;
    }
    let (cuts, stream) = rest.split_at(2 * n);
    let mut cuts: Vec<usize> = cuts
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();

    // The reference: a byte at a time, noting the byte each verdict came on.
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let (verdicts, counts) = feed(&bytes);
    let mut at = Vec::new();
    let mut before = 0;
    for (i, &c) in counts.iter().enumerate() {
        assert!(c - before <= 1, "two verdicts on byte {i}");
        if c > before {
            at.push(i);
        }
        before = c;
    }
    assert_eq!(at.len(), verdicts.len());
    // seen(p): the verdicts the first p bytes give.
    let seen = |p: usize| if p == 0 { 0 } else { counts[p - 1] };

    for (k, (&i, verdict)) in at.iter().zip(&verdicts).enumerate() {
        let read = &stream[..=i];
        assert_eq!(stream[i], b'\n', "verdict {k} on byte {i}, not an LF");
        if k + 1 < verdicts.len() {
            assert!(verdict.is_ok(), "verdict {k} refused, yet more followed");
        }
        match verdict {
            Ok(()) => assert!(
                read.ends_with(b"\r\n\r\n"),
                "ok head {k} ends without CRLF CRLF"
            ),
            Err(FramingError::BareLf) => assert!(
                read.windows(2).any(|w| w[0] != b'\r' && w[1] == b'\n') || read[0] == b'\n',
                "bare LF claimed, none read"
            ),
            Err(FramingError::RepeatedContentLength(m)) => {
                assert!(*m >= 2);
                assert!(
                    fields(read, b"content-length:") >= *m,
                    "{m} lengths claimed"
                );
            }
            Err(FramingError::LengthAndEncoding) => {
                assert!(fields(read, b"content-length:") >= 1);
                assert!(fields(read, b"transfer-encoding:") >= 1);
            }
            Err(e) => panic!("the tracker never gives {e:?}"),
        }
    }

    if stream.starts_with(b"PRI * HTTP/2.0\r\n") {
        assert!(verdicts.is_empty(), "HTTP/2 judged as HTTP/1");
    }

    // Whole.
    let (whole, _) = feed(&[stream]);
    assert_eq!(whole, verdicts, "whole vs a byte at a time");

    // The fuzzer's pieces.
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut ends = Vec::with_capacity(cuts.len() + 1);
    let mut from = 0;
    for &c in cuts.iter().chain([stream.len()].iter()) {
        pieces.push(&stream[from..c]);
        ends.push(c);
        from = c;
    }
    let (split, split_counts) = feed(&pieces);
    assert_eq!(split, verdicts, "cut at {cuts:?} vs a byte at a time");
    for (&end, &c) in ends.iter().zip(&split_counts) {
        assert_eq!(c, seen(end), "after {end} bytes in pieces cut at {cuts:?}");
    }
});
