//! Server-side search: `POST /search` (room events).

use axum::{Router, extract::State};
use ruma::api::client::search::search_events;

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `POST /_matrix/client/v3/search`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3search>
async fn search(
    State(services): State<AppState>,
    req: Ruma<search_events::v3::Request>,
) -> Result<RumaResponse<search_events::v3::Response>> {
    let session = req.session()?;
    let criteria = req
        .body
        .search_categories
        .room_events
        .as_ref()
        .ok_or_else(|| Error::bad_json("search_categories names no category this server searches (room_events)"))?;
    let room_events = services
        .search_room_events(&session.user_id, &session.device_id, criteria, req.body.next_batch.as_deref())
        .await?;
    let mut categories = search_events::v3::ResultCategories::new();
    categories.room_events = room_events;
    Ok(search_events::v3::Response::new(categories).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    route::<search_events::v3::Request, _, _>(router, search)
}
