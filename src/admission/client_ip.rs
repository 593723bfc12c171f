//! Who the client is: the address every per-IP limit is keyed by. Pure functions of the socket
//! peer, the request headers and the trusted-proxy list; no I/O, so they are unit-tested and
//! fuzzed (`fuzz/fuzz_targets/forwarded.rs`).
//!
//! The socket peer is the client unless it is a trusted proxy. Then the one forwarding header
//! the proxies write (`admission.forwarded_header`: `X-Forwarded-For`, or RFC 7239 `Forwarded`)
//! is read from the right (the hop nearest to us) leftwards, skipping trusted proxies: the first
//! address that is not one is the client. Everything left of it was written by the client itself
//! and is ignored, so a client cannot pick its own key. The other header is never read: proxies
//! pass a client's own copy of the header they do not write through untouched. An element that is
//! not an address (`unknown`, an obfuscated `_id`, garbage, a byte that is not ASCII) ends the walk
//! at the last address known.
//!
//! The walk is lazy from the right and looks at each element on its own: what the client wrote
//! (any number of elements, any bytes) sits left of what our proxies appended, so it is never
//! parsed unless every hop right of it is a trusted proxy, and it cannot push the proxies'
//! elements out of the window of [`MAX_HOPS`] read. Several header lines are one list, in order.
//!
//! IPv6 clients are grouped by a prefix (default /64, what one host or home usually gets), so a
//! host cannot dodge its limits by rotating through its own addresses.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;
use ipnet::IpNet;

/// The most forwarding elements read from a request, counted from the right: a chain of trusted
/// proxies longer than this is not a deployment, it is a client padding the header.
pub const MAX_HOPS: usize = 32;

/// Which forwarding header trusted proxies write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub enum ForwardedHeader {
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Forwarded,
}

impl ForwardedHeader {
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }

    /// The address of one element of this header (the bytes between two commas), or `None`
    /// when it names none.
    pub fn hop(self, element: &[u8]) -> Option<IpAddr> {
        // Addresses, ports and the `for=` token are ASCII; anything else is not an address.
        let element = std::str::from_utf8(element).ok()?;
        match self {
            ForwardedHeader::XForwardedFor => parse_element(element.trim()),
            ForwardedHeader::Forwarded => element
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                .and_then(|(_, v)| parse_element(v.trim().trim_matches('"'))),
        }
    }
}

