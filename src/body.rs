//! Response bodies: one type for everything the proxy sends, and the bounded read that hashes
//! a GET body while it arrives. Request bodies: the wrapper that hashes a PUT body on its way
//! upstream (routes with `tag_puts`), and the read of a small one whole before its write.
//!
//! A tagged body is kept as the chunks the upstream sent; they are hashed (or compared with
//! the memo's copy, `memo.rs`) as they arrive and sent on as they are, never concatenated. A
//! body longer than the route's limit stops being buffered at the limit and streams on
//! untagged, so memory per request is bounded by it; so does one that would take the bytes
//! held by all requests past `max_buffered_bytes` (`budget.rs`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::h1::{UpBody, UpError};
use tokio::time::{Instant, Sleep};

use crate::budget::Share;
use crate::error::Error;
use crate::etag::{ETag, TagHasher};
use crate::memo::Memo;

/// The body of every response the proxy sends: buffered chunks, then maybe a live stream.
#[derive(Debug, Default)]
pub struct ProxyBody {
    head: VecDeque<Bytes>,
    tail: Option<Tail>,
    /// The budget `head` holds, given back once the last of it is handed to the connection.
    held: Option<Share>,
}

/// What is left of an upstream body, with a timer: a stream that stalls for longer than
/// `idle` between chunks ends in an error, which aborts the response to the client cleanly
/// (HTTP/1.1 closes the connection, HTTP/2 resets the stream) instead of hanging it.
#[derive(Debug)]
struct Tail {
    body: UpBody,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Set for a body sent under a tag judged from an earlier read of it.
    check: Option<Box<Check>>,
}

/// A body streamed under a tag that was computed from another read of the same URL (a
/// conditional GET with no room in `max_buffered_bytes`, `proxy/read.rs`): it is hashed as it
/// goes, and its last chunk is held back until the hash is known, so that a body that is
/// not the one tagged never reaches its client whole: it ends in an error, which aborts the
/// response, instead.
struct Check {
    hasher: TagHasher,
    tag: ETag,
    last: Option<Bytes>,
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Check")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// A body error: the upstream's, or a stall.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream body sent no chunk for this long.
#[derive(Debug, thiserror::Error)]
#[error("the upstream body stalled for {0:?}")]
pub struct Stalled(pub Duration);

/// A checked body (see [`Check`]) was not the representation whose tag its head carries.
#[derive(Debug, thiserror::Error)]
#[error("the representation changed between the read that tagged it and the one sent")]
pub struct Changed;

// === impl ProxyBody ===

impl ProxyBody {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn full(bytes: Bytes) -> Self {
        Self {
            head: VecDeque::from([bytes]),
            tail: None,
            held: None,
        }
    }

    /// The upstream's body, streamed through untouched; each chunk must come within `idle`.
    pub fn stream(body: UpBody, idle: Duration) -> Self {
        Self::chunks(VecDeque::new(), None, Some(body), idle)
    }

    /// The upstream's body, streamed under `tag` (judged from an earlier read of the URL):
    /// hashed with `hasher` on the way, it ends in [`Changed`] before its last chunk unless
    /// it has that tag.
    pub fn checked(body: UpBody, idle: Duration, hasher: TagHasher, tag: ETag) -> Self {
        // Kept even when already at its end: the empty body's own tag still decides.
        let tail = Tail {
            body,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            check: Some(Box::new(Check {
                hasher,
                tag,
                last: None,
            })),
        };
        Self {
            head: VecDeque::new(),
            tail: Some(tail),
            held: None,
        }
    }

