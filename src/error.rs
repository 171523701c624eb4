//! The one error type of the request path, and the only place that turns an error into a
//! response: an RFC 9457 `application/problem+json` body whose `detail` says what happened.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, RETRY_AFTER};
use http::{HeaderValue, Method, Response, StatusCode};

use crate::body::ProxyBody;
use crate::etag::ETag;
use crate::framing::FramingError;
use crate::precondition::{Failure, HeaderError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no route matches {path}")]
    NoRoute { path: String },

    #[error(transparent)]
    BadHeader(#[from] HeaderError),

    #[error(transparent)]
    BadFraming(#[from] FramingError),

    #[error("the request target {0}")]
    BadTarget(String),

    #[error("{method} is not supported: {}", unsupported_because(method))]
    MethodNotSupported { method: Method },

    #[error("the request head is larger than the limit of {limit} bytes")]
    HeadersTooLarge { limit: u64 },

    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },

    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),

    #[error("the request body could not be read: {0}")]
    BodyRead(String),

    #[error("{method} on this route requires If-Match, If-None-Match or If-Unmodified-Since; fetch the resource, then send its ETag in If-Match")]
    /// `method`: the method, or what a POST asked to be run as (`POST run as PUT by ...`).
    PreconditionRequired { method: String },

    #[error("{method} on this route requires a precondition, and its If-Unmodified-Since is not one valid HTTP-date (such as Sun, 06 Nov 1994 08:49:37 GMT), so it is ignored (RFC 9110 §13.1.4); send one, or fetch the resource, then send its ETag in If-Match")]
    PreconditionDateIgnored { method: String },

    #[error("{method} on this route requires a precondition, and this resource has no Last-Modified date, so If-Unmodified-Since guards nothing (RFC 9110 §13.1.4); fetch the resource, then send its ETag in If-Match")]
    PreconditionUndated { method: String },

    #[error("the precondition failed: {}", failed_because(*why))]
    PreconditionFailed { current: Option<ETag>, why: Failure },

    #[error("another write to this URL held its lock for longer than {0:?}; retry later")]
    LockTimeout(Duration),

    #[error("cannot connect to upstream {upstream}: {reason}")]
    UpstreamConnect { upstream: String, reason: String },

    /// EMFILE or ENFILE at the connect: the proxy's own limit, not the backend's fault.
    #[error("ifmatch ran out of file descriptors ({reason}) and could not open a connection to upstream {upstream}, which is not at fault: {hint}; retry later")]
    OutOfFiles {
        upstream: String,
        reason: String,
        /// Which limit to raise (`fds::exhausted`).
        hint: &'static str,
    },

    #[error("TLS with upstream {upstream} failed: {reason}{hint}")]
    UpstreamTls {
        upstream: String,
        reason: String,
        /// What to do about it, where that is known (`upstream::tls_hint`); may be empty.
        hint: &'static str,
    },

    /// `connecting`: the connection itself was not made within `connect_timeout`, which
    /// the message names apart from a backend slow to answer.
    #[error("upstream {upstream} {} within {after:?}", timed_out(*.connecting))]
    UpstreamTimeout {
        upstream: String,
        after: Duration,
        connecting: bool,
    },

    #[error("upstream {upstream} failed: {reason}")]
    Upstream { upstream: String, reason: String },

    #[error("upstream {upstream} has its upstream_max_connections ({limit}) open and busy, and none came free within {waited:?}; retry later")]
    UpstreamBusy {
        upstream: String,
        limit: usize,
        waited: Duration,
    },
}

/// Whose fault an error is: it picks the status class and the log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Proxy,
}

/// `e` and its sources, joined by ": ": hyper says "error reading a body from connection",
/// and only its source says what was wrong (an invalid chunk size, a connection closed).
pub fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // `#[error(transparent)]` wrappers repeat their source's text.
        if !text.ends_with(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

/// Why the proxy does not forward `method` (CONNECT or TRACE).
fn unsupported_because(method: &Method) -> &'static str {
    if method.as_str().eq_ignore_ascii_case("TRACE") {
        "ifmatch does not forward TRACE, which echoes the request's credentials back"
    } else {
        "ifmatch does not open tunnels"
    }
}

