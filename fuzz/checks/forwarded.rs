//! Invariants of client address resolution (`edgeplex::admission::client_ip`) on one input.
//! Shared by the fuzz target `forwarded` and `tests/fuzz_regressions.rs`. The input is the value of
//! a `Forwarded` header on the first line and of `X-Forwarded-For` on the second, sent by a peer
//! that is a trusted proxy (so the headers are read).

use std::net::IpAddr;

use edgeplex::admission::client_ip::{
    ForwardedHeader, canonical, forwarded_for, group, resolve, x_forwarded_for,
};
use http::{HeaderMap, HeaderValue};

pub fn check_forwarded(input: &[u8]) {
    let mut parts = input.splitn(2, |b| *b == b'\n');
    let forwarded = parts.next().unwrap_or_default();
    let xff = parts.next().unwrap_or_default();
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
    for (name, value) in [("forwarded", forwarded), ("x-forwarded-for", xff)] {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let hops = match value.to_str() {
            Ok(text) if name == "forwarded" => forwarded_for(text),
            Ok(text) => x_forwarded_for(text),
            Err(_) => Vec::new(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(name, value.clone());
        let which = if name == "forwarded" {
            ForwardedHeader::Forwarded
        } else {
            ForwardedHeader::XForwardedFor
        };
        let client = resolve(peer, &headers, &trusted, which);
        // The client is the peer or an address the header named; never IPv4-mapped IPv6.
        assert_eq!(canonical(client), client, "{client} is not canonical");
        let named = client == peer || hops.iter().flatten().any(|h| canonical(*h) == client);
        assert!(named, "{client} is neither the peer nor in {hops:?}");
        // Nothing the client wrote left of an untrusted hop is believed: the result is the
        // rightmost untrusted hop, or a trusted one when there is none.
        let untrusted: Vec<IpAddr> = hops
            .iter()
            .flatten()
            .map(|h| canonical(*h))
            .filter(|h| !trusted.iter().any(|n: &ipnet::IpNet| n.contains(h)))
            .collect();
        if trusted.iter().any(|n: &ipnet::IpNet| !n.contains(&client)) {
            assert_eq!(
                Some(&client),
                untrusted.last(),
                "an untrusted client must be the rightmost untrusted hop"
            );
        }
        // Grouping is idempotent and never lengthens an address.
        for prefix in [16u8, 48, 64, 128] {
            let g = group(client, prefix);
            assert_eq!(group(g, prefix), g);
        }
    }
}
