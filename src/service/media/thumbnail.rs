//! Thumbnails: which of the spec's sizes answers a request, and making one from an
//! image file (PNG, JPEG, WebP, GIF's first frame). Decoding untrusted files is
//! bounded by `image::Limits` (largest width and height, most memory) before any pixel
//! is decoded, and runs on the blocking pool. It knows nothing of the database.

use std::{io::Cursor, path::Path};

use image::{DynamicImage, ImageFormat, ImageReader, imageops::FilterType};

use crate::error::{Error, Result};

/// A thumbnail method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Crop,
    Scale,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Crop => "crop",
            Method::Scale => "scale",
        }
    }
}

/// The sizes the spec suggests: made on demand, then cached.
pub const SIZES: [(u32, u32, Method); 5] = [
    (32, 32, Method::Crop),
    (96, 96, Method::Crop),
    (320, 240, Method::Scale),
    (640, 480, Method::Scale),
    (800, 600, Method::Scale),
];

/// The suggested size that answers a request for `width` × `height`: the smallest of
/// the method's sizes at least as large in both dimensions, else its largest.
pub fn pick(width: u32, height: u32, method: Method) -> (u32, u32) {
    let sizes = SIZES.iter().filter(|s| s.2 == method);
    sizes
        .clone()
        .find(|(w, h, _)| *w >= width && *h >= height)
        .or_else(|| sizes.clone().next_back())
        .map(|&(w, h, _)| (w, h))
        .unwrap_or((width, height))
}

/// Bounds on decoding one untrusted image.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    pub max_dimension: u32,
    pub max_alloc: u64,
}

/// What making a thumbnail gave.
pub enum Made {
    /// The image is no larger than the size asked for: serve the original, whose
    /// content type (by its bytes) this is.
    Original(&'static str),
    /// The thumbnail's bytes and content type.
    Thumbnail(Vec<u8>, &'static str),
}

/// The formats Convo thumbnails (and whose originals are images it may serve as their
/// own thumbnail).
fn supported(format: ImageFormat) -> bool {
    matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP)
}

/// The content type of the file at `path` if its bytes are a type that may be
/// animated (GIF or WebP): for `animated=true`, the original is the thumbnail.
pub fn animated_type(path: &Path) -> Option<&'static str> {
    let format = ImageReader::open(path).and_then(|r| r.with_guessed_format()).ok()?.format()?;
    matches!(format, ImageFormat::Gif | ImageFormat::WebP).then(|| format.to_mime_type())
}

fn cannot(detail: impl std::fmt::Display) -> Error {
    tracing::debug!(%detail, "no thumbnail");
    Error::unknown(axum::http::StatusCode::BAD_REQUEST, "Cannot generate a thumbnail for this content")
}

/// Makes a `width` × `height` thumbnail of the image at `path` (blocking: run it on
/// the blocking pool). Content that is not a supported image, or is larger than the
/// limits allow, is `400 M_UNKNOWN`, as the spec says.
pub fn make(path: &Path, width: u32, height: u32, method: Method, limits: DecodeLimits) -> Result<Made> {
    let reader = ImageReader::open(path).map_err(cannot)?.with_guessed_format().map_err(cannot)?;
    let format = reader.format().filter(|f| supported(*f)).ok_or_else(|| cannot("not a supported image"))?;
    let mut bounds = image::Limits::default();
    bounds.max_image_width = Some(limits.max_dimension);
    bounds.max_image_height = Some(limits.max_dimension);
    bounds.max_alloc = Some(limits.max_alloc);
    let mut reader = reader;
    reader.limits(bounds);
    let image = reader.decode().map_err(cannot)?;
    let (iw, ih) = (image.width(), image.height());
    let thumb = match method {
        // Never upscaled: an image that fits in the box is its own thumbnail.
        Method::Scale if iw <= width && ih <= height => return Ok(Made::Original(format.to_mime_type())),
        Method::Scale => image.resize(width, height, FilterType::Triangle),
        Method::Crop if iw <= width && ih <= height => return Ok(Made::Original(format.to_mime_type())),
        Method::Crop => crop(&image, width, height),
    };
    let alpha = thumb.color().has_alpha() || matches!(format, ImageFormat::Png | ImageFormat::Gif);
    let mut out = Cursor::new(Vec::new());
    if alpha {
        thumb.write_to(&mut out, ImageFormat::Png).map_err(Error::internal)?;
        Ok(Made::Thumbnail(out.into_inner(), "image/png"))
    } else {
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85);
        DynamicImage::ImageRgb8(thumb.to_rgb8()).write_with_encoder(encoder).map_err(Error::internal)?;
        Ok(Made::Thumbnail(out.into_inner(), "image/jpeg"))
    }
}

/// The largest centred part of the image with the box's aspect ratio, scaled down to
/// the box (or kept at its size when it is smaller: never upscaled).
fn crop(image: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    let (iw, ih) = (u64::from(image.width()), u64::from(image.height()));
    let (w, h) = (u64::from(width), u64::from(height));
    // The crop window: as wide as possible with aspect w:h.
    let (cw, ch) = if iw * h > ih * w { (ih * w / h, ih) } else { (iw, iw * h / w) };
    let (cw, ch) = (cw.max(1) as u32, ch.max(1) as u32);
    let x = (image.width() - cw) / 2;
    let y = (image.height() - ch) / 2;
    let window = image.crop_imm(x, y, cw, ch);
    if cw <= width || ch <= height { window } else { window.resize_exact(width, height, FilterType::Triangle) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_the_suggested_sizes() {
        assert_eq!(pick(10, 10, Method::Crop), (32, 32));
        assert_eq!(pick(33, 20, Method::Crop), (96, 96));
        assert_eq!(pick(500, 500, Method::Crop), (96, 96));
        assert_eq!(pick(1, 1, Method::Scale), (320, 240));
        assert_eq!(pick(400, 100, Method::Scale), (640, 480));
        assert_eq!(pick(5000, 5000, Method::Scale), (800, 600));
    }
}
