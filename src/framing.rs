//! Request framing (RFC 9112 §2.2, §5.2, §6): a request whose head or length could be read
//! two ways is refused before anything is forwarded, so that no backend can disagree with
//! the proxy on where one request ends and the next begins (request smuggling).
//!
//! hyper refuses differing `Content-Length`s, lists in it and obsolete line folding, but it
//! quietly normalises some ambiguous heads: it merges equal duplicate `Content-Length`s,
//! drops `Content-Length` when `Transfer-Encoding` is present, and takes a bare LF as a line
//! end. Those are only visible in the raw bytes, so [`Inspected`] watches the bytes hyper
//! reads (never changing them): it follows each request's framing (head, then a
//! `Content-Length` or chunked body) and queues one [`Verdict`] per request head, which the
//! connection's service checks before the request goes further; an HTTP/1 request without
//! a verdict is refused too, so a disagreement the inspector did not foresee fails closed.
//! HTTP/2 connections (the preface `PRI * HTTP/2.0`) are not HTTP/1 framed and are left alone.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why a request's framing was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("the request head ends a line with a bare LF; lines end with CRLF")]
    BareLf,
    #[error("the request has {0} Content-Length fields; send exactly one")]
    RepeatedContentLength(usize),
    #[error("the request has both Transfer-Encoding and Content-Length; send one of them")]
    LengthAndEncoding,
    #[error("the request's Content-Length is not a decimal number")]
    NotALength,
    #[error("Transfer-Encoding {0:?} is not supported; only \"chunked\" is")]
    UnsupportedEncoding(String),
    /// The inspector lost its place in the stream where hyper did not: the two read it
    /// differently, so the request is refused rather than let through unjudged.
    #[error("the proxy could not follow the framing of this connection's requests; send the request again on a new connection")]
    Lost,
}

/// The outcome of inspecting one request head, in arrival order.
pub type Verdict = Result<(), FramingError>;

/// Verdicts shared between a connection's reader and its service.
pub type Verdicts = Arc<Mutex<VecDeque<Verdict>>>;

/// Refuses transfer codings other than a single `chunked`: the proxy would forward such a
/// body still encoded, as if it were the content.
pub fn check_codings(headers: &HeaderMap) -> Result<(), FramingError> {
    let mut codings = Vec::new();
    for v in headers.get_all(TRANSFER_ENCODING) {
        for c in String::from_utf8_lossy(v.as_bytes()).split(',') {
            let c = c.trim().to_ascii_lowercase();
            if !c.is_empty() {
                codings.push(c);
            }
        }
    }
    match codings.as_slice() {
        [] => Ok(()),
        [only] if only == "chunked" => Ok(()),
        _ => Err(FramingError::UnsupportedEncoding(codings.join(", "))),
    }
}

/// Refuses an HTTP/2 request whose `content-length` is not a number (RFC 9110 §8.6). The h2
/// library reads an empty one as 0 (its parser takes no digits for zero) and lets it
/// through, alone or beside a `0`; hyper then sees no length in it, and the backend would be
/// sent `Content-Length: ` with none, a head it must refuse or may read its own way. (An
/// HTTP/1 request's has been checked by hyper.)
pub fn check_http2_length(headers: &HeaderMap) -> Result<(), FramingError> {
    let number =
        |v: &http::HeaderValue| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
    match headers.get_all(CONTENT_LENGTH).iter().all(number) {
        true => Ok(()),
        false => Err(FramingError::NotALength),
    }
}

#[derive(Debug)]
enum State {
    /// Reading a request head, a line at a time.
    Head(Head),
    /// Skipping a `Content-Length` body.
    Body(u64),
    /// A chunked body: the chunk-size line.
    ChunkSize(Vec<u8>),
    /// Chunk data, then its CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data; `true` once its CR is in.
    ChunkEnd(bool),
    /// Trailer lines after the last chunk, until an empty line.
    Trailer(Vec<u8>),
    /// Not HTTP/1 framed (HTTP/2), after a refused head, or lost on input hyper refuses too
    /// (an unparseable length or chunk size, a coding other than chunked). Nothing more is
    /// judged; a further HTTP/1 request then finds no verdict and is refused
    /// ([`FramingError::Lost`]).
    Off,
}

impl State {
    fn head() -> Self {
        Self::Head(Head::default())
    }
}

