//! What a render writes: PNGs with text metadata, the MP4 of the frames, and
//! `metadata.json`; plus the image conversions the loop needs.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, RgbImage};
use serde::Serialize;

use super::history::History;
use super::job::{RenderError, RenderJob};
use super::models::{ModelIdentities, ModelSet};
use super::spec::{ImageRef, JobSpec};
use super::steer::AppliedRevision;

fn encode_err(what: &'static str, reason: impl ToString) -> RenderError {
    RenderError::Encode {
        what,
        reason: reason.to_string(),
    }
}

/// An RGB image to a (1, 3, H, W) tensor in [0, 1].
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&b| f32::from(b) / 255.0).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// A (1, 3, H, W) tensor in [0, 1] to 8-bit RGB, rounding to nearest.
pub fn tensor_to_image(t: &Tensor) -> Result<RgbImage, RenderError> {
    let (_, _, h, w) = t.dims4()?;
    let data: Vec<f32> = t
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let bytes = data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| encode_err("image", "buffer size mismatch"))
}

/// generate.py's `resize_image`: keep the aspect ratio, at most the target's area.
pub fn resize_keep_area(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    let ratio = f64::from(iw) / f64::from(ih);
    let area = (f64::from(iw) * f64::from(ih)).min(f64::from(width) * f64::from(height));
    let w = ((area * ratio).sqrt().round() as u32).max(1);
    let h = ((area / ratio).sqrt().round() as u32).max(1);
    image::imageops::resize(img, w, h, FilterType::Lanczos3)
}

pub fn resize_exact(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    image::imageops::resize(img, width, height, FilterType::Lanczos3)
}

/// generate.py's `zoom_at` about the centre, then `ImageChops.offset` (wrapping shift).
pub fn zoom_and_shift(img: &RgbImage, scale: f32, shift_x: i32, shift_y: i32) -> RgbImage {
    let (w, h) = img.dimensions();
    let zoomed = if (scale - 1.0).abs() > f32::EPSILON {
        let cw = (f64::from(w) / f64::from(scale))
            .round()
            .clamp(1.0, f64::from(w)) as u32;
        let ch = (f64::from(h) / f64::from(scale))
            .round()
            .clamp(1.0, f64::from(h)) as u32;
        if cw <= w && ch <= h {
            let crop =
                image::imageops::crop_imm(img, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
            image::imageops::resize(&crop, w, h, FilterType::Lanczos3)
        } else {
            img.clone()
        }
    } else {
        img.clone()
    };
    if shift_x == 0 && shift_y == 0 {
        return zoomed;
    }
    RgbImage::from_fn(w, h, |x, y| {
        let sx = (i64::from(x) - i64::from(shift_x)).rem_euclid(i64::from(w)) as u32;
        let sy = (i64::from(y) - i64::from(shift_y)).rem_euclid(i64::from(h)) as u32;
        *zoomed.get_pixel(sx, sy)
    })
}

/// The spec as recorded in outputs: inline `data:` images are replaced by their
/// media type, size and sha256, so a PNG's text chunk does not carry a second image.
pub fn record_spec(spec: &JobSpec) -> JobSpec {
    use sha2::{Digest, Sha256};
    let shorten = |reference: &mut String| {
        if let Ok(ImageRef::Inline { media_type, bytes }) = ImageRef::parse(reference) {
            *reference = format!(
                "inline:{media_type};bytes={};sha256={}",
                bytes.len(),
                hex::encode(Sha256::digest(&bytes))
            );
        }
    };
    let mut spec = spec.clone();
    for prompt in &mut spec.image_prompts {
        shorten(&mut prompt.image);
    }
    if let Some(init) = &mut spec.init_image {
        shorten(init);
    }
    spec
}

/// The text chunks of the final PNG.
pub fn png_text(job: &RenderJob, identities: &ModelIdentities) -> Vec<(String, String)> {
    let prompts = prompts_text(job);
    vec![
        ("prompts".into(), prompts),
        ("seed".into(), job.seed.to_string()),
        (
            "parameters".into(),
            serde_json::to_string(&record_spec(&job.spec)).unwrap_or_default(),
        ),
        (
            "software".into(),
            format!("vqclip {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "models".into(),
            serde_json::to_string(identities).unwrap_or_default(),
        ),
    ]
}

/// Writes an 8-bit RGB PNG with text chunks: `tEXt` when the text is Latin-1,
/// `iTXt` (UTF-8) otherwise.
pub fn write_png(
    path: &Path,
    img: &RgbImage,
    text: &[(String, String)],
) -> Result<(), RenderError> {
    let file = std::fs::File::create(path).map_err(|e| RenderError::io(path, e))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), img.width(), img.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        let latin1 = value.chars().all(|c| (c as u32) < 256 && c != '\0');
        let added = if latin1 {
            encoder.add_text_chunk(key.clone(), value.clone())
        } else {
            encoder.add_itxt_chunk(key.clone(), value.clone())
        };
        added.map_err(|e| encode_err("PNG", e))?;
    }
    let mut writer = encoder.write_header().map_err(|e| encode_err("PNG", e))?;
    writer
        .write_image_data(img.as_raw())
        .map_err(|e| encode_err("PNG", e))?;
    writer.finish().map_err(|e| encode_err("PNG", e))
}