/// The client address of a request that arrived from `peer`.
pub fn resolve(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    // Right to left: the last header line first, and in each line its last element first.
    let elements = headers
        .get_all(header.name())
        .iter()
        .rev()
        .flat_map(|line| line.as_bytes().rsplit(|b| *b == b','));
    let mut client = peer;
    for element in elements.take(MAX_HOPS) {
        match header.hop(element) {
            Some(ip) => {
                client = canonical(ip);
                if !is_trusted(client, trusted) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// One forwarding element: `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1`, `[2001:db8::1]:8080`.
fn parse_element(e: &str) -> Option<IpAddr> {
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    // `a.b.c.d:port`; a bare IPv6 address has more than one colon and parsed above.
    let (ip, port) = e.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// IPv4-mapped IPv6 (`::ffff:192.0.2.1`, what a dual-stack socket reports) is the IPv4 client.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The key a client's per-IP state is kept under: IPv4 as is, IPv6 cut to `v6_prefix` bits.
pub fn group(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = match v6_prefix {
                0 => 0,
                p if p >= 128 => u128::MAX,
                p => u128::MAX << (128 - u32::from(p)),
            };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;
    const FWD: ForwardedHeader = ForwardedHeader::Forwarded;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(
            resolve(ip("9.9.9.9"), &h, &nets(&["10.0.0.0/8"]), XFF),
            ip("9.9.9.9")
        );
        assert_eq!(resolve(ip("9.9.9.9"), &h, &[], XFF), ip("9.9.9.9"));
    }

    #[test]
    fn behind_trusted_proxies_the_first_untrusted_hop_from_the_right() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client wrote 6.6.6.6 itself; our proxies appended 1.2.3.4 and 10.0.0.2.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.2")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, XFF), ip("1.2.3.4"));
        // Several header lines are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "1.2.3.4"),
        ]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, XFF), ip("1.2.3.4"));
        // No header: the proxy itself.
        assert_eq!(
            resolve(ip("10.0.0.1"), &HeaderMap::new(), &trusted, XFF),
            ip("10.0.0.1")
        );
        // Every hop trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, XFF), ip("10.1.1.1"));
    }

    #[test]
    fn only_the_configured_header_is_read_and_its_forms_parse() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "7.7.7.7"),
            (
                "forwarded",
                r#"for=6.6.6.6;proto=https, For="[2001:db8:cafe::17]:4711";by=10.0.0.9"#,
            ),
        ]);
        assert_eq!(
            resolve(ip("10.0.0.1"), &h, &trusted, FWD),
            ip("2001:db8:cafe::17")
        );
        // A proxy that writes X-Forwarded-For passes the client's own Forwarded through:
        // that one must not be read.
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, XFF), ip("7.7.7.7"));
        let h = headers(&[("forwarded", "for=192.0.2.60:8080")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, FWD), ip("192.0.2.60"));
        assert_eq!(
            resolve(ip("10.0.0.1"), &h, &trusted, XFF),
            ip("10.0.0.1"),
            "no X-Forwarded-For: the proxy itself"
        );
    }

    #[test]
    fn an_unusable_element_stops_the_walk_at_the_last_known_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        for v in [
            "unknown",
            "_hidden",
            "not an address",
            "1.2.3.4:notaport",
            "",
        ] {
            let h = headers(&[("x-forwarded-for", &format!("6.6.6.6, {v}, 10.0.0.5"))]);
            assert_eq!(
                resolve(ip("10.0.0.1"), &h, &trusted, XFF),
                ip("10.0.0.5"),
                "{v}"
            );
        }
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, FWD), ip("10.0.0.1"));
    }

    /// The outside review's reproduction: 70 elements the client wrote, then the one address
    /// the proxy appended. Keeping the leftmost elements made the client `1.1.1.63`.
    #[test]
    fn a_client_cannot_push_the_proxys_element_out_by_padding() {
        let trusted = nets(&["127.0.0.1/32"]);
        let mut chain = vec!["9.9.9.9".to_string()];
        chain.extend((1..=70).map(|i| format!("1.1.1.{i}")));
        chain.push("5.5.5.5".into());
        let h = headers(&[("x-forwarded-for", &chain.join(", "))]);
        assert_eq!(resolve(ip("127.0.0.1"), &h, &trusted, XFF), ip("5.5.5.5"));
        // The same padding on header lines of its own, and in `Forwarded`.
        let mut h = HeaderMap::new();
        for c in &chain {
            h.append("x-forwarded-for", c.parse().unwrap());
        }
        assert_eq!(resolve(ip("127.0.0.1"), &h, &trusted, XFF), ip("5.5.5.5"));
        let fwd: Vec<String> = chain.iter().map(|c| format!("for={c}")).collect();
        let h = headers(&[("forwarded", &fwd.join(", "))]);
        assert_eq!(resolve(ip("127.0.0.1"), &h, &trusted, FWD), ip("5.5.5.5"));
    }

    /// One byte that is not ASCII, anywhere the client writes, used to make the whole header
    /// unreadable and the client the proxy itself.
    #[test]
    fn a_byte_that_is_not_ascii_spoils_only_its_own_element() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        let value = http::HeaderValue::from_bytes(b"6.6.6.\xff6, 1.2.3.4, 10.0.0.2").unwrap();
        h.insert("x-forwarded-for", value);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, XFF), ip("1.2.3.4"));
        let mut h = HeaderMap::new();
        let value = http::HeaderValue::from_bytes(b"for=\"\xe2\x80\x8b\", for=1.2.3.4").unwrap();
        h.insert("forwarded", value);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, FWD), ip("1.2.3.4"));
        // Right of every trusted hop it still ends the walk, at the last address known.
        let mut h = HeaderMap::new();
        let value = http::HeaderValue::from_bytes(b"1.2.3.4, \xff, 10.0.0.2").unwrap();
        h.insert("x-forwarded-for", value);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, XFF), ip("10.0.0.2"));
    }

    #[test]
    fn a_padded_chain_is_read_only_so_far() {
        let trusted = nets(&["10.0.0.0/8"]);
        let long = vec!["10.9.9.9"; 100].join(", ");
        let h = headers(&[("x-forwarded-for", &format!("6.6.6.6, {long}"))]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted, XFF), ip("10.9.9.9"));
    }

    #[test]
    fn ipv6_groups_by_prefix_and_mapped_ipv4_is_ipv4() {
        assert_eq!(group(ip("2001:db8:1:2:aaaa::1"), 64), ip("2001:db8:1:2::"));
        assert_eq!(group(ip("2001:db8:1:2:aaaa::1"), 48), ip("2001:db8:1::"));
        assert_eq!(group(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(group(ip("2001:db8::1"), 0), ip("::"));
        assert_eq!(group(ip("::ffff:192.0.2.1"), 64), ip("192.0.2.1"));
        assert_eq!(group(ip("192.0.2.1"), 64), ip("192.0.2.1"));
        let trusted = nets(&["192.0.2.0/24"]);
        assert_eq!(
            resolve(ip("::ffff:192.0.2.1"), &HeaderMap::new(), &trusted, XFF),
            ip("192.0.2.1")
        );
    }
}
