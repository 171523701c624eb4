//! HTTP/1.1 connections to the upstreams, kept open per origin between requests, for every
//! request but the body-less GETs and HEADs to plain-http upstreams that `h1.rs`'s client
//! takes (outside `upstream_max_connections`).
//!
//! Why not hyper-util's legacy client: profiled, its pool cost about a tenth of the proxy's
//! user-space instructions per request (a checkout future, a wrapper per connection, a task
//! spawned per response to put the connection back). Here a connection goes back to its
//! origin's list as soon as the response head is in, and a checkout takes the first one
//! that is ready: one short mutex section each way, nothing spawned.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::Progress;
use crate::config::Upstream;
use crate::upstream::UpstreamBody;
use crate::watchdog::{Watch, Watched, WatchedIo};

/// A connection's error before any HTTP was exchanged (TCP, TLS), with its cause chain.
pub type ConnectError = Box<dyn std::error::Error + Send + Sync>;

/// A new connection, or why there is none.
type Connected = Result<Conn, SendError>;

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    Connect(ConnectError),
    Http(hyper::Error),
    /// Of the client of body-less GETs and HEADs ([`crate::h1`]).
    Raw(crate::h1::RawError),
    /// No response head within the request's timeout.
    Timeout,
    /// The client paused its upload for the timeout: the connection was waiting for its
    /// next chunk, not for the backend.
    UploadPaused,
    /// The origin had `upstream_max_connections` open and none came free within the
    /// connect timeout.
    Saturated {
        limit: usize,
        waited: Duration,
    },
}

/// A connection to an upstream: where requests go in, and the watch on its timer.
struct Conn {
    sender: SendRequest<UpstreamBody>,
    watch: Arc<Watch>,
    /// Its task, to end it when a request's own deadline passes: hyper gives up a
    /// connection whose answer nobody awaits only once it reads again, and one stuck
    /// writing an upload to a backend that takes no more never does.
    task: AbortHandle,
    /// The line of requests waiting for a turn at its origin, under a cap: told when the
    /// connection is handed back.
    line: Option<Arc<Line>>,
}

/// An origin's share of `upstream_max_connections`, which the pools of one client share: a
/// permit for each open connection, held by the connection's task until it ends, and the
/// count of requests waiting for a turn in any of the pools (for the metrics).
struct Share {
    open: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// The pools whose connections to the origin count here, so that a request of one can
    /// have another close an idle connection it could not use (`Pool::wait_turn`).
    pools: Mutex<Vec<Weak<dyn CloseIdle>>>,
}

impl Share {
    /// Closes one idle connection to `origin` that is ready, in whichever pool has one:
    /// its permit comes free once its task ends. Says whether other pools than one count
    /// here at all (then a connection of theirs may come free later, and nothing says so).
    fn close_idle(&self, origin: &str) -> (bool, bool) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        let closed = pools
            .iter()
            .filter_map(Weak::upgrade)
            .any(|pool| pool.close_idle(origin));
        (closed, pools.len() > 1)
    }
}

/// How often the first request in line looks again for an idle connection of another pool
/// to close, while all the permits are held: a connection of another pool coming free is not
/// told to this pool's line. Also how long it waits for its own pool's busy connections
/// before it closes one (a short answer ends sooner than a new connection opens).
const RECHECK: Duration = Duration::from_millis(50);

/// Where a request stands, for a caller that times it from outside or may drop it
/// ([`Pool::send_queued`]): under `upstream_max_connections`, not queued, waiting for a
/// turn, or given its turn at an instant (its timeout runs from there); and whether it has
/// been sent, that is handed to hyper on a connection made and ready. Until then (a wait
/// for a turn, a connect, a TLS handshake) nothing of it has gone up.
#[derive(Debug, Default)]
pub struct Queued {
    queue: Mutex<Queue>,
    sent: AtomicBool,
}

#[derive(Clone, Copy, Debug, Default)]
enum Queue {
    #[default]
    NotQueued,
    Waiting,
    TurnAt(Instant),
}

impl Queued {
    fn set(&self, state: Queue) {
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// Nothing of the request has been sent: it has not been handed to a connection yet,
    /// or hyper gave it back unsent.
    pub fn unsent(&self) -> bool {
        !self.sent.load(Ordering::Acquire)
    }

    /// When a timer of `timeout` set at `deadline - timeout` should end instead, given the
    /// request's waits: later while it still waits, from its turn once it got one.
    pub fn deadline(&self, deadline: Instant, timeout: Duration) -> Instant {
        match *self.queue.lock().unwrap_or_else(|p| p.into_inner()) {
            Queue::NotQueued => deadline,
            Queue::Waiting => deadline.max(Instant::now() + timeout),
            Queue::TurnAt(turn) => deadline.max(turn + timeout),
        }
    }
}

/// A pool, to a share of a cap it counts under (`Share::pools`).
trait CloseIdle: Send + Sync {
    /// Closes one idle, ready connection to `origin`, if there is one.
    fn close_idle(&self, origin: &str) -> bool;
}

/// The requests of one pool waiting for a turn at one origin. Its own per pool: a request
/// can take only its own pool's connections (they trust its roots).
struct Line {
    share: Arc<Share>,
    /// Told when a connection is handed back after its response head.
    returned: Notify,
    /// The waiting queue here (tokio's mutex is fair): the first watches for a turn, the
    /// others wait behind it, so that turns go in the order they came.
    order: tokio::sync::Mutex<()>,
    /// Requests in this line: while there are any, a new request queues behind them rather
    /// than take a connection that comes free.
    waiting: AtomicUsize,
}

/// A request counted among those waiting for a turn (`Line::waiting`, `Share::waiting`)
/// while it lives.
struct Waiting<'a>(&'a Line);

