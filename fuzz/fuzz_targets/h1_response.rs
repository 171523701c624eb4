//! A backend's answer to a GET or a HEAD, read by ifmatch's own HTTP/1.1 client
//! (`h1::read_response`: the code `h1::RawPool` runs) and by hyper's, as ifmatch sets it up
//! (`pool.rs`, `Pool::connect`): both must read it alike, since a body read one byte short or
//! long answers the next request on the connection with the rest (another client's).
//!
//! Input: byte 0 is flags (bit 0: the request is a HEAD, else a GET; bit 1:
//! `max_header_fields = 4`, else the default 100), the rest is what the backend sends before
//! it closes the connection. `upstream_read_buffer` is its least, 16 KiB, so that a head too
//! large for it is within the fuzzer's reach.
//!
//! hyper's client runs over a `tokio::io::duplex` in a current-thread runtime whose time is
//! paused: a timer fires only when every task waits, so a read that waits for more is seen
//! at once. The backend reads the request's head, writes the bytes, and closes only when the
//! client waits for more: whether hyper keeps the connection is then seen before the close.
//!
//! Checks: the same head refused or read; the same status, version, fields (in order) and
//! reason; the same body and trailers, and both reads ending well or both failing (a failure
//! after the head compares what each gave up to there); the connection reused by `h1` exactly
//! when ifmatch's hyper path would reuse it. Divergences `h1` makes on purpose are taken out
//! below, each where it is.
#![no_main]
use std::future::Future;
use std::pin::{pin, Pin};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use ifmatch::config::DEFAULT_MAX_HEADER_FIELDS;
use ifmatch::h1::read_response;
use ifmatch::pool::ReadLimits;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// What hyper's client made of an answer whose head it read.
#[derive(Debug)]
struct Hyper {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    reason: Option<Bytes>,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    end: Result<(), String>,
    /// The connection would take another request: the body ended before the close, and
    /// hyper's connection then waited for a request rather than closing.
    reused: bool,
}

/// In paused time, a wait this long ends only when every task is waiting.
const STALL: Duration = Duration::from_secs(1);

/// Polls `fut` until it is done. If every task waits first, the backend is told to close
/// (once): then the wait must end.
async fn until_done<F: Future>(
    mut fut: Pin<&mut F>,
    close: &mut Option<oneshot::Sender<()>>,
) -> F::Output {
    loop {
        match tokio::time::timeout(STALL, &mut fut).await {
            Ok(out) => return out,
            Err(_) => match close.take() {
                Some(close) => {
                    let _ = close.send(());
                }
                None => panic!("hyper's client waits after the close"),
            },
        }
    }
}