/// The frames written so far, in step order.
pub fn list_frames(dir: &Path) -> Result<Vec<PathBuf>, RenderError> {
    let mut frames: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| RenderError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    frames.sort();
    Ok(frames)
}

/// How an MP4 is written: its frame rate, interpolation and metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mp4Options {
    /// The rate the given frames are shown at.
    pub fps: f32,
    /// Cross-fade between neighbouring frames up to this rate (above `fps`).
    pub output_fps: Option<f32>,
    /// Written as iTunes-style `udta/meta/ilst` items: `©nam` (title) and `desc`.
    pub title: Option<String>,
    pub description: Option<String>,
}

impl Mp4Options {
    pub fn at(fps: f32) -> Self {
        Mp4Options {
            fps,
            ..Default::default()
        }
    }
}

/// The MP4 options of a job's frames: generate.py's `--video_length` /
/// `--output_video_fps` rates, and the prompt and seed in the metadata (generate.py
/// writes the prompt as ffmpeg's `comment`).
pub fn job_mp4_options(job: &RenderJob, fps: f32) -> Mp4Options {
    let prompts = prompts_text(job);
    Mp4Options {
        fps,
        output_fps: job.spec.video.output_fps,
        description: Some(format!("{prompts}\nseed: {}", job.seed)),
        title: Some(prompts),
    }
}

/// Writes a finished job's frames as its video, at the rate the spec asks for.
pub fn write_job_mp4(path: &Path, frames: &[PathBuf], job: &RenderJob) -> Result<(), RenderError> {
    let fps = job.spec.video.frame_rate(frames.len());
    write_mp4_with(path, frames, &job_mp4_options(job, fps))
}

/// Encodes the frames as H.264 (openh264, built from source by cargo) in an MP4.
pub fn write_mp4(path: &Path, frames: &[PathBuf], fps: f32) -> Result<(), RenderError> {
    write_mp4_with(path, frames, &Mp4Options::at(fps))
}