impl<'a> Waiting<'a> {
    fn enter(line: &'a Line) -> Self {
        line.waiting.fetch_add(1, Ordering::AcqRel);
        line.share.waiting.fetch_add(1, Ordering::Relaxed);
        Self(line)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.share.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `upstream_max_connections`: connections open at once per origin, shared by every pool
/// of one client (one per trust root), so that routes to one origin with different
/// `ca_file`s share it too.
pub struct ConnectionCap {
    limit: usize,
    /// Each origin's share, made at its first request and kept: origins come from the
    /// config, so they are few.
    shares: Mutex<HashMap<String, Arc<Share>, foldhash::fast::RandomState>>,
}

impl std::fmt::Debug for ConnectionCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCap")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl ConnectionCap {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            shares: Mutex::new(HashMap::default()),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Per origin that has had a request under the cap, sorted: the connections open now
    /// and the requests waiting for a turn.
    pub fn snapshot(&self) -> Vec<(String, usize, usize)> {
        let shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<_> = shares
            .iter()
            .map(|(origin, s)| {
                let open = self.limit.saturating_sub(s.open.available_permits());
                (origin.clone(), open, s.waiting.load(Ordering::Relaxed))
            })
            .collect();
        rows.sort();
        rows
    }

    /// The origin's share.
    fn share(&self, origin: &str) -> Arc<Share> {
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        let share = match shares.get(origin) {
            Some(share) => share,
            None => shares.entry(origin.to_owned()).or_insert_with(|| {
                Arc::new(Share {
                    open: Arc::new(Semaphore::new(self.limit)),
                    waiting: AtomicUsize::new(0),
                    pools: Mutex::new(Vec::new()),
                })
            }),
        };
        share.clone()
    }
}

/// A backend closes a kept-alive connection on its keep-alive timeout, seconds at the
/// least (Node and Apache 5 s, gunicorn 2 s). A request sent on a connection idle this long
/// may meet that close, and is kept to be sent again (see [`Pool::send`]).
const REPLAY_AFTER: Duration = Duration::from_millis(500);

/// How long an origin is remembered to close connections just after answering on them (a
/// backend that serves one request per connection without saying so, or one restarting):
/// while it is, a GET or HEAD sent on any of its pooled connections is kept to be sent
/// again, however briefly the connection was idle (see [`Pool::send`]). Each close met
/// renews it.
const CLOSES_EARLY_FOR: Duration = Duration::from_secs(60);

/// An origin's idle connections, and when a connection of its last closed on a request it
/// had not answered, though idle for less than [`REPLAY_AFTER`].
#[derive(Default)]
struct Origin {
    idle: Vec<Idle>,
    closed_early: Option<Instant>,
}

impl Origin {
    /// Whether its connections may close on a request however briefly they were idle.
    fn closes_early(&self, now: Instant) -> bool {
        self.closed_early
            .is_some_and(|at| now.duration_since(at) < CLOSES_EARLY_FOR)
    }
}

/// What an upstream connection may read (`[server]` `upstream_read_buffer` and
/// `max_header_fields`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// hyper's `max_buf_size`: the most read at once, and the largest response head.
    pub read_buffer: usize,
    pub max_header_fields: usize,
}

/// An idle connection and when it was last handed back.
struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    /// Open, and either busy (its response may stream for longer than the timeout) or idle
    /// for less than `timeout`.
    fn usable(&self, now: Instant, timeout: Duration) -> bool {
        let sender = &self.conn.sender;
        !sender.is_closed() && (!sender.is_ready() || now.duration_since(self.since) < timeout)
    }
}

/// Connections per origin (`scheme://authority`), made with connector `C`.
pub struct Pool<C> {
    connector: C,
    /// Keyed by origins from the config, not by anything a client sends: a fast hasher.
    idle: Mutex<HashMap<String, Origin, foldhash::fast::RandomState>>,
    idle_timeout: Duration,
    max_idle_per_origin: usize,
    /// Open connections per origin at most (`upstream_max_connections`); `None`: no limit.
    cap: Option<Arc<ConnectionCap>>,
    /// Under a cap, each origin's line of waiting requests, made at its first request.
    lines: Mutex<HashMap<String, Arc<Line>, foldhash::fast::RandomState>>,
    /// What a connection reads: at most this at once, and at most so many header fields in
    /// a response head.
    limits: ReadLimits,
    /// The longest a new connection may take to open, TLS handshake included (the TCP
    /// connect has the connector's own timer too): nginx's `proxy_connect_timeout` covers
    /// the handshake as well.
    connect_timeout: Duration,
    /// Itself, for the reaper task, which must not keep the pool alive.
    me: Weak<Self>,
    reaper: AtomicBool,
}

impl<C> std::fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

// === impl Pool ===

