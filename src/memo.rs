//! `BodyMemo`: a copy of the body each URL last answered with, beside its tag, so that an
//! unchanged body is compared instead of hashed again.
//!
//! A tag is HMAC-SHA256 of the body under the tag key: the same bytes under the same key
//! always give the same tag. When a GET's body equals, byte for byte, the copy kept from an
//! earlier response, the copy's tag is that body's tag. Comparing runs at memory speed (tens
//! of GB/s); hashing at ~1.65 GB/s even with SHA-NI, which made it the largest cost of a
//! tagged GET from a few KiB up. A memo never says what a resource's current tag is, only
//! what the tag of given bytes is, so writes need not touch it: it is not the tag cache.
//!
//! Bounded by bytes: a body over an eighth of the budget is never kept, and past the budget
//! the oldest copies go first (FIFO). Each copy is charged its body, its key and a fixed
//! overhead for its map and queue slots and allocations, so that a million tiny bodies
//! cannot hold many times the budget. A budget of 0 keeps nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use http::HeaderValue;

use crate::etag::{ETag, TagKey};
use crate::key::ResourceKey;

/// A body as the upstream sent it, and its tag under one key.
#[derive(Debug)]
pub struct Memo {
    /// Which copy this is, so that the eviction queue can tell a stale entry of its own.
    id: u64,
    key_id: u64,
    pub body: Bytes,
    /// The metadata the tag is keyed by as well (`TagKey::hasher_for`), if any: equal
    /// bytes under other metadata have another tag.
    pub meta: Option<Box<[u8]>>,
    pub tag: ETag,
    /// The tag as an `ETag` value, made once: a hit clones it instead.
    pub header: HeaderValue,
}

impl Memo {
    /// The bytes it holds that its cost counts: its body and metadata.
    fn len(&self) -> usize {
        self.body.len() + self.meta.as_ref().map_or(0, |m| m.len())
    }
}

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct MemoStats {
    /// Bodies found equal to their copy: not hashed.
    pub hits: AtomicU64,
    /// Bodies that may be shared but had no copy or differed from it: hashed.
    pub misses: AtomicU64,
    /// Copies evicted to stay within the budget.
    pub evictions: AtomicU64,
}

#[derive(Debug)]
pub struct BodyMemo {
    budget: usize,
    map: DashMap<ResourceKey, Arc<Memo>>,
    /// Eviction order and the bytes held. Every change of `map` but lookups happens under
    /// this lock, so `used` is exact.
    order: Mutex<Order>,
    pub stats: MemoStats,
}

#[derive(Debug, Default)]
struct Order {
    /// Copies in the order they were kept; an entry whose copy was replaced since is stale
    /// and skipped.
    queue: VecDeque<(ResourceKey, u64)>,
    used: usize,
    next_id: u64,
}

/// What a copy costs besides its body and key: the `Memo` with its tag and header value
/// (~260 bytes with their allocations), its map and queue slots (~50, the queue at up to
/// twice the copies), allocator headers. Checked by `benches/memory.rs`: a million tiny
/// bodies through the default budget hold less RSS than they are charged.
const ENTRY_OVERHEAD: usize = 384;

// === impl BodyMemo ===

