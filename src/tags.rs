//! `TagStore`: the tag last seen for each resource, in a bounded in-memory map.
//!
//! The rule that keeps `validation = "cached"` safe: a tag read from the upstream is only
//! remembered if no write to that resource finished after the read began. Every read takes a
//! ticket from one clock before it asks the upstream; every finished write leaves an
//! `Invalidated` mark stamped from the same clock; `record` refuses a ticket older than the
//! mark. So a slow GET that fetched the old body can never put the old tag back after a write.
//!
//! The map is bounded: past `capacity` entries, or past their bytes (keys, and tags as the
//! upstream sent them), the oldest inserted are evicted (FIFO). An evicted mark would let an
//! old ticket through, so eviction raises a floor below which no ticket is accepted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;

use crate::etag::ETag;
use crate::key::ResourceKey;

/// Key and tag bytes the cache may hold for each entry it may hold, on average: 25.6 MB at
/// the default 100,000 entries, where URLs of a usual length and their tags take a few MB.
const KEY_BYTES_PER_ENTRY: usize = 256;
/// Keys longer than this are never remembered: a write to such a URL revalidates.
const MAX_KEY_BYTES: usize = 8 * 1024;

fn too_long(key: &ResourceKey) -> bool {
    key.as_str().len() > MAX_KEY_BYTES
}

/// What is remembered of a resource's representation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    pub tag: ETag,
    pub last_modified: Option<SystemTime>,
    /// The tag is the upstream's own (it sent a strong `ETag`), not the hash of the body.
    pub from_upstream: bool,
    /// The representation was one of several (`Vary`, or a content coding): another
    /// request for the same state may have been given another, with another tag.
    pub negotiated: bool,
}

/// A point on the store's clock, taken before reading from the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

#[derive(Debug)]
enum Entry {
    Known {
        known: Known,
        at: u64,
    },
    /// `from_upstream` survives the tag it describes: the upstream that tagged a resource
    /// itself will most likely tag its next representation too. So does `negotiated`.
    Invalidated {
        at: u64,
        from_upstream: bool,
        negotiated: bool,
    },
}

impl Entry {
    fn at(&self) -> u64 {
        match self {
            Self::Known { at, .. } | Self::Invalidated { at, .. } => *at,
        }
    }

    fn upstream_tagged(&self) -> bool {
        match self {
            Self::Known { known, .. } => known.from_upstream,
            Self::Invalidated { from_upstream, .. } => *from_upstream,
        }
    }

    /// Whether a representation of the resource was ever one of several. It stays so: a
    /// backend that gzips for clients that ask (nginx's default, `gzip_vary off`) marks
    /// only its gzip answers, and an identity read after one must not make a gzip writer's
    /// tag a 412 without the revalidation that would confirm it.
    fn negotiated(&self) -> bool {
        match self {
            Self::Known { known, .. } => known.negotiated,
            Self::Invalidated { negotiated, .. } => *negotiated,
        }
    }

    /// The bytes of the tag it holds: the proxy's own are small, but one the upstream sent
    /// itself is kept as sent, and may be as long as a response head.
    fn tag_bytes(&self) -> usize {
        match self {
            Self::Known { known, .. } => known.tag.opaque_len(),
            Self::Invalidated { .. } => 0,
        }
    }

    /// The mark a write leaves on it.
    fn invalidated(&self, at: u64) -> Self {
        Self::Invalidated {
            at,
            from_upstream: self.upstream_tagged(),
            negotiated: self.negotiated(),
        }
    }
}

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

#[derive(Debug)]
pub struct TagStore {
    map: DashMap<ResourceKey, Entry>,
    /// Insertion order, for eviction.
    order: Mutex<VecDeque<ResourceKey>>,
    /// Held (shared) from a new entry's insertion to the end of its bookkeeping (`inserted`,
    /// evictions included); `clear` holds it alone.
    adding: RwLock<()>,
    len: AtomicUsize,
    capacity: usize,
    /// Bytes of the keys and tags held, and the most they may be: clients choose URLs (a
    /// 60 KB query is a 60 KB key) and upstreams their tags, so a bound on entries alone
    /// does not bound memory. Changed only under the entry's map lock (`recharge`), so it
    /// is exact.
    key_bytes: AtomicUsize,
    key_budget: usize,
    clock: AtomicU64,
    /// Tickets below this are refused: an entry that could have refused them was evicted.
    floor: AtomicU64,
    pub stats: CacheStats,
}

