//! GET and HEAD: forward as a GET, tag a whole 200 (hashing it, or comparing it with the
//! kept copy), remember the tag, and answer 200, 304 or 412 by the request's conditions.

use std::sync::atomic::Ordering;

use crate::h1::UpBody;
use http::header::{self, HeaderMap, HeaderValue, ETAG};
use http::request::Parts;
use http::response;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;

use crate::body::{read_tagged, Collected, Keep, ProxyBody, ReadError};
use crate::config::{Route, UpstreamEtag};
use crate::error::Error;
use crate::etag::ETag;
use crate::key::ResourceKey;
use crate::metrics::Unheld;
use crate::precondition::{
    evaluate, failure, names_tags, Decision, Failure, Preconditions, Resource,
};
use crate::tags::{Known, Ticket};
use crate::upstream;

use super::{
    credentialed, last_modified, pass_read, strip_evaluated, upstream_strong_tag, Exchange, Proxy,
    Routing,
};

impl Proxy {
    /// GET and HEAD: forward as a GET, tag a 200 body, then answer 200, 304 or 412.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn read(
        &self,
        rt: &Routing,
        route: &Route,
        key: &ResourceKey,
        pre: &Preconditions,
        mut parts: Parts,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        // HEAD is sent as a GET so that it gets the tag a GET would give: without `Range`,
        // which only a GET may honour (RFC 9110 §14.2), so a HEAD gets the head of the 200.
        let head = parts.method == Method::HEAD;
        parts.method = Method::GET;
        if head {
            parts.headers.remove(header::RANGE);
            parts.headers.remove(header::IF_RANGE);
        }
        // A read goes up as one: a backend that honours a method override on any method
        // (CakePHP) would run `X-HTTP-Method-Override: DELETE` as the delete, past the 428
        // and the URL's lock, and its answer would be tagged as the document.
        upstream::strip_method_overrides(&mut parts.headers);
        strip_evaluated(&mut parts.headers, pre, true);
        let credentials = credentialed(&parts.headers);
        let ticket = self.tags.ticket();
        let mut req = Box::new(Request::from_parts(
            parts,
            rt.upstream.limit(ex.take_body()),
        ));
        // hyper's client sends a GET body of unknown length (chunked, or HTTP/2 with no
        // `content-length`) as no body at all unless the head says chunked: it goes up
        // chunked, as any other method's does, not dropped.
        if !req.body().is_end_stream() && req.body().size_hint().exact().is_none() {
            req.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        // A GET whose answer turns on the tag (`If-Match`, `If-None-Match`) must be judged
        // by it even when its body finds no room in `max_buffered_bytes`: it is then hashed
        // without being held, and a 200 is sent from a second fetch (`send_again`), for
        // which its head is kept. Without a tag, a current `If-Match` would get a false 412
        // and a current `If-None-Match` a whole body instead of a 304.
        // Boxed: the read's future carries it across the exchange, and every GET moves that.
        let again = (!head && pre.compares_tags())
            .then(|| Box::new(crate::pool::head_only(&req)))
            .filter(|_| req.body().is_end_stream());
        ex.sent = true;
        let rsp = self.send(rt, route, req).await?;
        ex.upstream_status = Some(rsp.status());
        if !whole_representation(&rsp) {
            // A part, asked for with `If-Unmodified-Since` alone (`strip_evaluated` kept its
            // `Range`), is judged by its date, which its head carries: a download resumed
            // after the document changed would splice two versions (§13.1.4).
            if rsp.status() == StatusCode::PARTIAL_CONTENT
                && pre.if_match.is_none()
                && pre.unmodified_since_fails(last_modified(rsp.headers()))
            {
                return Err(Error::PreconditionFailed {
                    current: None,
                    why: Failure::ModifiedSince,
                });
            }
            ex.outcome = "passthrough";
            return Ok(pass_read(rsp, head, route));
        }
        let (mut rparts, rbody) = rsp.into_parts();
        // A HEAD's body is read only for its tag: with no room in the budget it is hashed
        // and let go, and the HEAD still gets the tag a GET would.
        let tag_only = head || again.is_some();
        let read = self.tag(
            rt,
            route,
            key,
            ticket,
            &mut rparts,
            rbody,
            tag_only,
            credentials,
        );
        let (current, body) = read.await?;
        if body.is_none() && !head {
            self.over_budget(route, Unheld::Response);
        }
        match evaluate(pre, true, &current) {
            Decision::Proceed => {
                ex.outcome = if current.tag.is_some() {
                    "tagged"
                } else {
                    "untagged"
                };
                let body = if head {
                    // The length a GET's answer would have, known once the body was held
                    // whole (a chunked one's, whose head had none), as RFC 9110 §9.3.2 asks.
                    let held = body
                        .as_ref()
                        .and_then(|b| http_body::Body::size_hint(b).exact());
                    if let Some(n) =
                        held.filter(|_| !rparts.headers.contains_key(header::CONTENT_LENGTH))
                    {
                        rparts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                    }
                    ProxyBody::empty()
                } else if let Some(body) = body {
                    body
                } else {
                    // `tag` lets a GET's body go only when `again` is kept: hashed whole
                    // (tagged), or let go before it passed `max_tag_body` (untagged).
                    let Some(again) = again else {
                        unreachable!("a GET hashed without being held")
                    };
                    let tag = current.tag;
                    // Boxed: rare, and its future would otherwise grow every GET's.
                    return Box::pin(self.send_again(rt, route, again, tag, pre, ex)).await;
                };
                Ok(Response::from_parts(rparts, body))
            }
            Decision::NotModified => {
                ex.outcome = "not_modified";
                ex.by_proxy = true;
                Ok(not_modified(&rparts))
            }
            Decision::PreconditionFailed => Err(Error::PreconditionFailed {
                why: failure(pre, &current),
                current: current.tag,
            }),
        }
    }