/// What a failed precondition found, for the 412's `detail`.
fn failed_because(why: Failure) -> &'static str {
    match why {
        Failure::Gone => "the resource has no current representation (it was deleted, or does not exist yet); fetch it again and retry",
        Failure::Untagged => "the resource exists but has no tag to match (its body is larger than the route's max_tag_body, or its answer is not a whole 200); send If-Match: * or If-Unmodified-Since instead, or raise max_tag_body",
        Failure::Changed => "the resource changed since the client read it; fetch it again and retry",
        Failure::WeakOrEmpty => "If-Match names the current tag only as a weak one (W/), which If-Match never matches (it compares strongly), or names no tag at all; send the ETag as the resource gave it",
        Failure::ModifiedSince => "the resource was modified after the date in If-Unmodified-Since; fetch it again and retry",
        Failure::Exists => "the resource exists already (If-None-Match: *)",
        Failure::Matches => "the resource's current tag is one that If-None-Match names; fetch it again and retry",
    }
}

// === impl Error ===

/// What an [`Error::UpstreamTimeout`] says ran out.
fn timed_out(connecting: bool) -> &'static str {
    match connecting {
        true => "could not be connected to (connect_timeout)",
        false => "did not answer",
    }
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::BadHeader(_) | Self::BadTarget(_) => StatusCode::BAD_REQUEST,
            Self::BadFraming(FramingError::UnsupportedEncoding(_)) => StatusCode::NOT_IMPLEMENTED,
            Self::BadFraming(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotSupported { .. } => StatusCode::NOT_IMPLEMENTED,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::PreconditionRequired { .. }
            | Self::PreconditionDateIgnored { .. }
            | Self::PreconditionUndated { .. } => StatusCode::PRECONDITION_REQUIRED,
            Self::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            // nginx answers 500 and blames itself; it passes once connections close, so 503.
            Self::LockTimeout(_) | Self::UpstreamBusy { .. } | Self::OutOfFiles { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamConnect { .. } | Self::UpstreamTls { .. } | Self::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            // Not the client's doing as far as anyone knows: worth an operator's look.
            Self::BadFraming(FramingError::Lost) => Blame::Proxy,
            Self::NoRoute { .. }
            | Self::BadHeader(_)
            | Self::BadTarget(_)
            | Self::BadFraming(_)
            | Self::MethodNotSupported { .. }
            | Self::HeadersTooLarge { .. }
            | Self::BodyTooLarge { .. }
            | Self::BodyTimeout(_)
            | Self::BodyRead(_)
            | Self::PreconditionRequired { .. }
            | Self::PreconditionDateIgnored { .. }
            | Self::PreconditionUndated { .. }
            | Self::PreconditionFailed { .. } => Blame::Client,
            Self::UpstreamConnect { .. }
            | Self::UpstreamTls { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamBusy { .. }
            | Self::Upstream { .. } => Blame::Upstream,
            Self::LockTimeout(_) | Self::OutOfFiles { .. } => Blame::Proxy,
        }
    }

    /// A short name for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::NoRoute { .. } => "no_route",
            Self::BadHeader(_) => "bad_header",
            Self::BadTarget(_) => "bad_target",
            Self::BadFraming(_) => "bad_framing",
            Self::MethodNotSupported { .. } => "method_not_supported",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::BodyRead(_) => "body_error",
            Self::PreconditionRequired { .. }
            | Self::PreconditionDateIgnored { .. }
            | Self::PreconditionUndated { .. } => "precondition_required",
            Self::PreconditionFailed { .. } => "precondition_failed",
            Self::LockTimeout(_) => "lock_timeout",
            Self::UpstreamConnect { .. } => "upstream_connect",
            Self::UpstreamTls { .. } => "upstream_tls",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::Upstream { .. } => "upstream_error",
            Self::UpstreamBusy { .. } => "upstream_busy",
            Self::OutOfFiles { .. } => "proxy_out_of_files",
        }
    }

    /// The request's body was left part-read, so an HTTP/1.1 connection cannot take another
    /// request after this answer (RFC 9110 §15.5.9).
    pub fn ends_connection(&self) -> bool {
        matches!(self, Self::BodyTimeout(_) | Self::BodyRead(_))
    }

    /// The problem+json response for this error, to a request of `method`: a HEAD's keeps
    /// the head (its `Content-Length` too) and has no body. hyper's HTTP/1 code leaves a
    /// HEAD response's body out itself; its HTTP/2 code sends it, which clients take for a
    /// protocol error (RFC 9113 §8.1.1) and never see the status.
    pub fn into_response_to(self, method: &Method) -> Response<ProxyBody> {
        let mut rsp = self.into_response();
        if method == Method::HEAD {
            let length = http_body::Body::size_hint(rsp.body()).exact().unwrap_or(0);
            rsp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(length));
            *rsp.body_mut() = ProxyBody::empty();
        }
        rsp
    }

    /// The problem+json response for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut rsp = problem(status, &self.to_string());
        let headers = rsp.headers_mut();
        match &self {
            Self::PreconditionFailed {
                current: Some(tag), ..
            } => {
                headers.insert(ETAG, tag.to_header());
            }
            Self::LockTimeout(_) | Self::UpstreamBusy { .. } | Self::OutOfFiles { .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        rsp
    }
}

