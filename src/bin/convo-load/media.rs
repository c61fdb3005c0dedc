//! The load tool's `media` scenario: one user uploads a `--media-size-mb` file (10 MB by
//! default) `--media-rounds` times (each file differs, so no upload is a duplicate of
//! another) and downloads each once through the authenticated v1 endpoint; then uploads
//! `--media-rounds` JPEGs of about 2 megapixels (1,632 × 1,224, made here) and asks for a
//! 320 × 240 scaled thumbnail of each twice: the first request (made on demand by
//! Convo; Synapse makes its default sizes at upload) and the second (cached). Reported:
//! upload and download throughput (MB/s, median and slowest), thumbnail latency
//! (median and p99 of each), server CPU and RSS during each phase.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Api, Args, Meter, Outcome, Res, User, ms, pct, r2, sorted};

/// Options of the media scenario (flattened into the tool's arguments).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct MediaArgs {
    /// media: size of each uploaded file, in MB (MiB).
    #[arg(long, default_value_t = 10)]
    media_size_mb: usize,
    /// media: files uploaded and downloaded, and JPEGs thumbnailed.
    #[arg(long, default_value_t = 5)]
    media_rounds: usize,
}

const JPEG_WIDTH: u32 = 1_632;
const JPEG_HEIGHT: u32 = 1_224;

/// `len` bytes that differ with `seed` (xorshift), so every upload is new content.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A photo-like JPEG of about 2 megapixels (gradients with noise), different per seed.
fn jpeg(seed: u64) -> Res<Vec<u8>> {
    let noise = payload((JPEG_WIDTH * JPEG_HEIGHT) as usize, seed);
    let image = image::RgbImage::from_fn(JPEG_WIDTH, JPEG_HEIGHT, |x, y| {
        let n = noise[(y * JPEG_WIDTH + x) as usize] / 8;
        image::Rgb([(x * 255 / JPEG_WIDTH) as u8 ^ n, (y * 255 / JPEG_HEIGHT) as u8, ((x + y) % 256) as u8 ^ n])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .map_err(|e| format!("cannot encode the JPEG: {e}"))?;
    Ok(out.into_inner())
}

/// Uploads `bytes`; answers (server name, media id).
async fn upload(api: &Api, user: &User, bytes: Vec<u8>, content_type: &str) -> Res<(String, String)> {
    let resp = api
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=load.bin", api.base))
        .bearer_auth(&user.token)
        .header("Content-Type", content_type)
        .body(bytes)
        .send()
        .await
        .map_err(|e| format!("upload: {e}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| format!("upload: {status}: {e}"))?;
    let mxc = v["content_uri"].as_str().ok_or_else(|| format!("upload: {status}: {v}"))?;
    let (server, id) =
        mxc.trim_start_matches("mxc://").split_once('/').ok_or_else(|| format!("upload: bad content_uri {mxc}"))?;
    Ok((server.to_owned(), id.to_owned()))
}

/// GETs `path` (authenticated) and reads the whole body; answers its length.
async fn fetch(api: &Api, user: &User, path: &str) -> Res<usize> {
    let resp = api
        .http
        .get(format!("{}{path}", api.base))
        .bearer_auth(&user.token)
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("GET {path}: body: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET {path}: HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])));
    }
    Ok(body.len())
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / took.as_secs_f64().max(1e-9)
}

fn measured(out: &mut Outcome, meter: &Meter, prefix: &str, values: Vec<f64>, unit: &str) {
    let m = meter.stop();
    let values = sorted(values);
    out.put("count", values.len());
    out.put(&format!("{prefix}_p50_{unit}"), r2(pct(&values, 50.0)));
    if unit == "mb_s" {
        out.put(&format!("{prefix}_slowest_{unit}"), r2(values.first().copied().unwrap_or(0.0)));
    } else {
        out.put(&format!("{prefix}_p99_{unit}"), r2(pct(&values, 99.0)));
    }
    out.measured = Some(m);
}

pub(crate) async fn scenario_media(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Vec<Outcome>> {
    let m = &a.media;
    let rounds = m.media_rounds.max(1);
    let size = m.media_size_mb.max(1) * 1_048_576;
    let user = api.register_many(&format!("{run}m"), 1, 1).await?.remove(0);
    let mut outs = Vec::new();

    // Upload, then download, 10 MB files.
    let mut out = Outcome::new(&format!("media upload {} MB", m.media_size_mb));
    let meter = Meter::start(a.server_pid, tck);
    let (mut rates, mut ids) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let bytes = payload(size, i as u64 + 1);
        let t = Instant::now();
        ids.push(upload(api, &user, bytes, "application/octet-stream").await?);
        rates.push(mb_per_s(size, t.elapsed()));
    }
    measured(&mut out, &meter, "upload", rates, "mb_s");
    outs.push(out);

    let mut out = Outcome::new(&format!("media download {} MB", m.media_size_mb));
    let meter = Meter::start(a.server_pid, tck);
    let mut rates = Vec::new();
    for (server, id) in &ids {
        let t = Instant::now();
        let got = fetch(api, &user, &format!("/_matrix/client/v1/media/download/{server}/{id}")).await?;
        if got != size {
            return Err(format!("download of {id}: {got} bytes, not {size}"));
        }
        rates.push(mb_per_s(size, t.elapsed()));
    }
    measured(&mut out, &meter, "download", rates, "mb_s");
    outs.push(out);

    // Thumbnails of 2 MP JPEGs: first request, then cached.
    let mut jpegs = Vec::new();
    for i in 0..rounds {
        let bytes = jpeg(i as u64 + 100)?;
        jpegs.push(upload(api, &user, bytes, "image/jpeg").await?);
    }
    for (name, prefix) in [("media thumbnail 2 MP, first", "first"), ("media thumbnail 2 MP, cached", "cached")] {
        let mut out = Outcome::new(name);
        let meter = Meter::start(a.server_pid, tck);
        let mut lat = Vec::new();
        for (server, id) in &jpegs {
            let path = format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=320&height=240&method=scale");
            let t = Instant::now();
            fetch(api, &user, &path).await?;
            lat.push(ms(t.elapsed()));
        }
        measured(&mut out, &meter, prefix, lat, "ms");
        outs.push(out);
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::{jpeg, payload};

    #[test]
    fn payloads_differ_and_jpegs_decode_at_two_megapixels() {
        assert_eq!(payload(1000, 1).len(), 1000);
        assert_ne!(payload(64, 1), payload(64, 2));
        let bytes = jpeg(1).unwrap();
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert!(u64::from(decoded.width()) * u64::from(decoded.height()) >= 1_990_000);
    }
}