    /// Sends a GET judged by tags again, its first body having been hashed without being
    /// held (see `read`), or let go before it passed `max_tag_body` (`tag` is then `None`:
    /// sent untagged, as a body over the limit is), and sends the new body on. A response
    /// that is no longer a whole 200 passes through as it is; an empty one is whole already,
    /// and is judged again on its own tag.
    ///
    /// Under the judged `tag` only for an `If-Match` naming tags, whose client asked for that
    /// representation and no other, and only where a cut is visible (a declared length,
    /// chunked or HTTP/2; not HTTP/1.0's close-delimited body): it is checked on its way, and
    /// should the representation have changed in between it is cut before its end, never
    /// sent whole under a tag that does not name it. Any other is sent untagged, as a body
    /// with no room always was: a backend whose bytes differ on every read (a timestamp in
    /// the body) then still gets its whole 200s.
    async fn send_again(
        &self,
        rt: &Routing,
        route: &Route,
        req: Box<Request<upstream::UpstreamBody>>,
        tag: Option<ETag>,
        pre: &Preconditions,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Error> {
        ex.sent = true;
        let rsp = self.send(rt, route, req).await?;
        ex.upstream_status = Some(rsp.status());
        if !whole_representation(&rsp) {
            ex.outcome = "passthrough";
            return Ok(pass_read(rsp, false, route));
        }
        let (mut rparts, body) = rsp.into_parts();
        rparts.headers.remove(ETAG);
        let meta = representation_meta(&rparts.headers);
        if body.is_end_stream() {
            // hyper sends no byte of an empty body, so it would never be checked.
            let empty = tag_hasher(rt, meta.as_deref()).finish();
            let current = Resource {
                exists: true,
                tag: Some(empty.clone()),
                last_modified: last_modified(&rparts.headers),
            };
            return match evaluate(pre, true, &current) {
                Decision::Proceed => {
                    rparts.headers.insert(ETAG, empty.to_header());
                    Ok(Response::from_parts(rparts, ProxyBody::empty()))
                }
                Decision::NotModified => {
                    rparts.headers.insert(ETAG, empty.to_header());
                    ex.outcome = "not_modified";
                    ex.by_proxy = true;
                    Ok(not_modified(&rparts))
                }
                Decision::PreconditionFailed => Err(Error::PreconditionFailed {
                    why: failure(pre, &current),
                    current: Some(empty),
                }),
            };
        }
        let cut_is_visible =
            body.size_hint().exact().is_some() || ex.client_version != Version::HTTP_10;
        let idle = route.upstream_timeout;
        let Some(tag) = tag.filter(|_| names_tags(&pre.if_match) && cut_is_visible) else {
            ex.outcome = "untagged";
            return Ok(Response::from_parts(rparts, ProxyBody::stream(body, idle)));
        };
        // Its trailers are dropped with the check: none are announced.
        rparts.headers.remove(header::TRAILER);
        rparts.headers.insert(ETAG, tag.to_header());
        let hasher = tag_hasher(rt, meta.as_deref());
        let body = ProxyBody::checked(body, idle, hasher, tag);
        Ok(Response::from_parts(rparts, body))
    }

    /// Records what a GET (read or revalidation) learnt of a resource, if its response may
    /// be shared (`cacheable`), and returns its tag for evaluating the request. Of one that
    /// may not, on a `tag_puts` route, how the upstream represents the resource is noted
    /// (`TagStore::note`): whether PUTs there may be tagged turns on it.
    fn remember(
        &self,
        rt: &Routing,
        route: &Route,
        key: &ResourceKey,
        shared: bool,
        known: Option<Known>,
        ticket: Ticket,
    ) -> Option<ETag> {
        let known = known?;
        let tag = known.tag.clone();
        if shared {
            self.record(rt, key, known, ticket);
        } else if route.tag_puts {
            let (upstream, negotiated) = (known.from_upstream, known.negotiated);
            self.tags.note(key, upstream, negotiated, ticket);
        }
        Some(tag)
    }

    /// Records a tag made with `rt`'s key. A request that began before a reload changed the
    /// key (a write waiting for its lock, a PUT in flight) makes its tags with the old one,
    /// under a ticket that may postdate the reload's clear: such a tag is dropped. The
    /// reload counts the new key before it clears, and the clear takes each entry's lock:
    /// a record the clear went past sees the new count here; one it did not, it removes.
    pub(super) fn record(&self, rt: &Routing, key: &ResourceKey, known: Known, ticket: Ticket) {
        self.tags.record(key, known, ticket);
        if self.key_generation.load(Ordering::SeqCst) != rt.key_generation {
            self.tags.invalidate(key);
        }
    }

    /// Tags a 200 read from the upstream (a GET, or a revalidation) and records what it
    /// learnt (`remember`). The tag is the upstream's own strong tag if it sent one, else the
    /// hash of the body if it fits the route's limit; the `ETag` header is set to it (a weak
    /// upstream tag, which cannot stand for the proxy's validator, is removed). A response
    /// that may be shared (`cacheable`) is compared with the memo's copy, not hashed, when
    /// there is one; one that may not never is: how long the comparison takes would tell how
    /// much of it matched another user's body. Returns the resource as the response shows it,
    /// and the body to send on.
    ///
    /// A body held counts against `max_buffered_bytes`. One that finds no room there is
    /// sent on untagged, as a body over the limit is; one read only for its tag (`tag_only`:
    /// a revalidation, a HEAD, a GET judged by tags) is hashed without being held, and so
    /// is tagged all the same: its body is then `None`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn tag(
        &self,
        rt: &Routing,
        route: &Route,
        key: &ResourceKey,
        ticket: Ticket,
        rparts: &mut response::Parts,
        body: UpBody,
        tag_only: bool,
        credentials: bool,
    ) -> Result<(Resource, Option<ProxyBody>), Error> {
        let last_modified = last_modified(&rparts.headers);
        let (shared, negotiated) = cacheable(route, &rparts.headers, credentials);
        let idle = route.upstream_timeout;
        let (tag, from_upstream, body) = 'read: {
            let kept = route.upstream_etag == UpstreamEtag::Keep;
            if let Some(tag) = upstream_strong_tag(&rparts.headers).filter(|_| kept) {
                break 'read (Some(tag), true, Some(ProxyBody::stream(body, idle)));
            }
            rparts.headers.remove(ETAG);
            // The declared length, as hyper read it from `Content-Length` (parsing it again
            // was 230 instructions a GET).
            let declared = body.size_hint().exact();
            if declared.is_some_and(|n| n > route.max_tag_body) {
                self.metrics.untagged_large_body(&route.metric_labels);
                break 'read (None, false, Some(ProxyBody::stream(body, idle)));
            }
            // A body of known size takes its whole share now, so that one without room
            // streams from its first byte; any other grows its share chunk by chunk.
            let share = match declared {
                Some(n) => self.budget.take(usize::try_from(n).unwrap_or(usize::MAX)),
                None => Some(self.budget.share()),
            };
            // Read only for its tag, a body whose size is known not to fit is hashed
            // without holding any of it: growing its share chunk by chunk, it would take
            // the room left from bodies that fit, only to let it go at its end.
            let (share, keep) = match share {
                Some(share) if tag_only => (share, Keep::WhileRoom),
                Some(share) => (share, Keep::ToSend),
                None if tag_only => (self.budget.share(), Keep::Nothing),
                None => {
                    self.over_budget(route, Unheld::Response);
                    break 'read (None, false, Some(ProxyBody::stream(body, idle)));
                }
            };
            let upstream = || route.upstream.origin.clone();
            let meta = negotiated
                .then(|| representation_meta(&rparts.headers))
                .flatten();
            let hasher = tag_hasher(rt, meta.as_deref());
            let memo = shared.then(|| self.memo.get(key, &rt.tag_key, meta.as_deref()));
            let memo = memo.flatten();
            let limit = route.max_tag_body;
            match read_tagged(body, hasher, memo, limit, idle, share, keep).await {
                Ok(Collected::Whole {
                    chunks,
                    held,
                    kept,
                    tag,
                    remembered,
                    dropped_trailers,
                }) => {
                    let header = if let Some(memo) = remembered {
                        self.memo.stats.hits.fetch_add(1, Ordering::Relaxed);
                        memo.header.clone()
                    } else {
                        let header = tag.to_header();
                        // Not a body that was hashed without being held: no copy to keep.
                        if shared && self.memo.is_on() && kept {
                            self.memo.stats.misses.fetch_add(1, Ordering::Relaxed);
                            let (t, h) = (tag.clone(), header.clone());
                            let m = meta.as_deref();
                            self.memo.put(key, &chunks, m, t, h, &rt.tag_key);
                        }
                        header
                    };
                    rparts.headers.insert(ETAG, header);
                    // Read whole, it goes out with a length, without its trailers: they are
                    // no longer announced.
                    if dropped_trailers {
                        rparts.headers.remove(header::TRAILER);
                    }
                    let body = kept.then(|| ProxyBody::chunks(chunks, Some(held), None, idle));
                    (Some(tag), false, body)
                }
                Ok(Collected::TooLarge {
                    chunks,
                    held,
                    kept,
                    rest,
                }) => {
                    // Its start let go when the room ran out (read only for its tag), what is
                    // left is no body to send: a GET judged by tags fetches it again.
                    let body =
                        kept.then(|| ProxyBody::chunks(chunks, Some(held), Some(rest), idle));
                    (None, false, body)
                }
                Ok(Collected::OverBudget { chunks, held, rest }) => {
                    self.over_budget(route, Unheld::Response);
                    let body = ProxyBody::chunks(chunks, Some(held), Some(rest), idle);
                    (None, false, Some(body))
                }
                Err(ReadError::Stalled(after)) => {
                    return Err(Error::UpstreamTimeout {
                        upstream: upstream(),
                        after,
                        connecting: false,
                    })
                }
                Err(ReadError::Failed(e)) => {
                    return Err(Error::Upstream {
                        upstream: upstream(),
                        reason: format!("the response body was cut short: {e}"),
                    })
                }
            }
        };
        let known = tag.map(|tag| Known {
            tag,
            last_modified,
            from_upstream,
            negotiated,
        });
        let resource = Resource {
            exists: true,
            last_modified,
            tag: self.remember(rt, route, key, shared, known, ticket),
        };
        Ok((resource, body))
    }
}