/// [`write_mp4`] with interpolation and metadata.
pub fn write_mp4_with(
    path: &Path,
    frames: &[PathBuf],
    options: &Mp4Options,
) -> Result<(), RenderError> {
    use openh264::encoder::{Encoder, EncoderConfig};
    use openh264::formats::{RgbSliceU8, YUVBuffer};
    use openh264::OpenH264API;

    if frames.is_empty() {
        return Err(encode_err("video", "there are no frames to encode"));
    }
    // Encoded at the output rate; interpolated frames fill the gaps.
    let fps = options.output_fps.unwrap_or(options.fps);
    let schedule = interpolation_schedule(frames.len(), options.fps, options.output_fps);
    let first = image::open(&frames[0])
        .map_err(|e| encode_err("video", e))?
        .to_rgb8();
    let (w, h) = first.dimensions();
    let config = EncoderConfig::new()
        .max_frame_rate(openh264::encoder::FrameRate::from_hz(fps))
        .bitrate(openh264::encoder::BitRate::from_bps(w * h * 8))
        // openh264 drops frames to hold the bitrate by default; each dropped frame
        // would become a zero-byte sample that players show as a frozen picture.
        .skip_frames(false)
        // Bitrate and quality modes need skipping to hold their target (openh264 warns
        // on every encoder otherwise); buffer-based control adjusts quality instead.
        .rate_control_mode(openh264::encoder::RateControlMode::Bufferbased);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| encode_err("video", e))?;

    // The track ticks `fps · 1000` times a second so every frame lasts exactly 1000.
    let timescale = (f64::from(fps) * 1000.0).round().max(1.0) as u32;
    let frame_ticks = 1000u32;
    let mut sps = None;
    let mut pps = None;
    let mut samples: Vec<(Vec<u8>, bool)> = Vec::with_capacity(schedule.len());
    // The two source frames the current output frame lies between.
    let mut loaded: Vec<(usize, RgbImage)> = vec![(0, first)];
    for &(a, b, t) in &schedule {
        for i in [a, b] {
            if loaded.iter().all(|(j, _)| *j != i) {
                let img = image::open(&frames[i])
                    .map_err(|e| encode_err("video", e))?
                    .to_rgb8();
                if img.dimensions() != (w, h) {
                    return Err(encode_err(
                        "video",
                        format!(
                            "{} differs in size from the first frame",
                            frames[i].display()
                        ),
                    ));
                }
                loaded.push((i, img));
            }
        }
        loaded.retain(|(j, _)| *j >= a);
        let pick = |i: usize| loaded.iter().find(|(j, _)| *j == i).map(|(_, img)| img);
        let (Some(from), Some(to)) = (pick(a), pick(b)) else {
            return Err(encode_err("video", "an interpolated frame lost its source"));
        };
        let img = cross_fade(from, to, t);
        let yuv =
            YUVBuffer::from_rgb8_source(RgbSliceU8::new(img.as_raw(), (w as usize, h as usize)));
        let mut annex_b = encoder
            .encode(&yuv)
            .map_err(|e| encode_err("video", e))?
            .to_vec();
        if annex_b.is_empty() {
            // Should the encoder still skip one, a key frame is never skipped.
            encoder.force_intra_frame();
            annex_b = encoder
                .encode(&yuv)
                .map_err(|e| encode_err("video", e))?
                .to_vec();
        }
        let mut sample = Vec::with_capacity(annex_b.len());
        let mut sync = false;
        for nal in split_annex_b(&annex_b) {
            match nal[0] & 0x1f {
                7 => sps = Some(nal.to_vec()),
                8 => pps = Some(nal.to_vec()),
                t => {
                    sync |= t == 5;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        if sample.is_empty() {
            return Err(encode_err(
                "video",
                format!(
                    "the encoder produced no picture for output frame {}",
                    samples.len()
                ),
            ));
        }
        samples.push((sample, sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(encode_err("video", "the encoder produced no SPS/PPS"));
    };

    let file = std::fs::File::create(path).map_err(|e| RenderError::io(path, e))?;
    let mp4_config = mp4::Mp4Config {
        major_brand: str::parse("isom").map_err(|e| encode_err("video", e))?,
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .map(|b| str::parse(b))
            .collect::<Result<_, _>>()
            .map_err(|e| encode_err("video", e))?,
        timescale: 1000,
    };
    let mut writer = mp4::Mp4Writer::write_start(BufWriter::new(file), &mp4_config)
        .map_err(|e| encode_err("video", e))?;
    let track = mp4::TrackConfig {
        track_type: mp4::TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
            width: w as u16,
            height: h as u16,
            seq_param_set: sps,
            pic_param_set: pps,
        }),
    };
    writer
        .add_track(&track)
        .map_err(|e| encode_err("video", e))?;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * u64::from(frame_ticks),
            duration: frame_ticks,
            rendering_offset: 0,
            is_sync,
            bytes: bytes.into(),
        };
        writer
            .write_sample(1, &sample)
            .map_err(|e| encode_err("video", e))?;
    }
    writer.write_end().map_err(|e| encode_err("video", e))?;
    let mut file = writer.into_writer();
    std::io::Write::flush(&mut file).map_err(|e| RenderError::io(path, e))?;
    drop(file);
    if options.title.is_some() || options.description.is_some() {
        append_metadata(path, options)?;
    }
    Ok(())
}

