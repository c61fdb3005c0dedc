//! The server-server API router (served on the federation listener, over TLS):
//! `/_matrix/federation/*` and `/_matrix/key/*` only. One file per area, handlers
//! as thin as the client API's.

mod backfill;
mod e2e;
mod events;
mod keys;
mod media;
mod membership;
mod queries;
mod transactions;

use axum::Router;

use super::{AppState, route};

/// Registers every federation endpoint.
pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router =
        route::<ruma::api::federation::discovery::get_server_keys::v2::Request, _, _>(router, keys::get_server_keys);
    let router = route::<ruma::api::federation::discovery::get_remote_server_keys_batch::v2::Request, _, _>(
        router,
        keys::get_remote_server_keys_batch,
    );
    let router = route::<ruma::api::federation::discovery::get_remote_server_keys::v2::Request, _, _>(
        router,
        keys::get_remote_server_keys,
    );
    let router = transactions::routes(router);
    let router = e2e::routes(router);
    let router = backfill::routes(router);
    let router = events::routes(router);
    let router = membership::routes(router);
    let router = media::routes(router);
    queries::routes(router)
}