impl<C> Pool<C>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Error: Into<ConnectError>,
    C::Future: Send,
{
    pub fn new(
        connector: C,
        idle_timeout: Duration,
        max_idle_per_origin: usize,
        cap: Option<Arc<ConnectionCap>>,
        limits: ReadLimits,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            connector,
            idle: Mutex::new(HashMap::default()),
            idle_timeout,
            max_idle_per_origin,
            cap,
            lines: Mutex::new(HashMap::default()),
            limits,
            connect_timeout,
            me: me.clone(),
            reaper: AtomicBool::new(false),
        })
    }

    /// Sends `req` (origin-form URI, `Host` set) to `upstream`, on an idle connection if one
    /// is ready, else on a new one, and waits up to `timeout` for the response head (see
    /// [`crate::watchdog`]). A request that an idle connection closed before sending is
    /// tried again on the next one: it was never sent.
    ///
    /// So is a GET or HEAD without a body that went out on a connection idle for
    /// [`REPLAY_AFTER`] or more just as the backend closed it on its keep-alive timeout: no
    /// answer at all came back, and sending it again cannot do harm (Go's HTTP client does
    /// the same). So is one on a connection of any idleness to an origin seen closing a
    /// connection on a request soon after an answer (one request per connection without
    /// `Connection: close`, or a restart): the close then reaches the pool only after the
    /// next request went up ([`CLOSES_EARLY_FOR`]). The first such close is met with no copy
    /// in hand (keeping one for every request costs a plain GET 3-5%): that request gets the
    /// error. Once: a request whose handling makes the backend close (a crashing
    /// handler) is not sent again on every idle connection. Other requests get the error:
    /// the backend may have carried them out. All attempts share the one `timeout`.
    ///
    /// `req` comes boxed: on its way here it passes through four async fns, which moved its
    /// 280 bytes about ten times a request; a box moves 8.
    pub async fn send(
        &self,
        upstream: &Upstream,
        req: Box<Request<UpstreamBody>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        self.send_queued(upstream, req, timeout, None).await
    }

    /// [`Pool::send`], telling `queued` when the request waits for a turn and when it gets
    /// one: its `timeout` then runs from the turn, and so must a caller's own timer.
    pub async fn send_queued(
        &self,
        upstream: &Upstream,
        mut req: Box<Request<UpstreamBody>>,
        timeout: Duration,
        queued: Option<&Queued>,
    ) -> Result<Response<Incoming>, SendError> {
        // In one spelling (`LOCALHOST` and `localhost:80` are one backend): its idle
        // connections and its share of `upstream_max_connections` are one, as its locks
        // and tags are.
        let origin = upstream.key_prefix.as_str();
        // One timeout for all attempts, from the first; and one replay at most: a request
        // that makes the backend close (a crashing handler) must not be sent once per
        // idle connection.
        let mut start = None;
        let mut replayed = false;
        // Under `upstream_max_connections`: the origin's permits, a connection handed over
        // by a wait for a turn, and since when this request has waited.
        let line = self.line(origin);
        let mut handed: Option<Box<Idle>> = None;
        let mut waiting = None;
        // A body still to be sent: the timeout runs from its last chunk (see `Deadline`).
        let uploading = match req.body_mut() {
            Either::Left(body) => body.uploading(),
            Either::Right(_) => None,
        };
        let carries_body = !req.body().is_end_stream();
        // A body a handler may leave unread whatever it answers goes up as the connection's
        // last request ([`body_may_be_ignored`]).
        let last = carries_body && body_may_be_ignored(req.method());
        if last {
            req.headers_mut()
                .insert(CONNECTION, http::HeaderValue::from_static("close"));
        }
        // With `upstream_max_connections`, a request finding none ready waits its turn.
        let permit = loop {
            // Requests waiting for a turn come first: a new one queues behind them.
            let queue = waiting.is_none()
                && line
                    .as_ref()
                    .is_some_and(|l| l.waiting.load(Ordering::Acquire) > 0);
            while let Some((mut idle, now, closes_early)) = match handed.take() {
                // Most likely the connection the backend closes just after answering, when
                // it does: it was handed over as its last answer ended.
                Some(idle) => {
                    let now = Instant::now();
                    Some((*idle, now, self.closes_early(origin, now)))
                }
                None if queue => None,
                None => self.checkout(origin),
            } {
                let start = *start.get_or_insert(now);
                let conn = &mut idle.conn;
                // The copy costs 3-5% of a request's instructions: only where the race can be.
                let replay = (!replayed
                    && (closes_early || now.duration_since(idle.since) >= REPLAY_AFTER)
                    && replayable(&req))
                .then(|| head_only(&req));
                // A timeout shorter than the one the connection was opened with (another
                // route's) needs a timer of its own, and so does a second attempt: its
                // deadline began before the watch's timer was last set, which could fire late
                // for it. So does an upload, whose deadline moves with its chunks.
                let own_timer =
                    uploading.is_some() || start != now || !conn.watch.begin(start, timeout);
                let busy = Busy::mark(&conn.watch, own_timer);
                let mut deadline = own_timer
                    .then(|| Box::new(Deadline::new(start + timeout, timeout, uploading.clone())));
                // From here the request is the connection's to send.
                sending(queued, true);
                // One place that polls the exchange, so that it is inlined there.
                let mut exchange = pin!(conn.sender.try_send_request(*req));
                let sent = poll_fn(|cx| match exchange.as_mut().poll(cx) {
                    Poll::Ready(sent) => Poll::Ready(Some(sent)),
                    Poll::Pending => match deadline.as_mut().map(|d| d.poll(cx)) {
                        Some(Poll::Ready(())) => Poll::Ready(None),
                        _ => Poll::Pending,
                    },
                });
                let sent = sent.await;
                busy.defuse();
                match sent {
                    _ if !conn.watch.end() => return Err(SendError::Timeout),
                    None => {
                        let missed = deadline.map_or(SendError::Timeout, |d| d.missed());
                        conn.task.abort();
                        return Err(missed);
                    }
                    Some(Ok(rsp)) => {
                        let unread = last || unread(&rsp, carries_body, &uploading);
                        self.checkin_after(&rsp, origin, idle.conn, unread);
                        return Ok(rsp);
                    }
                    Some(Err(mut e)) => match (e.take_message(), replay) {
                        (Some(unsent), _) => {
                            sending(queued, false);
                            *req = unsent
                        }
                        (None, Some(copy)) if unanswered(e.error()) => {
                            let error = e.error();
                            tracing::debug!(origin, %error, "sent again: an idle connection closed");
                            self.closed_early(origin, now, idle.since);
                            *req = copy;
                            replayed = true;
                        }
                        (None, _) => {
                            if unanswered(e.error()) {
                                self.closed_early(origin, now, idle.since);
                            }
                            return Err(SendError::Http(e.into_error()));
                        }
                    },
                }
            }
            let Some(line) = &line else {
                break None;
            };
            let since = *waiting.get_or_insert_with(Instant::now);
            if let Some(q) = queued.filter(|_| !replayed) {
                q.set(Queue::Waiting);
            }
            let turn = self.wait_turn(origin, line.clone(), since);
            // A request sent again has its one timeout running (below): its wait for a turn
            // ends with it, not only at the connect timeout.
            let turn = match start.filter(|_| replayed) {
                Some(first) => tokio::time::timeout_at(first + timeout, turn)
                    .await
                    .map_err(|_| SendError::Timeout)??,
                None => turn.await?,
            };
            // After a wait, the timeout runs from the turn, as HAProxy's `timeout server`
            // runs after its `timeout queue`: counted from before the wait, a request whose
            // turn came late would go up with little time left, and be cut off while the
            // backend, scarce enough to be capped, works on it (a write then lands with its
            // client told 504). Not for a request sent again: its attempts share one timeout.
            if !matches!(turn, Turn::Free(_)) && !replayed {
                start = None;
            }
            if let Some(q) = queued.filter(|_| !replayed) {
                q.set(Queue::TurnAt(Instant::now()));
            }
            match turn {
                Turn::Free(permit) | Turn::Permit(permit) => break Some((line.clone(), permit)),
                Turn::Conn(idle) => handed = Some(idle),
            }
        };
        // A new connection: the timeout counts from before it is made, or from the first
        // attempt on an idle one.
        let start = start.unwrap_or_else(Instant::now);
        let connect = self.connect_boxed(upstream.uri.clone(), start, timeout, permit);
        let mut conn = tokio::time::timeout_at(start + timeout, connect)
            .await
            .map_err(|_| SendError::Timeout)??;
        // Made and ready: from here the request is the connection's to send.
        sending(queued, true);
        let rsp = match &uploading {
            None => {
                conn.watch.begin(start, timeout);
                let sent = conn.sender.send_request(*req).await;
                if !conn.watch.end() {
                    return Err(SendError::Timeout);
                }
                sent.map_err(SendError::Http)?
            }
            Some(progress) => {
                let busy = Busy::mark(&conn.watch, true);
                let mut deadline = Deadline::new(start + timeout, timeout, Some(progress.clone()));
                let mut exchange = pin!(conn.sender.send_request(*req));
                let sent = poll_fn(|cx| match exchange.as_mut().poll(cx) {
                    Poll::Ready(sent) => Poll::Ready(Some(sent)),
                    Poll::Pending => deadline.poll(cx).map(|()| None),
                });
                let sent = sent.await;
                busy.defuse();
                match sent {
                    Some(sent) => {
                        conn.watch.end();
                        sent.map_err(SendError::Http)?
                    }
                    None => {
                        let missed = deadline.missed();
                        conn.task.abort();
                        return Err(missed);
                    }
                }
            }
        };
        let unread = last || unread(&rsp, carries_body, &uploading);
        self.checkin_after(&rsp, origin, conn, unread);
        Ok(rsp)
    }

    /// Hands a connection back after `rsp`'s head, unless that head leaves where the next
    /// response begins in doubt: then it is closed. `unread`: the backend may not have read
    /// the request's body ([`unread`]).
    fn checkin_after(&self, rsp: &Response<Incoming>, origin: &str, conn: Conn, unread: bool) {
        if spoils_connection(rsp.status(), rsp.headers()) {
            tracing::debug!(origin, status = %rsp.status(), "upstream connection not reused");
            conn.task.abort();
        } else if rsp.version() == Version::HTTP_10 || unread || framed_twice(rsp) {
            // Its answer's body, or the rest of the request's, is still to go through the
            // connection's task: let go of the sender, and hyper closes the connection once
            // the exchange is over. After an HTTP/1.0 answer hyper would send the next
            // request as HTTP/1.0 (`spoils_connection`); after an answer by a backend that
            // did not read the request's body (a legacy handler's early 409), it would read
            // that body as the next request: another client's answer would be its answer to
            // the body. After a body framed two ways, what the backend sent past the chunks
            // would be read as the next answer (`framed_twice`).
            drop(conn);
        } else {
            self.checkin(origin, conn);
        }
    }

    /// An idle connection that can take a request now, and the time it was taken. Closed
    /// and expired ones are dropped on the way; busy ones (a response body still streaming)
    /// stay.
    /// Also whether the origin closes connections early ([`Origin::closes_early`]).
    fn checkout(&self, origin: &str) -> Option<(Idle, Instant, bool)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let entry = idle.get_mut(origin)?;
        let now = Instant::now();
        let list = &mut entry.idle;
        list.retain(|c| c.usable(now, self.idle_timeout));
        let ready = list.iter().position(|c| c.conn.sender.is_ready())?;
        let conn = list.swap_remove(ready);
        Some((conn, now, entry.closes_early(now)))
    }

    /// Whether `origin` is known to close connections early ([`Origin::closes_early`]).
    fn closes_early(&self, origin: &str, now: Instant) -> bool {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get(origin).is_some_and(|o| o.closes_early(now))
    }

    /// Notes that a connection to `origin` idle since `since` closed on a request sent at
    /// `sent` without answering it. Idle for less than [`REPLAY_AFTER`], that is no
    /// keep-alive timeout: the origin closes its connections soon after answering, and its
    /// GETs are kept to be sent again from now on.
    fn closed_early(&self, origin: &str, sent: Instant, since: Instant) {
        if sent.duration_since(since) >= REPLAY_AFTER {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match idle.get_mut(origin) {
            Some(entry) => entry,
            None => idle.entry(origin.to_owned()).or_default(),
        };
        entry.closed_early = Some(sent);
    }

    /// The origin's permits, under `upstream_max_connections`.
    fn line(&self, origin: &str) -> Option<Arc<Line>> {
        let cap = self.cap.as_ref()?;
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let line = match lines.get(origin) {
            Some(line) => line,
            None => lines.entry(origin.to_owned()).or_insert_with(|| {
                let share = cap.share(origin);
                let me: Weak<dyn CloseIdle> = self.me.clone();
                let mut pools = share.pools.lock().unwrap_or_else(|p| p.into_inner());
                // Pools that reloads replaced are let go here too, not only when a request
                // finds every place taken: each reload of a pool setting makes new ones.
                pools.retain(|p| p.strong_count() > 0);
                pools.push(me);
                drop(pools);
                Arc::new(Line {
                    share,
                    returned: Notify::new(),
                    order: tokio::sync::Mutex::new(()),
                    waiting: AtomicUsize::new(0),
                })
            }),
        };
        Some(line.clone())
    }

    /// Waits for a turn at an origin that may have `upstream_max_connections` open: a
    /// permit for a new connection, free at once or when one of them closes, or one of them
    /// that is free. Requests that wait queue in the order they came, and the first of them
    /// watches: for a permit, for a connection handed back to the idle list, and for every
    /// busy one there (taken out of it, since nothing else says when a response body has
    /// ended). Waits within the connect timeout from `since`, when the request began to wait
    /// (HAProxy's `timeout queue` defaults to its `timeout connect`).
    ///
    /// Boxed, as `connect_boxed` is: rare, and `send`'s future should not carry it.
    #[inline(never)]
    fn wait_turn<'a>(
        &'a self,
        origin: &'a str,
        line: Arc<Line>,
        since: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Turn, SendError>> + Send + 'a>> {
        Box::pin(async move {
            let open = &line.share.open;
            if let Ok(permit) = open.clone().try_acquire_owned() {
                return Ok(Turn::Free(permit));
            }
            let until = since + self.connect_timeout;
            let expired = || SendError::Saturated {
                limit: self.cap.as_ref().map_or(0, |c| c.limit),
                waited: self.connect_timeout,
            };
            let _waiting = Waiting::enter(&line);
            let Ok(_first) = tokio::time::timeout_at(until, line.order.lock()).await else {
                return Err(expired());
            };
            let mut timer = pin!(tokio::time::sleep_until(until));
            let mut acquire = pin!(open.clone().acquire_owned());
            let mut taken = Taken {
                pool: self,
                origin,
                idle: Vec::new(),
            };
            let began = Instant::now();
            loop {
                let mut returned = pin!(line.returned.notified());
                returned.as_mut().enable();
                // After `enable`: one handed back since the last look is not missed.
                if let Some(idle) = self.claim(origin, &mut taken.idle) {
                    return Ok(Turn::Conn(Box::new(idle)));
                }
                // Every permit held, and none of this pool's connections free: an idle one
                // of another pool under the cap (another `ca_file`'s, or one a reload
                // replaced), which this request cannot use, gives its place. While this
                // pool's own are busy, only once they have had `RECHECK` to come free:
                // nothing says when their bodies end (a download may stream for minutes),
                // and waiting on them left the request refused at its connect timeout while
                // an allowed connection sat idle; but a short answer ends sooner than a new
                // connection opens, and the other pool would open one again.
                let mut recheck = None;
                if open.available_permits() == 0 {
                    if !taken.idle.is_empty() && began.elapsed() < RECHECK {
                        recheck = Some(Box::pin(tokio::time::sleep_until(began + RECHECK)));
                    } else {
                        let (closed, others) = line.share.close_idle(origin);
                        if !closed && others {
                            recheck = Some(Box::pin(tokio::time::sleep(RECHECK)));
                        }
                    }
                }
                let busy = &mut taken.idle;
                let woke = poll_fn(|cx| {
                    if let Poll::Ready(permit) = acquire.as_mut().poll(cx) {
                        return Poll::Ready(Woke::Permit(permit.expect("never closed")));
                    }
                    if returned.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Look);
                    }
                    for (i, busy) in busy.iter_mut().enumerate() {
                        if let Poll::Ready(ready) = busy.conn.sender.poll_ready(cx) {
                            return Poll::Ready(Woke::Ready(i, ready.is_ok()));
                        }
                    }
                    if let Some(recheck) = recheck.as_mut() {
                        if recheck.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Woke::Look);
                        }
                    }
                    timer.as_mut().poll(cx).map(|()| Woke::Expired)
                })
                .await;
                match woke {
                    Woke::Permit(permit) => return Ok(Turn::Permit(permit)),
                    // Another look, still watching the connections taken.
                    Woke::Look => {}
                    // The rest go back, and whoever is next in line is told (`Taken`).
                    Woke::Ready(i, true) => {
                        // Busy until now: not a connection idle long enough to meet a
                        // backend's keep-alive close (`REPLAY_AFTER`).
                        let mut free = taken.idle.swap_remove(i);
                        free.since = Instant::now();
                        return Ok(Turn::Conn(Box::new(free)));
                    }
                    Woke::Ready(i, false) => drop(taken.idle.swap_remove(i)),
                    Woke::Expired => return Err(expired()),
                }
            }
        })
    }

    /// For the first request in line: a connection of the origin's that is ready, or else
    /// all those whose response bodies still stream, out of the list and into `busy` to be
    /// watched. One pass under one lock: a connection that came free between a look for a
    /// ready one and a look for busy ones would be in neither, and nothing would say so.
    fn claim(&self, origin: &str, busy: &mut Vec<Idle>) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = &mut idle.get_mut(origin)?.idle;
        let now = Instant::now();
        list.retain(|c| c.usable(now, self.idle_timeout));
        if let Some(ready) = list.iter().position(|c| c.conn.sender.is_ready()) {
            return Some(list.swap_remove(ready));
        }
        // Open and not ready: busy, every one.
        busy.append(list);
        None
    }

    /// Closes the connections idle past the timeout, so that a pool with no traffic does
    /// not hold the backend's sockets forever.
    fn drop_expired(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, origin| {
            origin.idle.retain(|c| c.usable(now, self.idle_timeout));
            !origin.idle.is_empty() || origin.closes_early(now)
        });
    }

    /// Connecting (TCP, TLS, handshake) is rare next to sending. Boxed, so that its future
    /// does not nearly double `send`'s, which every request carries and moves; and out of
    /// line, so that it is built in this function's stack frame: built in `send`'s, it made
    /// that frame 22 KB deep for every request.
    #[inline(never)]
    fn connect_boxed(
        &self,
        target: Uri,
        start: Instant,
        timeout: Duration,
        permit: Option<(Arc<Line>, OwnedSemaphorePermit)>,
    ) -> Pin<Box<dyn Future<Output = Connected> + Send + '_>> {
        Box::pin(self.connect(target, start, timeout, permit))
    }

    /// A new connection, its task spawned. Its watch's period is `timeout`, from `start`.
    /// `permit`, its place under `upstream_max_connections`, is held by its task: it is
    /// given back when the connection closes.
    async fn connect(
        &self,
        target: Uri,
        start: Instant,
        timeout: Duration,
        permit: Option<(Arc<Line>, OwnedSemaphorePermit)>,
    ) -> Connected {
        // Started with the first connection: only then is there something to reap, and a
        // runtime to run on.
        if !self.reaper.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(self.me.clone(), self.idle_timeout / 2));
        }
        let io = tokio::time::timeout(self.connect_timeout, self.connector.clone().call(target))
            .await
            .map_err(|_| {
                SendError::Connect(std::io::Error::from(std::io::ErrorKind::TimedOut).into())
            })?
            .map_err(|e| SendError::Connect(e.into()))?;
        let mut builder = http1::Builder::new();
        builder.max_buf_size(self.limits.read_buffer);
        // Only when not hyper's default: set at all, it allocates each head's field slots on
        // the heap.
        if self.limits.max_header_fields != crate::config::DEFAULT_MAX_HEADER_FIELDS {
            builder.max_headers(self.limits.max_header_fields);
        }
        let watch = Watch::new(start, timeout);
        let io = WatchedIo::new(io, watch.clone());
        let (sender, conn) = builder.handshake(io).await.map_err(SendError::Http)?;
        let watched = Watched::new(conn, watch.clone());
        let (line, permit) = permit.unzip();
        let ended = watch.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            match watched.await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "upstream connection ended with an error")
                }
                None if ended.stalled_out() => tracing::debug!(
                    "upstream connection closed: it took nothing more of a request it had answered"
                ),
                None => tracing::debug!("upstream connection closed: no response head in time"),
            }
        });
        Ok(Conn {
            sender,
            watch,
            task: task.abort_handle(),
            line,
        })
    }
}

