//! The binary's interface: `--check` on good and bad files, and the demo a newcomer runs first.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Client;

const BIN: &str = env!("CARGO_BIN_EXE_ifmatch");

fn check(text: &str) -> (bool, String) {
    let dir = common::TempDir::new("cli");
    let path = dir.join("ifmatch.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["--config", path.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_shipped_example_config_is_valid() {
    let out = Command::new(BIN)
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"),
            "--check",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 routes)"));
}

/// Every config a reader may copy passes `--check`: each TOML file under `config/` (what the
/// image, the pod and the compose file mount) and each `toml` block of the README (the
/// minimal sidecar config), not only the one file named above.
#[test]
fn every_shipped_config_and_readme_example_passes_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("config")];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty());
    for file in &files {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(file)
            .arg("--check")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty(), "the README's sidecar config is gone");
    for block in blocks {
        let (ok, out) = check(block);
        assert!(ok, "README block:\n{block}\n{out}");
    }
}

/// `kubectl apply -k config`: kustomize refuses any file outside the kustomization's folder
/// (`config/kubernetes/` once named `../example.toml`, and every apply failed). Each file it
/// names must lie in or below `config/` and exist; with `kubectl` at hand, it must render,
/// with the example config in its ConfigMap.
#[test]
fn the_kubernetes_kustomization_names_files_kustomize_will_read() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"));
    let text = std::fs::read_to_string(root.join("kustomization.yaml")).unwrap();
    let files: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|item| !item.starts_with("name:"))
        .map(|item| item.rsplit('=').next().unwrap().trim())
        .collect();
    assert!(files.contains(&"example.toml"), "{files:?}");
    for file in &files {
        assert!(
            !file.starts_with('/') && !file.split('/').any(|part| part == ".."),
            "{file}: outside config/, which kustomize refuses"
        );
        assert!(root.join(file).is_file(), "{file} does not exist");
    }
    match Command::new("kubectl")
        .args(["kustomize"])
        .arg(root)
        .output()
    {
        Ok(out) => {
            let rendered = String::from_utf8_lossy(&out.stdout);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "kubectl kustomize config: {err}");
            assert!(rendered.contains("listen = \"0.0.0.0:8080\""), "{rendered}");
            assert!(rendered.contains("kind: Pod"), "{rendered}");
        }
        Err(e) => eprintln!("kubectl not run ({e}): the file checks above stand alone"),
    }
}

/// The Dockerfile builds the dependencies from the manifest alone first; cargo reads every
/// target the manifest declares before building anything, so each [[bench]]'s file must be
/// copied in before that first `cargo build` (without `benches/`, every image build failed:
/// "can't find `core` bench at `benches/core.rs`").
#[test]
fn the_dockerfile_copies_every_declared_target_before_its_first_build() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    let before_build = dockerfile.split("cargo build").next().unwrap();
    let copied: Vec<&str> = before_build
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let benches: Vec<&str> = manifest
        .split("[[bench]]")
        .skip(1)
        .filter_map(|t| t.lines().find_map(|l| l.strip_prefix("name = ")))
        .map(|n| n.trim_matches('"'))
        .collect();
    assert!(!benches.is_empty());
    for bench in benches {
        let file = format!("benches/{bench}.rs");
        assert!(dir.join(&file).is_file(), "{file}");
        assert!(
            copied.iter().any(|c| *c == "benches" || *c == file),
            "{file} is not copied before the first cargo build (copied: {copied:?})"
        );
    }
}

#[test]
fn check_refuses_a_bad_file_naming_file_line_and_key() {
    let (ok, out) = check(
        "[server]\nlisten = \"127.0.0.1:8080\"\n\n[[route]]\nprefix = \"/docs/\"\nupstream = \"not a url\"\n",
    );
    assert!(!ok);
    assert!(out.contains("ifmatch.toml:6: route.upstream:"), "{out}");
}