impl BodyMemo {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            map: DashMap::new(),
            order: Mutex::new(Order::default()),
            stats: MemoStats::default(),
        }
    }

    /// Copies are kept at all (`tag_memo_bytes` is not 0).
    pub fn is_on(&self) -> bool {
        self.budget > 0
    }

    /// The longest body kept: an eighth of the budget, so that a few large bodies cannot
    /// push out every other copy.
    pub fn max_body(&self) -> usize {
        self.budget / 8
    }

    /// The bytes a copy of a `len`-byte body for `key` is charged.
    pub fn cost(key: &ResourceKey, len: usize) -> usize {
        len + key.as_str().len() + ENTRY_OVERHEAD
    }

    /// The copy kept for `key` under `tag_key` and `meta` (see [`Memo::meta`]), if any.
    pub fn get(
        &self,
        key: &ResourceKey,
        tag_key: &TagKey,
        meta: Option<&[u8]>,
    ) -> Option<Arc<Memo>> {
        if !self.is_on() {
            return None;
        }
        let memo = self.map.get(key)?;
        (memo.key_id == tag_key.id() && memo.meta.as_deref() == meta).then(|| memo.clone())
    }

    /// Keeps a copy of `chunks`, whose tag under `tag_key` and `meta` is `tag` (`header`
    /// as a header value), for `key`; replaces the copy kept before. Does nothing for a
    /// body over [`max_body`](Self::max_body).
    pub fn put(
        &self,
        key: &ResourceKey,
        chunks: &VecDeque<Bytes>,
        meta: Option<&[u8]>,
        tag: ETag,
        header: HeaderValue,
        tag_key: &TagKey,
    ) {
        let len: usize = chunks.iter().map(Bytes::len).sum();
        let cost = Self::cost(key, len + meta.map_or(0, <[u8]>::len));
        if self.budget == 0 || len > self.max_body() || cost > self.budget {
            return;
        }
        // One allocation of exactly the body's size: a chunk of hyper's may share a larger
        // read buffer, which keeping would hold on to.
        let mut body = BytesMut::with_capacity(len);
        for c in chunks {
            body.extend_from_slice(c);
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        // The copy this one replaces goes first, then the oldest others while room is short.
        // Its key is kept for the new copy: the replaced copy's queue entry still holds it,
        // and a key of this request's own would be a second block of it (a URL may be as
        // long as a request head), charged once.
        let key = match self.map.remove(key) {
            Some((old_key, old)) => {
                order.used -= Self::cost(&old_key, old.len());
                old_key
            }
            None => key.clone(),
        };
        while order.used + cost > self.budget {
            let Some((old_key, old_id)) = order.queue.pop_front() else {
                return;
            };
            if let Some((old_key, old)) = self.map.remove_if(&old_key, |_, m| m.id == old_id) {
                order.used -= Self::cost(&old_key, old.len());
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = order.next_id;
        order.next_id += 1;
        let memo = Arc::new(Memo {
            id,
            key_id: tag_key.id(),
            body: body.freeze(),
            meta: meta.map(Box::from),
            header,
            tag,
        });
        self.map.insert(key.clone(), memo);
        order.used += cost;
        order.queue.push_back((key, id));
        // Replaced copies leave stale queue entries behind; without a budget squeeze none
        // would ever be popped. Compacting once they outnumber the live ones keeps the
        // queue within twice the copies held, at a constant cost per `put` on average.
        if order.queue.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            order
                .queue
                .retain(|(k, id)| map.get(k).is_some_and(|m| m.id == *id));
        }
    }

    /// Drops every copy (the tag key changed: their tags are no longer what a body hashes to).
    pub fn clear(&self) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.map.clear();
        order.queue.clear();
        order.used = 0;
    }

    /// Bytes charged for the copies held now (bodies, keys and overhead).
    pub fn bytes(&self) -> usize {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).used
    }

    /// Copies held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::test_key as key;

    fn tag_key() -> TagKey {
        TagKey::new(b"memo-tests-key-0123456789abcdef0")
    }

    fn body(n: usize, byte: u8) -> VecDeque<Bytes> {
        // Two chunks, to show that a copy joins them.
        let half = n / 2;
        VecDeque::from([
            Bytes::from(vec![byte; half]),
            Bytes::from(vec![byte; n - half]),
        ])
    }

    fn put(m: &BodyMemo, path: &str, n: usize, byte: u8) {
        let k = tag_key();
        let chunks = body(n, byte);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let tag = k.tag_of(&joined);
        m.put(&key(path), &chunks, None, tag.clone(), tag.to_header(), &k);
    }

    #[test]
    fn keeps_the_joined_body_and_its_tag() {
        let m = BodyMemo::new(1000);
        put(&m, "/a", 100, b'x');
        let memo = m.get(&key("/a"), &tag_key(), None).unwrap();
        assert_eq!(&memo.body[..], &[b'x'; 100][..]);
        assert_eq!(memo.tag, tag_key().tag_of(&[b'x'; 100]));
        assert_eq!(memo.header, memo.tag.to_header());
        assert!(m.get(&key("/b"), &tag_key(), None).is_none());
        assert_eq!(m.bytes(), 100 + "http://a:1/a".len() + ENTRY_OVERHEAD);
    }

    #[test]
    fn a_copy_made_under_another_key_is_not_used() {
        let m = BodyMemo::new(1000);
        put(&m, "/a", 10, b'x');
        let other = TagKey::new(b"another-key-0123456789abcdef0123");
        assert!(m.get(&key("/a"), &other, None).is_none());
        assert!(m.get(&key("/a"), &tag_key(), None).is_some());
    }

    #[test]
    fn the_budget_holds_and_the_oldest_copies_go_first() {
        // Room for eight copies of 1000 bytes with their keys and overhead, and bodies up
        // to 1400 bytes.
        let budget = 8 * 1400;
        let m = BodyMemo::new(budget);
        put(&m, "/big", 1401, b'x');
        assert!(m.is_empty(), "over an eighth of the budget");
        for i in 0..20 {
            put(&m, &format!("/{i}"), 1000, b'y');
            assert!(m.bytes() <= budget, "{} bytes after {i}", m.bytes());
        }
        assert_eq!(m.len(), 8);
        assert_eq!(m.stats.evictions.load(Ordering::Relaxed), 12);
        assert!(m.get(&key("/11"), &tag_key(), None).is_none());
        assert!(m.get(&key("/12"), &tag_key(), None).is_some());
        // A replaced copy frees its bytes at once.
        put(&m, "/19", 10, b'z');
        let kept = (12..19).map(|i| BodyMemo::cost(&key(&format!("/{i}")), 1000));
        let expected = kept.sum::<usize>() + BodyMemo::cost(&key("/19"), 10);
        assert_eq!(m.bytes(), expected);
        assert_eq!(
            &m.get(&key("/19"), &tag_key(), None).unwrap().body[..],
            &[b'z'; 10]
        );
    }

    #[test]
    fn replacing_one_copy_forever_keeps_the_queue_small() {
        let m = BodyMemo::new(1 << 20);
        for i in 0..10_000u32 {
            put(&m, "/hot", 64, i as u8);
        }
        assert_eq!(m.len(), 1);
        assert_eq!(m.bytes(), BodyMemo::cost(&key("/hot"), 64));
        let queued = m.order.lock().unwrap().queue.len();
        assert!(queued <= 2 + 16, "{queued} queue entries for one copy");
    }

    #[test]
    fn tiny_bodies_are_charged_their_overhead() {
        // A million copies of 10-byte bodies would hold far more than 10 MB.
        let m = BodyMemo::new(100 * 1024);
        for i in 0..10_000 {
            put(&m, &format!("/{i}"), 10, b'x');
        }
        assert!(m.bytes() <= 100 * 1024);
        assert!(m.len() <= 100 * 1024 / ENTRY_OVERHEAD, "{} copies", m.len());
    }

    #[test]
    fn a_zero_budget_keeps_nothing_and_clear_drops_everything() {
        let off = BodyMemo::new(0);
        put(&off, "/a", 0, b'x');
        assert!(off.get(&key("/a"), &tag_key(), None).is_none());

        let m = BodyMemo::new(1000);
        put(&m, "/a", 50, b'x');
        m.clear();
        assert!(m.is_empty());
        assert_eq!(m.bytes(), 0);
    }
}
