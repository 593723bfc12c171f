//! Invariants of client address resolution (`edgeplex::admission::client_ip`) on one input.
//! Shared by the fuzz target `forwarded` and `tests/fuzz_regressions.rs`. The input is the value of
//! a `Forwarded` header on the first line and of `X-Forwarded-For` on the second, sent by a peer
//! that is a trusted proxy (so the headers are read).
//!
//! The reference below is written apart from the edge's parser on purpose, and the other way
//! round: it splits the whole header into every element first (no window while splitting), parses
//! each with its own small grammar, and only then keeps the rightmost `MAX_HOPS`. A resolver that
//! truncates from the wrong end, lets one bad byte spoil a whole header, or reads past its window
//! disagrees with it. The same value sent as two header lines must resolve the same.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use edgeplex::admission::client_ip::{ForwardedHeader, MAX_HOPS, canonical, group, resolve};
use http::{HeaderMap, HeaderValue};

pub fn check_forwarded(input: &[u8]) {
    let mut parts = input.splitn(2, |b| *b == b'\n');
    let forwarded = parts.next().unwrap_or_default();
    let xff = parts.next().unwrap_or_default();
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
    for (which, value) in [
        (ForwardedHeader::Forwarded, forwarded),
        (ForwardedHeader::XForwardedFor, xff),
    ] {
        let Ok(header_value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let mut headers = HeaderMap::new();
        headers.insert(which.name(), header_value);
        let client = resolve(peer, &headers, &trusted, which);
        let expected = reference(peer, value, &trusted, which);
        assert_eq!(client, expected, "resolve disagrees with the reference");
        assert_eq!(canonical(client), client, "{client} is not canonical");

        // Header lines are one list: cut the value at a comma into two lines.
        if let Some(cut) = value.iter().position(|b| *b == b',') {
            let (a, b) = (&value[..cut], &value[cut + 1..]);
            if let (Ok(a), Ok(b)) = (HeaderValue::from_bytes(a), HeaderValue::from_bytes(b)) {
                let mut headers = HeaderMap::new();
                headers.append(which.name(), a);
                headers.append(which.name(), b);
                assert_eq!(
                    resolve(peer, &headers, &trusted, which),
                    client,
                    "two header lines resolve unlike one"
                );
            }
        }

        // Grouping is idempotent and never lengthens an address.
        for prefix in [16u8, 48, 64, 128] {
            let g = group(client, prefix);
            assert_eq!(group(g, prefix), g);
        }
    }
}

/// The client by the rule of the README, computed the long way.
fn reference(
    peer: IpAddr,
    value: &[u8],
    trusted: &[ipnet::IpNet],
    which: ForwardedHeader,
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut elements: Vec<Option<IpAddr>> = Vec::new();
    let mut start = 0;
    for (i, b) in value.iter().enumerate() {
        if *b == b',' {
            elements.push(ref_hop(&value[start..i], which));
            start = i + 1;
        }
    }
    elements.push(ref_hop(&value[start..], which));
    let window = &elements[elements.len().saturating_sub(MAX_HOPS)..];
    let mut client = peer;
    for hop in window.iter().rev() {
        let Some(ip) = hop else { break };
        client = ref_canonical(*ip);
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

fn ref_hop(element: &[u8], which: ForwardedHeader) -> Option<IpAddr> {
    if !element.is_ascii() {
        return None;
    }
    let text: String = element.iter().map(|b| *b as char).collect();
    let text = text.trim_matches(|c| c == ' ' || c == '\t');
    let addr = match which {
        ForwardedHeader::XForwardedFor => text.to_string(),
        ForwardedHeader::Forwarded => {
            let mut found = None;
            for pair in text.split(';') {
                let Some(eq) = pair.find('=') else { continue };
                if pair[..eq].trim().eq_ignore_ascii_case("for") {
                    found = Some(pair[eq + 1..].trim().trim_matches('"').to_string());
                    break;
                }
            }
            found?
        }
    };
    ref_address(&addr)
}

/// `a.b.c.d`, `a.b.c.d:port`, a bare IPv6 address, or `[IPv6]` with an optional `:port`.
fn ref_address(s: &str) -> Option<IpAddr> {
    if let Some(inner) = s.strip_prefix('[') {
        let close = inner.find(']')?;
        return inner[..close].parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if s.matches(':').count() >= 2 {
        return s.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    match s.split_once(':') {
        None => s.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        Some((ip, port)) => {
            port.parse::<u16>().ok()?;
            ip.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
        }
    }
}

fn ref_canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.octets() {
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] => {
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            _ => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}
