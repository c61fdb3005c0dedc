//! Media for other servers: `/_matrix/federation/v1/media/download/{mediaId}` and
//! `/thumbnail/{mediaId}` serve this server's own media as the spec's
//! `multipart/mixed` body (a JSON metadata part, then the file), streamed from disk.

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::StreamExt;
use ruma::{
    UInt,
    api::federation::authenticated_media::{get_content, get_content_thumbnail},
};

use super::super::{
    AppState,
    client::media::{content_disposition, file_stream, safe_headers},
    route,
    xmatrix::Federated,
};
use crate::{
    error::Result,
    service::media::{Fetch, MediaContent, thumbnail::Method},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_content::v1::Request, _, _>(router, get_content);
    route::<get_content_thumbnail::v1::Request, _, _>(router, get_content_thumbnail)
}

/// The `multipart/mixed` answer: the metadata part (`{}`), then the content part with
/// its type and disposition, the file streamed between the two boundaries.
fn multipart_response(content: MediaContent, file_name: Option<String>) -> Response {
    let boundary = crate::service::generate_registration_token();
    let disposition = content_disposition(&content.content_type, file_name.or(content.file_name));
    let content_type = if content.content_type.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        content.content_type.clone()
    } else {
        "application/octet-stream".to_owned()
    };
    let head = format!(
        "\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n\
         Content-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let length = head.len() as u64 + content.size + tail.len() as u64;
    let body = futures_util::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(file_stream(content.file))
        .chain(futures_util::stream::once(async move { Ok(Bytes::from(tail)) }));
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CONTENT_LENGTH, length.into());
    safe_headers(headers);
    response
}

/// # `GET /_matrix/federation/v1/media/download/{mediaId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1mediadownloadmediaid)
async fn get_content(
    State(services): State<AppState>,
    request: Federated<get_content::v1::Request>,
) -> Result<Response> {
    request.origin()?;
    let r = request.body;
    let fetch = Fetch { wait: r.timeout_ms, allow_remote: false };
    let content = services.media_content(services.server_name(), &r.media_id, fetch).await?;
    Ok(multipart_response(content, None))
}

/// # `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1mediathumbnailmediaid)
async fn get_content_thumbnail(
    State(services): State<AppState>,
    request: Federated<get_content_thumbnail::v1::Request>,
) -> Result<Response> {
    request.origin()?;
    let r = request.body;
    let method = match r.method {
        Some(ruma::media::Method::Crop) => Method::Crop,
        _ => Method::Scale,
    };
    let clamp = |v: UInt| u32::try_from(u64::from(v)).unwrap_or(u32::MAX);
    let fetch = Fetch { wait: r.timeout_ms, allow_remote: false };
    let size = (clamp(r.width), clamp(r.height));
    let animated = r.animated.unwrap_or(false);
    let content = services.media_thumbnail(services.server_name(), &r.media_id, size, method, animated, fetch).await?;
    Ok(multipart_response(content, Some("thumbnail".to_owned())))
}