/// hyper's client, set up as `pool.rs`'s `Pool::connect` sets it up, sends a request
/// with `method` and reads `bytes` as the answer; `Err`: no head came of them.
async fn hyper_reads(bytes: Vec<u8>, method: Method, limits: ReadLimits) -> Result<Hyper, String> {
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.max_buf_size(limits.read_buffer);
    if limits.max_header_fields != DEFAULT_MAX_HEADER_FIELDS {
        builder.max_headers(limits.max_header_fields);
    }
    let (mut sender, conn) = builder
        .handshake::<_, Empty<Bytes>>(TokioIo::new(client))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let (close_tx, close_rx) = oneshot::channel::<()>();
    let backend = tokio::spawn(async move {
        let mut head = Vec::new();
        let mut b = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match server.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        let _ = server.write_all(&bytes).await;
        let _ = close_rx.await;
        let _ = server.shutdown().await;
        // The server's end stays open (dropped, it would fail the client's writes).
        std::future::pending::<()>().await;
    });
    let mut close = Some(close_tx);
    let req = Request::builder()
        .method(method)
        .uri("/")
        .header("host", "backend")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let rsp = until_done(pin!(sender.send_request(req)), &mut close).await;
    let rsp = match rsp {
        Ok(rsp) => rsp,
        Err(e) => {
            conn.abort();
            backend.abort();
            return Err(e.to_string());
        }
    };
    let (parts, mut body) = rsp.into_parts();
    let (mut data, mut trailers) = (Vec::new(), None);
    let end = loop {
        match until_done(pin!(body.frame()), &mut close).await {
            None => break Ok(()),
            Some(Err(e)) => break Err(e.to_string()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    };
    let reused = if end.is_ok() && close.is_some() {
        // The body ended before the close: the connection's task has its turn, then either
        // waits for a request or has closed (kept-alive off, or bytes after the body).
        tokio::time::sleep(STALL).await;
        sender.is_ready()
    } else {
        false
    };
    conn.abort();
    backend.abort();
    Ok(Hyper {
        status: parts.status,
        version: parts.version,
        reason: parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| Bytes::copy_from_slice(r.as_bytes())),
        headers: parts.headers,
        body: data,
        trailers: trailers.filter(|t| !t.is_empty()),
        end,
        reused,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let is_head = flags & 1 == 1;
    let limits = ReadLimits {
        read_buffer: 16 * 1024,
        max_header_fields: if flags & 2 == 0 {
            DEFAULT_MAX_HEADER_FIELDS
        } else {
            4
        },
    };
    let method = if is_head { Method::HEAD } else { Method::GET };
    let ours = read_response(bytes, is_head, limits);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let theirs = rt.block_on(hyper_reads(bytes.to_vec(), method, limits));

    let (ours, theirs) = match (ours, theirs) {
        (Err(_), Err(_)) => return,
        // Deliberate: h1 refuses a 101 (its requests ask for no upgrade); hyper hands it on,
        // and `pool.rs` closes the connection after it (`spoils_connection`).
        (Err(_), Ok(h)) if h.status == StatusCode::SWITCHING_PROTOCOLS => return,
        (Err(e), Ok(h)) => panic!("h1 refused a head hyper read ({e}): {h:?}"),
        (Ok(o), Err(e)) => panic!("h1 read a head hyper refused ({e}): {o:?}"),
        (Ok(o), Ok(h)) => (o, h),
    };
    assert_eq!(ours.status, theirs.status, "status; hyper: {theirs:?}");
    assert_eq!(ours.version, theirs.version, "version; hyper: {theirs:?}");
    assert_eq!(
        ours.headers.iter().collect::<Vec<_>>(),
        theirs.headers.iter().collect::<Vec<_>>(),
        "fields; hyper: {theirs:?}"
    );
    assert_eq!(
        ours.reason.as_ref().map(|r| r.as_bytes()),
        theirs.reason.as_deref(),
        "reason; hyper: {theirs:?}"
    );
    match (&ours.end, &theirs.end) {
        (Ok(()), Ok(())) | (Err(_), Err(_)) => {}
        _ => panic!(
            "body ends {:?}, hyper's {:?}; ours {ours:?}, hyper {theirs:?}",
            ours.end, theirs.end
        ),
    }
    assert_eq!(
        ours.body, theirs.body,
        "body; ours {ours:?}, hyper {theirs:?}"
    );
    assert_eq!(
        ours.trailers.as_ref().filter(|t| !t.is_empty()),
        theirs.trailers.as_ref(),
        "trailers; ours {ours:?}, hyper {theirs:?}"
    );

    // Reuse: hyper's verdict, less what ifmatch's hyper path closes after on purpose
    // (`pool.rs`, `checkin_after`), which h1 closes after too.
    let h = &theirs.headers;
    // An HTTP/1.0 answer, `Connection: keep-alive` or not: hyper would send the next
    // request as HTTP/1.0.
    let http10 = theirs.version == Version::HTTP_10;
    // A 204 declaring content, a 304 with a Transfer-Encoding (`spoils_connection`).
    let spoiled = match theirs.status.as_u16() {
        204 => {
            h.contains_key(TRANSFER_ENCODING) || h.get_all(CONTENT_LENGTH).iter().any(|v| v != "0")
        }
        304 => h.contains_key(TRANSFER_ENCODING),
        _ => false,
    };
    // A body framed by both chunks and a length (`framed_twice`).
    let framed_twice =
        !is_head && !spoiled && h.contains_key(TRANSFER_ENCODING) && h.contains_key(CONTENT_LENGTH);
    // A `close` token in any `Connection` field closes it in h1, read as bytes; hyper skips
    // a field value that is not all visible ASCII.
    let close = h.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    let expected = theirs.reused && !http10 && !spoiled && !framed_twice && !close;
    assert_eq!(
        ours.reused, expected,
        "reused (hyper's own verdict {}); ours {ours:?}, hyper {theirs:?}",
        theirs.reused
    );
    if ours.reused {
        assert!(ours.leftover.is_empty(), "reused with bytes left: {ours:?}");
    }
});
