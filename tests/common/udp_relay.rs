//! A UDP relay between QUIC clients and an edge that drops the datagrams a test names: a lossy
//! path on loopback, deterministic. Each client address gets its own upstream socket, so the edge
//! sees one stable address per client (its Retry tokens are bound to it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Which way a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToEdge,
    ToClient,
}

/// The QUIC packet type of a datagram's first packet (RFC 9000 §17; version 1 type bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An Initial; `token` says whether it carries an address-validation token.
    Initial {
        token: bool,
    },
    ZeroRtt,
    Handshake,
    Retry,
    Short,
}

impl Kind {
    pub fn of(d: &[u8]) -> Kind {
        let Some(&first) = d.first() else {
            return Kind::Short;
        };
        if first & 0x80 == 0 {
            return Kind::Short;
        }
        match (first >> 4) & 0x3 {
            0 => Kind::Initial {
                token: initial_token_len(d).is_some_and(|n| n > 0),
            },
            1 => Kind::ZeroRtt,
            2 => Kind::Handshake,
            _ => Kind::Retry,
        }
    }
}

/// The kinds of every packet in a datagram, in order: long-header packets may be coalesced
/// (RFC 9000 §12.2), a short-header one ends the datagram.
pub fn kinds(d: &[u8]) -> Vec<Kind> {
    let mut out = Vec::new();
    let mut rest = d;
    while !rest.is_empty() {
        let kind = Kind::of(rest);
        out.push(kind);
        match long_packet_len(rest) {
            Some(n) if matches!(kind, Kind::Initial { .. } | Kind::ZeroRtt | Kind::Handshake) => {
                rest = rest.get(n..).unwrap_or_default();
            }
            _ => break,
        }
    }
    out
}

/// A variable-length integer at `d[i..]` and the index after it (RFC 9000 §16).
fn varint(d: &[u8], i: usize) -> Option<(u64, usize)> {
    let first = *d.get(i)?;
    let len = 1usize << (first >> 6);
    let mut v = u64::from(first & 0x3f);
    for k in 1..len {
        v = (v << 8) | u64::from(*d.get(i + k)?);
    }
    Some((v, i + len))
}

/// The index after both connection IDs of a long header (RFC 9000 §17.2).
fn after_cids(d: &[u8]) -> Option<usize> {
    let mut i = 5;
    i += 1 + *d.get(i)? as usize;
    i += 1 + *d.get(i)? as usize;
    Some(i)
}

/// The token length of an Initial (RFC 9000 §17.2.2).
fn initial_token_len(d: &[u8]) -> Option<u64> {
    varint(d, after_cids(d)?).map(|(v, _)| v)
}

/// The whole length of the long-header packet at the start of `d` (Initial, 0-RTT, Handshake).
fn long_packet_len(d: &[u8]) -> Option<usize> {
    let mut i = after_cids(d)?;
    if matches!(Kind::of(d), Kind::Initial { .. }) {
        let (token, j) = varint(d, i)?;
        i = j + token as usize;
    }
    let (len, j) = varint(d, i)?;
    Some(j + len as usize)
}

/// Decides a datagram's fate from its direction and bytes: `true` drops it. It may also rewrite
/// the bytes in place (a hostile path).
pub type Policy = Box<dyn FnMut(Dir, &mut [u8]) -> bool + Send>;

pub struct UdpRelay {
    /// Where clients send.
    pub addr: SocketAddr,
    /// Every datagram seen, in order: its direction, the kind of its first packet, and whether it
    /// was dropped.
    pub log: Arc<Mutex<Vec<(Dir, Kind, bool)>>>,
    task: JoinHandle<()>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpRelay {
    /// Relays 127.0.0.1:<port 0> to `edge`, dropping (or rewriting) what `policy` says.
    pub async fn start(edge: SocketAddr, policy: Policy) -> UdpRelay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let policy = Arc::new(Mutex::new(policy));
        let (l, p) = (log.clone(), policy.clone());
        let task = tokio::spawn(async move {
            let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut back_tasks = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, client)) = front.recv_from(&mut buf).await {
                let up = match upstreams.get(&client) {
                    Some(u) => u.clone(),
                    None => {
                        let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        u.connect(edge).await.unwrap();
                        upstreams.insert(client, u.clone());
                        back_tasks.push(AbortOnDrop(tokio::spawn(back(
                            u.clone(),
                            front.clone(),
                            client,
                            l.clone(),
                            p.clone(),
                        ))));
                        u
                    }
                };
                let kind = Kind::of(&buf[..n]);
                let drop = (p.lock())(Dir::ToEdge, &mut buf[..n]);
                l.lock().push((Dir::ToEdge, kind, drop));
                if !drop {
                    let _ = up.send(&buf[..n]).await;
                }
            }
        });
        UdpRelay { addr, log, task }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The edge's datagrams back to `client`.
async fn back(
    up: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    log: Arc<Mutex<Vec<(Dir, Kind, bool)>>>,
    policy: Arc<Mutex<Policy>>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = up.recv(&mut buf).await {
        let kind = Kind::of(&buf[..n]);
        let drop = (policy.lock())(Dir::ToClient, &mut buf[..n]);
        log.lock().push((Dir::ToClient, kind, drop));
        if !drop {
            let _ = front.send_to(&buf[..n], client).await;
        }
    }
}

/// The destination and source connection IDs of a long header (RFC 9000 §17.2), as ranges.
pub fn long_cids(d: &[u8]) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let dcid_len = *d.get(5)? as usize;
    let dcid = 6..6 + dcid_len;
    let scid_len = *d.get(dcid.end)? as usize;
    let scid = dcid.end + 1..dcid.end + 1 + scid_len;
    (scid.end <= d.len()).then_some((dcid, scid))
}

/// Recomputes a Retry packet's integrity tag (its last 16 bytes) for the client's original
/// destination connection ID `odcid`, after its header was rewritten (RFC 9001 §5.8, QUIC v1).
pub fn reseal_retry(retry: &mut [u8], odcid: &[u8]) {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    const KEY: [u8; 16] = [
        0xbe, 0x0c, 0x69, 0x0b, 0x9f, 0x66, 0x57, 0x5a, 0x1d, 0x76, 0x6b, 0x54, 0xe3, 0x68, 0xc8,
        0x4e,
    ];
    const NONCE: [u8; 12] = [
        0x46, 0x15, 0x99, 0xd3, 0x5d, 0x63, 0x2b, 0xf2, 0x23, 0x98, 0x25, 0xbb,
    ];
    let body = retry.len() - 16;
    let mut pseudo = vec![odcid.len() as u8];
    pseudo.extend_from_slice(odcid);
    pseudo.extend_from_slice(&retry[..body]);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &KEY).unwrap());
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(NONCE),
            Aad::from(pseudo),
            &mut [],
        )
        .unwrap();
    retry[body..].copy_from_slice(tag.as_ref());
}