/// For each output frame, the two source frames it lies between and the weight of
/// the second. Without interpolation every source frame is shown once; with it, the
/// video keeps its length (`frames / fps` seconds) at `output_fps`.
pub fn interpolation_schedule(
    frames: usize,
    fps: f32,
    output_fps: Option<f32>,
) -> Vec<(usize, usize, f32)> {
    let Some(out) = output_fps.filter(|o| *o > fps && fps > 0.0 && frames > 1) else {
        return (0..frames).map(|i| (i, i, 0.0)).collect();
    };
    let ratio = f64::from(fps) / f64::from(out);
    let count = ((frames as f64) / ratio).round().max(1.0) as usize;
    (0..count)
        .map(|k| {
            let at = k as f64 * ratio;
            let a = (at.floor() as usize).min(frames - 1);
            let b = (a + 1).min(frames - 1);
            let t = if a == b { 0.0 } else { (at - a as f64) as f32 };
            (a, b, t)
        })
        .collect()
}

/// `(1 - t) · a + t · b`, rounded to nearest; `a` and `b` of one size.
pub fn cross_fade(a: &RgbImage, b: &RgbImage, t: f32) -> RgbImage {
    if t <= 0.0 {
        return a.clone();
    }
    let bytes = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (f32::from(x) * (1.0 - t) + f32::from(y) * t).round() as u8)
        .collect();
    RgbImage::from_raw(a.width(), a.height(), bytes).unwrap_or_else(|| a.clone())
}

