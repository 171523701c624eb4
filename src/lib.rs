//! ifmatch: a reverse proxy that gives an ETag-less HTTP backend strong ETags and race-free
//! conditional writes.
//!
//! ```text
//! client ─▶ server ─▶ proxy::handle
//!                       ├─ host            one valid Host (HTTP/1.1: required) → 400
//!                       ├─ router          which route (longest prefix)      → 404
//!                       ├─ precondition    parse If-Match / If-None-Match …  → 400
//!                       ├─ GET/HEAD ─▶ upstream ─▶ body::read_tagged ─▶ tags.record
//!                       │              (hash, or compare with memo's copy)
//!                       │                                   → 200 + ETag / 304 / 412
//!                       └─ writes:  428? ─▶ lock.acquire(url) ─▶ current tag
//!                                   (revalidate GET, or tags.get when cached)
//!                                   ─▶ precondition::evaluate → 412, never forwarded
//!                                   ─▶ upstream ─▶ tags.invalidate (unless 4xx)
//! ```
//!
//! Every error of the request path is an [`error::Error`], turned into an RFC 9457 problem
//! response in one place.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod activity;
pub mod admin;
pub mod body;
pub mod budget;
pub mod config;
pub mod date;
pub mod demo;
pub mod error;
pub mod etag;
pub mod fds;
pub mod file;
pub mod framing;
pub mod h1;
pub mod host;
pub mod key;
pub mod lifecycle;
pub mod lock;
pub mod max_forwards;
pub mod memo;
pub mod metrics;
pub mod pool;
pub mod precondition;
pub mod proxy;
pub mod reuse;
pub mod router;
pub mod runtime;
pub mod server;
pub mod settling;
pub mod tags;
pub mod telemetry;
pub mod tls;
pub mod trust;
pub mod upstream;
pub mod watchdog;
