//! Helpers shared by the integration tests: real servers on 127.0.0.1:0 and a real client.
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod binary;
pub mod client;
pub mod faults;
pub mod proxy;
pub mod tls;

pub use backend::{Backend, Recorded, ScriptedBackend};
pub use client::{Client, Reply};
pub use proxy::Proxy;

/// Polls `cond` every 5 ms until it holds or `within` has passed; returns whether it held.
pub async fn eventually(within: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    true
}
