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

/// A directory of its own under the system's temporary one, removed when dropped: also
/// when the test fails, since a panic drops it on the way out.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `ifmatch-{name}-{pid}-{n}`: tests of one binary run side by side, so each directory
    /// gets a number of its own as well as the process's.
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ifmatch-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn join(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes `path` a FIFO (replacing a file there): a process that opens it to read waits
/// until [`fifo_writer`] opens it, which holds a config read at a known point.
pub fn make_fifo(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a path the test chose, with a NUL-terminated string.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Opens the FIFO at `path` to write, without waiting: with no reader yet the open fails
/// (ENXIO) instead of blocking the test for ever.
pub fn fifo_writer(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

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

/// Sends `bytes` on a new connection and reads until the server closes it (5 s at most):
/// for heads a real client would not send. On the test's runtime, so nothing blocks it.
pub async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw HTTP/2 (prior knowledge) client on a new connection to `addr`, the connection driven
/// by a task of its own, ready for a request: for frames hyper's client will not send.
pub async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}
