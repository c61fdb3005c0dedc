//! The client-server API, one file per area. Each file's `routes` registers its
//! endpoints from ruma's metadata.

mod account;
mod account_data;
mod devices;
mod discovery;
mod profile;
mod register;
mod session;

use axum::Router;

use super::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = discovery::routes(router);
    let router = register::routes(router);
    let router = session::routes(router);
    let router = account::routes(router);
    let router = devices::routes(router);
    let router = profile::routes(router);
    account_data::routes(router)
}
