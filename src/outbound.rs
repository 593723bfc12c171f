//! The one HTTP(S) client the edge calls out with: backend hooks now, the JWKS refresher later.
//!
//! It owns the connection pool (keep-alive, a bounded number of idle connections per host), the
//! TLS client config (rustls on ring, roots from the OS store plus an optional CA file) and the
//! two rules every call out obeys: one deadline covers connecting, sending and reading the whole
//! answer, and an answer is read under a byte cap, so a stalled or buggy service costs the edge a
//! bounded wait and bounded memory. It knows nothing of what is sent or what an answer means;
//! callers own their bodies, their metrics and their logs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Idle connections kept per host. Enough for a busy node's steady hook traffic over HTTP/1.1
/// (one connection per call in flight) without holding hundreds of sockets after a burst.
pub const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// An idle pooled connection is closed after this. Shorter than the keep-alive of common app
/// servers (gunicorn 2 s, Node.js 5 s): a connection the server closes while we pick it up fails
/// a POST that cannot be retried, so ours must go first. Busy traffic never idles this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

static AGENT: HeaderValue =
    HeaderValue::from_static(concat!("edgeplex/", env!("CARGO_PKG_VERSION")));

/// Why a call out failed. Every variant is the far side's doing (or the network's), except the
/// CA ones, which are the operator's config.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot read the CA file {path}: {source}")]
    CaRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA file {path} holds no usable PEM certificate{detail}")]
    CaInvalid { path: PathBuf, detail: String },
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, the TLS handshake, or sending the request failed.
    #[error("request failed: {0}")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the answer failed: {0}")]
    Body(String),
    #[error("cannot build the request: {0}")]
    Build(#[from] http::Error),
}

impl OutboundError {
    /// A short stable name for metrics and logs: which way the call failed.
    pub fn kind(&self) -> &'static str {
        match self {
            OutboundError::CaRead { .. } | OutboundError::CaInvalid { .. } => "config",
            OutboundError::Tls(_) | OutboundError::Build(_) => "config",
            OutboundError::Timeout(_) => "timeout",
            OutboundError::Request(_) => "unreachable",
            OutboundError::TooLarge(_) | OutboundError::Body(_) => "answer",
        }
    }
}

/// A pooled HTTP/1.1 and HTTP/2 (by ALPN over TLS) client. Cheap to clone: clones share the pool.
#[derive(Clone, Debug)]
pub struct Outbound {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Outbound {
    /// A client trusting the OS's roots, and also the certificates of the PEM file `ca` (a
    /// private PKI, or a test's self-signed certificate). Needs no runtime; the pool's timer
    /// does when the first call is made.
    pub fn new(ca: Option<&Path>) -> Result<Outbound, OutboundError> {
        let mut roots = rustls::RootCertStore::empty();
        // A host without a CA bundle (a slim container) still reaches a service whose CA is in
        // `ca`; failures to load single system certificates are not ours to fix.
        let native = rustls_native_certs::load_native_certs();
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            tracing::debug!(
                ignored,
                errors = native.errors.len(),
                "outbound TLS: no system root certificates found"
            );
        }
        if let Some(path) = ca {
            for cert in read_ca(path)? {
                roots.add(cert).map_err(|e| OutboundError::CaInvalid {
                    path: path.to_owned(),
                    detail: format!(": {e}"),
                })?;
            }
        }
        // The provider is named here rather than taken from the process default, so an
        // embedder that never installed one still gets ring, and never another.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        // A hook call is one small request waiting for one small answer: Nagle only adds delay.
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Ok(Outbound { client })
    }

    /// `POST url` with a JSON body; the status and the whole answer body, read within `timeout`
    /// (from the start of the call) and at most `max_answer_bytes`.
    pub async fn post_json(
        &self,
        url: &Uri,
        body: Bytes,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<(StatusCode, Bytes), OutboundError> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, AGENT.clone())
            .body(Full::new(body))?;
        self.send(request, timeout, max_answer_bytes).await
    }

    /// `GET url`; the status and the whole answer body, under the same rules as
    /// [`Outbound::post_json`].
    pub async fn get(
        &self,
        url: &Uri,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<(StatusCode, Bytes), OutboundError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(url.clone())
            .header(USER_AGENT, AGENT.clone())
            .body(Full::new(Bytes::new()))?;
        self.send(request, timeout, max_answer_bytes).await
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<(StatusCode, Bytes), OutboundError> {
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(OutboundError::Request)?;
            let status = response.status();
            // A connection whose answer was cut short (cap, deadline) is dropped, not pooled:
            // hyper only returns a connection whose answer was read to the end.
            let body = Limited::new(response.into_body(), max_answer_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        OutboundError::TooLarge(max_answer_bytes)
                    } else {
                        OutboundError::Body(e.to_string())
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| OutboundError::Timeout(timeout))?
    }
}

fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, OutboundError> {
    let pem = std::fs::read(path).map_err(|source| OutboundError::CaRead {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OutboundError::CaInvalid {
            path: path.to_owned(),
            detail: format!(": {e}"),
        })?;
    if certs.is_empty() {
        return Err(OutboundError::CaInvalid {
            path: path.to_owned(),
            detail: String::new(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = Outbound::new(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("no usable PEM"), "{e}");
        let e = Outbound::new(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
    }
}