impl<C: Send + Sync> CloseIdle for Pool<C> {
    fn close_idle(&self, origin: &str) -> bool {
        let closed = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let Some(Origin { idle: list, .. }) = idle.get_mut(origin) else {
                return false;
            };
            let Some(ready) = list.iter().position(|c| c.conn.sender.is_ready()) else {
                return false;
            };
            list.swap_remove(ready)
        };
        // Outside the lock: letting go of the sender ends the connection's task.
        drop(closed);
        true
    }
}

/// The hand-back of connections, which the connector's type has no part in (`Taken` uses it
/// when dropped).
impl<C> Pool<C> {
    /// Hands a connection back right after its response head: it becomes ready once the
    /// response body has been read to the end. A request waiting for a turn at the origin
    /// is told (`wait_turn`).
    fn checkin(&self, origin: &str, conn: Conn) {
        let line = conn.line.clone();
        self.keep(origin, conn);
        if let Some(line) = line {
            line.returned.notify_one();
        }
    }

    /// Puts a connection in the origin's idle list, if there is room.
    fn keep(&self, origin: &str, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = match idle.get_mut(origin) {
            Some(entry) => &mut entry.idle,
            None => &mut idle.entry(origin.to_owned()).or_default().idle,
        };
        if list.len() < self.max_idle_per_origin {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// The busy connections that a request waiting for its turn took out of the idle list
/// (`Pool::wait_turn`). Those it does not take go back when the wait ends, or when the
/// request is dropped mid-wait (its client gone), and the waiting are told: not lost to
/// the others.
struct Taken<'a, C> {
    pool: &'a Pool<C>,
    origin: &'a str,
    idle: Vec<Idle>,
}

impl<C> Drop for Taken<'_, C> {
    fn drop(&mut self) {
        for idle in self.idle.drain(..) {
            self.pool.checkin(self.origin, idle.conn);
        }
    }
}

/// A turn at an origin under `upstream_max_connections` (`Pool::wait_turn`): a new
/// connection's permit, or a connection that is free.
enum Turn {
    /// A permit for a new connection, free without waiting.
    Free(OwnedSemaphorePermit),
    /// A permit that came free while the request waited.
    Permit(OwnedSemaphorePermit),
    Conn(Box<Idle>),
}

/// What woke the first request in line (`Pool::wait_turn`).
enum Woke {
    Permit(OwnedSemaphorePermit),
    /// Time to look again: a connection was handed back, or (`RECHECK`) one of another
    /// pool may have come free.
    Look,
    /// The busy connection watched at this index is free (`true`) or closed.
    Ready(usize, bool),
    Expired,
}

/// A request's own upstream timer, for requests the connection's watch cannot time. For an
/// upload it is the time since its last chunk went up that counts, as nginx's
/// `proxy_send_timeout` does: each chunk must follow the one before within the timeout,
/// and the response head the last one; a client sending a large body slowly is not a slow
/// backend, and one that stops sending is still cut off.
struct Deadline {
    timer: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    upload: Option<Arc<Progress>>,
}

impl Deadline {
    fn new(at: Instant, timeout: Duration, upload: Option<Arc<Progress>>) -> Self {
        Self {
            timer: Box::pin(tokio::time::sleep_until(at)),
            timeout,
            upload,
        }
    }

