//! The media endpoints: uploads (streamed into the media store, never held whole in
//! memory), authenticated downloads and thumbnails (`/_matrix/client/v1/media/*`), the
//! legacy unauthenticated `/_matrix/media/v3/*` behind `media.legacy_unauthenticated`,
//! the config and URL previews. Every media response carries the safe-serving headers
//! (`media_response`).

// The legacy `/_matrix/media/v3/*` endpoints are deprecated in ruma as in the spec;
// serving them is what `media.legacy_unauthenticated` is for.
#![allow(deprecated)]

use std::time::Duration;

use axum::{
    Router,
    body::Body,
    extract::{RawPathParams, Request, State},
    http::{HeaderValue, header, request::Parts},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use ruma::{
    OwnedServerName, ServerName, UInt,
    api::client::{
        authenticated_media as v1,
        media::{
            create_content, create_content_async, create_mxc_uri, get_content, get_content_as_filename,
            get_content_thumbnail, get_media_config, get_media_preview,
        },
    },
    http_headers::{ContentDisposition, ContentDispositionType},
};
use tokio::io::AsyncReadExt;

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::{
        Session,
        media::{Fetch, MediaContent, UploadMeta, thumbnail::Method},
    },
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_content::v3::Request, _, _>(router, upload);
    let router = route::<create_mxc_uri::v1::Request, _, _>(router, create_mxc_uri);
    let router = route::<create_content_async::v3::Request, _, _>(router, upload_created);
    let router = route::<v1::get_media_config::v1::Request, _, _>(router, get_media_config);
    let router = route::<v1::get_content::v1::Request, _, _>(router, get_content);
    let router = route::<v1::get_content_as_filename::v1::Request, _, _>(router, get_content_as_filename);
    let router = route::<v1::get_content_thumbnail::v1::Request, _, _>(router, get_content_thumbnail);
    let router = route::<v1::get_media_preview::v1::Request, _, _>(router, get_media_preview);
    let router = route::<get_media_config::v3::Request, _, _>(router, legacy_get_media_config);
    let router = route::<get_content::v3::Request, _, _>(router, legacy_get_content);
    let router = route::<get_content_as_filename::v3::Request, _, _>(router, legacy_get_content_as_filename);
    let router = route::<get_content_thumbnail::v3::Request, _, _>(router, legacy_get_content_thumbnail);
    route::<get_media_preview::v3::Request, _, _>(router, legacy_get_media_preview)
}

/// The policy the spec recommends for media (`content_repo.md`): nothing served as
/// media may run scripts, load anything, or be framed as a page of the server.
const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; \
     object-src 'self';";

/// Content types a browser may show inline: images other than SVG (which can hold
/// scripts), video, audio and plain text. Everything else is an attachment.
pub(crate) fn inline_allowed(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("image", sub)) => !sub.contains("svg"),
        Some(("video" | "audio", sub)) => !sub.is_empty(),
        _ => essence == "text/plain",
    }
}

/// The `Content-Disposition` of served media: inline only for the safe types, the file
/// name encoded as RFC 6266 and 8187 say (ruma's `ContentDisposition`).
pub(crate) fn content_disposition(content_type: &str, file_name: Option<String>) -> ContentDisposition {
    let kind =
        if inline_allowed(content_type) { ContentDispositionType::Inline } else { ContentDispositionType::Attachment };
    ContentDisposition::new(kind).with_filename(file_name)
}

/// The headers every media response carries.
pub(crate) fn safe_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
}