// === impl TagStore ===

impl TagStore {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            adding: RwLock::new(()),
            len: AtomicUsize::new(0),
            capacity: capacity.max(1),
            key_bytes: AtomicUsize::new(0),
            key_budget: capacity.max(1).saturating_mul(KEY_BYTES_PER_ENTRY),
            clock: AtomicU64::new(1),
            floor: AtomicU64::new(0),
            stats: CacheStats::default(),
        }
    }

    /// Take before sending the GET whose answer may be recorded.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.clock.fetch_add(1, Ordering::AcqRel))
    }

    /// The remembered tag, if any (counts a hit or a miss).
    pub fn get(&self, key: &ResourceKey) -> Option<Known> {
        let found = match self.map.get(key).as_deref() {
            Some(Entry::Known { known, .. }) => Some(known.clone()),
            _ => None,
        };
        let counter = if found.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Whether the upstream was last seen sending its own strong tag for this resource
    /// (not counted as a hit or a miss). `tag_puts` must not answer with a tag of its own
    /// then: a GET would give the upstream's, and the writer's next write would fail.
    pub fn upstream_tags(&self, key: &ResourceKey) -> bool {
        self.map.get(key).is_some_and(|e| e.upstream_tagged())
    }

    /// Whether `tag_puts` may answer a PUT with its body's tag (not counted as a hit or a
    /// miss): not for a resource the upstream tags itself (`upstream_tags`), nor for one
    /// seen in several representations (`Vary`, or a content coding): a writer may be given
    /// another one (gzip), whose tag a revalidation finds, and its next write would get a
    /// 412 it did not earn. One look at the entry for both.
    pub fn takes_put_tags(&self, key: &ResourceKey) -> bool {
        self.map
            .get(key)
            .is_none_or(|e| !e.upstream_tagged() && !e.negotiated())
    }

    /// Remembers `known` as read by the GET that took `ticket`, unless a write finished
    /// since, or a newer read was already recorded.
    pub fn record(&self, key: &ResourceKey, known: Known, ticket: Ticket) {
        if ticket.0 < self.floor.load(Ordering::Acquire) || too_long(key) {
            return;
        }
        // A resource already held (the usual case) is updated in place: no new entry, so
        // nothing for `clear` to wait for.
        let mut known = known;
        if let Some(mut held) = self.map.get_mut(key) {
            if held.at() < ticket.0 {
                known.negotiated |= held.negotiated();
                let new = Entry::Known {
                    known,
                    at: ticket.0,
                };
                let grew = self.recharge(&held, &new);
                *held = new;
                drop(held);
                if grew {
                    self.evict_past_bound();
                }
            }
            return;
        }
        let _adding = self.adding.read().unwrap_or_else(|p| p.into_inner());
        match self.map.entry(key.clone()) {
            MapEntry::Occupied(mut o) => {
                if o.get().at() < ticket.0 {
                    known.negotiated |= o.get().negotiated();
                    let new = Entry::Known {
                        known,
                        at: ticket.0,
                    };
                    let grew = self.recharge(o.get(), &new);
                    o.insert(new);
                    drop(o);
                    if grew {
                        // `adding` is held already: taken again, it could wait for a
                        // `clear` that waits for this.
                        self.evict();
                    }
                }
            }
            MapEntry::Vacant(v) => {
                // Again, under the key's lock: its mark may have been evicted since the
                // check above, and an eviction raises the floor before the mark goes,
                // under the same lock (`inserted`).
                if ticket.0 < self.floor.load(Ordering::Acquire) {
                    return;
                }
                let new = Entry::Known {
                    known,
                    at: ticket.0,
                };
                self.charge(key, &new);
                v.insert(new);
                self.inserted(key);
            }
        }
    }

    /// Notes how the upstream represents `key`, as a read whose tag may not be remembered
    /// (a response to credentials) showed it: tagged by the upstream itself, or one of
    /// several representations. `tag_puts` must know it whoever read (`takes_put_tags`):
    /// where every reader sends a session cookie, nothing else would ever tell it. No tag
    /// is kept; where there is no entry, a mark is placed at `ticket` (which refuses only
    /// reads older than this one).
    pub fn note(&self, key: &ResourceKey, from_upstream: bool, negotiated: bool, ticket: Ticket) {
        if !(from_upstream || negotiated) || too_long(key) {
            return;
        }
        if let Some(mut held) = self.map.get_mut(key) {
            match &mut *held {
                Entry::Known { known, .. } => {
                    known.from_upstream |= from_upstream;
                    known.negotiated |= negotiated;
                }
                Entry::Invalidated {
                    from_upstream: f,
                    negotiated: n,
                    ..
                } => {
                    *f |= from_upstream;
                    *n |= negotiated;
                }
            }
            return;
        }
        let _adding = self.adding.read().unwrap_or_else(|p| p.into_inner());
        if let MapEntry::Vacant(v) = self.map.entry(key.clone()) {
            let new = Entry::Invalidated {
                at: ticket.0,
                from_upstream,
                negotiated,
            };
            self.charge(key, &new);
            v.insert(new);
            self.inserted(key);
        }
    }

    /// Forgets the tag of `key` after a write that may have changed it.
    pub fn invalidate(&self, key: &ResourceKey) {
        // Never remembered, so there is no tag to forget, nor a read to refuse.
        if too_long(key) {
            return;
        }
        let at = self.clock.fetch_add(1, Ordering::AcqRel);
        if let Some(mut held) = self.map.get_mut(key) {
            let mark = held.invalidated(at);
            self.recharge(&held, &mark);
            *held = mark;
            return;
        }
        let _adding = self.adding.read().unwrap_or_else(|p| p.into_inner());
        match self.map.entry(key.clone()) {
            MapEntry::Occupied(mut o) => {
                let mark = o.get().invalidated(at);
                self.recharge(o.get(), &mark);
                o.insert(mark);
            }
            MapEntry::Vacant(v) => {
                let mark = Entry::Invalidated {
                    at,
                    from_upstream: false,
                    negotiated: false,
                };
                self.charge(key, &mark);
                v.insert(mark);
                self.inserted(key);
            }
        }
    }

    /// Forgets every tag, and refuses every read that began before.
    pub fn clear(&self) {
        let now = self.clock.fetch_add(1, Ordering::AcqRel);
        self.floor.fetch_max(now + 1, Ordering::AcqRel);
        // No entry half added (in the map, not yet counted) or half evicted while the count
        // is reset: one would be counted after the reset for an entry no longer there, or
        // taken off a count that no longer had it (and wrap).
        let _alone = self.adding.write().unwrap_or_else(|p| p.into_inner());
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.map.clear();
        // A write's mark placed since the floor was raised (`invalidate`'s fast path takes
        // no lock here) may have been swept away with the rest: raised again, the floor
        // refuses every read begun before the sweep, as the mark would have.
        let swept = self.clock.fetch_add(1, Ordering::AcqRel);
        self.floor.fetch_max(swept + 1, Ordering::AcqRel);
        order.clear();
        self.len.store(0, Ordering::Release);
        self.key_bytes.store(0, Ordering::Release);
    }

    /// Entries held now (marks of invalidated tags included).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Counts a new entry's bytes, under its vacant slot's lock (before it goes in): a change
    /// to it in place (`recharge`) may follow as soon as it is in.
    fn charge(&self, key: &ResourceKey, entry: &Entry) {
        let size = key.as_str().len() + entry.tag_bytes();
        self.key_bytes.fetch_add(size, Ordering::AcqRel);
    }

    /// Counts the change of an entry's tag, under its lock; whether its bytes grew (the
    /// bound may then be passed: `evict_past_bound`, once the lock is let go). Tags the
    /// proxy makes are all of one length, so the usual read costs no atomic here.
    fn recharge(&self, old: &Entry, new: &Entry) -> bool {
        let (old, new) = (old.tag_bytes(), new.tag_bytes());
        match new.cmp(&old) {
            std::cmp::Ordering::Greater => {
                let now = self.key_bytes.fetch_add(new - old, Ordering::AcqRel) + new - old;
                now > self.key_budget
            }
            std::cmp::Ordering::Less => {
                self.key_bytes.fetch_sub(old - new, Ordering::AcqRel);
                false
            }
            std::cmp::Ordering::Equal => false,
        }
    }

    /// Bookkeeping after a new key went in (no map guard may be held here).
    fn inserted(&self, key: &ResourceKey) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push_back(key.clone());
        self.len.fetch_add(1, Ordering::AcqRel);
        drop(order);
        self.evict();
    }

    /// Evicts after an entry's tag grew in place (no map guard may be held here).
    fn evict_past_bound(&self) {
        let _adding = self.adding.read().unwrap_or_else(|p| p.into_inner());
        self.evict();
    }

    /// Evicts the oldest entries, as many as it takes to be within both bounds: one long
    /// key or tag may take the room of several. Called with `adding` held, shared.
    fn evict(&self) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        while self.len.load(Ordering::Acquire) > self.capacity
            || self.key_bytes.load(Ordering::Acquire) > self.key_budget
        {
            let Some(victim) = order.pop_front() else {
                return;
            };
            drop(order);
            if let MapEntry::Occupied(victim) = self.map.entry(victim) {
                // The floor first, while the entry's lock is held: a `record` that then
                // finds the key vacant finds the floor raised too.
                self.floor
                    .fetch_max(victim.get().at() + 1, Ordering::AcqRel);
                let size = victim.key().as_str().len() + victim.get().tag_bytes();
                victim.remove();
                self.len.fetch_sub(1, Ordering::AcqRel);
                self.key_bytes.fetch_sub(size, Ordering::AcqRel);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
            order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::test_key as key;

    fn known(t: &str) -> Known {
        Known {
            tag: ETag::strong(t).unwrap(),
            last_modified: None,
            from_upstream: false,
            negotiated: false,
        }
    }

    #[test]
    fn records_and_returns_tags() {
        let s = TagStore::new(10);
        let t = s.ticket();
        s.record(&key("/a"), known("1"), t);
        assert_eq!(s.get(&key("/a")), Some(known("1")));
        assert_eq!(s.get(&key("/b")), None);
        assert_eq!(s.stats.hits.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats.misses.load(Ordering::Relaxed), 1);
    }

    /// A write's mark that `clear` sweeps away as it is placed (a reload emptying the cache
    /// as a write's answer comes) still refuses the reads that began before it: else a read
    /// of the old body, begun after `clear` raised the floor but before the sweep, would
    /// find the slot empty and remember a tag the write had made stale. A race of a few
    /// instructions: each round clears on a thread of its own while the test thread marks
    /// the key until it sees its own mark swept away, then records as such a read would.
    #[test]
    fn a_mark_cleared_away_as_it_is_placed_still_refuses_older_reads() {
        let k = key("/k");
        let mut swept = 0;
        for _ in 0..5_000 {
            let s = std::sync::Arc::new(TagStore::new(1000));
            s.record(&k, known("old"), s.ticket());
            let clearing = {
                let s = s.clone();
                std::thread::spawn(move || s.clear())
            };
            let mut read = None;
            while !clearing.is_finished() {
                let t = s.ticket();
                s.invalidate(&k);
                if s.map.get(&k).is_none() {
                    read = Some(t);
                    break;
                }
            }
            clearing.join().unwrap();
            if let Some(t) = read {
                swept += 1;
                s.record(&k, known("old"), t);
                assert_eq!(
                    s.get(&k),
                    None,
                    "a stale tag remembered after {swept} sweeps"
                );
            }
        }
        eprintln!("{swept} marks swept away as they were placed");
    }

    /// A read whose tag may not be remembered still tells how the upstream represents the
    /// resource, and keeps no tag.
    #[test]
    fn a_note_keeps_how_the_upstream_tags_and_no_tag() {
        let s = TagStore::new(10);
        let (a, b) = (key("/a"), key("/b"));
        s.note(&a, false, false, s.ticket());
        assert!(s.is_empty(), "nothing to note");
        s.note(&a, true, false, s.ticket());
        assert!(!s.takes_put_tags(&a) && s.upstream_tags(&a));
        assert_eq!(s.get(&a), None);
        s.record(&b, known("1"), s.ticket());
        s.note(&b, false, true, s.ticket());
        assert!(!s.takes_put_tags(&b) && !s.upstream_tags(&b));
        assert_eq!(s.get(&b).map(|k| k.negotiated), Some(true), "the tag stays");
    }

    #[test]
    fn a_read_older_than_a_write_is_not_recorded() {
        let s = TagStore::new(10);
        let k = key("/a");
        let slow_read = s.ticket();
        s.invalidate(&k); // a write finished while the read was in flight
        s.record(&k, known("old"), slow_read);
        assert_eq!(s.get(&k), None);
        let fresh_read = s.ticket();
        s.record(&k, known("new"), fresh_read);
        assert_eq!(s.get(&k), Some(known("new")));
        // An older read cannot overwrite a newer one either.
        s.record(&k, known("old"), slow_read);
        assert_eq!(s.get(&k), Some(known("new")));
    }

    #[test]
    fn whether_the_upstream_tags_a_resource_itself_outlives_its_tag() {
        let s = TagStore::new(10);
        let k = key("/a");
        assert!(!s.upstream_tags(&k), "nothing known");
        let own = Known {
            from_upstream: true,
            negotiated: false,
            ..known("backend-1")
        };
        s.record(&k, own, s.ticket());
        assert!(s.upstream_tags(&k));
        s.invalidate(&k);
        assert_eq!(s.get(&k), None);
        assert!(s.upstream_tags(&k), "kept through a write");
        // The upstream stopped tagging: the next read says so.
        s.record(&k, known("hash"), s.ticket());
        assert!(!s.upstream_tags(&k));
        s.invalidate(&key("/b"));
        assert!(!s.upstream_tags(&key("/b")));
    }

    /// A stale read's `record` racing another key's insert that evicts its key's mark: the
    /// mark goes and the floor rises, in some order, while `record` looks at both. Whatever
    /// the interleaving, the stale tag must not be remembered.
    #[test]
    fn a_stale_read_racing_the_eviction_of_its_mark_is_refused() {
        use std::sync::{Arc, Barrier};
        const ROUNDS: usize = 20_000;
        let start = Arc::new(Barrier::new(2));
        let stores: Arc<Vec<TagStore>> = Arc::new((0..ROUNDS).map(|_| TagStore::new(1)).collect());
        let tickets: Vec<Ticket> = stores
            .iter()
            .map(|s| {
                let stale = s.ticket();
                s.invalidate(&key("/k")); // a write finished after the read began
                stale
            })
            .collect();
        let evictor = {
            let (stores, start) = (stores.clone(), start.clone());
            std::thread::spawn(move || {
                for s in stores.iter() {
                    start.wait();
                    s.invalidate(&key("/other")); // capacity 1: evicts /k's mark
                }
            })
        };
        let mut remembered = 0;
        for (s, stale) in stores.iter().zip(tickets) {
            start.wait();
            s.record(&key("/k"), known("old"), stale);
            remembered += usize::from(s.get(&key("/k")).is_some());
        }
        evictor.join().unwrap();
        assert_eq!(
            remembered, 0,
            "stale tags remembered in {remembered} of {ROUNDS} rounds"
        );
    }

    #[test]
    fn the_bound_holds_and_eviction_keeps_the_rule() {
        let s = TagStore::new(3);
        let stale = s.ticket();
        s.invalidate(&key("/x"));
        for i in 0..10 {
            let t = s.ticket();
            s.record(&key(&format!("/{i}")), known("t"), t);
            assert!(s.len() <= 3);
        }
        assert_eq!(s.stats.evictions.load(Ordering::Relaxed), 8);
        // /x's mark was evicted, yet the read that began before it is still refused.
        s.record(&key("/x"), known("old"), stale);
        assert_eq!(s.get(&key("/x")), None);
    }

    /// Clients choose URLs: the bytes of the keys are bounded too, not only their number.
    /// Long keys evict the oldest as many as they need; one past `MAX_KEY_BYTES` is never
    /// remembered (nor marked: no tag of it can be there to forget).
    #[test]
    fn the_bytes_of_the_keys_are_bounded_as_well_as_their_number() {
        let s = TagStore::new(10);
        assert_eq!(s.key_budget, 2560);
        let long = |i: usize| key(&format!("/{i}/{}", "x".repeat(1000)));
        for i in 0..5 {
            s.record(&long(i), known("1"), s.ticket());
        }
        assert_eq!(s.len(), 2, "two 1 KB keys fit in 2.5 KB, not three");
        assert!(s.key_bytes.load(Ordering::Relaxed) <= s.key_budget);
        assert_eq!(s.stats.evictions.load(Ordering::Relaxed), 3);
        assert!(s.get(&long(4)).is_some() && s.get(&long(2)).is_none());
        // Short keys then fill the entries again as the long ones go.
        for i in 0..10 {
            s.record(&key(&format!("/s{i}")), known("1"), s.ticket());
        }
        assert_eq!(s.len(), 10);
        let huge = key(&format!("/{}", "y".repeat(MAX_KEY_BYTES)));
        s.record(&huge, known("1"), s.ticket());
        s.invalidate(&huge);
        assert_eq!(s.get(&huge), None);
        assert_eq!(s.len(), 10, "nothing of it is kept");
    }

    /// A tag the upstream chose counts with its key, also when it replaces another in place
    /// (the read after a write, a resource whose tag grew): the count stays the bytes held,
    /// a write's mark gives the tag's back, and past the bound the oldest entries go.
    #[test]
    fn long_tags_count_with_their_keys_as_they_come_and_go() {
        let s = TagStore::new(10);
        let held = |s: &TagStore| {
            let sum = s
                .map
                .iter()
                .map(|e| e.key().as_str().len() + e.value().tag_bytes());
            (s.key_bytes.load(Ordering::Relaxed), sum.sum::<usize>())
        };
        let long = |c: &str| Known {
            from_upstream: true,
            ..known(&c.repeat(1000))
        };
        for i in 0..3 {
            s.record(&key(&format!("/{i}")), known("1"), s.ticket());
        }
        s.invalidate(&key("/1"));
        s.record(&key("/1"), long("a"), s.ticket());
        s.record(&key("/2"), long("b"), s.ticket());
        let (counted, bytes) = held(&s);
        assert_eq!(counted, bytes);
        assert!(bytes > 2000 && s.len() == 3, "{bytes} bytes in {}", s.len());
        // A third 1 KB tag passes the 2,560 bytes: the oldest entry goes (it is the one
        // that grew, which was inserted first).
        s.record(&key("/0"), long("c"), s.ticket());
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(&key("/0")), None);
        let (counted, bytes) = held(&s);
        assert_eq!(counted, bytes);
        assert!(bytes <= s.key_budget);
        s.invalidate(&key("/1"));
        assert_eq!(
            held(&s),
            (bytes - 1000, bytes - 1000),
            "the mark keeps no tag"
        );
    }

    /// `clear` (a reload) racing new entries and their evictions: the count must stay the
    /// map's size, or the bound drifts (and a count taken below zero panicked in debug
    /// builds).
    #[test]
    fn clear_racing_inserts_and_evictions_keeps_the_count_exact() {
        use std::sync::{Arc, Barrier};
        const ROUNDS: usize = 3_000;
        let mut drift = 0;
        for round in 0..ROUNDS {
            let s = Arc::new(TagStore::new(4));
            for i in 0..4 {
                s.invalidate(&key(&format!("/pre{i}")));
            }
            let start = Arc::new(Barrier::new(3));
            let writers: Vec<_> = (0..2)
                .map(|w| {
                    let (s, start) = (s.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for i in 0..8 {
                            s.invalidate(&key(&format!("/r{round}w{w}i{i}")));
                        }
                    })
                })
                .collect();
            start.wait();
            s.clear();
            for w in writers {
                w.join().unwrap();
            }
            let bytes: usize = s.map.iter().map(|e| e.key().as_str().len()).sum();
            if s.len() != s.map.len()
                || s.order.lock().unwrap().len() != s.map.len()
                || s.key_bytes.load(Ordering::Relaxed) != bytes
            {
                drift += 1;
            }
        }
        assert_eq!(
            drift, 0,
            "count and map disagreed in {drift} of {ROUNDS} rounds"
        );
    }
}
