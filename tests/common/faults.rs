//! A backend that misbehaves at the TCP level, one way per instance.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Reads the request, then resets the connection before any response byte.
    ResetBeforeHead,
    /// Sends a head promising 100000 bytes and 1000 of them, then resets.
    ResetMidBody,
    /// Sends a head promising 100000 bytes and 1000 of them, then closes cleanly.
    CutShort,
    /// Reads the request and never answers.
    NoHeaders,
    /// Sends a head and 1000 bytes, then nothing more, keeping the connection open.
    StallBody,
    /// Answers with something that is not HTTP.
    NotHttp,
    /// Not a fault: a head promising 1000 bytes, sent as 5 chunks of 200, 100 ms apart.
    /// Slower in all than a 300 ms timeout, though every chunk is in time.
    Trickle,
    /// Answers every request on the connection with these bytes: for framings that real
    /// servers send only by mistake.
    Answer(&'static [u8]),
}

pub struct FaultyBackend {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl FaultyBackend {
    pub async fn start(fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                tokio::spawn(misbehave(stream, fault));
            }
        });
        Self { addr, _stop: stop }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn misbehave(mut s: TcpStream, fault: Fault) {
    // Read the request head (and whatever body arrives with it).
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if let Fault::Answer(bytes) = fault {
        // Body-less requests only: each head gets the bytes.
        loop {
            while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                got.drain(..end + 4);
                if s.write_all(bytes).await.is_err() {
                    return;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: text/plain\r\n\r\n";
    let part = vec![b'x'; 1000];
    match fault {
        Fault::ResetBeforeHead => reset(s),
        Fault::ResetMidBody => {
            let _ = s.write_all(head).await;
            let _ = s.write_all(&part).await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            reset(s);
        }
        Fault::CutShort => {
            let _ = s.write_all(head).await;
            let _ = s.write_all(&part).await;
            let _ = s.shutdown().await;
        }
        Fault::NoHeaders => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Fault::StallBody => {
            let _ = s.write_all(head).await;
            let _ = s.write_all(&part).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Fault::NotHttp => {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
            let _ = s.shutdown().await;
        }
        Fault::Trickle => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                .await;
            for _ in 0..5 {
                let _ = s.write_all(&part[..200]).await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Fault::Answer(_) => unreachable!("answered above"),
    }
}

/// Closes with RST rather than FIN (`SO_LINGER` with a zero timeout).
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}