/// A problem+json response (RFC 9457) with the status's reason as title: RFC 9110's, which
/// renamed 413 (the `http` crate still says "Payload Too Large").
pub fn problem(status: StatusCode, detail: &str) -> Response<ProxyBody> {
    let title = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "Content Too Large",
        _ => status.canonical_reason().unwrap_or("Error"),
    };
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut rsp = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    rsp
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn precondition_failed_is_a_412_problem_with_the_current_etag() {
        let tag = ETag::strong("abc").unwrap();
        let rsp = Error::PreconditionFailed {
            current: Some(tag.clone()),
            why: Failure::Changed,
        }
        .into_response();
        assert_eq!(rsp.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(rsp.headers()[ETAG], tag.to_header());
        assert_eq!(rsp.headers()[CONTENT_TYPE], "application/problem+json");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["status"], 412);
        assert_eq!(json["title"], "Precondition Failed");
        assert!(json["detail"].as_str().unwrap().contains("changed"));
        // Each failure says what failed, not that the resource changed.
        for (why, says) in [
            (Failure::Gone, "no current representation"),
            (Failure::WeakOrEmpty, "compares strongly"),
            (Failure::Untagged, "max_tag_body"),
            (
                Failure::ModifiedSince,
                "after the date in If-Unmodified-Since",
            ),
            (Failure::Exists, "exists already"),
            (Failure::Matches, "one that If-None-Match names"),
        ] {
            let e = Error::PreconditionFailed { current: None, why };
            assert!(e.to_string().contains(says), "{why:?}: {e}");
        }
    }

    #[test]
    fn statuses_by_error() {
        let up = || "http://a:1".to_owned();
        let cases = [
            (Error::NoRoute { path: "/x".into() }, 404),
            (
                Error::PreconditionRequired {
                    method: "PUT".into(),
                },
                428,
            ),
            (Error::LockTimeout(Duration::from_secs(1)), 503),
            (Error::BodyTimeout(Duration::from_secs(1)), 408),
            (Error::BodyRead("reset".into()), 400),
            (Error::BadTarget("b:80".into()), 400),
            (
                Error::UpstreamConnect {
                    upstream: up(),
                    reason: "refused".into(),
                },
                502,
            ),
            (
                Error::UpstreamTimeout {
                    upstream: up(),
                    after: Duration::from_secs(1),
                    connecting: false,
                },
                504,
            ),
            (
                Error::OutOfFiles {
                    upstream: up(),
                    reason: "Too many open files".into(),
                    hint: "",
                },
                503,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
        }
    }
}