    /// Chunks already read (holding `held` of the budget), followed by what is left of the
    /// stream.
    pub fn chunks(
        head: VecDeque<Bytes>,
        held: Option<Share>,
        rest: Option<UpBody>,
        idle: Duration,
    ) -> Self {
        let tail = rest.filter(|b| !b.is_end_stream()).map(|body| Tail {
            body,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            check: None,
        });
        Self { head, tail, held }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(chunk) = self.head.pop_front() {
            if self.head.is_empty() {
                // All handed over: what hyper still queues is bounded by its write buffer.
                self.held = None;
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(tail) = self.tail.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let frame = match Pin::new(&mut tail.body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    return match tail.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            let idle = tail.idle;
                            self.tail = None;
                            Poll::Ready(Some(Err(Stalled(idle).into())))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            };
            let deadline = tokio::time::Instant::now() + tail.idle;
            tail.timer.as_mut().reset(deadline);
            let Some(check) = tail.check.as_deref_mut() else {
                return Poll::Ready(frame.map(|f| f.map(hop_free).map_err(BodyError::from)));
            };
            match frame {
                Some(Ok(frame)) => {
                    // Trailers are dropped, as a tagged body's are (`read_tagged`).
                    if let Ok(chunk) = frame.into_data() {
                        check.hasher.update(&chunk);
                        if let Some(prev) = check.last.replace(chunk) {
                            return Poll::Ready(Some(Ok(Frame::data(prev))));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.tail = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    let check = *tail.check.take().expect("checked above");
                    self.tail = None;
                    if !check.hasher.finish().strong_eq(&check.tag) {
                        return Poll::Ready(Some(Err(Changed.into())));
                    }
                    return Poll::Ready(check.last.map(|last| Ok(Frame::data(last))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A checked body still holds its last chunk when its upstream has ended.
        self.head.is_empty()
            && self
                .tail
                .as_ref()
                .is_none_or(|t| t.check.is_none() && t.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let mut buffered: u64 = self.head.iter().map(|b| b.len() as u64).sum();
        let Some(tail) = &self.tail else {
            return SizeHint::with_exact(buffered);
        };
        if let Some(last) = tail.check.as_ref().and_then(|c| c.last.as_ref()) {
            buffered += last.len() as u64;
        }
        let t = tail.body.size_hint();
        let mut hint = SizeHint::new();
        // The upper bound first: `set_lower` asserts lower <= upper.
        if let Some(upper) = t.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint.set_lower(t.lower().saturating_add(buffered));
        hint
    }
}

/// A backend's trailers without connection-specific fields, as its head is sent on
/// (`upstream::strip_hop_by_hop`): RFC 9110 §6.5.1 does not allow them there, and h2 refuses
/// to send them, resetting an HTTP/2 client's stream after its whole body.
fn hop_free(frame: Frame<Bytes>) -> Frame<Bytes> {
    if !frame.is_trailers() {
        return frame;
    }
    match frame.into_trailers() {
        Ok(mut trailers) => {
            crate::upstream::strip_hop_by_hop(&mut trailers);
            Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

/// A client's request body on its way upstream: cut off past `max_request_body` (found
/// while streaming a chunked body), and its end checked. hyper ends an HTTP/2 request body
/// that the client reset with `NO_ERROR` as if it were complete (hyper#3681); sent on as a
/// chunked upload, it would end cleanly upstream, and the backend would store the part
/// that came. So such an end is an error here: the upstream request is cut off instead.
/// (An HTTP/1.1 body's end is hyper's to check: a connection that closes mid-body is an
/// error already.)
#[derive(Debug)]
pub struct ClientBody {
    /// Bytes read already, sent first, with their share of the budget until then: the
    /// start of a body whose read-whole found no room, which streams instead
    /// (`read_request`). Boxed: one word in every upstream request, which carries and moves
    /// this.
    prefix: Option<Box<(Bytes, Share)>>,
    inner: Incoming,
    /// The bytes still allowed, with [`H2`] set for an HTTP/2 body: one word for both, as
    /// every upstream request carries this and moves it about (a flag of its own made each
    /// request 8 bytes larger, and 160 instructions dearer in moves).
    left: u64,
}

/// [`ClientBody::left`]'s flag of an HTTP/2 body.
const H2: u64 = 1 << 63;

/// An HTTP/2 request body that ended without its `END_STREAM`.
#[derive(Debug, thiserror::Error)]
#[error("the client reset its stream before the request body was complete")]
pub struct StreamReset;

/// The client's request body failed as it streamed up (chunked framing hyper refused, a
/// connection closed mid-body): the client's doing, not the backend's, though it surfaces
/// as the upstream exchange's error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ClientBodyFailed(hyper::Error);

/// A request body longer than `max_request_body`, found while it streamed.
#[derive(Debug, thiserror::Error)]
#[error("the request body is longer than max_request_body")]
pub struct BodyTooLong;

impl ClientBody {
    /// `inner`, with no limit yet (see [`limit`](Self::limit)).
    pub fn new(inner: Incoming, version: http::Version) -> Self {
        let h2 = if version == http::Version::HTTP_2 {
            H2
        } else {
            0
        };
        Self {
            prefix: None,
            inner,
            left: h2 | !H2,
        }
    }

    /// At most `max` bytes of it (`max` past 2^63 is no limit), the prefix included.
    pub fn limit(mut self, max: u64) -> Self {
        let max = max.saturating_sub(self.prefix.as_ref().map_or(0, |p| p.0.len() as u64));
        self.left = (self.left & H2) | max.min(!H2);
        self
    }

    fn remaining(&self) -> u64 {
        self.left & !H2
    }

    /// Some of it is still to come from the client: a prefix read to the body's end leaves
    /// nothing on the connection.
    pub fn unread(&self) -> bool {
        !self.inner.is_end_stream()
    }

    /// Lets go of a body the proxy will not send on (refused after part of it was read, or
    /// found too large), answered with `Connection: close`: over HTTP/1.1 what is still to
    /// come is read and dropped until the close ([`discard`]); over HTTP/2 dropping it
    /// resets only its stream.
    pub fn linger(self) {
        if self.left & H2 == 0 && self.unread() {
            discard(self.inner);
        }
    }
}

/// How long [`discard`] waits for each chunk of a body, and for all of it: nginx's
/// `lingering_timeout` and `lingering_time`. A slow client's body still arrives whole
/// (20 KB/s sends a megabyte in time); one that stops is let go.
pub const DISCARD_IDLE: Duration = Duration::from_secs(5);
pub const DISCARD_TIME: Duration = Duration::from_secs(30);

/// Reads and drops an HTTP/1.1 request body the proxy answered without sending on, within
/// [`DISCARD_IDLE`] and [`DISCARD_TIME`] (nginx's lingering close). A socket closed with
/// the body still arriving is reset, and a client that sends its whole body before it reads
/// its answer (Python's http.client) would get a broken pipe instead of the answer. hyper
/// closes the connection (or, for a small body, takes the next request) once the body is
/// read or dropped.
pub fn discard(mut body: Incoming) {
    use http_body_util::BodyExt;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DISCARD_TIME, async {
            while let Ok(Some(Ok(_))) = tokio::time::timeout(DISCARD_IDLE, body.frame()).await {}
        })
        .await;
    });
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            // Its share goes with it: the bytes are the connection's from here.
            let (prefix, _share) = *prefix;
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.remaining() {
                        return Poll::Ready(Some(Err(BodyTooLong.into())));
                    }
                    self.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(ClientBodyFailed(e).into()))),
            None if self.left & H2 != 0 && !self.inner.is_end_stream() => {
                Poll::Ready(Some(Err(StreamReset.into())))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    /// The body's own hint, bounded by what is still allowed (as `http_body_util::Limited`
    /// does): a body declared longer is refused before it is sent. The prefix is added.
    fn size_hint(&self) -> SizeHint {
        let hint = self.rest_hint();
        let Some(p) = self.prefix.as_ref().map(|p| p.0.len() as u64) else {
            return hint;
        };
        let mut with = SizeHint::new();
        with.set_lower(hint.lower() + p);
        if let Some(upper) = hint.upper() {
            with.set_upper(upper + p);
        }
        with
    }
}

impl ClientBody {
    /// The hint of what is still to come from the client (see `size_hint`). Exact only for
    /// a body of known length: hyper frames the upload by an exact hint (a `Content-Length`)
    /// and stops reading the body there. A body of unknown length bounded to `left` more
    /// bytes may still send more, which must end it in [`BodyTooLong`]; hinted exact (as
    /// when `left` is 0, the bytes read before it streamed reaching the limit), it would go
    /// up cut short at the limit, framed as a whole body.
    fn rest_hint(&self) -> SizeHint {
        let left = self.remaining();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        if let Some(n) = inner.exact() {
            hint.set_exact(n.min(left));
            return hint;
        }
        let lower = inner.lower().min(left);
        let upper = inner.upper().map_or(left, |max| max.min(left));
        if upper > lower {
            hint.set_upper(upper);
        }
        hint.set_lower(lower);
        hint
    }
}

/// A request body sent on unchanged, optionally hashed on the way: once the last byte has
/// been handed to the connection, the tag of exactly the bytes sent is set in the slot that
/// [`Hashed::tee`] returned. A body that fails or is cut short, or outgrows the bound it was
/// hashed under, leaves the slot empty.
pub struct Hashed<B> {
    inner: B,
    /// Boxed: only `tag_puts` writes hash, and the hasher's state would otherwise add some
    /// 200 bytes to every upstream request, which the request futures carry and move.
    tee: Option<Box<Tee>>,
    /// When the last chunk went up, once the pool asks ([`Hashed::uploading`]).
    progress: Option<Arc<Progress>>,
}

/// A [`Hashed`] body's hashing.
struct Tee {
    hasher: TagHasher,
    slot: Arc<OnceLock<ETag>>,
    /// How many more bytes may come before the body is too large to be tagged.
    left: u64,
}

/// When a request body streaming upstream last handed a chunk to its connection. The
/// upstream timeout of such a request runs from its last chunk (`pool.rs`), not from its
/// start: a client uploading slowly is not a slow backend.
#[derive(Debug)]
pub struct Progress {
    base: Instant,
    /// Nanoseconds after `base`.
    last: AtomicU64,
    /// The connection asked for the next chunk and the client has not sent it yet.
    awaited: AtomicBool,
    /// The body's last chunk has been handed to the connection.
    done: AtomicBool,
}

impl Progress {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
            awaited: AtomicBool::new(false),
            done: AtomicBool::new(false),
        }
    }

    /// Whether the whole body has been handed to the connection.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Whether a pause now is the client's: the connection is waiting for its next chunk.
    /// Otherwise it is the backend's, which has stopped taking what was sent (or, after the
    /// last chunk, has not answered).
    pub fn client_paused(&self) -> bool {
        self.awaited.load(Ordering::Acquire)
    }

    fn mark(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Release);
    }

    /// When the last chunk went up (or, before the first, when the upload began).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Acquire))
    }
}

// === impl Hashed ===

impl<B: std::fmt::Debug> std::fmt::Debug for Hashed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hashed")
            .field("inner", &self.inner)
            .field("hashing", &self.tee.is_some())
            .field("progress", &self.progress)
            .finish()
    }
}

impl<B: Body<Data = Bytes>> Hashed<B> {
    /// `inner`, not hashed.
    pub fn plain(inner: B) -> Self {
        Self {
            inner,
            tee: None,
            progress: None,
        }
    }

    /// For a body still to be sent: the record of its chunks going up, kept from now on.
    pub fn uploading(&mut self) -> Option<Arc<Progress>> {
        if self.inner.is_end_stream() {
            return None;
        }
        Some(
            self.progress
                .get_or_insert_with(|| Arc::new(Progress::new()))
                .clone(),
        )
    }

    /// `inner`, hashed by `hasher` as it is sent: tagged if it ends within `most` bytes.
    pub fn tee(inner: B, hasher: TagHasher, most: u64) -> (Self, Arc<OnceLock<ETag>>) {
        let slot = Arc::new(OnceLock::new());
        let mut body = Self {
            inner,
            tee: Some(Box::new(Tee {
                hasher,
                slot: slot.clone(),
                left: most,
            })),
            progress: None,
        };
        // An empty body is never polled: its tag is known now.
        if body.inner.is_end_stream() {
            body.finish();
        }
        (body, slot)
    }

    fn finish(&mut self) {
        if let Some(tee) = self.tee.take() {
            let _ = tee.slot.set(tee.hasher.finish());
        }
    }
}

impl<B> Body for Hashed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(progress) = &this.progress {
            progress
                .awaited
                .store(polled.is_pending(), Ordering::Release);
            if let Poll::Ready(Some(Ok(_))) = &polled {
                progress.mark();
            }
            // The connection stops polling once the body says it has ended, or once the
            // length it declared has gone (an HTTP/2 client may end its stream only later,
            // with an empty frame).
            if matches!(polled, Poll::Ready(None))
                || this.inner.is_end_stream()
                || this.inner.size_hint().exact() == Some(0)
            {
                progress.done.store(true, Ordering::Release);
            }
        }
        if this.tee.is_none() {
            return polled;
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(tee)) = (frame.data_ref(), this.tee.as_deref_mut()) {
                    match tee.left.checked_sub(data.len() as u64) {
                        Some(rest) => {
                            tee.left = rest;
                            tee.hasher.update(data);
                        }
                        None => this.tee = None,
                    }
                }
                // The connection stops polling once the body says it has ended, so the
                // last data frame may be the last poll.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.tee = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The outcome of reading a body for tagging.
#[derive(Debug)]
pub enum Collected<B = UpBody> {
    /// The whole body fit within the limit. `remembered`: the memo's copy it equalled, whose
    /// tag it has, so it was not hashed.
    /// `held`: the budget `chunks` hold. `kept`: false when a read only for the tag found no
    /// room and let its chunks go (`chunks` is then empty).
    Whole {
        chunks: VecDeque<Bytes>,
        held: Share,
        kept: bool,
        tag: ETag,
        remembered: Option<Arc<Memo>>,
        /// The body ended in trailers, which were dropped.
        dropped_trailers: bool,
    },
    /// The body passed the limit: the chunks read so far (holding `held`) and the rest,
    /// still streaming. `kept`: false when a read only for the tag had let its chunks go
    /// before (`chunks` is then empty): the rest is not the body, and must not be sent as it.
    TooLarge {
        chunks: VecDeque<Bytes>,
        held: Share,
        kept: bool,
        rest: B,
    },
    /// Holding the next chunk would have taken the bytes held by all requests past
    /// `max_buffered_bytes`: as `TooLarge`.
    OverBudget {
        chunks: VecDeque<Bytes>,
        held: Share,
        rest: B,
    },
}

/// What a read for a tag keeps of its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// All of it, to send on: one that finds no room stops there (`OverBudget`).
    ToSend,
    /// What fits: read only for its tag (a revalidation, a HEAD, a GET judged by tags), it
    /// lets its chunks go once there is no room and is hashed to the end.
    WhileRoom,
    /// Nothing: read only for its tag, and known not to fit.
    Nothing,
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// No chunk arrived for this long.
    Stalled(Duration),
    Failed(UpError),
}

/// Reads `body` while feeding it to `hasher`, up to `limit` bytes; each chunk must arrive
/// within `idle`. Given a `memo` (the copy of a body of this URL, and its tag), the body is
/// compared with the copy as it arrives and hashed only once it differs: from the copy's
/// bytes up to there, which are the body's, then on. A body equal to the copy gets its tag.
///
/// The chunks kept count against the budget through `held`, as `keep` says: when it has no
/// room, a body to be sent on stops there (`OverBudget`); one read only for its tag lets
/// its chunks go and is hashed to the end; one known not to fit keeps none.
///
/// Every [`FAIR_SHARE`] bytes it lets the thread's other tasks run.
pub async fn read_tagged<B>(
    mut body: B,
    mut hasher: TagHasher,
    memo: Option<Arc<Memo>>,
    limit: u64,
    idle: Duration,
    mut held: Share,
    keep: Keep,
) -> Result<Collected<B>, ReadError>
where
    B: Body<Data = Bytes, Error = UpError> + Unpin,
{
    use http_body_util::BodyExt;

    let mut chunks = VecDeque::new();
    // Small chunks past the first few, copied together (`hold`).
    let mut tail = BytesMut::new();
    // False once a read only for the tag has found no room: it keeps nothing more.
    let mut kept = keep != Keep::Nothing;
    let mut len = 0usize;
    // `Some` while every byte so far equals the copy's.
    let mut same = memo;
    let mut dropped_trailers = false;
    // Bytes read since the task last let others run.
    let mut unyielded = 0;
    loop {
        let frame = within(idle, body.frame())
            .await
            .map_err(|_| ReadError::Stalled(idle))?;
        let Some(frame) = frame.transpose().map_err(ReadError::Failed)? else {
            let (tag, remembered) = match same {
                Some(m) if m.body.len() == len => (m.tag.clone(), Some(m)),
                Some(m) => {
                    hasher.update(&m.body[..len]);
                    (hasher.finish(), None)
                }
                None => (hasher.finish(), None),
            };
            flush(&mut chunks, &mut tail);
            return Ok(Collected::Whole {
                chunks,
                held,
                kept,
                tag,
                remembered,
                dropped_trailers,
            });
        };
        // Trailers on a GET body are rare and carry nothing the tag depends on: dropped.
        let Ok(chunk) = frame.into_data() else {
            dropped_trailers = true;
            continue;
        };
        let start = len;
        len += chunk.len();
        unyielded += chunk.len();
        let chunk = match &same {
            // The copy's bytes are held in its place: the chunk goes now, and the read
            // buffer it was cut from is free again for the next read, still in the cache,
            // where a 4 MiB body held as read took 4 MiB of fresh memory a GET.
            Some(m) if m.body.get(start..len) == Some(&chunk[..]) => m.body.slice(start..len),
            Some(m) => {
                hasher.update(&m.body[..start]);
                hasher.update(&chunk);
                same = None;
                chunk
            }
            None => {
                hasher.update(&chunk);
                chunk
            }
        };
        if kept {
            hold(&mut chunks, &mut tail, chunk);
        }
        if unyielded >= FAIR_SHARE && !body.is_end_stream() {
            unyielded = 0;
            tokio::task::yield_now().await;
        }
        // The chunk in hand is not counted in either case: it goes out next, with the rest
        // streamed.
        if len as u64 > limit {
            flush(&mut chunks, &mut tail);
            return Ok(Collected::TooLarge {
                chunks,
                held,
                kept,
                rest: body,
            });
        }
        if !kept || held.reserve(len) {
            continue;
        }
        if keep == Keep::ToSend {
            flush(&mut chunks, &mut tail);
            return Ok(Collected::OverBudget {
                chunks,
                held,
                rest: body,
            });
        }
        chunks.clear();
        tail = BytesMut::new();
        held.release();
        kept = false;
    }
}

/// Body bytes a read for a tag takes in before it lets the other tasks of its thread run:
/// a read buffer's worth (`upstream_read_buffer`'s default). A body already in hand (a
/// fast backend) is otherwise read, compared and held in one go: with one worker, each
/// 4 MiB GET kept every other request waiting a millisecond or more, and the 4 MiB p99 was
/// 1.2-1.5x nginx's, which serves its connections in turns. A body up to it never yields
/// (at 64 KiB, 256 KiB GETs took extra turns while still arriving, p99 0.95-1.09x nginx's
/// against 0.73x); a 4 MiB one yields after each 256 KiB chunk but its last.
pub const FAIR_SHARE: usize = crate::config::DEFAULT_UPSTREAM_READ_BUFFER as usize;

/// Chunks kept as they came, before small ones are copied together.
const SLICES: usize = 16;
/// A chunk under this is small.
const SMALL_CHUNK: usize = 4 * 1024;
/// The most small chunks copied into one.
const COPIED: usize = 64 * 1024;

/// Keeps `chunk` of a body being read. A chunk is a slice of hyper's read buffer, which it
/// keeps alive whole, and takes a slot of its own: a backend sending a body in one-byte
/// chunks would make each byte the budget counts hold some 40. So past the first
/// [`SLICES`], small chunks are copied into `tail`, up to [`COPIED`] bytes a piece. Bodies
/// that come in a few chunks, small ones included, are kept as they came.
fn hold(chunks: &mut VecDeque<Bytes>, tail: &mut BytesMut, chunk: Bytes) {
    if chunks.len() < SLICES || chunk.len() >= SMALL_CHUNK {
        flush(chunks, tail);
        chunks.push_back(chunk);
        return;
    }
    if tail.len() + chunk.len() > COPIED {
        flush(chunks, tail);
    }
    tail.extend_from_slice(&chunk);
}

/// Puts what `tail` has copied, if anything, after the chunks kept.
fn flush(chunks: &mut VecDeque<Bytes>, tail: &mut BytesMut) {
    if !tail.is_empty() {
        chunks.push_back(tail.split().freeze());
    }
}

/// A client's request body, read whole before the write it belongs to takes its lock (one
/// of known size within the route's `max_tag_body`, `proxy/write.rs`): a client slow to send it
/// then holds up nobody else's write. Each chunk must come within `idle` of the one before
/// (nginx's `client_body_timeout`), as a streamed body's must.
///
/// The bytes are counted in `share` as they arrive, not as declared: a client that declares
/// a large body and sends none holds none of `max_buffered_bytes`. When the budget has no
/// room for the next chunk, the read stops and the body is given back with what was read as
/// its prefix ([`Read::NoRoom`]), to stream to the backend as a larger body does. So it
/// does, past `idle`, if it has come slower than [`MIN_READ_RATE`] ([`Read::TooSlow`]): a
/// client that drips its body a byte per `idle` would otherwise hold its share for hours;
/// and a body of unknown length once longer than `limits.0` ([`Read::TooLong`]). One longer
/// than `limits.1` is a 413.
pub async fn read_request(
    mut body: ClientBody,
    idle: Duration,
    limits: (u64, u64),
    share: &mut Share,
) -> Result<Read, Error> {
    use http_body_util::BodyExt;

    let (whole, max) = limits;
    let started = Instant::now();
    // Held as a GET's body is (`hold`): a client sending one-byte frames would make each
    // byte counted in the share keep a slice of hyper's read buffer alive.
    let (mut chunks, mut tail) = (VecDeque::new(), BytesMut::new());
    let mut len = 0;
    loop {
        let frame = match within(idle, body.frame()).await {
            Err(_) => return Err(Error::BodyTimeout(idle)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Error::BodyRead(crate::error::with_sources(&*e))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not forwarded with a body read whole
        };
        // A body of unknown length that turns out longer than `whole` streams on too, and
        // one longer than `max` (`max_request_body`) is refused, as it would be streaming.
        let so_far = (len + data.len()) as u64;
        if so_far > max {
            body.linger();
            return Err(Error::BodyTooLarge { limit: max });
        }
        if so_far > whole {
            hold(&mut chunks, &mut tail, data);
            body.prefix = Some(Box::new((concat(chunks, tail), share.split_off())));
            return Ok(Read::TooLong(Box::new(body)));
        }
        if !share.reserve(len + data.len()) {
            hold(&mut chunks, &mut tail, data);
            // Held until sent, counted as read (the chunk in hand aside, which goes first).
            body.prefix = Some(Box::new((concat(chunks, tail), share.split_off())));
            return Ok(Read::NoRoom(Box::new(body)));
        }
        len += data.len();
        hold(&mut chunks, &mut tail, data);
        let elapsed = started.elapsed();
        if elapsed > idle && (len as f64) < MIN_READ_RATE * elapsed.as_secs_f64() {
            body.prefix = Some(Box::new((concat(chunks, tail), share.split_off())));
            return Ok(Read::TooSlow(Box::new(body)));
        }
    }
    Ok(Read::Whole(concat(chunks, tail)))
}

/// Bytes a second below which a body read whole, once it has taken longer than the idle
/// timeout, streams on instead (its share of the budget then goes with what was read). A
/// client that slow still gets its write through, holding its URL's lock while it uploads
/// rather than memory.
pub const MIN_READ_RATE: f64 = 8.0 * 1024.0;

/// What [`read_request`] read.
#[derive(Debug)]
pub enum Read {
    /// The whole body, its bytes counted in the share.
    Whole(Bytes),
    /// The budget had no room: the body, with what was read of it as its prefix.
    NoRoom(Box<ClientBody>),
    /// It came slower than [`MIN_READ_RATE`]: the same.
    TooSlow(Box<ClientBody>),
    /// It came without a declared length and grew past the limit: the same.
    TooLong(Box<ClientBody>),
}

/// The chunks held (`hold`) as one `Bytes`, copied only if there are two or more.
fn concat(mut chunks: VecDeque<Bytes>, mut tail: BytesMut) -> Bytes {
    flush(&mut chunks, &mut tail);
    if chunks.len() <= 1 {
        return chunks.pop_back().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for c in &chunks {
        out.extend_from_slice(c);
    }
    out.freeze()
}

/// `fut`'s output, or an error once `idle` has passed. The timer is made only if `fut` is not
/// ready at once: a small body's chunks usually arrive with its head, and a timer that is
/// never needed still costs two clock reads and its setup (callgrind).
async fn within<F: Future>(
    idle: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Ok(out);
    }
    tokio::time::timeout(idle, fut).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body in one-byte chunks is held in a few pieces, not a slice of hyper's buffer
    /// each; the bytes and their order are the body's, big chunks among them kept as they
    /// came.
    #[test]
    fn small_chunks_past_the_first_few_are_held_copied_together() {
        let (mut chunks, mut tail) = (VecDeque::new(), BytesMut::new());
        let mut body = Vec::new();
        for i in 0..100_000u32 {
            let byte = Bytes::from(vec![(i % 251) as u8]);
            body.extend_from_slice(&byte);
            hold(&mut chunks, &mut tail, byte);
            if i == 50_000 {
                let big = Bytes::from(vec![7u8; SMALL_CHUNK]);
                body.extend_from_slice(&big);
                hold(&mut chunks, &mut tail, big);
            }
        }
        flush(&mut chunks, &mut tail);
        // 16 slices, then ~50 KB copied, the big chunk, ~50 KB copied.
        assert_eq!(
            chunks.len(),
            SLICES + 3,
            "{:?}",
            chunks.iter().map(Bytes::len).collect::<Vec<_>>()
        );
        assert!(chunks.iter().all(|c| c.len() <= COPIED));
        assert_eq!(joined(&chunks), body);
        // A few small chunks are kept as they came: no copy for the common case.
        let (mut chunks, mut tail) = (VecDeque::new(), BytesMut::new());
        for _ in 0..SLICES {
            hold(&mut chunks, &mut tail, Bytes::from_static(b"abc"));
        }
        assert!(tail.is_empty());
        assert_eq!(chunks.len(), SLICES);
    }

    #[tokio::test(start_paused = true)]
    async fn within_answers_what_is_ready_or_comes_in_time_and_refuses_a_stall() {
        let second = Duration::from_secs(1);
        assert_eq!(within(second, async { 7 }).await.ok(), Some(7));
        let soon = tokio::time::sleep(Duration::from_millis(500));
        assert!(within(second, soon).await.is_ok());
        let late = tokio::time::sleep(Duration::from_millis(1500));
        assert!(within(second, late).await.is_err());
        assert!(within(second, std::future::pending::<()>()).await.is_err());
    }

    #[test]
    fn buffered_bodies_report_their_exact_size() {
        let b = ProxyBody::chunks(
            VecDeque::from([Bytes::from("ab"), Bytes::from("cde")]),
            None,
            None,
            Duration::from_secs(1),
        );
        assert_eq!(b.size_hint().exact(), Some(5));
        assert!(!b.is_end_stream());
        assert_eq!(ProxyBody::empty().size_hint().exact(), Some(0));
        assert!(ProxyBody::empty().is_end_stream());
    }

    fn key() -> crate::etag::TagKey {
        crate::etag::TagKey::new(b"body-tests-key-0123456789abcdef0")
    }

    /// A body of the given frames, then its end; it never reports the end early.
    struct Chunks(VecDeque<Result<&'static str, &'static str>>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            let next = self.0.pop_front();
            Poll::Ready(next.map(|i| i.map(|s| Frame::data(Bytes::from(s)))))
        }
    }

    fn chunks(items: Vec<Result<&'static str, &'static str>>) -> Chunks {
        Chunks(items.into())
    }

    #[tokio::test]
    async fn a_hashed_body_is_sent_unchanged_and_tagged_once_it_ends() {
        use http_body_util::BodyExt;
        let body = chunks(vec![Ok("ab"), Ok("c"), Ok("de")]);
        let (hashed, sent) = Hashed::tee(body, key().hasher(), 5);
        assert!(sent.get().is_none(), "no tag before the body went up");
        let bytes = hashed.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "abcde");
        assert_eq!(sent.get(), Some(&key().tag_of(b"abcde")));
    }

