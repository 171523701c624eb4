//! A real HTTP client (hyper-util's pooled client) with a small request builder.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A response, read whole.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The `ETag` header; panics if there is none.
    pub fn etag(&self) -> String {
        self.header("etag")
            .unwrap_or_else(|| panic!("no ETag in {self:?}"))
            .to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (problem details, for instance).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// Asserts an RFC 9457 problem response with this status.
    pub fn assert_problem(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let p = self.json();
        assert_eq!(p["status"], status);
        assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()), "{p}");
        p
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

/// A connector for plain `http://` (the https type, so that one client type serves all).
pub fn plain() -> Connector {
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http)
}

impl Client {
    pub fn new() -> Self {
        let inner =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(plain());
        Self { inner }
    }

    /// An HTTP/2 client using prior knowledge (h2c).
    pub fn h2() -> Self {
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(plain());
        Self { inner }
    }

    pub fn from_inner(inner: hyper_util::client::legacy::Client<Connector, Full<Bytes>>) -> Self {
        Self { inner }
    }

    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.try_send(method, url, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    /// Like `send`, but a failed exchange (no response, or a body cut off) is an `Err`.
    pub async fn try_send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let mut req = Request::new(Full::new(body.into()));
        *req.method_mut() = Method::from_bytes(method.as_bytes()).unwrap();
        *req.uri_mut() = url.parse().unwrap();
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let rsp = self
            .inner
            .request(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = rsp.status().as_u16();
        let version = rsp.version();
        let (parts, body) = rsp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("status {status}, body cut off: {e:?}"))?
            .to_bytes();
        Ok(Reply {
            status,
            version,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", url, headers, Bytes::new()).await
    }

    pub async fn head(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("HEAD", url, headers, Bytes::new()).await
    }

    pub async fn put(&self, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        self.send("PUT", url, headers, body).await
    }

    pub async fn delete(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("DELETE", url, headers, Bytes::new()).await
    }
}

/// `writers` concurrent PUTs to `url`, all with `If-Match: tag`; returns how many got 204
/// and how many 412, and panics on any other status. Each body is unique (`round`, writer):
/// a write of the very bytes already there would leave the tag valid for the next writer.
pub async fn race(
    client: &Client,
    url: &str,
    tag: &str,
    writers: usize,
    round: usize,
) -> (usize, usize) {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (c, url, tag) = (client.clone(), url.to_owned(), tag.to_owned());
            tokio::spawn(async move {
                c.put(
                    &url,
                    &[("if-match", &tag)],
                    format!("round {round} writer {w}"),
                )
                .await
                .status
            })
        })
        .collect();
    let (mut won, mut lost) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            204 => won += 1,
            412 => lost += 1,
            other => panic!("unexpected status {other} in a race on {url}"),
        }
    }
    (won, lost)
}
