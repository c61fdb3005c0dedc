//! Federation: talking to other homeservers. `discovery` finds where a server name is
//! served (the spec's server discovery); `client` sends signed requests there; `keys`
//! publishes this server's signing key and fetches, checks and caches other servers'
//! keys; `auth` checks the `X-Matrix` signature of inbound requests; `queries` serves
//! and asks the directory, profile and room-directory queries.

pub mod auth;
pub mod client;
pub mod discovery;
pub mod edus;
pub mod keys;
pub mod sender;
pub mod transactions;

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
