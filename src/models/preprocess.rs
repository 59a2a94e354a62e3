//! CLIP image preprocessing as the reference does it: shortest side to the
//! model's input size with PIL's bicubic filter, centre crop, then to a [0, 1]
//! tensor. Normalisation with CLIP's mean and std is `Clip::normalize_pixels`.
//!
//! The resize reproduces Pillow's `Image.resize(..., BICUBIC)` on 8-bit RGB
//! exactly (its separable filter with a = -0.5, widened by the scale when
//! downscaling, fixed-point weights and a u8 round trip between the horizontal
//! and vertical passes), because that is what OpenAI's CLIP and transformers'
//! `CLIPImageProcessor` feed the model.

use candle_core::{Device, Tensor};
use image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot read image {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: image::ImageError,
    },
    #[error("image is empty ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input index and the fixed-point weights.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // `as i64` truncates toward zero, as C's `(int)` cast in Pillow does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let mut w: Vec<f64> = (xmin..xmax)
            .map(|x| bicubic((x as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            w.iter_mut().for_each(|k| *k /= total);
        }
        let fixed = w
            .iter()
            .map(|&k| {
                let v = k * f64::from(1u32 << PRECISION_BITS);
                if k < 0.0 {
                    (v - 0.5) as i32
                } else {
                    (v + 0.5) as i32
                }
            })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    Taps { start, weights }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resample_horizontal(src: &RgbImage, width: u32) -> RgbImage {
    let taps = taps(src.width() as usize, width as usize);
    let mut out = RgbImage::new(width, src.height());
    let (w_in, raw) = (src.width() as usize, src.as_raw());
    for y in 0..src.height() as usize {
        let row = &raw[y * w_in * 3..(y + 1) * w_in * 3];
        for (xx, (start, weights)) in taps.start.iter().zip(&taps.weights).enumerate() {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, &k) in weights.iter().enumerate() {
                let px = &row[(start + i) * 3..(start + i) * 3 + 3];
                for c in 0..3 {
                    acc[c] += i64::from(px[c]) * i64::from(k);
                }
            }
            out.put_pixel(xx as u32, y as u32, image::Rgb(acc.map(clip8)));
        }
    }
    out
}

fn resample_vertical(src: &RgbImage, height: u32) -> RgbImage {
    let taps = taps(src.height() as usize, height as usize);
    let mut out = RgbImage::new(src.width(), height);
    let (w, raw) = (src.width() as usize, src.as_raw());
    for (yy, (start, weights)) in taps.start.iter().zip(&taps.weights).enumerate() {
        for x in 0..w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, &k) in weights.iter().enumerate() {
                let at = ((start + i) * w + x) * 3;
                for c in 0..3 {
                    acc[c] += i64::from(raw[at + c]) * i64::from(k);
                }
            }
            out.put_pixel(x as u32, yy as u32, image::Rgb(acc.map(clip8)));
        }
    }
    out
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` for 8-bit RGB.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let horizontal = width != src.width();
    let vertical = height != src.height();
    match (horizontal, vertical) {
        (false, false) => src.clone(),
        (true, false) => resample_horizontal(src, width),
        (false, true) => resample_vertical(src, height),
        // Pillow runs the horizontal pass first and rounds to u8 in between.
        (true, true) => resample_vertical(&resample_horizontal(src, width), height),
    }
}

/// The size after scaling the shortest side to `size`, the long side truncated
/// as transformers and torchvision do (`int(size * long / short)`).
pub fn shortest_side_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = (width.min(height), width.max(height));
    let new_long = (u64::from(size) * u64::from(long) / u64::from(short.max(1))) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// The centre `size`×`size` square, offsets rounded down as transformers does.
pub fn center_crop(src: &RgbImage, size: u32) -> RgbImage {
    let left = src.width().saturating_sub(size) / 2;
    let top = src.height().saturating_sub(size) / 2;
    image::imageops::crop_imm(
        src,
        left,
        top,
        size.min(src.width()),
        size.min(src.height()),
    )
    .to_image()
}

/// Resize (shortest side) and centre-crop to `size`×`size`, as 8-bit RGB.
pub fn clip_square(src: &RgbImage, size: u32) -> Result<RgbImage, PreprocessError> {
    if src.width() == 0 || src.height() == 0 {
        return Err(PreprocessError::Empty {
            width: src.width(),
            height: src.height(),
        });
    }
    let (w, h) = shortest_side_size(src.width(), src.height(), size);
    Ok(center_crop(&resize_bicubic(src, w, h), size))
}

/// 8-bit RGB to a (1, 3, H, W) f32 tensor in [0, 1].
pub fn to_unit_tensor(img: &RgbImage, device: &Device) -> Result<Tensor, PreprocessError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planar = vec![0f32; 3 * w * h];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            // transformers rescales in f64 and then casts to f32.
            planar[c * w * h + i] = (f64::from(px[c]) * (1.0 / 255.0)) as f32;
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), device)?)
}

/// CLIP's input for an image: (1, 3, size, size) in [0, 1], before normalisation.
pub fn clip_pixels(
    img: &image::DynamicImage,
    size: usize,
    device: &Device,
) -> Result<Tensor, PreprocessError> {
    let square = clip_square(&img.to_rgb8(), size as u32)?;
    to_unit_tensor(&square, device)
}

/// Reads an image file (PNG, JPEG or WebP).
pub fn open_image(path: &std::path::Path) -> Result<image::DynamicImage, PreprocessError> {
    image::open(path).map_err(|source| PreprocessError::Read {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 37 + y * 11) as u8,
                (x * x + 3 * y) as u8,
                ((x ^ y) * 29) as u8,
            ])
        })
    }

    #[test]
    fn a_square_input_at_the_model_size_is_unchanged() {
        let img = pattern(224, 224);
        let out = clip_square(&img, 224).unwrap();
        assert_eq!(out, img);
        let t = to_unit_tensor(&out, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 224, 224]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                assert_eq!(v[c * 224 * 224 + i], f32::from(px[c]) / 255.0);
            }
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(97, 32), (32, 97), (224, 224), (5, 3)] {
            let t = taps(i, o);
            for w in &t.weights {
                let s: i64 = w.iter().map(|&k| i64::from(k)).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    #[test]
    fn flat_colour_stays_flat() {
        let img = RgbImage::from_pixel(97, 61, image::Rgb([200, 13, 77]));
        let out = resize_bicubic(&img, 40, 25);
        assert!(out.pixels().all(|p| p.0 == [200, 13, 77]));
    }

    #[test]
    fn shortest_side_truncates_the_long_side() {
        assert_eq!(shortest_side_size(300, 200, 224), (336, 224));
        assert_eq!(shortest_side_size(61, 97, 32), (32, 50));
        assert_eq!(shortest_side_size(640, 480, 224), (298, 224));
    }
}
