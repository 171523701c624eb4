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
