//! WebTransport handshakes over a lossy path, with address validation on (the default): a UDP
//! relay in front of the edge drops one chosen datagram of the exchange (the Retry, the client's
//! Initial with its token, the edge's first flight, the client's Handshake, ...), and the session
//! must still open well within the client's idle timeout: QUIC recovers each of these with a
//! probe after about a second (RFC 9002 §6.2). Issue 16's stall looked like a loss the Retry
//! exchange did not recover from; it was not one (see `benches/README.md`), but losing the
//! client's Handshake showed a race of its own: the edge could read the CONNECT before the
//! client's SETTINGS (see `server::quic::peer_settings`).

mod common;

use std::time::Duration;

use common::udp_relay::{Dir, Kind, Policy, UdpRelay, kinds, long_cids, reseal_retry};
use common::wt_client::{client_endpoint, try_open_url};
use common::{TestEdge, start};
use edgeplex::config::schema::ValidateAddressSetting;

/// A handshake that loses one datagram still opens within this (two probe timeouts with
/// backoff, 1 s + 2 s, and the rest of the exchange).
const RECOVERED_WITHIN: Duration = Duration::from_secs(8);

/// Drops the `n`-th (from 1) datagram going `dir` that holds a packet of `kind` (a datagram may
/// carry several: the client's Handshake goes out behind an Initial with its ACK).
fn drop_nth(dir: Dir, kind: Kind, n: usize) -> Policy {
    let mut seen = 0;
    Box::new(move |d, datagram| {
        if d == dir && kinds(datagram).contains(&kind) {
            seen += 1;
            return seen == n;
        }
        false
    })
}

/// Opens a session through `relay` within [`RECOVERED_WITHIN`].
async fn open_through(t: &TestEdge, relay: &UdpRelay) {
    let url = format!("https://127.0.0.1:{}/wt", relay.addr.port());
    let opened = tokio::time::timeout(
        RECOVERED_WITHIN,
        try_open_url(client_endpoint(t), &url, None),
    )
    .await;
    let log = relay.log.lock().clone();
    match opened {
        Ok(Ok(_wt)) => {}
        Ok(Err(e)) => panic!("the session failed: {e}; datagrams: {log:?}"),
        Err(_) => panic!("the handshake stalled; datagrams: {log:?}"),
    }
}

async fn opens_despite(dir: Dir, kind: Kind, n: usize) {
    let t = start(|f| f.webtransport.validate_address = ValidateAddressSetting::Switch(true)).await;
    let relay = UdpRelay::start(t.edge.quic_addr().unwrap(), drop_nth(dir, kind, n)).await;
    open_through(&t, &relay).await;
    let dropped = relay.log.lock().iter().filter(|(_, _, x)| *x).count();
    assert_eq!(
        dropped, 1,
        "a datagram with a {kind:?} going {dir:?} was dropped"
    );
}

#[tokio::test]
async fn a_lost_retry_is_recovered() {
    opens_despite(Dir::ToClient, Kind::Retry, 1).await;
}

#[tokio::test]
async fn a_lost_initial_with_the_token_is_recovered() {
    opens_despite(Dir::ToEdge, Kind::Initial { token: true }, 1).await;
}

#[tokio::test]
async fn a_lost_first_flight_of_the_edge_is_recovered() {
    opens_despite(Dir::ToClient, Kind::Initial { token: false }, 1).await;
}

#[tokio::test]
async fn a_lost_client_handshake_is_recovered() {
    opens_despite(Dir::ToEdge, Kind::Handshake, 1).await;
}

#[tokio::test]
async fn a_lost_first_short_packet_to_the_client_is_recovered() {
    opens_despite(Dir::ToClient, Kind::Short, 1).await;
}

#[tokio::test]
async fn a_lost_first_short_packet_to_the_edge_is_recovered() {
    opens_despite(Dir::ToEdge, Kind::Short, 1).await;
}

#[tokio::test]
async fn a_lost_first_initial_is_recovered() {
    opens_despite(Dir::ToEdge, Kind::Initial { token: false }, 1).await;
}

/// The stall of issue 16 itself, forced: a path that rewrites the second client's Retry so that
/// its connection ID is one the first client's connection uses (what quinn's default generator,
/// with 2^24 IDs, did by chance once in a few thousand handshakes; the edge's random 8-byte IDs
/// make it 2^-64 likely). quinn-proto 0.11.19 routes the client's Initials with that ID to the
/// first connection, which drops them, and the handshake waits out the client's idle timeout.
/// Ignored until quinn redraws a Retry's ID that is in use, or routes a retried Initial apart
/// (the issue and patch are in `benches/README.md`); a reproducer for it meanwhile.
#[tokio::test]
#[ignore = "quinn-proto 0.11.19 routes a retried Initial to a live connection with the same ID"]
async fn a_retry_whose_id_a_live_connection_uses_still_opens() {
    let t = start(|f| f.webtransport.validate_address = ValidateAddressSetting::Switch(true)).await;
    // The edge's first Initial names its ID for the first connection; each client's first
    // Initial names the original destination ID its Retry's tag covers.
    let mut live: Option<Vec<u8>> = None;
    let mut odcid: Vec<u8> = Vec::new();
    let mut retries = 0;
    let relay = UdpRelay::start(
        t.edge.quic_addr().unwrap(),
        Box::new(move |dir, d| {
            let Some((dcid, scid)) = long_cids(d) else {
                return false;
            };
            match (dir, Kind::of(d)) {
                (Dir::ToEdge, Kind::Initial { token: false }) => odcid = d[dcid].to_vec(),
                (Dir::ToClient, Kind::Initial { .. }) if live.is_none() => {
                    live = Some(d[scid].to_vec());
                }
                (Dir::ToClient, Kind::Retry) => {
                    retries += 1;
                    if let Some(id) = live
                        .as_ref()
                        .filter(|id| retries == 2 && id.len() == scid.len())
                    {
                        d[scid].copy_from_slice(id);
                        reseal_retry(d, &odcid);
                    }
                }
                _ => {}
            }
            false
        }),
    )
    .await;
    let url = format!("https://127.0.0.1:{}/wt", relay.addr.port());
    let _first = try_open_url(client_endpoint(&t), &url, None)
        .await
        .expect("the first session opens");
    open_through(&t, &relay).await;
}