/// The bytes of an open file, 64 KiB at a time.
pub(crate) fn file_stream(file: tokio::fs::File) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
        match file.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(buf.freeze()), Some(file))),
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// A media response: the file streamed from disk with its type, length and the safe
/// headers. `file_name` overrides the stored name.
fn media_response(content: MediaContent, file_name: Option<String>) -> Response {
    let content_type =
        HeaderValue::from_str(&content.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let disposition = content_disposition(&content.content_type, file_name.or(content.file_name));
    let mut response = Body::from_stream(file_stream(content.file)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, content.size.into());
    if let Ok(value) = HeaderValue::from_str(&disposition.to_string()) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400, immutable"));
    safe_headers(headers);
    response
}

/// The caller of a raw (streaming) handler: the access token as `Ruma<T>` reads it.
async fn caller(parts: &Parts, services: &AppState) -> Result<(Session, String)> {
    let client_ip = crate::http::client_ip::client_ip(parts, &services.config.listeners);
    let token = crate::http::ruma::access_token(parts)?.ok_or_else(Error::missing_token)?;
    Ok((services.authenticate(&token, Some(&client_ip)).await?, client_ip))
}

/// The upload's content type (header) and file name (`filename` query parameter).
fn upload_meta(parts: &Parts) -> Result<UploadMeta> {
    let content_type = match parts.headers.get(header::CONTENT_TYPE) {
        Some(value) => Some(
            value.to_str().map_err(|_| Error::invalid_param("The Content-Type header is not ASCII"))?.trim().to_owned(),
        ),
        None => None,
    };
    let file_name = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "filename")
        .map(|(_, value)| value.into_owned())
        .filter(|name| !name.is_empty());
    Ok(UploadMeta { content_type: content_type.filter(|t| !t.is_empty()), file_name })
}

/// The request body as a stream of chunks; a body that stalls past the transport's
/// body timeout is `408`.
fn body_stream(body: Body) -> impl Stream<Item = Result<Bytes>> + Unpin {
    body.into_data_stream().map(|chunk| {
        chunk.map_err(|e| {
            if let Some(timeout) = crate::http::transport::body_timeout(&e) {
                Error::unknown(axum::http::StatusCode::REQUEST_TIMEOUT, timeout.to_string())
            } else {
                Error::unknown(axum::http::StatusCode::BAD_REQUEST, "Could not read the request body")
            }
        })
    })
}

/// Refuses a declared body length over the limit before reading any of it.
fn check_declared_length(parts: &Parts, limit: u64) -> Result<()> {
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(Error::too_large(format!("Uploads are {limit} bytes at most")));
    }
    Ok(())
}

/// # `POST /_matrix/media/v3/upload`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixmediav3upload>
async fn upload(State(services): State<AppState>, request: Request) -> Result<Response> {
    let (parts, body) = request.into_parts();
    crate::http::ruma::check_path_and_query(&[], parts.uri.query())?;
    let (session, _) = caller(&parts, &services).await?;
    check_declared_length(&parts, services.config.media.max_upload_size)?;
    let meta = upload_meta(&parts)?;
    let content_uri = services.upload_media(&session, meta, body_stream(body)).await?;
    Ok(RumaResponse(create_content::v3::Response::new(content_uri)).into_response())
}

/// # `POST /_matrix/media/v1/create`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixmediav1create>
async fn create_mxc_uri(
    State(services): State<AppState>,
    req: Ruma<create_mxc_uri::v1::Request>,
) -> Result<RumaResponse<create_mxc_uri::v1::Response>> {
    let (uri, expires) = services.create_media_id(req.session()?).await?;
    let mut response = create_mxc_uri::v1::Response::new(uri);
    response.unused_expires_at = UInt::new(expires as u64).map(ruma::MilliSecondsSinceUnixEpoch);
    Ok(response.into())
}