    /// Which side a deadline that has passed was waiting for.
    fn missed(&self) -> SendError {
        match &self.upload {
            Some(upload) if upload.client_paused() => SendError::UploadPaused,
            _ => SendError::Timeout,
        }
    }

    /// Ready once the deadline has passed with no chunk sent within the timeout.
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.timer.as_mut().poll(cx));
            let moved = self.upload.as_ref().map(|p| p.last() + self.timeout);
            match moved.filter(|due| *due > Instant::now()) {
                Some(due) => self.timer.as_mut().reset(due),
                None => return Poll::Ready(()),
            }
        }
    }
}

/// Tells `queued` whether its request has been handed to a connection (`Queued::unsent`).
fn sending(queued: Option<&Queued>, sent: bool) {
    if let Some(q) = queued {
        q.sent.store(sent, Ordering::Release);
    }
}

/// A request that may be sent again when its connection died before any answer: safe by
/// method, and with no body (one may have been half read already).
fn replayable(req: &Request<UpstreamBody>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD) && req.body().is_end_stream()
}

/// A copy of a body-less request, to send again.
pub(crate) fn head_only(req: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut copy = Request::new(Either::Right(Full::default()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The connection ended or was reset before a whole answer head came: the request may
/// never have reached the backend's application. A malformed answer is not this.
fn unanswered(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    e.is_incomplete_message()
        || e.source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                        // A TLS connection closed without its close_notify, as many servers
                        // close an idle one: what `is_incomplete_message` is over plain TCP.
                        | std::io::ErrorKind::UnexpectedEof
                )
            })
}

