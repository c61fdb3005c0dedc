//! Server discovery (server-server API, "Resolving server names"): where to connect for
//! a server name, which name the TLS certificate must carry and which `Host` header to
//! send, following the spec's steps in order (IP literal, explicit port,
//! `/.well-known/matrix/server`, SRV `_matrix-fed._tcp` then `_matrix._tcp`, A/AAAA on
//! 8448). Every address found is checked against the private-address rule before it is
//! given out. Outcomes are cached (DNS TTLs, the well-known's cache headers), concurrent
//! lookups of one name are done once, and failures are backed off. It opens no
//! connection to the destination itself: the outbound client does.
//! <https://spec.matrix.org/v1.19/server-server-api/#resolving-server-names>

mod cache;
#[cfg(test)]
mod tests;
mod well_known;

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{ResolverConfig, ResolverOpts},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::RData,
};
use ruma::{OwnedServerName, ServerName};

use self::{
    cache::{Cache, Entry, backoff},
    well_known::Answer,
};
use crate::error::{Error, Result};

/// The port federation uses when nothing says otherwise.
pub const DEFAULT_PORT: u16 = 8448;

/// A resolved destination is kept at least this long, whatever the DNS TTL says...
const MIN_TTL: Duration = Duration::from_secs(60);
/// ...and at most this long.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// When an SRV lookup failed (a timeout, not "no such record") and discovery went on
/// without it, the outcome is kept only this long.
const UNSURE_TTL: Duration = Duration::from_secs(5 * 60);
/// A name that failed is not looked up again for this long, doubled with each failure
/// in a row, up to `FAILURE_BACKOFF_CAP`.
const FAILURE_BACKOFF: Duration = Duration::from_secs(30);
const FAILURE_BACKOFF_CAP: Duration = Duration::from_secs(3600);

/// Where to send requests for one server name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The host to put in the URL: the name the TLS certificate must be valid for (and
    /// the SNI sent), or an IP literal (without brackets), for which the certificate
    /// must carry that IP address.
    pub tls_name: String,
    /// The port to connect to (the first address's, when SRV targets differ).
    pub port: u16,
    /// The value of the `Host` header. Set it explicitly: it is not always `tls_name`
    /// and `port` (after SRV it carries no port).
    pub host_header: String,
    /// The addresses to connect to, in order, each with its own port (SRV targets may
    /// use different ones). Never empty; already checked against the private-address
    /// rule.
    pub addrs: Vec<SocketAddr>,
}

impl Destination {
    /// `https://<tls_name>:<port>`, the start of request URLs (an IPv6 literal in
    /// brackets). The `Host` header still has to be set from `host_header`.
    pub fn base_url(&self) -> String {
        if self.tls_name.contains(':') {
            format!("https://[{}]:{}", self.tls_name, self.port)
        } else {
            format!("https://{}:{}", self.tls_name, self.port)
        }
    }
}

/// How a `Resolver` is set up beyond its HTTP client.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `federation.allow_private_destinations`: give out (and fetch `.well-known`
    /// from) private and loopback addresses.
    pub allow_private: bool,
    /// The DNS servers and options; `None` reads the system's (`/etc/resolv.conf`).
    pub dns: Option<(ResolverConfig, ResolverOpts)>,
    /// How many server names (and as many `.well-known` answers) are remembered.
    pub capacity: usize,
    /// The port `.well-known` requests connect to: 443, the `https` port (tests serve
    /// it elsewhere; the `Host` header stays the bare hostname).
    pub well_known_port: u16,
    /// `federation.resolve_names`: look names up (DNS, `.well-known`). Off, only
    /// IP-literal server names are reached, and nothing leaves the machine to find one.
    pub resolve_names: bool,
}

impl Settings {
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private, dns: None, capacity: 10_000, well_known_port: 443, resolve_names: true }
    }
}

/// Resolves server names.
pub struct Resolver {
    dns: TokioResolver,
    /// For `.well-known` requests only: the caller's TLS trust, our DNS, our redirects.
    http: reqwest::Client,
    allow_private: bool,
    resolve_names: bool,
    destinations: Cache<OwnedServerName, Result<Destination, String>>,
    well_known: Cache<String, Answer>,
}

