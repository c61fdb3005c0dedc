//! The media repository: uploads (at once and create-then-upload), limits, downloads
//! with their safe headers, thumbnails, avatars, quarantine and deletion, and remote
//! media over federation.

use std::{io::Cursor, time::Duration};

use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
    federation::{TRUSTING, fed_request, federating, services},
};

backend_tests!(
    upload_and_download,
    legacy_endpoints_follow_their_switch,
    uploads_stop_at_the_size_limit,
    created_ids_take_one_upload_by_their_creator,
    parallel_uploads_to_a_created_id_store_one,
    downloads_wait_for_a_created_upload,
    quota_and_rate_limit,
    thumbnails_of_each_format,
    thumbnail_decoding_is_bounded,
    avatars_are_seen_by_others,
    quarantine_delete_and_list,
    remote_media_over_federation,
    url_previews_read_public_pages_only,
);

/// Uploads `bytes`; answers the `mxc://` URI.
async fn upload(server: &TestServer, token: &str, bytes: Vec<u8>, content_type: &str, name: Option<&str>) -> String {
    let (status, body) = upload_raw(server, token, bytes, content_type, name).await;
    assert_eq!(status, StatusCode::OK, "upload: {body}");
    body["content_uri"].as_str().unwrap().to_owned()
}

async fn upload_raw(
    server: &TestServer,
    token: &str,
    bytes: Vec<u8>,
    content_type: &str,
    name: Option<&str>,
) -> (StatusCode, Value) {
    let mut url = format!("{}/_matrix/media/v3/upload", server.base);
    if let Some(name) = name {
        url.push_str(&format!("?filename={}", form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()));
    }
    let response =
        server.http.post(url).bearer_auth(token).header("content-type", content_type).body(bytes).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The server name and media id of an `mxc://` URI.
fn parts(mxc: &str) -> (&str, &str) {
    mxc.strip_prefix("mxc://").unwrap().split_once('/').unwrap()
}

/// A GET of media: status, headers, bytes.
async fn fetch(server: &TestServer, path: &str, token: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut request = server.http.get(format!("{}{path}", server.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

#[track_caller]
fn assert_media_error(result: &(StatusCode, HeaderMap, Vec<u8>), status: StatusCode, errcode: &str) {
    assert_error(&(result.0, json_of(&result.2)), status, errcode);
}

fn download_path(mxc: &str) -> String {
    let (server, id) = parts(mxc);
    format!("/_matrix/client/v1/media/download/{server}/{id}")
}

fn thumbnail_path(mxc: &str, width: u32, height: u32, method: &str) -> String {
    let (server, id) = parts(mxc);
    format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width={width}&height={height}&method={method}")
}

/// An image encoded in `format`: a gradient, so that scaling has something to do.
fn picture(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(image).write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A two-frame animated GIF.
fn animated_gif(width: u16, height: u16) -> Vec<u8> {
    use image::{Delay, Frame, codecs::gif::GifEncoder};
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        for shade in [0u8, 255] {
            let frame = RgbaImage::from_pixel(u32::from(width), u32::from(height), image::Rgba([shade, 0, 0, 255]));
            encoder.encode_frame(Frame::from_parts(frame, 0, 0, Delay::from_numer_denom_ms(100, 1))).unwrap();
        }
    }
    out
}

fn dimensions(bytes: &[u8]) -> (u32, u32) {
    let image = image::load_from_memory(bytes).expect("an image");
    (image.width(), image.height())
}

/// The file of `bytes` in the media store, by its SHA-256.
fn stored_path(server: &TestServer, bytes: &[u8]) -> std::path::PathBuf {
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    server.config().media.path.join(&hash[0..2]).join(&hash[2..4]).join(hash)
}

async fn upload_and_download(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;

    let text = b"hello media".to_vec();
    let mxc = upload(&server, &alice, text.clone(), "text/plain", Some("notes é.txt")).await;
    assert!(mxc.starts_with("mxc://localhost/"), "{mxc}");
    assert!(stored_path(&server, &text).exists(), "stored by content hash under media.path");

    // Another user downloads it, with the safe headers.
    let (status, headers, bytes) = fetch(&server, &download_path(&mxc), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bytes, text);
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(headers["content-length"], text.len().to_string().as_str());
    assert_eq!(headers["content-disposition"], "inline; filename*=utf-8''notes%20%C3%A9.txt");
    assert!(headers["content-security-policy"].to_str().unwrap().starts_with("sandbox; default-src 'none'"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cross-origin-resource-policy"], "cross-origin");

    // The file name in the path overrides the stored one.
    let (status, headers, _) = fetch(&server, &format!("{}/other.txt", download_path(&mxc)), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-disposition"], "inline; filename=other.txt");

    // Uploads are not bound by the JSON body limit (1 MiB): 3 MB goes through whole.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let big_mxc = upload(&server, &alice, big.clone(), "application/octet-stream", None).await;
    let (status, headers, bytes) = fetch(&server, &download_path(&big_mxc), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bytes == big, "the same 3 MB come back");
    assert_eq!(headers["content-disposition"], "attachment");

    // HTML and SVG are attachments, never inline.
    for (content_type, name) in [("text/html", "page.html"), ("image/svg+xml", "x.svg")] {
        let mxc = upload(&server, &alice, b"<script>alert(1)</script>".to_vec(), content_type, Some(name)).await;
        let (status, headers, _) = fetch(&server, &download_path(&mxc), Some(&bob)).await;
        assert_eq!(status, StatusCode::OK);
        let disposition = headers["content-disposition"].to_str().unwrap();
        assert_eq!(disposition, format!("attachment; filename={name}"));
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }

    // Authentication is required; unknown and malformed ids are refused cleanly.
    assert_media_error(&fetch(&server, &download_path(&mxc), None).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let unknown = fetch(&server, "/_matrix/client/v1/media/download/localhost/AAAAnothere", Some(&bob)).await;
    assert_media_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad_id = fetch(&server, "/_matrix/client/v1/media/download/localhost/a.b", Some(&bob)).await;
    assert_media_error(&bad_id, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let bad_server = fetch(&server, "/_matrix/client/v1/media/download/bad%20server/abc", Some(&bob)).await;
    assert_media_error(&bad_server, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    let (status, body) = server.get("/_matrix/client/v1/media/config", Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["m.upload.size"], server.config().media.max_upload_size);

    // URL previews are off by default.
    let preview = server.get("/_matrix/client/v1/media/preview_url?url=https%3A%2F%2Fexample.org", Some(&bob)).await;
    assert_error(&preview, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    server.stop().await;
}

async fn legacy_endpoints_follow_their_switch(backend: Backend) {
    let server = TestServer::start(backend.clone()).await;
    let (_, alice, _) = server.register("alice").await;
    let mxc = upload(&server, &alice, b"legacy".to_vec(), "text/plain", None).await;
    let (host, id) = parts(&mxc);
    let legacy = format!("/_matrix/media/v3/download/{host}/{id}");
    let (status, headers, bytes) = fetch(&server, &legacy, None).await;
    assert_eq!((status, bytes.as_slice()), (StatusCode::OK, &b"legacy"[..]));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    server.stop().await;

    let server = TestServer::start_with(backend, |c| c.media.legacy_unauthenticated = false).await;
    let (_, alice, _) = server.register("alice").await;
    let mxc = upload(&server, &alice, b"legacy".to_vec(), "text/plain", None).await;
    let (host, id) = parts(&mxc);
    let legacy = fetch(&server, &format!("/_matrix/media/v3/download/{host}/{id}"), None).await;
    assert_media_error(&legacy, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let thumb = fetch(&server, &format!("/_matrix/media/v3/thumbnail/{host}/{id}?width=32&height=32"), None).await;
    assert_media_error(&thumb, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(fetch(&server, &download_path(&mxc), Some(&alice)).await.0, StatusCode::OK);
    server.stop().await;
}

async fn uploads_stop_at_the_size_limit(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.media.max_upload_size = 10_000).await;
    let (_, alice, _) = server.register("alice").await;
    let ok = upload_raw(&server, &alice, vec![7; 10_000], "application/octet-stream", None).await;
    assert_eq!(ok.0, StatusCode::OK, "{}", ok.1);
    // A declared length over the limit is refused before any byte is read.
    let declared = upload_raw(&server, &alice, vec![7; 10_001], "application/octet-stream", None).await;
    assert_error(&declared, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    // A chunked body with no length is cut at the limit: the server answers while the
    // client still has most of its 10 MB to send.
    let chunks = futures_util::stream::iter(
        (0..1000).map(|_| Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(vec![1u8; 10_000])))),
    );
    let response = server
        .http
        .post(format!("{}/_matrix/media/v3/upload", server.base))
        .bearer_auth(&alice)
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(chunks)))
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert_error(&(status, body), StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
        }
        // The server may close the connection before the client has read its answer.
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    let tmp = server.config().media.path.join("tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0, "no temporary file is left");
    server.stop().await;
}

/// `PUT /upload/{server}/{id}` with `bytes`.
async fn put_upload(server: &TestServer, token: &str, mxc: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
    let (host, id) = parts(mxc);
    let response = server
        .http
        .put(format!("{}/_matrix/media/v3/upload/{host}/{id}?filename=late.txt", server.base))
        .bearer_auth(token)
        .header("content-type", "text/plain")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn create(server: &TestServer, token: &str) -> String {
    let (status, body) = server.post("/_matrix/media/v1/create", Some(token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["unused_expires_at"].as_i64().unwrap() > 0);
    body["content_uri"].as_str().unwrap().to_owned()
}

async fn created_ids_take_one_upload_by_their_creator(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.media.max_pending_uploads = 2).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let mxc = create(&server, &alice).await;

    assert_error(&put_upload(&server, &bob, &mxc, b"bob's".to_vec()).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, body) = put_upload(&server, &alice, &mxc, b"alice's".to_vec()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = put_upload(&server, &alice, &mxc, b"again".to_vec()).await;
    assert_error(&again, StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA");
    let (status, headers, bytes) = fetch(&server, &download_path(&mxc), Some(&bob)).await;
    assert_eq!((status, bytes.as_slice()), (StatusCode::OK, &b"alice's"[..]));
    assert_eq!(headers["content-disposition"], "inline; filename=late.txt");

    // Unknown ids, ids of other servers, malformed ids.
    let unknown = put_upload(&server, &alice, "mxc://localhost/nosuchid", b"x".to_vec()).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad = put_upload(&server, &alice, "mxc://localhost/bad.id", b"x".to_vec()).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // At most `max_pending_uploads` ids wait for their upload.
    create(&server, &alice).await;
    create(&server, &alice).await;
    let third = server.post("/_matrix/media/v1/create", Some(&alice), json!({})).await;
    assert_error(&third, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    create(&server, &bob).await;
    server.stop().await;
}

async fn parallel_uploads_to_a_created_id_store_one(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let mxc = create(&server, &alice).await;
    let uploads = (0..8).map(|i| {
        let (server, alice, mxc) = (&server, &alice, &mxc);
        async move { (i, put_upload(server, alice, mxc, format!("content {i}").into_bytes()).await) }
    });
    let results = futures_util::future::join_all(uploads).await;
    let winners: Vec<usize> = results.iter().filter(|(_, r)| r.0 == StatusCode::OK).map(|(i, _)| *i).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for (_, result) in results.iter().filter(|(_, r)| r.0 != StatusCode::OK) {
        assert_error(result, StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA");
    }
    let (_, _, bytes) = fetch(&server, &download_path(&mxc), Some(&alice)).await;
    assert_eq!(bytes, format!("content {}", winners[0]).into_bytes());
    // The losers' files are not kept.
    for i in (0..8).filter(|i| *i != winners[0]) {
        assert!(!stored_path(&server, format!("content {i}").as_bytes()).exists());
    }
    server.stop().await;
}

async fn downloads_wait_for_a_created_upload(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let mxc = create(&server, &alice).await;
    let early = fetch(&server, &format!("{}?timeout_ms=50", download_path(&mxc)), Some(&alice)).await;
    assert_media_error(&early, StatusCode::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED");

    // A download that waits gets the content once it is uploaded.
    let waiting_path = format!("{}?timeout_ms=20000", download_path(&mxc));
    let waiting = fetch(&server, &waiting_path, Some(&alice));
    let upload = async {
        // The upload comes once the download waits for it.
        let waiting = services(&server).media.wait_for_waiting_downloads(1);
        tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("the download waits");
        put_upload(&server, &alice, &mxc, b"finally".to_vec()).await
    };
    let ((status, _, bytes), uploaded) = tokio::join!(waiting, upload);
    assert_eq!(uploaded.0, StatusCode::OK);
    assert_eq!((status, bytes.as_slice()), (StatusCode::OK, &b"finally"[..]));
    server.stop().await;
}

async fn quota_and_rate_limit(backend: Backend) {
    let server = TestServer::start_with(backend.clone(), |c| c.media.user_quota_bytes = 100).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    // Parallel uploads of 30 bytes: exactly three fit in 100.
    let uploads = (0..6).map(|i| upload_raw(&server, &alice, vec![i; 30], "application/octet-stream", None));
    let results = futures_util::future::join_all(uploads).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    assert_eq!(ok, 3, "{results:?}");
    for result in results.iter().filter(|r| r.0 != StatusCode::OK) {
        assert_error(result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    }
    // The quota is per user; a created id counts when its bytes arrive.
    upload(&server, &bob, vec![1; 100], "text/plain", None).await;
    let mxc = create(&server, &bob).await;
    assert_error(&put_upload(&server, &bob, &mxc, vec![2; 10]).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    server.stop().await;

    let server = TestServer::start_with(backend, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.media_upload = convo::config::Bucket { per_second: 0.001, burst: 2 };
    })
    .await;
    let (_, alice, _) = server.register("alice").await;
    upload(&server, &alice, b"1".to_vec(), "text/plain", None).await;
    create(&server, &alice).await;
    let limited = upload_raw(&server, &alice, b"3".to_vec(), "text/plain", None).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    server.stop().await;
}

async fn thumbnails_of_each_format(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;

    let png = upload(&server, &alice, picture(1000, 500, ImageFormat::Png), "image/png", Some("a.png")).await;
    let (status, headers, crop) = fetch(&server, &thumbnail_path(&png, 90, 90, "crop"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&crop));
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-disposition"].to_str().unwrap().starts_with("inline"));
    assert_eq!(dimensions(&crop), (96, 96), "the smallest suggested crop at least as large");
    let (_, _, scale) = fetch(&server, &thumbnail_path(&png, 300, 200, "scale"), Some(&bob)).await;
    assert_eq!(dimensions(&scale), (320, 160), "scaled to fit 320x240, aspect kept");
    // Made once, then served from the cache.
    let (_, _, again) = fetch(&server, &thumbnail_path(&png, 90, 90, "crop"), Some(&bob)).await;
    assert_eq!(again, crop);
    let (host, id) = parts(&png);
    let cached = services(&server).store.get_media_thumbnail(host, id, 96, 96, "crop").await.unwrap();
    assert!(cached.is_some_and(|t| t.content_type == "image/png"));

    let jpeg = upload(&server, &alice, picture(1000, 500, ImageFormat::Jpeg), "image/jpeg", None).await;
    let (status, headers, thumb) = fetch(&server, &thumbnail_path(&jpeg, 640, 480, "scale"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "image/jpeg");
    assert_eq!(dimensions(&thumb), (640, 320));

    let webp = upload(&server, &alice, picture(300, 300, ImageFormat::WebP), "image/webp", None).await;
    let (status, _, thumb) = fetch(&server, &thumbnail_path(&webp, 32, 32, "crop"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dimensions(&thumb), (32, 32));

    // GIF: the first frame, or the original when an animated thumbnail is asked for.
    let gif_bytes = animated_gif(400, 400);
    let gif = upload(&server, &alice, gif_bytes.clone(), "image/gif", None).await;
    let (status, headers, thumb) = fetch(&server, &thumbnail_path(&gif, 96, 96, "crop"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(dimensions(&thumb), (96, 96));
    let animated = fetch(&server, &format!("{}&animated=true", thumbnail_path(&gif, 96, 96, "crop")), Some(&bob)).await;
    assert_eq!(animated.0, StatusCode::OK);
    assert_eq!(animated.1["content-type"], "image/gif");
    assert_eq!(animated.2, gif_bytes);

    // Never upscaled: a small image is its own thumbnail.
    let small_bytes = picture(20, 10, ImageFormat::Png);
    let small = upload(&server, &alice, small_bytes.clone(), "image/png", None).await;
    let (status, _, thumb) = fetch(&server, &thumbnail_path(&small, 96, 96, "crop"), Some(&bob)).await;
    assert_eq!((status, thumb), (StatusCode::OK, small_bytes));

    // Not an image: 400 M_UNKNOWN, as the spec says.
    let text = upload(&server, &alice, b"not a picture".to_vec(), "image/png", None).await;
    let result = fetch(&server, &thumbnail_path(&text, 32, 32, "crop"), Some(&bob)).await;
    assert_media_error(&result, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    let zero = fetch(&server, &thumbnail_path(&png, 0, 32, "crop"), Some(&bob)).await;
    assert_media_error(&zero, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    // The legacy endpoint serves thumbnails too.
    let legacy = format!("/_matrix/media/v3/thumbnail/{host}/{id}?width=32&height=32&method=crop");
    let (status, _, thumb) = fetch(&server, &legacy, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dimensions(&thumb), (32, 32));
    server.stop().await;
}

async fn thumbnail_decoding_is_bounded(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.media.max_image_dimension = 2000;
        c.media.max_image_alloc = 1024 * 1024;
    })
    .await;
    let (_, alice, _) = server.register("alice").await;
    // A PNG whose header claims 30000 x 30000 pixels (3.6 GB decoded): refused from
    // its header, before any pixel is decoded.
    let bomb = upload(&server, &alice, png_header_only(30_000, 30_000), "image/png", None).await;
    let result = fetch(&server, &thumbnail_path(&bomb, 96, 96, "crop"), Some(&alice)).await;
    assert_media_error(&result, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    // Within the dimensions, but 1000 x 1000 RGB needs 3 MB: over the 1 MiB allowed.
    let big = upload(&server, &alice, picture(1000, 1000, ImageFormat::Png), "image/png", None).await;
    let result = fetch(&server, &thumbnail_path(&big, 96, 96, "crop"), Some(&alice)).await;
    assert_media_error(&result, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    // A small one still works.
    let fine = upload(&server, &alice, picture(200, 200, ImageFormat::Png), "image/png", None).await;
    assert_eq!(fetch(&server, &thumbnail_path(&fine, 96, 96, "crop"), Some(&alice)).await.0, StatusCode::OK);
    server.stop().await;
}

/// A PNG signature and header chunk for `width` x `height` RGB, then an empty IDAT and IEND.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

async fn avatars_are_seen_by_others(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;

    let avatar = picture(200, 200, ImageFormat::Png);
    let mxc = upload(&server, &alice, avatar.clone(), "image/png", Some("me.png")).await;
    let (status, body) = server
        .put(&format!("/_matrix/client/v3/profile/{alice_id}/avatar_url"), Some(&alice), json!({"avatar_url": mxc}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, profile) = server.get(&format!("/_matrix/client/v3/profile/{alice_id}"), Some(&bob)).await;
    let seen = profile["avatar_url"].as_str().unwrap();
    let (status, _, bytes) = fetch(&server, &download_path(seen), Some(&bob)).await;
    assert_eq!((status, bytes), (StatusCode::OK, avatar));

    let room_avatar = picture(300, 100, ImageFormat::Jpeg);
    let room_mxc = upload(&server, &alice, room_avatar.clone(), "image/jpeg", None).await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await;
    let (status, body) = server
        .put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.avatar/"), Some(&alice), json!({"url": room_mxc}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, state) = server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.avatar/"), Some(&bob)).await;
    let seen = state["url"].as_str().unwrap();
    let (status, _, bytes) = fetch(&server, &download_path(seen), Some(&bob)).await;
    assert_eq!((status, bytes), (StatusCode::OK, room_avatar));
    let (status, _, thumb) = fetch(&server, &thumbnail_path(seen, 32, 32, "crop"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dimensions(&thumb), (32, 32));
    server.stop().await;
}

async fn quarantine_delete_and_list(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let media = services(&server);
    let bytes = picture(200, 200, ImageFormat::Png);
    let first = upload(&server, &alice, bytes.clone(), "image/png", Some("one.png")).await;
    let second = upload(&server, &alice, bytes.clone(), "image/png", Some("two.png")).await;
    assert_eq!(fetch(&server, &thumbnail_path(&first, 32, 32, "crop"), Some(&alice)).await.0, StatusCode::OK);

    media.quarantine_media(&first, true).await.unwrap();
    assert_media_error(
        &fetch(&server, &download_path(&first), Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    let thumb = fetch(&server, &thumbnail_path(&first, 32, 32, "crop"), Some(&alice)).await;
    assert_media_error(&thumb, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(fetch(&server, &download_path(&second), Some(&alice)).await.0, StatusCode::OK, "same bytes, other item");
    media.quarantine_media(&first, false).await.unwrap();
    assert_eq!(fetch(&server, &download_path(&first), Some(&alice)).await.0, StatusCode::OK);

    let listed = media.list_user_media(&alice_id, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|m| m.file_name.as_deref() == Some("one.png")));

    // Deleting one of two items with the same bytes keeps the file; the last one removes it.
    let file = stored_path(&server, &bytes);
    media.delete_media(&first).await.unwrap();
    assert_media_error(
        &fetch(&server, &download_path(&first), Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert!(file.exists());
    assert_eq!(fetch(&server, &download_path(&second), Some(&alice)).await.2, bytes);
    media.delete_media(&second).await.unwrap();
    assert!(!file.exists());
    assert_eq!(media.delete_media(&second).await.unwrap_err().errcode(), "M_NOT_FOUND");
    assert!(media.list_user_media(&alice_id, 10).await.unwrap().is_empty());
    server.stop().await;
}

async fn remote_media_over_federation(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice, _) = a.register("alice").await;
    let (_, bob, _) = b.register("bob").await;
    let bytes = picture(640, 480, ImageFormat::Png);
    let mxc = upload(&a, &alice, bytes.clone(), "image/png", Some("holiday.png")).await;

    // The federation endpoint wants a signature.
    let (_, id) = parts(&mxc);
    let unsigned =
        fed_request(&a, Method::GET, &format!("/_matrix/federation/v1/media/download/{id}"), None, None).await;
    assert_eq!(unsigned.0, StatusCode::UNAUTHORIZED, "{}", unsigned.1);

    // Bob on B downloads it through his own server.
    let (status, headers, got) = fetch(&b, &download_path(&mxc), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&got));
    assert_eq!(got, bytes);
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(headers["content-disposition"], "inline; filename=holiday.png");
    let (status, _, thumb) = fetch(&b, &thumbnail_path(&mxc, 96, 96, "crop"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dimensions(&thumb), (96, 96));

    // Unknown remote media is not found.
    let (host, _) = parts(&mxc);
    let unknown = fetch(&b, &format!("/_matrix/client/v1/media/download/{host}/nosuchmedia"), Some(&bob)).await;
    assert_media_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // The legacy endpoint with allow_remote=false does not fetch.
    let local_only = format!("/_matrix/media/v3/download/{host}/{}?allow_remote=false", parts(&mxc).1);
    let mxc2 = upload(&a, &alice, b"second".to_vec(), "text/plain", None).await;
    let local_only2 = format!("/_matrix/media/v3/download/{host}/{}?allow_remote=false", parts(&mxc2).1);
    assert_media_error(&fetch(&b, &local_only2, None).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(fetch(&b, &local_only, None).await.0, StatusCode::OK, "cached media is served");

    // Cached: B serves it with A gone.
    a.stop().await;
    let (status, _, got) = fetch(&b, &download_path(&mxc), Some(&bob)).await;
    assert_eq!((status, got), (StatusCode::OK, bytes));
    b.stop().await;
}

/// A tiny web server on loopback: each path answers its content type and body.
async fn web_server(pages: Vec<(&'static str, &'static str, Vec<u8>)>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let pages = pages.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let answer = match pages.iter().find(|(p, _, _)| *p == path) {
                    Some((_, content_type, body)) => {
                        let mut out = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        out.extend_from_slice(body);
                        out
                    }
                    None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                };
                let _ = socket.write_all(&answer).await;
            });
        }
    });
    base
}

async fn url_previews_read_public_pages_only(backend: Backend) {
    let image = picture(120, 60, ImageFormat::Png);
    let page = br#"<html><head><title>Fallback</title>
        <meta property="og:title" content="Hello &amp; welcome">
        <meta property="og:description" content="A page about things">
        <meta property="og:image" content="/picture.png"></head><body>hi</body></html>"#;
    let late =
        format!("<html><head>{}<meta property=\"og:title\" content=\"Too late\"></head></html>", " ".repeat(4096));
    let web = web_server(vec![
        ("/page", "text/html; charset=utf-8", page.to_vec()),
        ("/picture.png", "image/png", image.clone()),
        ("/late", "text/html", late.into_bytes()),
    ])
    .await;
    async fn preview(server: &TestServer, token: &str, url: String) -> (StatusCode, Value) {
        let url = form_urlencoded::byte_serialize(url.as_bytes()).collect::<String>();
        server.get(&format!("/_matrix/client/v1/media/preview_url?url={url}"), Some(token)).await
    }

    // Loopback is allowed only on test networks (`allow_private_destinations`).
    let server = TestServer::start_with(backend.clone(), |c| {
        c.media.url_preview_enabled = true;
        c.media.url_preview_max_size = 2048;
        c.federation.allow_private_destinations = true;
    })
    .await;
    let (_, alice, _) = server.register("alice").await;
    let (status, body) = preview(&server, &alice, format!("{web}/page")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["og:title"], "Hello & welcome");
    assert_eq!(body["og:description"], "A page about things");
    assert_eq!(body["matrix:image:size"], image.len());
    let (status, _, bytes) = fetch(&server, &download_path(body["og:image"].as_str().unwrap()), Some(&alice)).await;
    assert_eq!((status, bytes), (StatusCode::OK, image));
    // Only the first url_preview_max_size bytes are read.
    let (status, body) = preview(&server, &alice, format!("{web}/late")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("og:title").is_none(), "{body}");
    let bad = preview(&server, &alice, "file:///etc/passwd".to_owned()).await;
    assert_error(&bad, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let missing = preview(&server, &alice, format!("{web}/missing")).await;
    assert_error(&missing, StatusCode::BAD_GATEWAY, "M_UNKNOWN");
    server.stop().await;

    let server = TestServer::start_with(backend, |c| c.media.url_preview_enabled = true).await;
    let (_, alice, _) = server.register("alice").await;
    let refused = preview(&server, &alice, format!("{web}/page")).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let by_name = preview(&server, &alice, format!("{}/page", web.replace("127.0.0.1", "localhost"))).await;
    assert_error(&by_name, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    server.stop().await;
}