/// Every `every`, drops the pool's expired connections; ends when the pool is dropped.
async fn reap<C>(pool: Weak<Pool<C>>, every: Duration)
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Error: Into<ConnectError>,
    C::Future: Send,
{
    reap_with(pool, every, Pool::drop_expired).await
}

/// Every `every`, `drop_expired` on `pool`, until the pool is dropped (this pool's reaper,
/// and `h1.rs`'s).
pub(crate) async fn reap_with<P>(pool: Weak<P>, every: Duration, drop_expired: fn(&P)) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        drop_expired(&pool);
    }
}

/// A request waiting on its connection with a timer of its own ([`Watch::busy`]): should it
/// be dropped before its answer (its client reset its stream or left), the watch is given
/// back, or the stall rule would never judge the connection again. hyper then closes it,
/// but over TLS its close_notify waits on a backend that may read nothing more: a
/// connection, and its place under `upstream_max_connections`, held for good.
struct Busy<'a>(Option<&'a Watch>);

impl<'a> Busy<'a> {
    /// Marks `watch` busy, if `own_timer`.
    fn mark(watch: &'a Watch, own_timer: bool) -> Self {
        if !own_timer {
            return Self(None);
        }
        watch.busy();
        Self(Some(watch))
    }

    /// The request is over and ends the watch itself.
    fn defuse(mut self) {
        self.0 = None;
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(watch) = self.0 {
            watch.end();
        }
    }
}