/// # `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixmediav3uploadservernamemediaid>
async fn upload_created(State(services): State<AppState>, request: Request) -> Result<Response> {
    let (mut parts, body) = request.into_parts();
    let params =
        <RawPathParams as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, &services)
            .await
            .map_err(|e| Error::invalid_param(format!("Invalid path: {e}")))?;
    let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    crate::http::ruma::check_path_and_query(&params, parts.uri.query())?;
    let arg = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let server_name = OwnedServerName::try_from(arg("server_name"))
        .map_err(|e| Error::invalid_param(format!("Invalid server name: {e}")))?;
    let (session, _) = caller(&parts, &services).await?;
    check_declared_length(&parts, services.config.media.max_upload_size)?;
    let meta = upload_meta(&parts)?;
    services.upload_created_media(&session, &server_name, &arg("media_id"), meta, body_stream(body)).await?;
    // `create_content_async::v3::Response` is empty and cannot be built outside ruma.
    Ok(axum::Json(serde_json::json!({})).into_response())
}

/// # `GET /_matrix/client/v1/media/config`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1mediaconfig>
async fn get_media_config(
    State(services): State<AppState>,
    _: Ruma<v1::get_media_config::v1::Request>,
) -> Result<RumaResponse<v1::get_media_config::v1::Response>> {
    let size = UInt::new(services.config.media.max_upload_size).unwrap_or(UInt::MAX);
    Ok(v1::get_media_config::v1::Response::new(size).into())
}

fn fetch(timeout: Duration, allow_remote: bool) -> Fetch {
    Fetch { wait: timeout, allow_remote }
}

/// # `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1mediadownloadservernamemediaid>
async fn get_content(State(services): State<AppState>, req: Ruma<v1::get_content::v1::Request>) -> Result<Response> {
    let r = req.body;
    let content = services.media_content(&r.server_name, &r.media_id, fetch(r.timeout_ms, true)).await?;
    Ok(media_response(content, None))
}

/// # `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1mediadownloadservernamemediaidfilename>
async fn get_content_as_filename(
    State(services): State<AppState>,
    req: Ruma<v1::get_content_as_filename::v1::Request>,
) -> Result<Response> {
    let r = req.body;
    let content = services.media_content(&r.server_name, &r.media_id, fetch(r.timeout_ms, true)).await?;
    Ok(media_response(content, Some(r.filename)))
}

/// A thumbnail request, whichever endpoint it came by.
async fn thumbnail(
    services: &AppState,
    (server_name, media_id): (&ServerName, &str),
    (width, height): (UInt, UInt),
    method: Option<ruma::media::Method>,
    animated: Option<bool>,
    fetch: Fetch,
) -> Result<Response> {
    let method = match method {
        None | Some(ruma::media::Method::Scale) => Method::Scale,
        Some(ruma::media::Method::Crop) => Method::Crop,
        Some(other) => return Err(Error::invalid_param(format!("Unknown thumbnail method {}", other.as_str()))),
    };
    let clamp = |v: UInt| u32::try_from(u64::from(v)).unwrap_or(u32::MAX);
    let size = (clamp(width), clamp(height));
    let content =
        services.media_thumbnail(server_name, media_id, size, method, animated.unwrap_or(false), fetch).await?;
    let extension = content.content_type.rsplit('/').next().unwrap_or("bin").to_owned();
    Ok(media_response(content, Some(format!("thumbnail.{extension}"))))
}

/// # `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1mediathumbnailservernamemediaid>
async fn get_content_thumbnail(
    State(services): State<AppState>,
    req: Ruma<v1::get_content_thumbnail::v1::Request>,
) -> Result<Response> {
    let r = req.body;
    let fetch = fetch(r.timeout_ms, true);
    thumbnail(&services, (&r.server_name, &r.media_id), (r.width, r.height), r.method, r.animated, fetch).await
}

/// # `GET /_matrix/client/v1/media/preview_url`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1mediapreview_url>
async fn get_media_preview(
    State(services): State<AppState>,
    req: Ruma<v1::get_media_preview::v1::Request>,
) -> Result<RumaResponse<v1::get_media_preview::v1::Response>> {
    let data = services.preview_url(&req.body.url).await?;
    let data = serde_json::value::to_raw_value(&data).map_err(Error::internal)?;
    Ok(v1::get_media_preview::v1::Response::from_raw_value(data).into())
}

