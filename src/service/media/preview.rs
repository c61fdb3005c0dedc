//! URL previews (`/_matrix/client/v1/media/preview_url`), off unless
//! `media.url_preview_enabled`. A page is fetched only from public addresses (the rule
//! of federation's outbound requests, `discovery::is_public`, relaxed by
//! `federation.allow_private_destinations`): every address a host name resolves to is
//! checked, IP literals too, on every redirect (at most 3). At most
//! `media.url_preview_max_size` bytes are read, all within `url_preview_timeout_ms`. The
//! OpenGraph title, description and image (stored here as media) make the answer.

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::{
    error::{Error, Result},
    service::{Services, federation::discovery::is_public, now_ms},
    storage::NewContent,
};

/// The most redirects a preview follows.
const MAX_REDIRECTS: usize = 3;

/// Resolves host names to their allowed addresses only.
#[derive(Clone)]
struct AllowedAddrs {
    allow_private: bool,
}

impl reqwest::dns::Resolve for AllowedAddrs {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether a URL may be fetched: http or https, and not an IP literal that is not public.
fn allowed_url(url: &reqwest::Url, allow_private: bool) -> bool {
    if !matches!(url.scheme(), "http" | "https") {
        return false;
    }
    let Some(host) = url.host_str() else { return false };
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => allow_private || is_public(ip),
        // A name: its addresses are checked when it is resolved (`AllowedAddrs`).
        Err(_) => true,
    }
}

fn refused() -> Error {
    Error::forbidden("URL previews are fetched only from public http(s) addresses")
}

impl Services {
    /// The preview client: the address rule at each connection and each redirect.
    fn preview_client(&self) -> Result<reqwest::Client> {
        let allow_private = self.config.federation.allow_private_destinations;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(Error::internal)?
            .with_root_certificates(crate::service::federation::client::system_roots())
            .with_no_client_auth();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if !allowed_url(attempt.url(), allow_private) {
                attempt.error("a redirect to an address that is not public")
            } else {
                attempt.follow()
            }
        });
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(AllowedAddrs { allow_private })
            .redirect(redirects)
            .timeout(Duration::from_millis(self.config.media.url_preview_timeout_ms))
            .user_agent(concat!("Convo/", env!("CARGO_PKG_VERSION"), " (URL preview)"))
            .build()
            .map_err(Error::internal)
    }

    /// The OpenGraph data of a page (`og:title`, `og:description`, `og:image` as an
    /// `mxc://` URI with `matrix:image:size`), when URL previews are on.
    pub async fn preview_url(&self, url: &str) -> Result<Map<String, Value>> {
        if !self.config.media.url_preview_enabled {
            return Err(Error::not_found("URL previews are turned off on this server"));
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| Error::invalid_param(format!("Not a URL: {e}")))?;
        if !allowed_url(&parsed, self.config.federation.allow_private_destinations) {
            return Err(refused());
        }
        let timeout = Duration::from_millis(self.config.media.url_preview_timeout_ms);
        tokio::time::timeout(timeout, self.make_preview(parsed))
            .await
            .map_err(|_| Error::unknown(StatusCode::GATEWAY_TIMEOUT, "The page did not answer in time"))?
    }

    async fn make_preview(&self, url: reqwest::Url) -> Result<Map<String, Value>> {
        let client = self.preview_client()?;
        let limit = self.config.media.url_preview_max_size;
        let (content_type, body, final_url) = fetch_limited(&client, url, limit).await?;
        let mut data = Map::new();
        if content_type.starts_with("image/") {
            self.add_preview_image(&mut data, body, &content_type).await?;
            return Ok(data);
        }
        if !content_type.starts_with("text/html") {
            return Ok(data);
        }
        let html = String::from_utf8_lossy(&body);
        let meta = opengraph(&html);
        for key in ["og:title", "og:description", "og:site_name", "og:type", "og:url"] {
            if let Some(value) = meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()) {
                data.insert(key.to_owned(), Value::String(value));
            }
        }
        if !data.contains_key("og:title")
            && let Some(title) = title(&html)
        {
            data.insert("og:title".to_owned(), Value::String(title));
        }
        if !data.contains_key("og:description")
            && let Some((_, d)) = meta.iter().find(|(k, _)| k == "description")
        {
            data.insert("og:description".to_owned(), Value::String(d.clone()));
        }
        let image = meta.iter().find(|(k, _)| k == "og:image" || k == "og:image:url").map(|(_, v)| v.clone());
        if let Some(image_url) = image.and_then(|i| final_url.join(&i).ok())
            && allowed_url(&image_url, self.config.federation.allow_private_destinations)
        {
            // An image that cannot be had leaves the preview without one.
            match fetch_limited(&client, image_url, self.config.media.max_upload_size).await {
                Ok((image_type, bytes, _)) if image_type.starts_with("image/") => {
                    self.add_preview_image(&mut data, bytes, &image_type).await?;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "URL preview: no image"),
            }
        }
        Ok(data)
    }

    /// Stores a preview's image as media of this server and names it in `data`.
    async fn add_preview_image(&self, data: &mut Map<String, Value>, bytes: Vec<u8>, content_type: &str) -> Result<()> {
        let staged = self.media.files.stage_bytes(bytes).await?;
        let media_id = crate::service::ids::generate_session_id();
        let (hash, size) = (staged.hash.clone(), staged.size);
        let content_type = content_type.split(';').next().unwrap_or_default().trim().to_owned();
        let content =
            NewContent { content_hash: &hash, content_type: Some(&content_type), file_name: None, size: size as i64 };
        let server = self.server_name().as_str();
        let insert = async {
            self.store.insert_remote_media(server, &media_id, &content, now_ms()).await?;
            Ok(true)
        };
        self.place_and_store(staged, insert).await?;
        data.insert("og:image".to_owned(), Value::String(format!("mxc://{server}/{media_id}")));
        data.insert("og:image:type".to_owned(), Value::String(content_type));
        data.insert("matrix:image:size".to_owned(), Value::from(size));
        Ok(())
    }
}

