//! The conditional-write behaviour is the same on every protocol: HTTP/1.1, HTTP/2 with prior
//! knowledge (h2c), and both over TLS (HTTP/2 chosen by ALPN).

mod common;

use common::proxy::route;
use common::tls::{KeyType, Pki};
use common::{Backend, Client, Proxy};
use http::Version;

struct Case {
    name: &'static str,
    client: Client,
    version: Version,
    tls: bool,
}

fn cases(pki: &Pki) -> Vec<Case> {
    vec![
        Case {
            name: "HTTP/1.1",
            client: Client::new(),
            version: Version::HTTP_11,
            tls: false,
        },
        Case {
            name: "h2c",
            client: Client::h2(),
            version: Version::HTTP_2,
            tls: false,
        },
        Case {
            name: "HTTP/1.1 over TLS",
            client: Client::tls(&pki.ca_pem, false),
            version: Version::HTTP_11,
            tls: true,
        },
        Case {
            name: "h2 over TLS",
            client: Client::tls(&pki.ca_pem, true),
            version: Version::HTTP_2,
            tls: true,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_cases_behave_alike_on_every_protocol() {
    let pki = Pki::new("protocols", KeyType::EcdsaP256);
    for case in cases(&pki) {
        let backend = Backend::start().await;
        backend.store.put("/docs/a", "v1");
        let extra = if case.tls {
            pki.server_toml()
        } else {
            String::new()
        };
        let proxy = Proxy::start_with(&route("/docs/", ""), &backend.origin(), &extra).await;
        let url = |p: &str| {
            if case.tls {
                proxy.https_url(p)
            } else {
                proxy.url(p)
            }
        };
        let c = &case.client;
        let n = case.name;

        let r = c.get(&url("/docs/a"), &[]).await;
        assert_eq!((r.status, r.version), (200, case.version), "{n}");
        let tag = r.etag();
        assert_eq!(tag, proxy.tag_of("v1"), "{n}");
        let r = c.get(&url("/docs/a"), &[("if-none-match", &tag)]).await;
        assert_eq!(r.status, 304, "{n}");
        let r = c
            .put(&url("/docs/a"), &[("if-match", "\"stale\"")], "x")
            .await;
        assert_eq!(r.status, 412, "{n}");
        assert_eq!(
            backend.store.writes(),
            0,
            "{n}: the stale write was not forwarded"
        );
        let r = c.put(&url("/docs/a"), &[("if-match", &tag)], "v2").await;
        assert_eq!(r.status, 204, "{n}");
        assert_eq!(r.version, case.version, "{n}");

        let tag = c.get(&url("/docs/a"), &[]).await.etag();
        let before = backend.store.writes();
        let (won, lost) = common::client::race(c, &url("/docs/a"), &tag, 32, 0).await;
        assert_eq!((won, lost), (1, 31), "{n}");
        assert_eq!(backend.store.writes(), before + 1, "{n}");
    }
}
