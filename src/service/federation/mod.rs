//! Federation: talking to other homeservers. `discovery` finds where a server name is
//! served (the spec's server discovery); `client` sends signed requests there; `keys`
//! publishes this server's signing key and fetches, checks and caches other servers'
//! keys; `auth` checks the `X-Matrix` signature of inbound requests; `queries` serves
//! and asks the directory, profile and room-directory queries.

pub mod acl;
pub mod auth;
pub mod backfill;
pub mod client;
pub mod devices;
pub mod discovery;
pub mod e2e;
pub mod edus;
pub mod events;
pub mod invites;
pub mod keys;
pub mod knocks;
pub mod membership;
pub mod out_of_band;
pub mod prev_state;
pub mod queries;
pub mod sender;
pub mod timestamp;
pub mod transactions;
pub mod visibility;

/// The federation state of one server: the outbound client and the key fetcher.
pub struct Federation {
    pub client: client::FederationClient,
    pub keys: keys::KeyFetcher,
}

impl Federation {
    pub fn new(config: &crate::config::Federation) -> Result<Self, String> {
        Ok(Self { client: client::FederationClient::new(config)?, keys: keys::KeyFetcher::default() })
    }
}

impl crate::service::Services {
    /// Sends `request` to `destination`, signed as this server when the endpoint needs
    /// it, and answers the parsed response. The one way other code talks to another
    /// server. Errors: `502 M_UNKNOWN` naming the server and the cause (unreachable,
    /// refused address, TLS, bad answer), or `Error::Remote` with the other server's
    /// status and errcode (clients see its `404 M_NOT_FOUND`, or `502`).
    pub async fn send_federation_request<T>(
        &self,
        destination: &ruma::ServerName,
        request: T,
    ) -> crate::error::Result<T::IncomingResponse>
    where
        T: ruma::api::OutgoingRequest<
                EndpointError = ruma::api::error::Error,
                PathBuilder = ruma::api::path_builder::SinglePath,
            > + Send,
        T::Authentication: client::OutboundAuth,
    {
        if destination == self.server_name() {
            return Err(crate::error::Error::internal("a federation request addressed to this server itself"));
        }
        self.federation.client.send(self.server_name(), &self.signing_key, destination, request).await
    }
}

impl crate::service::Services {
    /// The keys to check event signatures with: those trusted without asking (our own,
    /// and keys tests add), then other servers' keys from the key service (fetched
    /// and cached).
    pub async fn event_signing_keys(
        &self,
        servers: &std::collections::BTreeSet<ruma::OwnedServerName>,
    ) -> crate::error::Result<ruma::signatures::PublicKeyMap> {
        let mut map = self.known_keys.public_keys(servers);
        let rest: Vec<ruma::OwnedServerName> =
            servers.iter().filter(|s| !map.contains_key(s.as_str()) && *s != self.server_name()).cloned().collect();
        if !rest.is_empty() {
            map.extend(self.server_public_keys(&rest).await?);
        }
        Ok(map)
    }
}

/// PDUs another server sent (at most `max`), parsed and sorted oldest first (by depth),
/// so that each one's prev events are taken in before it. Unparsable ones are dropped.
pub(crate) fn oldest_first(pdus: &[Box<serde_json::value::RawValue>], max: usize) -> Vec<ruma::CanonicalJsonObject> {
    let mut events: Vec<(i64, ruma::CanonicalJsonObject)> = pdus
        .iter()
        .take(max)
        .filter_map(|raw| serde_json::from_str::<ruma::CanonicalJsonObject>(raw.get()).ok())
        .map(|o| {
            let depth = match o.get("depth") {
                Some(ruma::CanonicalJsonValue::Integer(d)) => i64::from(*d),
                _ => 0,
            };
            (depth, o)
        })
        .collect();
    events.sort_by_key(|(depth, _)| *depth);
    events.into_iter().map(|(_, o)| o).collect()
}