#[test]
fn check_reports_every_problem_not_only_the_first() {
    let (ok, out) = check(
        "[server]\nlisten = \"nowhere\"\n[[route]]\nprefix = \"/a/\"\nupstream = \"http://127.0.0.1:1\"\n[[route]]\nprefix = \"/a/\"\nupstream = \"http://127.0.0.1:2\"\nlock_timeout = \"eventually\"\n",
    );
    assert!(!ok);
    for needle in [
        ":2: server.listen:",
        ":7: route.prefix: duplicate route",
        ":9: route.lock_timeout:",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

/// README: once the file's shape is right, `--check` names every problem of its values at
/// once, and a check between two keys comes once the values it compares are valid. A
/// problem elsewhere in `[server]` (or a route's bad `host`) must not hide the others for
/// another round of fix and check.
#[test]
fn check_reports_every_value_problem_at_once_cross_checks_included() {
    let (ok, out) = check(concat!(
        "[server]\n",
        "listen = \"127.0.0.1:8080\"\n",
        "max_connections = 0\n",
        "max_buffered_bytes = \"1MiB\"\n",
        "[admin]\n",
        "listen = \"127.0.0.1:8080\"\n",
        "[[route]]\n",
        "prefix = \"/\"\n",
        "upstream = \"http://127.0.0.1:9000\"\n",
        "host = \"a@b\"\n",
        "lock_timeout = \"0s\"\n",
    ));
    assert!(!ok);
    for needle in [
        ":3: server.max_connections:",
        ":4: server.max_buffered_bytes: 1048576 bytes is less than route \"/\"'s max_tag_body",
        ":6: admin.listen: 127.0.0.1:8080 is server.listen too",
        ":10: route.host:",
        ":11: route.lock_timeout:",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

/// The most common slip in a hand-written config, an address left unquoted, is a TOML
/// syntax error: it must still name the key beside its line (README: each problem as
/// `file:line: key: what is wrong`), not only the parser's "invalid float".
#[test]
fn a_syntax_error_in_a_value_names_its_key() {
    let (ok, out) = check(
        "[server]\nlisten = 0.0.0.0:8080\n[[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n",
    );
    assert!(!ok);
    assert!(out.contains("ifmatch.toml:2: server.listen: "), "{out}");
    let (ok, out) = check(
        "[server]\nlisten = \"127.0.0.1:8080\"\n[[route]]\nprefix = \"/\"\nupstream = http://127.0.0.1:1\n",
    );
    assert!(!ok);
    assert!(out.contains("ifmatch.toml:5: route.upstream: "), "{out}");
}

#[test]
fn unknown_keys_are_refused() {
    let (ok, out) = check(
        "[server]\nlisten = \"127.0.0.1:8080\"\n[[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nrequire_preconditions = true\n",
    );
    assert!(!ok);
    assert!(
        out.contains(":6: route.require_preconditions: unknown field"),
        "{out}"
    );
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/ifmatch.toml", "--check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read config /nonexistent/ifmatch.toml"));
}

/// `--check` shows the warnings a valid config gets at start, so that CI validating a config
/// sees them: a host's route that a longer host-less prefix takes requests from, no key.
#[test]
fn check_shows_the_warnings_a_start_would_log() {
    let (ok, out) = check(
        "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nhost = \"admin.example\"\nupstream = \"http://a:1\"\n[[route]]\nprefix = \"/docs/\"\nupstream = \"http://a:1\"\n",
    );
    assert!(ok, "{out}");
    assert!(out.contains("ok (2 routes)"), "{out}");
    assert!(out.contains("takes this host's requests"), "{out}");
    assert!(out.contains("no server.tag_key_file"), "{out}");

    // An https route without `ca_file` on a host with no CA roots (none where
    // SSL_CERT_FILE and SSL_CERT_DIR point): said too.
    let dir = common::TempDir::new("cli-roots");
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join("roots.pem"), "not a certificate\n").unwrap();
    let config = dir.join("ifmatch.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\nprefix = \"/\"\nupstream = \"https://a:1\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "--check"])
        .env("SSL_CERT_FILE", dir.join("roots.pem"))
        .env("SSL_CERT_DIR", dir.join("certs"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("https upstreams need ca_file"), "{err}");
}

/// A file that never ends, named where a config file, a key or a certificate belongs, is
/// refused within a bound instead of read until memory runs out (on a reload, the running
/// proxy's memory); a config that is not UTF-8 is refused naming the line.
#[test]
fn files_that_never_end_or_are_not_text_are_refused_saying_so() {
    let run = |args: &[&str]| {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                child.kill().unwrap();
                panic!("{args:?} still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let out = run(&["--config", "/dev/zero", "--check"]);
    assert!(
        out.contains("cannot read config /dev/zero: longer than 16384 KiB"),
        "{out}"
    );
    let base = "[server]\nlisten = \"127.0.0.1:1\"\n";
    let route = "[[route]]\nprefix = \"/\"\nupstream = \"http://a:1\"\n";
    let (ok, out) = check(&format!("{base}tag_key_file = \"/dev/urandom\"\n{route}"));
    assert!(!ok);
    assert!(
        out.contains(":3: server.tag_key_file: cannot read /dev/urandom: longer than 64 KiB"),
        "{out}"
    );
    let (ok, out) = check(&format!(
        "{base}[server.tls]\ncert = \"/dev/zero\"\nkey = \"/dev/zero\"\n{route}"
    ));
    assert!(!ok);
    assert!(out.contains("cannot read /dev/zero: longer than"), "{out}");
    let (ok, out) = check(&format!("{base}# caf\u{e9}\n{route}"));
    assert!(ok, "UTF-8 is fine: {out}");
    let dir = common::TempDir::new("cli-latin1");
    let path = dir.join("ifmatch.toml");
    let mut latin1 = base.as_bytes().to_vec();
    latin1.extend_from_slice(b"# caf\xe9\n");
    latin1.extend_from_slice(route.as_bytes());
    std::fs::write(&path, latin1).unwrap();
    let out = run(&["--config", path.to_str().unwrap(), "--check"]);
    assert!(
        out.contains("not UTF-8 text: line 3 holds a byte that is not"),
        "{out}"
    );
}

/// Kills the child on drop so a failing test leaves no process behind.
#[tokio::test]
async fn the_demo_serves_tags_304_412_428_and_409_as_it_says() {
    let mut child = common::binary::Reaped(
        Command::new(BIN)
            .args(["--demo", "--listen", "127.0.0.1:0"])
            // As in the image, which sets it: the demo needs no config and ignores it.
            .env("IFMATCH_CONFIG", "/nonexistent/ifmatch.toml")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rx = common::binary::lines_of(child.0.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let base = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo banner");
        if let Some(rest) = line.strip_prefix("ifmatch demo: proxy on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let c = Client::new();
    let url = format!("{base}/docs/hello");
    let r = c.get(&url, &[]).await;
    assert_eq!(r.status, 200);
    let tag = r.etag();
    assert_eq!(c.get(&url, &[("if-none-match", &tag)]).await.status, 304);
    assert_eq!(c.put(&url, &[("if-match", &tag)], "{}").await.status, 204);
    assert_eq!(c.put(&url, &[("if-match", &tag)], "{}").await.status, 412);
    assert_eq!(c.put(&url, &[], "{}").await.status, 428);
    let r = c
        .put(&format!("{base}/docs/archived"), &[("if-match", "*")], "{}")
        .await;
    assert_eq!(r.status, 409);
}

/// `ifmatch --demo | head -1`: the reader is gone before the walk-through is written. The
/// demo went down with a panic ("failed printing to stdout: Broken pipe"); it serves on.
#[tokio::test]
async fn the_demo_serves_on_when_its_stdout_is_a_closed_pipe() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both descriptors, which are then owned here.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let port = common::binary::free_port();
    let mut child = common::binary::Reaped(
        Command::new(BIN)
            .args(["--demo", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::from(write))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}/docs/hello");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the demo exited: {status}");
        }
        if let Ok(r) = Client::new().try_send("GET", &url, &[], "").await {
            break r.status;
        }
        assert!(Instant::now() < deadline, "the demo never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200);
    assert!(child.0.try_wait().unwrap().is_none(), "still running");
}

#[test]
fn the_demo_refuses_a_config_flag_beside_it() {
    let out = Command::new(BIN)
        .args(["--demo", "--config", "x.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'--demo' cannot be used with '--config"),
        "{err}"
    );
}

/// `--listen` is the demo's: beside `--check` as without it, a mistake said so, not a flag
/// dropped in silence (an operator would believe the proxy listens there).
#[test]
fn a_listen_flag_without_the_demo_is_refused_check_or_not() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    for extra in [&["--check"][..], &[]] {
        let out = Command::new(BIN)
            .args(["--config", config, "--listen", "127.0.0.1:9"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains("--demo"), "{extra:?}: {err}");
    }
}

#[test]
fn check_reports_every_schema_problem_too() {
    let (ok, out) = check(
        "[server]\nlisten = \"127.0.0.1:8080\"\nlistne = 1\n[[route]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nvalidation = \"never\"\nretries = 3\n",
    );
    assert!(!ok);
    for needle in [
        ":3: server.listne: unknown field",
        ":7: route.validation: unknown variant",
        ":8: route.retries: unknown field",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn the_config_path_can_come_from_ifmatch_config() {
    let out = Command::new(BIN)
        .arg("--check")
        .env(
            "IFMATCH_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("example.toml: ok"));
}