/// What a head has shown so far. Each line is judged as it ends, so a head costs one
/// reused line buffer, not an allocation per field.
#[derive(Debug, Default)]
struct Head {
    /// The current line, when it came in pieces. Its length needs no bound of its own: the
    /// tracker only sees what hyper reads, and hyper stops reading (431) when a head
    /// outgrows its buffer, however large the configured limit makes that.
    line: Vec<u8>,
    /// The request line has been read (empty lines before it are skipped).
    started: bool,
    bare_lf: bool,
    /// `Content-Length` fields seen, and the first one's value.
    lengths: usize,
    length: Option<u64>,
    /// A `Transfer-Encoding` field was seen; its last coding is `chunked`.
    encoded: bool,
    chunked: bool,
}

impl Head {
    /// Takes in one header field line (without its line end).
    fn field(&mut self, line: &[u8]) {
        // A field's name is what comes before its first colon, so a line is a
        // `Content-Length` field exactly when it starts with `content-length:` (any case).
        // Comparing that prefix rejects most lines at their first byte, where finding the
        // colon would read every name.
        let starts = |prefix: &[u8]| {
            line.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        };
        if starts(b"content-length:") {
            let value = line[b"content-length:".len()..].trim_ascii();
            self.lengths += 1;
            if self.lengths == 1 {
                // Unparseable: `None`, and the tracker stops following this connection.
                self.length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
        } else if starts(b"transfer-encoding:") {
            let value = line[b"transfer-encoding:".len()..].trim_ascii();
            self.encoded = true;
            self.chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
}

/// Follows HTTP/1 request framing over a byte stream and judges each head.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    verdicts: Verdicts,
}

impl Tracker {
    pub fn new(verdicts: Verdicts) -> Self {
        Self {
            state: State::head(),
            verdicts,
        }
    }

    /// Consumes bytes as they were read from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Body(n) | State::ChunkData(n) => {
                    let take = (*n).min(bytes.len() as u64);
                    *n -= take;
                    bytes = &bytes[take as usize..];
                    if *n == 0 {
                        self.state = match self.state {
                            State::Body(_) => State::head(),
                            _ => State::ChunkEnd(false),
                        };
                    }
                }
                // The lines of a chunked body end in CRLF exactly, as hyper reads them: any
                // other line end is one hyper refuses (and closes on) or reads otherwise (a
                // bare LF after the last chunk starts a trailer line to hyper, where an
                // empty line would end the body here, and the next bytes be taken for a
                // head). Either way the tracker cannot follow, and stops (fail closed).
                State::ChunkEnd(cr) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = match (*cr, b) {
                        (false, b'\r') => State::ChunkEnd(true),
                        (true, b'\n') => State::ChunkSize(Vec::new()),
                        _ => State::Off,
                    };
                }
                State::ChunkSize(line)
                    if line.as_slice() == b"0" && bytes[0].is_ascii_hexdigit() =>
                {
                    // A leading zero of a chunk size: hyper takes any number of them, so
                    // keeping them could push the digits past the line limit below, and a
                    // size would be read as 0 (the chunk's data then taken for heads).
                    line[0] = bytes[0];
                    bytes = &bytes[1..];
                }
                State::ChunkSize(line) | State::Trailer(line) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    if b != b'\n' {
                        // Past 4 KiB (a long chunk extension) only the last byte is kept,
                        // in the last place: the size is at the start, the CR at the end.
                        if line.len() < 4096 {
                            line.push(b);
                        } else if let Some(last) = line.last_mut() {
                            *last = b;
                        }
                        continue;
                    }
                    let Some(line) = line.strip_suffix(b"\r") else {
                        self.state = State::Off;
                        continue;
                    };
                    // Only a line with nothing on it ends the trailers (hyper takes one of
                    // blanks for a trailer line).
                    let ends_trailers = line.is_empty();
                    let text = String::from_utf8_lossy(line).trim().to_owned();
                    self.state = match &self.state {
                        State::Trailer(_) if ends_trailers => State::head(),
                        State::Trailer(_) => State::Trailer(Vec::new()),
                        _ => {
                            let hex = text.split(';').next().unwrap_or("").trim();
                            match u64::from_str_radix(hex, 16) {
                                Ok(0) => State::Trailer(Vec::new()),
                                Ok(n) => State::ChunkData(n),
                                Err(_) => State::Off,
                            }
                        }
                    };
                }
                State::Head(head) => {
                    // A line at a time, found with memchr: this runs over every byte of
                    // every request head.
                    let end = memchr::memchr(b'\n', bytes);
                    let Some(end) = end else {
                        head.line.extend_from_slice(bytes);
                        return;
                    };
                    let (now, rest) = (&bytes[..end], &bytes[end + 1..]);
                    bytes = rest;
                    // A line that came whole in this read is looked at where it is; only
                    // a line begun in an earlier read was copied, and is completed here.
                    let mut buf = std::mem::take(&mut head.line);
                    let whole: &[u8] = if buf.is_empty() {
                        now
                    } else {
                        buf.extend_from_slice(now);
                        &buf
                    };
                    let line = match whole.strip_suffix(b"\r") {
                        Some(line) => line,
                        None => {
                            head.bare_lf = true;
                            whole
                        }
                    };
                    if line.is_empty() && !head.started {
                        // Empty lines before a request line are skipped (RFC 9112 §2.2).
                        head.bare_lf = false;
                    } else if line.is_empty() {
                        let head = std::mem::take(head);
                        self.end_of_head(head);
                        if let State::Head(next) = &mut self.state {
                            // The next head reuses the line buffer.
                            buf.clear();
                            next.line = buf;
                        }
                        continue;
                    } else if !head.started {
                        if line.starts_with(b"PRI * HTTP/2.0") {
                            self.state = State::Off;
                            continue;
                        }
                        head.started = true;
                    } else {
                        head.field(line);
                    }
                    buf.clear();
                    head.line = buf;
                }
            }
        }
    }

    fn end_of_head(&mut self, head: Head) {
        let Head {
            bare_lf,
            lengths,
            length,
            encoded,
            chunked,
            ..
        } = head;
        let verdict = if bare_lf {
            Err(FramingError::BareLf)
        } else if lengths > 1 {
            Err(FramingError::RepeatedContentLength(lengths))
        } else if encoded && lengths > 0 {
            Err(FramingError::LengthAndEncoding)
        } else {
            Ok(())
        };
        let refused = verdict.is_err();
        self.verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(verdict);
        self.state = if refused {
            // The proxy answers 400 and closes: where this request ends is unknowable.
            State::Off
        } else if chunked {
            State::ChunkSize(Vec::new())
        } else if lengths == 1 {
            match length {
                Some(0) => State::head(),
                Some(n) => State::Body(n),
                None => State::Off,
            }
        } else if encoded {
            State::Off
        } else {
            State::head()
        };
    }
}