/// Whether a tag may be remembered and later trusted for any writer. A representation that
/// varies by user (`Vary: Authorization`, `Cookie` or `*`, `Cache-Control: private`, or a
/// `per_user` route) is not: a 412 would show one user's tag to another, so such writes
/// always revalidate with the writer's own credentials. Nor is one marked `no-store`: its
/// bytes must not be kept, as a copy would be. Nor one answering a request with
/// credentials (`Authorization`, or a `Cookie`, which may carry a session: Varnish passes
/// such requests), even one marked `public`, `s-maxage` or `must-revalidate`, which RFC 9111
/// §3.5 lets a shared cache reuse: such a cache serves those very bytes, but a remembered tag
/// judges other writers, who may be given other bytes (WordPress marks its logged-in pages
/// `must-revalidate`): a 412 showed a user's tag to an anonymous writer, and equal bytes let
/// a stale write pass. Nor one that sets a cookie, which nginx and Varnish do not
/// cache either. And whether it is one of several (`Known::negotiated`): it varies on
/// anything, or has a content coding. One pass over `Vary` for both.
fn cacheable(route: &Route, headers: &HeaderMap, credentials: bool) -> (bool, bool) {
    let vary = headers.get_all(header::VARY);
    let negotiated = vary.iter().next().is_some() || headers.contains_key(header::CONTENT_ENCODING);
    let varies_by_user = list_items(headers, header::VARY).any(|f| {
        f == "*" || f.eq_ignore_ascii_case("authorization") || f.eq_ignore_ascii_case("cookie")
    });
    (
        !route.per_user
            && !varies_by_user
            && !credentials
            && !headers.contains_key(header::SET_COOKIE)
            && !kept_from_others(headers),
        negotiated,
    )
}

