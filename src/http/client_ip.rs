//! The client's address, for rate limits and a device's "last seen": the connection's
//! peer, or, when the peer is one of `listeners.trusted_proxies`, the right-most
//! address in the forwarding header (`X-Forwarded-For` or RFC 7239 `Forwarded`, as
//! `listeners.forwarded_header` says) that is not itself a trusted proxy. A header
//! from any other peer is ignored: clients cannot choose their own address.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use axum::{extract::ConnectInfo, http::HeaderMap, http::request::Parts};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::{ForwardedHeader, Listeners};

/// An address or a CIDR range (`10.0.0.0/8`, `::1`, `fd00::/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4 addresses seen through an IPv6 socket (`::ffff:1.2.3.4`) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr = canonical(addr.trim().parse().map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be a number from 0 to {max}"))?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The client's address for a request (empty if the connection's is unknown).
pub fn client_ip(parts: &Parts, listeners: &Listeners) -> String {
    let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
        return String::new();
    };
    resolve(peer.ip(), &parts.headers, listeners).to_string()
}

/// Walks the forwarding chain from the right while the hop that reported it is trusted.
fn resolve(peer: IpAddr, headers: &HeaderMap, listeners: &Listeners) -> IpAddr {
    let trusted = |ip: IpAddr| listeners.trusted_proxies.iter().any(|net| net.contains(ip));
    let mut client = canonical(peer);
    if !trusted(client) {
        return client;
    }
    let hops = match listeners.forwarded_header {
        ForwardedHeader::XForwardedFor => header_values(headers, "x-forwarded-for")
            .flat_map(|v| v.split(','))
            .map(|hop| parse_hop(hop.trim()))
            .collect::<Vec<_>>(),
        ForwardedHeader::Forwarded => header_values(headers, "forwarded")
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, value)| parse_hop(value.trim().trim_matches('"')))
            })
            .collect(),
    };
    for hop in hops.into_iter().rev() {
        if !trusted(client) {
            break;
        }
        // An entry that is not an address ("unknown", an obfuscated name, garbage)
        // ends the walk: the last trusted hop is the best that is known.
        match hop {
            Some(ip) => client = canonical(ip),
            None => break,
        }
    }
    client
}

fn header_values<'a>(headers: &'a HeaderMap, name: &'static str) -> impl Iterator<Item = &'a str> {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok())
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[').and_then(|h| h.strip_suffix(']')).and_then(|h| h.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listeners(trusted: &[&str], header: ForwardedHeader) -> Listeners {
        Listeners {
            trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            forwarded_header: header,
            ..Listeners::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.1.2.3")) && !net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.9.9.9")), "IPv4-mapped addresses count as IPv4");
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!("0.0.0.0/0".parse::<IpNet>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["", "10.0.0.0/33", "::/129", "example.org", "10.0.0.0/x"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn header_from_an_untrusted_peer_is_ignored() {
        let l = listeners(&["10.0.0.1"], ForwardedHeader::XForwardedFor);
        let h = headers(&[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(resolve(ip("203.0.113.9"), &h, &l), ip("203.0.113.9"));
        let none = listeners(&[], ForwardedHeader::XForwardedFor);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &none), ip("10.0.0.1"), "no trusted proxies: no header");
    }

    #[test]
    fn right_most_untrusted_address_is_the_client() {
        let l = listeners(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        // The client forged the first entry; the proxy appended the real address.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &l), ip("198.51.100.7"));
        // Two proxies in a row, the header split over two lines, with a port.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7:4711"), ("x-forwarded-for", "10.0.0.2")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &l), ip("198.51.100.7"));
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "198.51.100.7, nonsense")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &l), ip("10.0.0.1"));
        // No header: the proxy itself.
        assert_eq!(resolve(ip("10.0.0.1"), &HeaderMap::new(), &l), ip("10.0.0.1"));
        // Everything trusted: the left-most.
        let h = headers(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &l), ip("10.0.0.3"));
    }

    #[test]
    fn forwarded_header_rfc_7239() {
        let l = listeners(&["127.0.0.1", "::1"], ForwardedHeader::Forwarded);
        let h = headers(&[(
            "forwarded",
            r#"for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https;by=127.0.0.1, For=127.0.0.1"#,
        )]);
        assert_eq!(resolve(ip("::1"), &h, &l), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", "for=192.0.2.43;proto=http")]);
        assert_eq!(resolve(ip("127.0.0.1"), &h, &l), ip("192.0.2.43"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(resolve(ip("127.0.0.1"), &h, &l), ip("127.0.0.1"));
        // With `forwarded` chosen, a (client-written) X-Forwarded-For means nothing.
        let h = headers(&[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(resolve(ip("127.0.0.1"), &h, &l), ip("127.0.0.1"));
    }
}
