//! Interop with a stock web server: nginx with WebDAV PUT/DELETE/MKCOL/COPY/MOVE and ETags
//! off, the kind of legacy backend ifmatch is for. Ignored by a plain `cargo test` because it
//! needs an nginx binary; `.ci/run` installs nginx and runs it.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::route;
use common::{Client, Proxy};

/// nginx on 127.0.0.1 with a WebDAV location, stopped (and its files removed) on drop.
struct Nginx {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    async fn start() -> Self {
        let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nginx is not installed: run .ci/run, which installs it");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("ifmatch-nginx-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root/dav", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // nginx's workers may run as another user: let them write.
        Command::new("chmod")
            .args(["-R", "0777"])
            .arg(&dir)
            .status()
            .unwrap();
        let d = dir.display();
        let conf = format!(
            r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    etag off;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {d}/root;
        location /dav/ {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            create_full_put_path off;
        }}
    }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(nginx)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nginx did not start; see {d}/error.log"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, dir, port }
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn file(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join("root").join(path.trim_start_matches('/'))).ok()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker too. A SIGKILL would leave the worker
        // running, orphaned, holding the port.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
#[ignore = "needs nginx; .ci/run installs it and runs this"]
async fn conditional_writes_in_front_of_nginx_webdav() {
    let nginx = Nginx::start().await;
    let proxy = Proxy::start(&route("/", ""), &nginx.origin()).await;
    let c = Client::new();
    let url = proxy.url("/dav/doc.txt");

    // Create-only PUT: the second one is refused before nginx sees it.
    assert_eq!(
        c.put(&url, &[("if-none-match", "*")], "one").await.status,
        201
    );
    assert_eq!(
        c.put(&url, &[("if-none-match", "*")], "two").await.status,
        412
    );
    assert_eq!(nginx.file("/dav/doc.txt").as_deref(), Some("one"));

    // Read, write with the fresh tag, then the same tag again is stale.
    let tag = c.get(&url, &[]).await.etag();
    assert_eq!(c.get(&url, &[("if-none-match", &tag)]).await.status, 304);
    assert_eq!(
        c.put(&url, &[("if-match", &tag)], "three").await.status,
        204
    );
    let r = c.put(&url, &[("if-match", &tag)], "four").await;
    r.assert_problem(412);
    assert_eq!(nginx.file("/dav/doc.txt").as_deref(), Some("three"));

    // A change behind the proxy's back is seen (revalidate).
    let tag = c.get(&url, &[]).await.etag();
    std::fs::write(nginx.dir.join("root/dav/doc.txt"), "edited on disk").unwrap();
    assert_eq!(c.put(&url, &[("if-match", &tag)], "five").await.status, 412);

    // Dates: nginx sends Last-Modified, so If-Unmodified-Since can be judged.
    let r = c
        .put(
            &url,
            &[("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
            "six",
        )
        .await;
    assert_eq!(r.status, 412);
    let lm = c
        .get(&url, &[])
        .await
        .header("last-modified")
        .unwrap()
        .to_owned();
    let r = c.get(&url, &[("if-modified-since", &lm)]).await;
    assert_eq!(r.status, 304);
    assert!(
        r.header("etag").is_some(),
        "the 304 carries the proxy's ETag"
    );

    // DELETE: stale refused, fresh forwarded.
    let tag = c.get(&url, &[]).await.etag();
    assert_eq!(
        c.delete(&url, &[("if-match", "\"stale\"")]).await.status,
        412
    );
    assert!(nginx.file("/dav/doc.txt").is_some());
    assert_eq!(c.delete(&url, &[("if-match", &tag)]).await.status, 204);
    assert!(nginx.file("/dav/doc.txt").is_none());
}

#[tokio::test]
#[ignore = "needs nginx; .ci/run installs it and runs this"]
async fn nginx_409_passes_through_byte_for_byte() {
    let nginx = Nginx::start().await;
    let proxy = Proxy::start(&route("/", ""), &nginx.origin()).await;
    let c = Client::new();
    // MKCOL under a missing parent is a 409 Conflict in WebDAV (RFC 4918 §9.3.1).
    let direct = c
        .send(
            "MKCOL",
            &format!("{}/dav/missing/sub/", nginx.origin()),
            &[],
            "",
        )
        .await;
    let via = c
        .send("MKCOL", &proxy.url("/dav/missing/sub/"), &[], "")
        .await;
    assert_eq!(direct.status, 409);
    assert_eq!(via.status, 409);
    assert_eq!(via.body, direct.body);
    let strip = |h: &http::HeaderMap| {
        let mut h = h.clone();
        h.remove("date");
        h.remove("connection"); // hop-by-hop: never forwarded
        h
    };
    assert_eq!(strip(&via.headers), strip(&direct.headers));
}

#[tokio::test]
#[ignore = "needs nginx; .ci/run installs it and runs this"]
async fn thirty_two_writers_in_front_of_nginx_one_wins() {
    let nginx = Nginx::start().await;
    let proxy = Proxy::start(&route("/", ""), &nginx.origin()).await;
    let c = Client::new();
    let url = proxy.url("/dav/race.txt");
    assert_eq!(c.put(&url, &[], "v0").await.status, 201);
    for round in 0..10 {
        let tag = c.get(&url, &[]).await.etag();
        let (won, lost) = common::client::race(&c, &url, &tag, 32, round).await;
        assert_eq!((won, lost), (1, 31), "round {round}");
    }
}

#[tokio::test]
#[ignore = "needs nginx; .ci/run installs it and runs this"]
async fn tag_puts_matches_what_nginx_webdav_serves_back() {
    let nginx = Nginx::start().await;
    let proxy = Proxy::start(
        &route("/", "validation = \"cached\"\ntag_puts = true"),
        &nginx.origin(),
    )
    .await;
    let c = Client::new();
    let url = proxy.url("/dav/tagged.txt");

    // nginx stores a PUT body byte for byte: the tag the PUT answered with is the tag a GET
    // of the stored file gets, so a writer can go on from a PUT without reading.
    let r = c.put(&url, &[("if-none-match", "*")], "one").await;
    assert_eq!(r.status, 201);
    let from_put = r.etag();
    assert_eq!(c.get(&url, &[]).await.etag(), from_put);
    let r = c.put(&url, &[("if-match", &from_put)], "two").await;
    assert_eq!(r.status, 204);
    let from_put = r.etag();
    assert_eq!(c.get(&url, &[]).await.etag(), from_put);
    let r = c
        .put(&url, &[("if-match", &proxy.tag_of(b"one"))], "three")
        .await;
    r.assert_problem(412);
    assert_eq!(r.etag(), from_put);
    assert_eq!(nginx.file("/dav/tagged.txt").as_deref(), Some("two"));
}

/// nginx decodes `%2F` before it maps a path to a file, so `/dav/sub%2Fdoc` and
/// `/dav/x%2F..%2Fsub/doc` are its `/dav/sub/doc`: one lock and one tag in ifmatch too, or a
/// writer through one spelling slips past another's newer write (a lost update, here with
/// no race at all under `cached`).
#[tokio::test]
#[ignore = "needs nginx; .ci/run installs it and runs this"]
async fn spellings_of_a_slash_that_nginx_decodes_name_one_resource() {
    let nginx = Nginx::start().await;
    let proxy = Proxy::start(&route("/", "validation = \"cached\""), &nginx.origin()).await;
    let c = Client::new();
    assert_eq!(
        c.send("MKCOL", &proxy.url("/dav/sub/"), &[], "")
            .await
            .status,
        201
    );
    let plain = proxy.url("/dav/sub/doc");
    assert_eq!(c.put(&plain, &[], "v1").await.status, 201);
    for alias in ["/dav/sub%2Fdoc", "/dav/x%2F..%2Fsub/doc", "/dav%2fsub/doc"] {
        let alias = proxy.url(alias);
        let a = c.get(&alias, &[]).await;
        assert_eq!(
            a.text(),
            nginx.file("/dav/sub/doc").unwrap(),
            "{alias}: one file"
        );
        let b = c.get(&plain, &[]).await;
        assert_eq!(a.etag(), b.etag(), "{alias}");
        let next = format!("after {alias}");
        let r = c
            .put(&plain, &[("if-match", &b.etag())], next.clone())
            .await;
        assert_eq!(r.status, 204, "{alias}");
        // The alias's reader now holds a stale tag.
        let r = c.put(&alias, &[("if-match", &a.etag())], "lost?").await;
        assert_eq!(r.status, 412, "{alias}");
        assert_eq!(
            nginx.file("/dav/sub/doc").as_deref(),
            Some(next.as_str()),
            "{alias}"
        );
    }
}