/// The prompts as one line of text, as the final PNG records them.
fn prompts_text(job: &RenderJob) -> String {
    match &job.spec.prompts {
        super::spec::PromptsSpec::Syntax(s) => s.clone(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// An ISO BMFF box: 32-bit size, type, body.
fn mp4_box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out
}

/// `moov/udta/meta` with an `mdir` handler and an `ilst` of UTF-8 text items, the
/// layout QuickTime, ffmpeg (`-metadata title=`/`description=`) and the `mp4` crate
/// read. The `mp4` crate writes no metadata, so the box is appended to the `moov`
/// it wrote last, and the `moov` size patched.
fn append_metadata(path: &Path, options: &Mp4Options) -> Result<(), RenderError> {
    use std::io::{Read, Seek, SeekFrom, Write};

    let text_item = |kind: &[u8; 4], text: &str| {
        // `data`: type 1 (UTF-8), locale 0, the text.
        let mut data = vec![0, 0, 0, 1, 0, 0, 0, 0];
        data.extend_from_slice(text.as_bytes());
        mp4_box(kind, &mp4_box(b"data", &data))
    };
    let mut items = Vec::new();
    if let Some(title) = &options.title {
        items.extend(text_item(b"\xa9nam", title));
    }
    if let Some(description) = &options.description {
        items.extend(text_item(b"desc", description));
    }
    // hdlr: version/flags, pre_defined, handler `mdir`, three reserved words, empty name.
    let mut hdlr = vec![0u8; 8];
    hdlr.extend_from_slice(b"mdir");
    hdlr.extend_from_slice(&[0u8; 13]);
    let mut meta = vec![0u8; 4];
    meta.extend(mp4_box(b"hdlr", &hdlr));
    meta.extend(mp4_box(b"ilst", &items));
    let udta = mp4_box(b"udta", &mp4_box(b"meta", &meta));

    let io = |e: std::io::Error| RenderError::io(path, e);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut pos = 0u64;
    let mut moov = None;
    while pos + 8 <= len {
        let mut header = [0u8; 8];
        file.seek(SeekFrom::Start(pos)).map_err(io)?;
        file.read_exact(&mut header).map_err(io)?;
        let size = u64::from(u32::from_be_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        if size < 8 {
            // 64-bit or to-the-end sizes: the writer produced neither for `moov`.
            break;
        }
        if &header[4..8] == b"moov" {
            moov = Some((pos, size));
        }
        pos += size;
    }
    let Some((start, size)) = moov.filter(|(s, n)| s + n == len) else {
        return Err(encode_err(
            "video",
            "the MP4 does not end with its moov box",
        ));
    };
    let new_size = u32::try_from(size + udta.len() as u64)
        .map_err(|_| encode_err("video", "the moov box would exceed 4 GiB"))?;
    file.seek(SeekFrom::End(0)).map_err(io)?;
    file.write_all(&udta).map_err(io)?;
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    file.write_all(&new_size.to_be_bytes()).map_err(io)?;
    file.flush().map_err(io)
}

/// NAL units of an Annex B stream, without their start codes.
fn split_annex_b(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut nals = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(data.len(), |&n| n - 3);
        // A four-byte start code leaves one zero before the next three-byte marker.
        while end > s && data[end - 1] == 0 && k + 1 < starts.len() {
            end -= 1;
        }
        if end > s {
            nals.push(&data[s..end]);
        }
    }
    nals
}

#[derive(Serialize)]
struct Metadata<'a> {
    vqclip_version: &'static str,
    spec: JobSpec,
    seed: u64,
    width: u32,
    height: u32,
    models: &'a ModelIdentities,
    steps_done: usize,
    /// Per step, one loss per prompt (then the regulariser).
    losses: &'a [Vec<f32>],
    step_seconds: &'a [f64],
    total_seconds: f64,
    /// Final CLIP cosine similarity per prompt of the last phrase, ensemble mean.
    final_similarity: &'a [f32],
    /// The changes steered into the job, each with the step it took effect at.
    revisions: &'a [AppliedRevision],
}

pub fn write_metadata(
    path: &Path,
    job: &RenderJob,
    models: &ModelSet,
    history: &History,
    similarities: &[f32],
    revisions: &[AppliedRevision],
) -> Result<(), RenderError> {
    let meta = Metadata {
        vqclip_version: env!("CARGO_PKG_VERSION"),
        spec: record_spec(&job.spec),
        seed: job.seed,
        width: job.spec.width,
        height: job.spec.height,
        models: &models.identities,
        steps_done: history.losses.len(),
        losses: &history.losses,
        step_seconds: &history.step_seconds,
        total_seconds: history.step_seconds.iter().sum(),
        final_similarity: similarities,
        revisions,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| encode_err("metadata", e))?;
    std::fs::write(path, json).map_err(|e| RenderError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annex_b_splits_on_three_and_four_byte_codes() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5,
        ];
        let nals = split_annex_b(&data);
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]
        );
    }

    #[test]
    fn mp4_reads_back_with_size_frames_and_duration() {
        let dir = tempfile::tempdir().unwrap();
        let mut frames = Vec::new();
        for i in 0..5u8 {
            let img = RgbImage::from_fn(64, 48, |x, y| {
                image::Rgb([x as u8 * 4, y as u8 * 5, i * 50])
            });
            let p = dir.path().join(format!("{i:05}.png"));
            write_png(&p, &img, &[]).unwrap();
            frames.push(p);
        }
        let out = dir.path().join("v.mp4");
        write_mp4(&out, &frames, 10.0).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let size = bytes.len() as u64;
        let reader = mp4::Mp4Reader::read_header(std::io::Cursor::new(bytes), size).unwrap();
        let track = reader.tracks().values().next().unwrap();
        assert_eq!((track.width(), track.height()), (64, 48));
        assert_eq!(track.sample_count(), 5);
        assert_eq!(track.duration(), std::time::Duration::from_millis(500));
        assert!((track.frame_rate() - 10.0).abs() < 1e-6);
    }

    /// Noise is what made the encoder skip frames (smooth gradients compress to nothing):
    /// every sample must carry a picture and every picture must decode.
    #[test]
    fn mp4_of_noisy_frames_keeps_and_decodes_every_frame() {
        use openh264::decoder::{Decoder, DecoderConfig};
        use openh264::OpenH264API;
        use rand::{Rng, SeedableRng};

        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut frames = Vec::new();
        for i in 0..12u8 {
            let img = RgbImage::from_fn(64, 64, |_, _| image::Rgb(rng.gen::<[u8; 3]>()));
            let p = dir.path().join(format!("{i:05}.png"));
            write_png(&p, &img, &[]).unwrap();
            frames.push(p);
        }
        let out = dir.path().join("v.mp4");
        write_mp4(&out, &frames, 10.0).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let size = bytes.len() as u64;
        let mut reader = mp4::Mp4Reader::read_header(std::io::Cursor::new(bytes), size).unwrap();
        let track = reader.tracks().values().next().unwrap();
        let track_id = track.track_id();
        let count = track.sample_count();
        assert_eq!(count, 12);
        let avc = &track.trak.mdia.minf.stbl.stsd.avc1.as_ref().unwrap().avcc;
        let start = [0u8, 0, 0, 1];
        let mut head = Vec::new();
        for nal in avc
            .sequence_parameter_sets
            .iter()
            .chain(&avc.picture_parameter_sets)
        {
            head.extend_from_slice(&start);
            head.extend_from_slice(&nal.bytes);
        }
        let mut decoder =
            Decoder::with_api_config(OpenH264API::from_source(), DecoderConfig::new()).unwrap();
        let mut decoded = 0;
        for n in 1..=count {
            let sample = reader.read_sample(track_id, n).unwrap().unwrap();
            assert!(!sample.bytes.is_empty(), "sample {n} of {count} is empty");
            // Length-prefixed NAL units back to Annex B for the decoder.
            let mut packet = if n == 1 { head.clone() } else { Vec::new() };
            let mut rest = &sample.bytes[..];
            while rest.len() >= 4 {
                let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                packet.extend_from_slice(&start);
                packet.extend_from_slice(&rest[4..4 + len]);
                rest = &rest[4 + len..];
            }
            if decoder.decode(&packet).unwrap().is_some() {
                decoded += 1;
            }
        }
        decoded += decoder.flush_remaining().unwrap().len();
        assert_eq!(decoded, 12, "frames decoded of 12");
    }

    #[test]
    fn png_carries_text_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let img = RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]));
        write_png(
            &p,
            &img,
            &[
                ("prompts".into(), "a cat".into()),
                ("note".into(), "ünï 猫".into()),
            ],
        )
        .unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!(info.uncompressed_latin1_text[0].keyword, "prompts");
        assert_eq!(info.uncompressed_latin1_text[0].text, "a cat");
        assert_eq!(info.utf8_text[0].get_text().unwrap(), "ünï 猫");
    }

    #[test]
    fn recorded_spec_drops_inline_image_bytes() {
        let spec: JobSpec = serde_json::from_str(
            r#"{"image_prompts": [{"image": "data:image/png;base64,iVBORw0KGgo="}],
                "init_image": "upload:0f8fad5b-d9cb-469f-a165-70867728950e"}"#,
        )
        .unwrap();
        let rec = record_spec(&spec);
        assert!(rec.image_prompts[0]
            .image
            .starts_with("inline:image/png;bytes=8;sha256="));
        assert_eq!(rec.init_image, spec.init_image);
    }

    #[test]
    fn zoom_and_shift_move_pixels() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let shifted = zoom_and_shift(&img, 1.0, 2, -1);
        assert_eq!(shifted.get_pixel(2, 0), img.get_pixel(0, 1));
        let zoomed = zoom_and_shift(&img, 2.0, 0, 0);
        assert_eq!(zoomed.dimensions(), (8, 8));
        assert_ne!(zoomed, img);
    }
}
