//! What the release-binary benches share: ports, readiness and RSS on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The release binary, which these benches measure (not the debug build tests use).
pub const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/ifmatch");

/// Starts the release binary with `config` (quiet logs) and waits until `port` accepts.
pub async fn start_proxy(config: &Path, port: u16) -> Child {
    assert!(
        Path::new(BIN).exists(),
        "build it first: cargo build --release"
    );
    let proxy = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(([127, 0, 0, 1], port).into()).await;
    proxy
}
