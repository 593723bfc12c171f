//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on the public TCP listeners, for load
//! balancers that pass the client's address in front of the TLS bytes instead of in an HTTP
//! header (`server.proxy_protocol`).
//!
//! With it on, every connection must start with a header, and only from a trusted proxy
//! (`admission.trusted_proxies`): anyone else could claim any address. The header's source
//! address then stands in for the socket peer everywhere (limits, logs). A `LOCAL` header (the
//! proxy's own health check) keeps the socket peer. This module reads and checks the header and
//! nothing else: parsing is ppp's.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header accepted: v1 is at most 107 bytes, v2 with addresses 232; the rest leaves
/// room for a load balancer's TLVs without letting a peer make us buffer much.
const MAX_HEADER: usize = 1024;

/// How long to wait before looking again when the header arrived in pieces (senders are asked to
/// send it at once, so this is rare).
const PARTIAL_RETRY: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection closed before a PROXY header")]
    Closed,
    #[error("no valid PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY header at the start of `stream`, consuming exactly its bytes, and returns the
/// client address it carries (`None` for `LOCAL` or `UNKNOWN`). The caller bounds the time.
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        // Peek, so the bytes after the header stay in the socket for TLS.
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let parsed = HeaderResult::parse(&buf[..n]);
        if parsed.is_incomplete() {
            if n == MAX_HEADER {
                return Err(ProxyHeaderError::TooLong);
            }
            tokio::time::sleep(PARTIAL_RETRY).await;
            continue;
        }
        let (len, source) = match parsed {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_source(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_source(&h)),
            HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::Malformed(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::Malformed(e.to_string())),
        };
        let mut header = vec![0u8; len];
        stream.read_exact(&mut header).await?;
        return Ok(source);
    }
}

fn v1_source(a: &v1::Addresses) -> Option<SocketAddr> {
    match a {
        v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match &h.addresses {
        v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}
