//! The client-server API, one file per area. Each file's `routes` registers its
//! endpoints from ruma's metadata.

mod account;
mod account_data;
mod dehydrated_devices;
mod devices;
pub(crate) mod directory;
mod discovery;
mod ephemeral;
mod key_backups;
mod keys;
pub(crate) mod media;
mod membership;
mod message;
mod profile;
mod push;
mod register;
mod relations;
mod room_extras;
mod rooms;
mod search;
mod session;
mod sync;
mod tags;
mod voip;

use axum::Router;

use super::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = discovery::routes(router);
    let router = register::routes(router);
    let router = session::routes(router);
    let router = account::routes(router);
    let router = devices::routes(router);
    let router = profile::routes(router);
    let router = account_data::routes(router);
    let router = rooms::routes(router);
    let router = membership::routes(router);
    let router = message::routes(router);
    let router = sync::routes(router);
    let router = ephemeral::routes(router);
    let router = directory::routes(router);
    let router = push::routes(router);
    let router = keys::routes(router);
    let router = key_backups::routes(router);
    let router = dehydrated_devices::routes(router);
    let router = tags::routes(router);
    let router = relations::routes(router);
    let router = room_extras::routes(router);
    let router = search::routes(router);
    let router = media::routes(router);
    voip::routes(router)
}