/// The legacy media endpoints answer only while `media.legacy_unauthenticated` is on.
fn legacy_allowed(services: &AppState) -> Result<()> {
    if services.config.media.legacy_unauthenticated {
        Ok(())
    } else {
        Err(Error::not_found("The unauthenticated media endpoints are turned off: use /_matrix/client/v1/media/"))
    }
}

/// # `GET /_matrix/media/v3/config` (frozen since Matrix 1.11)
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixmediav3config>
async fn legacy_get_media_config(
    State(services): State<AppState>,
    _: Ruma<get_media_config::v3::Request>,
) -> Result<RumaResponse<get_media_config::v3::Response>> {
    legacy_allowed(&services)?;
    let size = UInt::new(services.config.media.max_upload_size).unwrap_or(UInt::MAX);
    Ok(get_media_config::v3::Response::new(size).into())
}

/// # `GET /_matrix/media/v3/download/{serverName}/{mediaId}` (frozen since Matrix 1.11)
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixmediav3downloadservernamemediaid>
async fn legacy_get_content(State(services): State<AppState>, req: Ruma<get_content::v3::Request>) -> Result<Response> {
    legacy_allowed(&services)?;
    let r = req.body;
    let content = services.media_content(&r.server_name, &r.media_id, fetch(r.timeout_ms, r.allow_remote)).await?;
    Ok(media_response(content, None))
}

/// # `GET /_matrix/media/v3/download/{serverName}/{mediaId}/{fileName}` (frozen since Matrix 1.11)
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixmediav3downloadservernamemediaidfilename>
async fn legacy_get_content_as_filename(
    State(services): State<AppState>,
    req: Ruma<get_content_as_filename::v3::Request>,
) -> Result<Response> {
    legacy_allowed(&services)?;
    let r = req.body;
    let content = services.media_content(&r.server_name, &r.media_id, fetch(r.timeout_ms, r.allow_remote)).await?;
    Ok(media_response(content, Some(r.filename)))
}

/// # `GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}` (frozen since Matrix 1.11)
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixmediav3thumbnailservernamemediaid>
async fn legacy_get_content_thumbnail(
    State(services): State<AppState>,
    req: Ruma<get_content_thumbnail::v3::Request>,
) -> Result<Response> {
    legacy_allowed(&services)?;
    let r = req.body;
    let fetch = fetch(r.timeout_ms, r.allow_remote);
    thumbnail(&services, (&r.server_name, &r.media_id), (r.width, r.height), r.method, r.animated, fetch).await
}

/// # `GET /_matrix/media/v3/preview_url` (frozen since Matrix 1.11)
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixmediav3preview_url>
async fn legacy_get_media_preview(
    State(services): State<AppState>,
    req: Ruma<get_media_preview::v3::Request>,
) -> Result<RumaResponse<get_media_preview::v3::Response>> {
    legacy_allowed(&services)?;
    let data = services.preview_url(&req.body.url).await?;
    let data = serde_json::value::to_raw_value(&data).map_err(Error::internal)?;
    Ok(get_media_preview::v3::Response::from_raw_value(data).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_types_are_inline() {
        for inline in ["image/png", "image/JPEG", "video/mp4", "audio/ogg", "text/plain; charset=utf-8"] {
            assert!(inline_allowed(inline), "{inline}");
        }
        for attachment in
            ["image/svg+xml", "text/html", "application/pdf", "text/javascript", "application/xhtml+xml", ""]
        {
            assert!(!inline_allowed(attachment), "{attachment}");
        }
        let d = content_disposition("text/html", Some("a \"b\".html".into())).to_string();
        assert!(d.starts_with("attachment; filename="), "{d}");
        let d = content_disposition("image/png", Some("café.png".into())).to_string();
        assert_eq!(d, "inline; filename*=utf-8''caf%C3%A9.png");
    }
}