/// GETs `url` and reads at most `limit` bytes of it (a longer body is cut, not
/// refused: a page's head is what a preview needs). Answers its content type, the bytes
/// and the URL after redirects.
async fn fetch_limited(
    client: &reqwest::Client,
    url: reqwest::Url,
    limit: u64,
) -> Result<(String, Vec<u8>, reqwest::Url)> {
    let fail = |e: reqwest::Error| {
        tracing::debug!(error = %e, "URL preview: fetch failed");
        // The address rule's refusals: a redirect it stopped, or a name it resolved to
        // no allowed address (`AllowedAddrs`'s message, somewhere in the causes).
        let mut causes = Some(&e as &(dyn std::error::Error + 'static));
        let mut no_public_address = false;
        while let Some(cause) = causes {
            no_public_address |= cause.to_string().contains("has no public address");
            causes = cause.source();
        }
        if e.is_redirect() || no_public_address {
            refused()
        } else {
            Error::unknown(StatusCode::BAD_GATEWAY, "The page could not be fetched")
        }
    };
    let mut response = client.get(url).send().await.map_err(fail)?;
    if !response.status().is_success() {
        return Err(Error::unknown(
            StatusCode::BAD_GATEWAY,
            format!("The page answered {}", response.status().as_u16()),
        ));
    }
    let final_url = response.url().clone();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(fail)? {
        let room = (limit as usize).saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() as u64 >= limit {
            break;
        }
    }
    Ok((content_type, body, final_url))
}

/// The `<meta property|name=... content=...>` pairs of a page, keys lowercased.
fn opengraph(html: &str) -> Vec<(String, String)> {
    let lower = html.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(start) = lower[from..].find("<meta").map(|i| from + i) {
        let end = lower[start..].find('>').map_or(lower.len(), |i| start + i);
        let tag = &html[start..end];
        let key = attribute(tag, "property").or_else(|| attribute(tag, "name"));
        if let (Some(key), Some(content)) = (key, attribute(tag, "content")) {
            out.push((key.to_ascii_lowercase(), content));
        }
        from = end;
    }
    out
}

/// The value of attribute `name` in a tag's text (quoted or bare), entities decoded.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name).map(|i| from + i) {
        from = i + name.len();
        let before = lower[..i].chars().next_back();
        if !before.is_some_and(char::is_whitespace) {
            continue;
        }
        let rest = tag[from..].trim_start();
        let Some(rest) = rest.strip_prefix('=') else { continue };
        let rest = rest.trim_start();
        let value = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => rest[1..].split(q).next().unwrap_or_default(),
            _ => rest.split(|c: char| c.is_whitespace() || c == '/').next().unwrap_or_default(),
        };
        return Some(decode_entities(value));
    }
    None
}

/// The text of the page's `<title>`.
fn title(html: &str) -> Option<String> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open_end = start + lower[start..].find('>')? + 1;
    let close = open_end + lower[open_end..].find("</title")?;
    let text = decode_entities(html[open_end..close].trim());
    (!text.is_empty()).then_some(text)
}

fn decode_entities(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opengraph_tags_are_read() {
        let html = r#"<html><head><title>Plain &amp; simple</title>
            <meta property="og:title" content="The &quot;title&quot;">
            <META name=description content='A page'>
            <meta content="/a.png" property="og:image" /></head></html>"#;
        let meta = opengraph(html);
        assert!(meta.contains(&("og:title".into(), "The \"title\"".into())), "{meta:?}");
        assert!(meta.contains(&("description".into(), "A page".into())), "{meta:?}");
        assert!(meta.contains(&("og:image".into(), "/a.png".into())), "{meta:?}");
        assert_eq!(title(html).as_deref(), Some("Plain & simple"));
    }

    #[test]
    fn only_public_http_urls_are_allowed() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(allowed_url(&url("https://example.org/x"), false));
        assert!(allowed_url(&url("http://93.184.216.34/"), false));
        for refused in
            ["http://127.0.0.1/", "http://10.0.0.1/", "http://[::1]/", "file:///etc/passwd", "ftp://example.org/"]
        {
            assert!(!allowed_url(&url(refused), false), "{refused}");
        }
        assert!(allowed_url(&url("http://127.0.0.1/"), true));
    }
}