/// The metadata a representation's tag is keyed by too (`TagKey::hasher_for`), when its
/// `Vary` names a field by which a media type, language or charset is chosen (`Accept`,
/// `Accept-Language`, `Accept-Charset`, or `*`): such variants may hold equal bytes under
/// another `Content-Type` or `Content-Language`, and a strong tag must tell them apart
/// (RFC 9110 §8.8.1): one shared, a cache that revalidates one variant with the other's tag
/// is told 304 and serves the wrong one. `None` for all others, whose tag is of the bytes
/// alone: each coding (`Vary: Accept-Encoding`) is other bytes, and a `tag_puts` PUT's tag
/// stays the one a GET gives.
fn representation_meta(headers: &HeaderMap) -> Option<Vec<u8>> {
    let by_metadata = list_items(headers, header::VARY).any(|f| {
        f == "*"
            || f.eq_ignore_ascii_case("accept")
            || f.eq_ignore_ascii_case("accept-language")
            || f.eq_ignore_ascii_case("accept-charset")
    });
    if !by_metadata {
        return None;
    }
    let mut meta = Vec::new();
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
    ] {
        // A field value holds no line feed: the lines cannot run into one another.
        for value in headers.get_all(&name) {
            meta.extend_from_slice(name.as_str().as_bytes());
            meta.push(b':');
            meta.extend_from_slice(value.as_bytes());
            meta.push(b'\n');
        }
    }
    Some(meta)
}

