//! Server discovery (server-server API, "Resolving server names"): where to connect for
//! a server name, which name the TLS certificate must carry and which `Host` header to
//! send. Private and loopback addresses are refused unless the config allows them.

use std::net::{IpAddr, SocketAddr};

use ruma::ServerName;

use crate::error::{Error, Result};

/// The port federation uses when nothing says otherwise.
pub const DEFAULT_PORT: u16 = 8448;

/// Where to send requests for one server name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The host to put in the URL: the name the TLS certificate must be valid for (and
    /// the SNI sent), or an IP literal.
    pub tls_name: String,
    /// The port to connect to.
    pub port: u16,
    /// The value of the `Host` header.
    pub host_header: String,
    /// The addresses to connect to, in order (already checked against the
    /// private-address rule). Empty when `tls_name` is an IP literal.
    pub addrs: Vec<SocketAddr>,
}

/// Resolves server names. This first version knows IP literals and explicit ports only;
/// `.well-known`, SRV records, caching and backoff come next.
pub struct Resolver {
    allow_private: bool,
}

impl Resolver {
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private }
    }

    /// Where to connect for `server`.
    pub async fn resolve(&self, server: &ServerName) -> Result<Destination> {
        let host = server.host();
        let port = server.port().unwrap_or(DEFAULT_PORT);
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            self.check_address(ip)?;
            return Ok(Destination {
                tls_name: literal.to_owned(),
                port,
                host_header: server.as_str().to_owned(),
                addrs: vec![SocketAddr::new(ip, port)],
            });
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::federation(format!("cannot resolve {server}: {e}")))?
            .filter(|a| self.check_address(a.ip()).is_ok())
            .collect();
        if addrs.is_empty() {
            return Err(Error::federation(format!("{server} has no public address")));
        }
        Ok(Destination { tls_name: host.to_owned(), port, host_header: server.as_str().to_owned(), addrs })
    }

    /// Refuses loopback, private, link-local and other non-public addresses unless
    /// `allow_private_destinations` is set.
    pub fn check_address(&self, ip: IpAddr) -> Result<()> {
        if self.allow_private || is_public(ip) {
            Ok(())
        } else {
            Err(Error::federation(format!("refusing to contact the non-public address {ip}")))
        }
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (CGNAT)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_loopback_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "100.64.0.1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} should not be public");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2a00:1450::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} should be public");
        }
    }

    #[tokio::test]
    async fn ip_literals_connect_straight_there_when_allowed() {
        let strict = Resolver::new(false);
        let name = <&ServerName>::try_from("127.0.0.1:8449").unwrap();
        let err = strict.resolve(name).await.unwrap_err();
        assert!(err.to_string().contains("non-public"), "{err}");
        let lax = Resolver::new(true);
        let d = lax.resolve(name).await.unwrap();
        assert_eq!(d.tls_name, "127.0.0.1");
        assert_eq!(d.port, 8449);
        assert_eq!(d.host_header, "127.0.0.1:8449");
        let v6 = <&ServerName>::try_from("[::1]").unwrap();
        let d = lax.resolve(v6).await.unwrap();
        assert_eq!((d.tls_name.as_str(), d.port), ("::1", DEFAULT_PORT));
    }
}