/// A destination and until when it holds.
struct Found {
    destination: Destination,
    expires: Instant,
}

impl Resolver {
    /// A resolver whose `.well-known` requests use `http`, a builder the caller has
    /// given its TLS trust (system roots, the extra CA, skip-verify for tests). The
    /// resolver adds its own DNS (which applies the private-address rule), a redirect
    /// policy and timeouts, and builds it.
    pub fn new(http: reqwest::ClientBuilder, settings: Settings) -> Result<Self> {
        let dns = match settings.dns {
            Some((config, opts)) => {
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default()).with_options(opts).build()
            }
            None => TokioResolver::builder_tokio().and_then(|b| b.build()),
        }
        .map_err(|e| Error::Internal(format!("cannot set up DNS for server discovery: {e}")))?;
        let checked =
            CheckedDns { dns: dns.clone(), allow_private: settings.allow_private, port: settings.well_known_port };
        let http = http
            .dns_resolver(Arc::new(checked))
            .redirect(well_known::redirect_policy(settings.allow_private))
            .https_only(true)
            .timeout(well_known::TIMEOUT)
            .connect_timeout(well_known::TIMEOUT / 2)
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the well-known HTTP client: {e}")))?;
        Ok(Self {
            dns,
            http,
            allow_private: settings.allow_private,
            resolve_names: settings.resolve_names,
            destinations: Cache::new(settings.capacity),
            well_known: Cache::new(settings.capacity),
        })
    }

    /// Where to connect for `server`. A name that failed is answered with its error
    /// again, without a lookup, until its backoff has passed.
    pub async fn resolve(&self, server: &ServerName) -> Result<Destination> {
        if let Some(ip) = ip_literal(server.host()) {
            // Step 1: nothing to look up, nothing to cache.
            return self.ip_destination(server, ip).map(|f| f.destination).map_err(Error::federation);
        }
        if !self.resolve_names {
            return Err(Error::forbidden(format!(
                "Federation with {server} is off: this server contacts IP-literal server names only \
                 (federation.resolve_names = false)"
            )));
        }
        let slot = self.destinations.slot(&server.to_owned());
        let mut entry = slot.lock().await;
        let now = Instant::now();
        if let Some(entry) = entry.as_ref().filter(|e| e.is_fresh(now)) {
            return entry.value.clone().map_err(Error::federation);
        }
        let failures = entry.as_ref().map_or(0, |e| e.failures);
        match self.find(server).await {
            Ok(found) => {
                let expires = found.expires.clamp(now + MIN_TTL, now + MAX_TTL);
                *entry = Some(Entry { value: Ok(found.destination.clone()), expires, failures: 0 });
                Ok(found.destination)
            }
            Err(message) => {
                let failures = failures.saturating_add(1);
                let wait = backoff(failures, FAILURE_BACKOFF, FAILURE_BACKOFF_CAP);
                tracing::debug!(%server, failures, ?wait, "server discovery failed: {message}");
                *entry = Some(Entry { value: Err(message.clone()), expires: now + wait, failures });
                Err(Error::federation(message))
            }
        }
    }

    /// Whether `server` may be contacted at all under the configuration (an IP literal
    /// passes the private-address rule, a name needs `resolve_names`). Queues use it to
    /// keep nothing for servers that can never be reached.
    pub fn may_contact(&self, server: &ServerName) -> bool {
        match ip_literal(server.host()) {
            Some(ip) => self.check_address(ip).is_ok(),
            None => self.resolve_names,
        }
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

    /// Steps 2 to 6 for a name that is not an IP literal.
    async fn find(&self, server: &ServerName) -> Result<Found, String> {
        let hostname = server.host();
        if let Some(port) = server.port() {
            // Step 2: the hostname's addresses, the given port, the name with its port.
            return self.addresses(hostname, port, server.as_str()).await;
        }
        // Step 3: a delegation, which is processed as 3.1 to 3.5.
        if let Some((delegated, until)) = self.well_known(hostname).await {
            let mut found = match ip_literal(delegated.host()) {
                // 3.1: the IP address; the Host header carries the port if one was given.
                Some(ip) => self.ip_destination(&delegated, ip)?,
                None => match delegated.port() {
                    // 3.2: the delegated name's addresses, `<host>:<port>` as Host.
                    Some(port) => self.addresses(delegated.host(), port, delegated.as_str()).await?,
                    // 3.3 to 3.5: SRV records of the delegated name, then its addresses.
                    None => self.srv_then_addresses(delegated.host()).await?,
                },
            };
            found.expires = found.expires.min(until);
            return Ok(found);
        }
        // Steps 4 to 6.
        self.srv_then_addresses(hostname).await
    }

    /// The destination of an IP literal: that address, the name's port or 8448, the
    /// name (with its port, if any) as Host.
    fn ip_destination(&self, name: &ServerName, ip: IpAddr) -> Result<Found, String> {
        if !self.allow_private && !is_public(ip) {
            return Err(refused_message(name.as_str(), &[ip]));
        }
        let port = name.port().unwrap_or(DEFAULT_PORT);
        Ok(Found {
            destination: Destination {
                tls_name: ip.to_string(),
                port,
                host_header: name.as_str().to_owned(),
                addrs: vec![SocketAddr::new(ip, port)],
            },
            expires: Instant::now() + MAX_TTL,
        })
    }

    /// `.well-known` of `hostname`, cached: the delegated name and until when it holds.
    async fn well_known(&self, hostname: &str) -> Option<(OwnedServerName, Instant)> {
        let key = hostname.to_ascii_lowercase();
        let slot = self.well_known.slot(&key);
        let mut entry = slot.lock().await;
        let now = Instant::now();
        if entry.as_ref().is_none_or(|e| !e.is_fresh(now)) {
            let failures = entry.as_ref().map_or(0, |e| e.failures);
            let answer = well_known::fetch(&self.http, &key).await;
            let (ttl, failures) = match &answer {
                Answer::Delegated(_, ttl) => (*ttl, 0),
                Answer::Invalid(why) => {
                    tracing::debug!(hostname, "no server delegation: {why}");
                    (well_known::INVALID_TTL, 0)
                }
                Answer::Failed(why) => {
                    let failures = failures.saturating_add(1);
                    tracing::debug!(hostname, failures, "well-known request failed: {why}");
                    (backoff(failures, well_known::TRANSIENT_TTL, well_known::INVALID_TTL), failures)
                }
            };
            *entry = Some(Entry { value: answer, expires: now + ttl, failures });
        }
        let entry = entry.as_ref()?;
        match &entry.value {
            Answer::Delegated(server, _) => Some((server.clone(), entry.expires)),
            Answer::Invalid(_) | Answer::Failed(_) => None,
        }
    }

    /// SRV `_matrix-fed._tcp.<host>`, else `_matrix._tcp.<host>`, else the host's own
    /// addresses on 8448. Host header and certificate name are `host` in every case.
    async fn srv_then_addresses(&self, host: &str) -> Result<Found, String> {
        let mut unsure = None;
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let name = format!("{service}.{}", fqdn(host));
            match self.dns.srv_lookup(name.as_str()).await {
                Ok(lookup) => {
                    let mut targets: Vec<(u16, u16, u16, String)> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::SRV(srv) => Some((
                                srv.priority,
                                srv.weight,
                                srv.port,
                                if srv.target.is_root() { ".".to_owned() } else { srv.target.to_ascii() },
                            )),
                            _ => None,
                        })
                        .collect();
                    if targets.is_empty() {
                        continue;
                    }
                    if targets.iter().all(|t| t.3 == ".") {
                        // RFC 2782: a target of "." means "decidedly not available".
                        return Err(format!("{name} says {host} offers no federation (SRV target \".\")"));
                    }
                    // Lowest priority first; among equals, the heaviest first.
                    targets.sort_by_key(|t| (t.0, std::cmp::Reverse(t.1)));
                    return self.srv_targets(host, &name, &targets, lookup.valid_until()).await;
                }
                Err(e) if no_records(&e) => {}
                Err(e) => {
                    tracing::debug!(%name, "SRV lookup failed, going on without it: {e}");
                    unsure.get_or_insert(Instant::now() + UNSURE_TTL);
                }
            }
        }
        let mut found = self.addresses(host, DEFAULT_PORT, host).await?;
        if let Some(until) = unsure {
            found.expires = found.expires.min(until);
        }
        Ok(found)
    }

    /// The addresses of SRV targets, in the records' order.
    async fn srv_targets(
        &self,
        host: &str,
        record: &str,
        targets: &[(u16, u16, u16, String)],
        srv_until: Instant,
    ) -> Result<Found, String> {
        let mut addrs = Vec::new();
        let mut refused = Vec::new();
        let mut problems = String::new();
        let mut expires = srv_until;
        for (_, _, port, target) in targets.iter().filter(|t| t.3 != ".") {
            match self.dns.lookup_ip(target.as_str()).await {
                Ok(lookup) => {
                    expires = expires.min(lookup.valid_until());
                    for ip in lookup.iter() {
                        if self.allow_private || is_public(ip) {
                            addrs.push(SocketAddr::new(ip, *port));
                        } else {
                            refused.push(ip);
                        }
                    }
                }
                Err(e) => {
                    let _ = write!(problems, "; {target}: {e}");
                }
            }
        }
        if addrs.is_empty() {
            return Err(if refused.is_empty() {
                format!("the SRV targets of {record} have no address{problems}")
            } else {
                refused_message(&format!("{host} (SRV {record})"), &refused)
            });
        }
        let port = addrs[0].port();
        Ok(Found {
            destination: Destination { tls_name: host.to_owned(), port, host_header: host.to_owned(), addrs },
            expires,
        })
    }

    /// The AAAA/A addresses of `host` on `port`, with the given Host header; the
    /// certificate must be valid for `host`.
    async fn addresses(&self, host: &str, port: u16, host_header: &str) -> Result<Found, String> {
        let lookup = self.dns.lookup_ip(fqdn(host).as_str()).await.map_err(|e| {
            if no_records(&e) {
                format!("{host} has no address (A/AAAA) record")
            } else {
                format!("cannot resolve {host}: {e}")
            }
        })?;
        let (addrs, refused): (Vec<IpAddr>, Vec<IpAddr>) =
            lookup.iter().partition(|ip| self.allow_private || is_public(*ip));
        if addrs.is_empty() {
            return Err(if refused.is_empty() {
                format!("{host} has no address (A/AAAA) record")
            } else {
                refused_message(host, &refused)
            });
        }
        Ok(Found {
            destination: Destination {
                tls_name: host.to_owned(),
                port,
                host_header: host_header.to_owned(),
                addrs: addrs.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(),
            },
            expires: lookup.valid_until(),
        })
    }
}