/// Whether a request's streamed body (`uploading`) had not all gone up yet.
fn unsent(uploading: &Option<Arc<Progress>>) -> bool {
    uploading.as_ref().is_some_and(|p| !p.done())
}

/// Whether the backend may not have read the request's body: it was still going up when
/// `rsp` came, or `rsp` is not a 2xx, which a legacy handler may send without reading the
/// body (a 409 or 413 it decides on from the head) while it keeps the connection. The body
/// it left then reads as its next request, and a body shaped like one gets an answer, which
/// would be taken for the next request's. After a 2xx a write's body was taken in (bodies a
/// handler may ignore even then are sent last: [`body_may_be_ignored`]); a connection
/// closed after each refused write costs a handshake, where refusals are few.
fn unread(rsp: &Response<Incoming>, carries_body: bool, uploading: &Option<Arc<Progress>>) -> bool {
    unsent(uploading) || (carries_body && !rsp.status().is_success())
}

/// Whether a handler may leave a request's body unread even when it answers 2xx: one of a
/// method whose content has no defined meaning (GET, HEAD, sent up as a GET, DELETE and
/// OPTIONS: RFC 9110 §9.3), or of an extension method ifmatch does not know. Many legacy
/// handlers never read such a body (Python's `http.server`, most routes that expect none).
/// Left in the connection, it is read as the next request: one shaped like a write is then
/// carried out without ever being judged or locked, and one shaped like the head of a
/// write with a body takes the next client's request, credentials and all, as that body.
/// Such a request asks the backend to close after it (`Connection: close`, after which a
/// server reads nothing more) and its connection is not reused: closing only after the
/// answer would be too late, since the backend may have parsed the rest already.
///
/// The bodies of POST, PUT, PATCH, QUERY and WebDAV's methods (and CalDAV's MKCALENDAR) are
/// what their handlers are for, and RFC 9112 §9 has a server read them or close: they keep
/// the connection, as behind nginx and HAProxy (`upstream_max_idle = 0` is there for a
/// backend that breaks the rule). Any case: Werkzeug and Symfony upper-case the method they
/// are given.
fn body_may_be_ignored(method: &Method) -> bool {
    const READ: [&str; 13] = [
        "POST",
        "PUT",
        "PATCH",
        "QUERY",
        "PROPFIND",
        "PROPPATCH",
        "LOCK",
        "REPORT",
        "SEARCH",
        "MKCOL",
        "ACL",
        "BIND",
        "MKCALENDAR",
    ];
    !READ.iter().any(|m| method.as_str().eq_ignore_ascii_case(m))
}

