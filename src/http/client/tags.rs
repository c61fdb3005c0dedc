//! Room tags, kept as the `m.tag` room account data.

use axum::{Router, extract::State};
use ruma::api::client::tag::{create_tag, delete_tag, get_tags};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3useruseridroomsroomidtags>
async fn get_tags(
    State(services): State<AppState>,
    req: Ruma<get_tags::v3::Request>,
) -> Result<RumaResponse<get_tags::v3::Response>> {
    let tags = services.get_tags(req.session()?, &req.body.user_id, &req.body.room_id).await?;
    let tags = serde_json::from_value(tags).map_err(Error::internal)?;
    Ok(get_tags::v3::Response::new(tags).into())
}

/// # `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3useruseridroomsroomidtagstag>
async fn create_tag(
    State(services): State<AppState>,
    req: Ruma<create_tag::v3::Request>,
) -> Result<RumaResponse<create_tag::v3::Response>> {
    let b = &req.body;
    let info = serde_json::to_value(&b.tag_info).map_err(Error::internal)?;
    services.set_tag(req.session()?, &b.user_id, &b.room_id, &b.tag, Some(info)).await?;
    Ok(create_tag::v3::Response::new().into())
}

/// # `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3useruseridroomsroomidtagstag>
async fn delete_tag(
    State(services): State<AppState>,
    req: Ruma<delete_tag::v3::Request>,
) -> Result<RumaResponse<delete_tag::v3::Response>> {
    let b = &req.body;
    services.set_tag(req.session()?, &b.user_id, &b.room_id, &b.tag, None).await?;
    Ok(delete_tag::v3::Response::new().into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_tags::v3::Request, _, _>(router, get_tags);
    let router = route::<create_tag::v3::Request, _, _>(router, create_tag);
    route::<delete_tag::v3::Request, _, _>(router, delete_tag)
}