/// The hasher for a body whose tag is keyed by `meta` too (`representation_meta`), if any.
fn tag_hasher(rt: &Routing, meta: Option<&[u8]>) -> crate::etag::TagHasher {
    match meta {
        Some(meta) => rt.tag_key.hasher_for(meta),
        None => rt.tag_key.hasher(),
    }
}

/// `Cache-Control: private` (for one user: RFC 9111 §5.2.2.7) or `no-store` (§5.2.2.5), in
/// any field line, qualified or not.
fn kept_from_others(headers: &HeaderMap) -> bool {
    cache_directive(headers, &["private", "no-store"])
}

/// Whether `Cache-Control` holds one of `names` (with an argument or not), in any line.
fn cache_directive(headers: &HeaderMap, names: &[&str]) -> bool {
    list_items(headers, header::CACHE_CONTROL)
        .map(|d| d.split('=').next().unwrap_or("").trim_end())
        .any(|d| names.iter().any(|n| d.eq_ignore_ascii_case(n)))
}

/// The items of a comma-separated list field, across all its lines, trimmed.
fn list_items(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// An upstream response passed through unchanged (`send` already dropped hop-by-hop headers).
/// A GET's answer is a whole representation, to tag: a 200 without `Content-Range` (one with
/// it, from a backend that misanswers a range, holds part of one: its tag would name bytes
/// that are not the whole).
fn whole_representation(rsp: &Response<UpBody>) -> bool {
    rsp.status() == StatusCode::OK && !rsp.headers().contains_key(header::CONTENT_RANGE)
}

/// A 304 built from the 200 it replaces, with the fields §15.4.5 asks for.
fn not_modified(rparts: &response::Parts) -> Response<ProxyBody> {
    let mut rsp = Response::new(ProxyBody::empty());
    *rsp.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
        // Not in RFC 9110 §15.4.5's list, but a backend that renews a session on each read
        // renews it on a revalidation too, as it would through nginx.
        header::SET_COOKIE,
    ] {
        for value in rparts.headers.get_all(&name) {
            rsp.headers_mut().append(name.clone(), value.clone());
        }
    }
    rsp
}