/// A response with both `Content-Length` and `Transfer-Encoding`: hyper reads its body by
/// the chunks (RFC 9112 §6.3), but a backend that framed it by the length sends more after
/// them, which a reused connection would read as the next request's answer (another
/// client's). §6.3 has such a message handled as an error: the connection is closed after
/// its body.
fn framed_twice(rsp: &Response<Incoming>) -> bool {
    // A body of exact size was framed by its length alone: no header need be looked up (two
    // lookups are 0.5% of a small GET).
    let h = rsp.headers();
    rsp.body().size_hint().exact().is_none()
        && h.contains_key(TRANSFER_ENCODING)
        && h.contains_key(CONTENT_LENGTH)
}

/// A response after which the connection cannot be trusted with another request: a 204
/// that declares content (RFC 9110 §8.6 and RFC 9112 §6.1 forbid `Content-Length` and
/// `Transfer-Encoding` on it, and a backend that sends them often sends the content too,
/// which would then be read as the next request's answer: another client's), or a switch
/// of protocols. A 304's `Content-Length` is the representation's, and allowed; its
/// `Transfer-Encoding` is not, and spoils it as a 204's does.
///
/// Those have no body, so the connection is ended at once. A connection that answered in
/// HTTP/1.0 is not reused either (`checkin_after`), but closed after its body: hyper would
/// send its next request as HTTP/1.0, which cannot frame a body of unknown length (RFC 9112
/// has no chunked in 1.0), so a chunked PUT would go up as no body at all and store an empty
/// document.
pub(crate) fn spoils_connection(status: StatusCode, h: &http::HeaderMap) -> bool {
    match status {
        StatusCode::NOT_MODIFIED => h.contains_key(TRANSFER_ENCODING),
        StatusCode::NO_CONTENT => {
            h.contains_key(TRANSFER_ENCODING) || h.get_all(CONTENT_LENGTH).iter().any(|v| v != "0")
        }
        StatusCode::SWITCHING_PROTOCOLS => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpConnector;

    /// Each reload that changes a pool setting makes new pools under the same cap: those it
    /// replaced were kept in the cap's share until a request found every place taken, a
    /// few hundred bytes each, reload after reload.
    #[tokio::test]
    async fn pools_that_are_gone_leave_no_entry_in_their_caps_share() {
        let cap = ConnectionCap::new(1);
        let limits = ReadLimits {
            read_buffer: 16 * 1024,
            max_header_fields: crate::config::DEFAULT_MAX_HEADER_FIELDS,
        };
        let origin = "http://127.0.0.1:9";
        let pool = |cap: &Arc<ConnectionCap>| {
            let pool = Pool::new(
                HttpConnector::new(),
                Duration::from_secs(60),
                8,
                Some(cap.clone()),
                limits,
                Duration::from_secs(1),
            );
            assert!(pool.line(origin).is_some());
            pool
        };
        let kept = pool(&cap);
        for _ in 0..100 {
            drop(pool(&cap));
        }
        let share = cap.share(origin);
        let pools = share.pools.lock().unwrap().len();
        assert!(pools <= 2, "{pools} pools in the share");
        drop(kept);
    }
}