/// A client connection whose incoming bytes go through a [`Tracker`] on their way to hyper.
#[derive(Debug)]
pub struct Inspected<IO> {
    io: IO,
    tracker: Tracker,
}

impl<IO> Inspected<IO> {
    pub fn new(io: IO, verdicts: Verdicts) -> Self {
        Self {
            io,
            tracker: Tracker::new(verdicts),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Inspected<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = &buf.filled()[before..];
            self.tracker.feed(new);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Inspected<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(chunks: &[&[u8]]) -> Vec<Verdict> {
        let v: Verdicts = Arc::default();
        let mut t = Tracker::new(v.clone());
        for c in chunks {
            t.feed(c);
        }
        let out = v.lock().unwrap().drain(..).collect();
        out
    }

    fn one_byte_at_a_time(stream: &[u8]) -> Vec<Verdict> {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        verdicts_of(&chunks)
    }

    #[test]
    fn well_framed_pipelined_requests_each_get_an_ok() {
        let stream = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nbody\nwith\nLF\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\na\nb\n\r\n0\r\nX-Trailer: 1\r\n\r\n\
DELETE /d HTTP/1.1\r\nHost: x\r\n\r\n";
        let want = vec![Ok(()), Ok(()), Ok(()), Ok(())];
        assert_eq!(verdicts_of(&[stream]), want);
        assert_eq!(
            one_byte_at_a_time(stream),
            want,
            "split reads do not matter"
        );
    }

    #[test]
    fn chunked_lines_are_followed_as_hyper_reads_them_or_not_at_all() {
        let post = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        // A bare LF after the last chunk starts a trailer line to hyper, which runs to the
        // next CRLF; the request hidden behind it is a trailer, not a head. The tracker
        // cannot tell, and stops: the refused PUT after it finds no verdict (refused as
        // lost), instead of taking another head's.
        let mut bare = post.clone();
        bare.extend(b"0\r\n\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n");
        bare.extend(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(verdicts_of(&[&bare]), vec![Ok(())]);
        assert_eq!(one_byte_at_a_time(&bare), vec![Ok(())]);
        // A line of blanks is a trailer line to hyper too: only an empty one ends the body.
        let mut blanks = post.clone();
        blanks.extend(b"0\r\n  \r\nGET /h HTTP/1.1\r\n\r\nDELETE /d HTTP/1.1\r\n\r\n");
        assert_eq!(verdicts_of(&[&blanks]), vec![Ok(()), Ok(())]);
        // Chunk data not ended by CRLF, or a size line ended by a bare LF: hyper refuses it.
        for tail in [
            &b"1\r\nxy\r\n0\r\n\r\n"[..],
            b"1\r\nx\n0\r\n\r\n",
            b"1\nx\r\n0\r\n\r\n",
        ] {
            let mut stream = post.clone();
            stream.extend(tail);
            stream.extend(b"GET /next HTTP/1.1\r\n\r\n");
            assert_eq!(
                verdicts_of(&[&stream]),
                vec![Ok(())],
                "{:?}",
                String::from_utf8_lossy(tail)
            );
        }
    }

    #[test]
    fn a_chunk_size_is_read_whatever_its_leading_zeros() {
        // More zeros than a buffered line holds, then chunk data that reads as a head.
        let mut stream = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        stream.extend(std::iter::repeat_n(b'0', 5000));
        stream.extend(b"18\r\nx\r\n\r\nGET /s HTTP/1.1\r\n\r\n\r\n0000\r\n\r\n");
        stream.extend(b"GET /next HTTP/1.1\r\n\r\n");
        let want = vec![Ok(()), Ok(())];
        assert_eq!(verdicts_of(&[&stream]), want);
        assert_eq!(one_byte_at_a_time(&stream), want);
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        let cases: &[(&[u8], FramingError)] = &[
            (b"PUT / HTTP/1.1\nHost: x\nContent-Length: 1\n\nx", FramingError::BareLf),
            (b"PUT / HTTP/1.1\r\nHost: x\nContent-Length: 1\r\n\r\nx", FramingError::BareLf),
            (b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", FramingError::RepeatedContentLength(2)),
            (b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", FramingError::LengthAndEncoding),
        ];
        for (stream, want) in cases {
            let text = String::from_utf8_lossy(stream);
            assert_eq!(verdicts_of(&[stream]), vec![Err(want.clone())], "{text}");
            assert_eq!(
                one_byte_at_a_time(stream),
                vec![Err(want.clone())],
                "{text}"
            );
            for at in 1..stream.len() {
                let (a, b) = stream.split_at(at);
                assert_eq!(
                    verdicts_of(&[a, b]),
                    vec![Err(want.clone())],
                    "{text} split at {at}"
                );
            }
        }
    }

    #[test]
    fn http2_is_left_alone() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend_from_slice(&[0, 0, 0x0a, 4, 0, 0, 0, 0, 0, b'\n', b'\n']);
        assert_eq!(verdicts_of(&[&stream]), vec![]);
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        assert_eq!(
            verdicts_of(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]),
            vec![Ok(())]
        );
    }

    #[test]
    fn an_http2_length_must_be_a_number() {
        let h = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(CONTENT_LENGTH, v.parse().unwrap());
            }
            h
        };
        assert_eq!(check_http2_length(&h(&[])), Ok(()));
        assert_eq!(check_http2_length(&h(&["0"])), Ok(()));
        assert_eq!(check_http2_length(&h(&["12", "12"])), Ok(()));
        for bad in [&[""][..], &["", "0"], &["0", ""], &["+1"], &["1 "]] {
            assert_eq!(
                check_http2_length(&h(bad)),
                Err(FramingError::NotALength),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_single_chunked_coding_is_supported() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(TRANSFER_ENCODING, v.parse().unwrap());
            h
        };
        assert_eq!(check_codings(&h("chunked")), Ok(()));
        assert!(check_codings(&h("gzip, chunked")).is_err());
        assert_eq!(check_codings(&HeaderMap::new()), Ok(()));
    }
}
