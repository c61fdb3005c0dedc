//! Discovery: supported versions, `/.well-known/matrix/client`, capabilities, and the
//! server delegation `/.well-known/matrix/server` (served here, on the client listener,
//! because a delegating domain's HTTPS port 443 usually reaches it).

use std::collections::BTreeMap;

use axum::{Router, extract::State};
use ruma::{
    OwnedServerName,
    api::{
        client::discovery::{
            discover_homeserver::{self, HomeserverInfo},
            get_capabilities::{
                self,
                v3::{Capabilities, RoomVersionStability},
            },
            get_supported_versions,
        },
        federation::discovery::discover_homeserver as discover_server,
    },
};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::SUPPORTED_ROOM_VERSIONS,
};

/// The spec versions whose client-server API Convo follows, for the modules it has.
const SPEC_VERSIONS: &[&str] =
    &["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11"];

/// Unstable features Convo implements, as clients look them up in `/versions`. Only
/// what works belongs here: Element Web sets up cross-signing (and so stops marking
/// every message of an encrypted DM as unverified) only when the first is advertised.
const UNSTABLE_FEATURES: &[&str] = &[
    // MSC1756: cross-signing keys and signatures (`service/cross_signing.rs`).
    "org.matrix.e2e_cross_signing",
];

/// # `GET /_matrix/client/versions`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientversions>
async fn get_supported_versions(
    _: Ruma<get_supported_versions::Request>,
) -> Result<RumaResponse<get_supported_versions::Response>> {
    let mut response = get_supported_versions::Response::new(SPEC_VERSIONS.iter().map(|v| (*v).to_owned()).collect());
    response.unstable_features = UNSTABLE_FEATURES.iter().map(|f| ((*f).to_owned(), true)).collect::<BTreeMap<_, _>>();
    Ok(response.into())
}

/// # `GET /.well-known/matrix/client`
/// <https://spec.matrix.org/v1.19/client-server-api/#getwell-knownmatrixclient>
async fn discover_homeserver(
    State(services): State<AppState>,
    _: Ruma<discover_homeserver::Request>,
) -> Result<RumaResponse<discover_homeserver::Response>> {
    Ok(discover_homeserver::Response::new(HomeserverInfo::new(services.public_baseurl.clone())).into())
}

/// # `GET /.well-known/matrix/server`
/// <https://spec.matrix.org/v1.19/server-server-api/#getwell-knownmatrixserver>
async fn discover_server(
    State(services): State<AppState>,
    _: Ruma<discover_server::Request>,
) -> Result<RumaResponse<discover_server::Response>> {
    let delegated = &services.config.federation.well_known_server;
    if delegated.is_empty() {
        return Err(Error::not_found("This server does not delegate federation (federation.well_known_server)"));
    }
    // Checked when the configuration was loaded.
    let server = OwnedServerName::try_from(delegated.as_str())
        .map_err(|e| Error::Internal(format!("federation.well_known_server: {e}")))?;
    Ok(discover_server::Response::new(server).into())
}

/// # `GET /_matrix/client/v3/capabilities`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3capabilities>
#[allow(deprecated)] // m.set_displayname and m.set_avatar_url: still what clients of v1.10 read
async fn get_capabilities(
    State(services): State<AppState>,
    _: Ruma<get_capabilities::v3::Request>,
) -> Result<RumaResponse<get_capabilities::v3::Response>> {
    let mut capabilities = Capabilities::new();
    capabilities.change_password.enabled = true;
    capabilities.set_displayname.enabled = true;
    capabilities.set_avatar_url.enabled = true;
    capabilities.thirdparty_id_changes.enabled = false;
    capabilities.get_login_token.enabled = false;
    capabilities.room_versions.default = services.config.rooms.default_room_version.clone();
    capabilities.room_versions.available =
        SUPPORTED_ROOM_VERSIONS.iter().map(|v| (v.clone(), RoomVersionStability::Stable)).collect();
    Ok(get_capabilities::v3::Response::new(capabilities).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_supported_versions::Request, _, _>(router, get_supported_versions);
    let router = route::<discover_homeserver::Request, _, _>(router, discover_homeserver);
    let router = route::<discover_server::Request, _, _>(router, discover_server);
    route::<get_capabilities::v3::Request, _, _>(router, get_capabilities)
}