    #[tokio::test]
    async fn a_body_whose_last_frame_ends_it_is_tagged_without_another_poll() {
        // `Full` reports its end right after its one frame; hyper then stops polling.
        let full = http_body_util::Full::new(Bytes::from("whole"));
        let (mut hashed, sent) = Hashed::tee(full, key().hasher(), u64::MAX);
        let frame = std::future::poll_fn(|cx| Pin::new(&mut hashed).poll_frame(cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "whole");
        assert!(hashed.is_end_stream());
        assert_eq!(sent.get(), Some(&key().tag_of(b"whole")));
    }

    #[tokio::test]
    async fn an_empty_body_is_tagged_at_once_and_a_failed_one_never() {
        use http_body_util::BodyExt;
        let (_, sent) = Hashed::tee(http_body_util::Empty::<Bytes>::new(), key().hasher(), 0);
        assert_eq!(sent.get(), Some(&key().tag_of(b"")));

        let (hashed, sent) = Hashed::tee(chunks(vec![Ok("ab"), Err("cut")]), key().hasher(), 9);
        assert!(hashed.collect().await.is_err());
        assert!(sent.get().is_none(), "a body cut short has no tag");
    }

    /// A body past the bound it is hashed under goes up whole, untagged: a GET of it would
    /// stream untagged (`max_tag_body`), so a tag from its PUT could never be confirmed.
    #[tokio::test]
    async fn a_body_past_its_bound_goes_up_whole_and_untagged() {
        use http_body_util::BodyExt;
        let (hashed, sent) = Hashed::tee(chunks(vec![Ok("ab"), Ok("cd")]), key().hasher(), 3);
        assert_eq!(hashed.collect().await.unwrap().to_bytes(), "abcd");
        assert!(sent.get().is_none(), "4 bytes past a bound of 3");
    }

    /// The bytes of `chunks`, in order.
    fn joined(chunks: &VecDeque<Bytes>) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// A body whose chunks are all in hand, each ready at once, as a fast backend's are.
    struct InHand(VecDeque<Bytes>);

    impl Body for InHand {
        type Data = Bytes;
        type Error = UpError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, UpError>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// `n` chunks of `size` bytes of `byte`, each in its own allocation.
    fn in_hand(n: usize, size: usize, byte: u8) -> InHand {
        InHand((0..n).map(|_| Bytes::from(vec![byte; size])).collect())
    }

    /// Reads `body` for its tag to keep and send, as a GET does, with room for all of it.
    async fn read_whole(body: InHand, memo: Option<Arc<Memo>>) -> (VecDeque<Bytes>, ETag, bool) {
        let share = crate::budget::Budget::new(usize::MAX).share();
        let second = Duration::from_secs(1);
        let read = read_tagged(
            body,
            key().hasher(),
            memo,
            u64::MAX,
            second,
            share,
            Keep::ToSend,
        );
        match read.await {
            Ok(Collected::Whole {
                chunks,
                tag,
                remembered,
                ..
            }) => (chunks, tag, remembered.is_some()),
            Ok(_) => panic!("not read whole"),
            Err(e) => panic!("{e:?}"),
        }
    }

    /// How often a task beside the read ran while it went on: one worker thread serves
    /// every connection, and a body in hand must not hold all of them up until its end.
    async fn turns_beside(read: impl Future<Output = (VecDeque<Bytes>, ETag, bool)>) -> u64 {
        let turns = Arc::new(AtomicU64::new(0));
        let counted = turns.clone();
        let other = tokio::spawn(async move {
            loop {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        });
        read.await;
        other.abort();
        turns.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_large_body_in_hand_is_read_in_turns_with_the_threads_other_tasks() {
        // 4 MiB read 256 KiB at a time: the other task runs between chunks, not only after.
        let turns = turns_beside(read_whole(in_hand(16, 256 * 1024, b'x'), None)).await;
        assert!(turns >= 8, "the other task ran {turns} times in 16 chunks");
        // A body under the fair share is read in one go: small GETs pay nothing for it.
        let turns = turns_beside(read_whole(in_hand(4, FAIR_SHARE / 8, b'x'), None)).await;
        assert_eq!(turns, 0);
    }

    /// A body equal to its URL's kept copy is held as slices of that copy: the chunks read
    /// are let go at once (their read buffer is reused, warm, for the next read) rather than
    /// held, 4 MiB of fresh memory for a 4 MiB GET. Where it differs, it is held as read.
    #[tokio::test]
    async fn a_body_equal_to_its_copy_is_held_as_the_copy() {
        let (size, n) = (64 * 1024, 4);
        let memos = crate::memo::BodyMemo::new(64 * 1024 * 1024);
        let tag = key().tag_of(&vec![b'x'; size * n]);
        let k = crate::key::test_key("/doc");
        let copy = in_hand(n, size, b'x').0;
        memos.put(&k, &copy, None, tag.clone(), tag.to_header(), &key());
        let memo = memos.get(&k, &key(), None).expect("a copy");
        let within_copy = |c: &Bytes| memo.body.as_ptr_range().contains(&c.as_ptr());

        let (chunks, got, remembered) =
            read_whole(in_hand(n, size, b'x'), Some(memo.clone())).await;
        assert!(got.strong_eq(&tag) && remembered);
        assert_eq!(chunks.len(), n);
        assert!(
            chunks.iter().all(within_copy),
            "held as read, not as the copy"
        );

        // The third chunk differs: the first two are the copy's, the rest as read.
        let mut body = in_hand(n, size, b'x');
        body.0[2] = Bytes::from(vec![b'y'; size]);
        let sent = joined(&body.0);
        let (chunks, got, remembered) = read_whole(body, Some(memo.clone())).await;
        assert!(!remembered && got.strong_eq(&key().tag_of(&sent)));
        let held: Vec<bool> = chunks.iter().map(within_copy).collect();
        assert_eq!(held, [true, true, false, false]);
        assert!(joined(&chunks) == sent, "the bytes held are the body's");
    }
}
