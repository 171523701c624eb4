//! The real `ifmatch` binary, run with a config file in a temp dir; its stderr is collected.
//! The process is killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ifmatch");

pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    pub config: PathBuf,
    dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

/// A port that was free a moment ago. Another process may take it before it is used: prefer
/// binding port 0 and reading the bound address (see [`Binary::start`]).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What `{listen}` stands for in a config: port 0, so the proxy binds a port no other test
/// can hold, and logs which one.
const LISTEN_ANY: &str = "127.0.0.1:0";

impl Binary {
    /// Starts `ifmatch --config FILE` with `config` (where `{listen}` is replaced by
    /// `127.0.0.1:0`), learns the bound address from its start-up log line and waits until
    /// it accepts connections.
    pub async fn start(config: &str, extra_args: &[&str]) -> Self {
        Self::start_with(config, extra_args, |_| {}).await
    }

    /// [`Binary::start`], with `prepare` run on the command before it is spawned (to set
    /// its environment or limits).
    pub async fn start_with(
        config: &str,
        extra_args: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Self {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ifmatch-bin-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ifmatch.toml");
        std::fs::write(&path, config.replace("{listen}", LISTEN_ANY)).unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(&path)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        prepare(&mut command);
        let mut child = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut me = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            config: path,
            dir,
            log,
        };
        me.addr = me.logged_addr("ifmatch started").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(me.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "ifmatch did not start: {:?}",
                me.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        me
    }

    /// The address in the `listen` field of the first log line containing `needle` (the
    /// proxy logs the addresses it bound, text or JSON).
    pub async fn logged_addr(&self, needle: &str) -> SocketAddr {
        let line = self.wait_for_log(needle, Duration::from_secs(10)).await;
        let after = &line[line.find("listen").expect("a listen field") + "listen".len()..];
        let start = after.find(|c: char| c.is_ascii_digit()).unwrap();
        let addr: String = after[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse()
            .unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"))
    }

    /// The process's threads now (Linux `/proc`).
    #[allow(dead_code)]
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .unwrap()
            .count()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Rewrites the config file (`{listen}` replaced as at start, so that a reload sees the
    /// same `listen`).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config, config.replace("{listen}", LISTEN_ANY)).unwrap();
    }

    /// Writes `config` as the config file, sends SIGHUP and waits for the reload to be
    /// logged.
    pub async fn reload(&self, config: &str) {
        let done = |log: Vec<String>| log.iter().filter(|l| l.contains("config reloaded")).count();
        let before = done(self.log());
        self.write_config(config);
        self.signal("HUP");
        assert!(
            super::eventually(Duration::from_secs(5), || done(self.log()) > before).await,
            "no reload logged: {:#?}",
            self.log()
        );
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Every line logged so far (stderr and stdout).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `within` for a log line containing `needle`.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} in {:#?}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "ifmatch did not exit: {:#?}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process killed and waited for when dropped: also when its test fails.
pub struct Reaped(pub std::process::Child);

impl Reaped {
    /// The child's exit status, waiting up to `within` for it to exit.
    pub fn exit_within(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary started with `--config path` at `RUST_LOG=info`, and the lines of its log:
/// for tests that signal the process themselves, at moments `Binary::start` does not reach.
pub fn spawn_logged(path: &std::path::Path) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    use std::process::{Command, Stdio};
    let mut child = Reaped(
        Command::new(BIN)
            .arg("--config")
            .arg(path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(child.0.stderr.take().unwrap());
    (child, lines)
}

/// Waits up to 10 s for the next of `lines` that holds `needle`, keeping the others in
/// `seen`, which a failure shows.
pub fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
) {
    loop {
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.contains(needle) => return,
            Ok(line) => seen.push(line),
            Err(e) => panic!("no {needle:?} ({e}): {seen:#?}"),
        }
    }
}

/// The lines of a child's output, read on a thread of their own, so that a wait for one
/// can time out (`recv_timeout`) instead of hanging the test on a child that says nothing.
pub fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