/// The DNS that `.well-known` requests go through: the resolver's own, with the
/// private-address rule applied, so that neither the hostname nor a redirect reaches a
/// refused address.
#[derive(Clone)]
struct CheckedDns {
    dns: TokioResolver,
    allow_private: bool,
    port: u16,
}

impl reqwest::dns::Resolve for CheckedDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        Box::pin(async move {
            let host = name.as_str();
            let lookup = this.dns.lookup_ip(fqdn(host).as_str()).await?;
            let (addrs, refused): (Vec<IpAddr>, Vec<IpAddr>) =
                lookup.iter().partition(|ip| this.allow_private || is_public(*ip));
            if addrs.is_empty() {
                return Err(refused_message(host, &refused).into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(
                addrs.into_iter().map(move |ip| SocketAddr::new(ip, this.port)).collect::<Vec<_>>().into_iter(),
            );
            Ok(addrs)
        })
    }
}

/// The IP address of a server name's host, if it is an IP literal (`[::1]` included).
fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// `host` as a fully qualified name (trailing dot), so that no search domain is tried.
fn fqdn(host: &str) -> String {
    format!("{}.", host.trim_end_matches('.'))
}

fn no_records(e: &NetError) -> bool {
    e.is_no_records_found() || e.is_nx_domain()
}

fn refused_message(name: &str, refused: &[IpAddr]) -> String {
    let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
    format!(
        "{name} resolves only to non-public addresses ({}), which outbound federation refuses \
         (federation.allow_private_destinations is off)",
        list.join(", ")
    )
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
