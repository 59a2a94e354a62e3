//! Video in, and video styling.
//!
//! Decoding is in process, like the encoder: the `mp4` crate demuxes, openh264
//! decodes H.264, no ffmpeg. Styling is generate.py's `--video_style_dir`: every
//! source frame, resized to the job's size, is VQGAN-encoded as the init image of its
//! own short render toward the prompts (`steps_per_frame` steps, the same seed, a
//! fresh optimiser, `init_weight` as usual), and the styled frames become the video,
//! at the source's frame rate. With `carry` above 0 the init image is the source
//! frame blended with the previous styled frame, so each frame starts partly from
//! the previous result.

use std::collections::HashMap;
use std::io::Cursor;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::engine::RenderSession;
use super::history::History;
use super::job::{Artifacts, RenderError, RenderJob, RenderOutcome};
use super::models::ModelSet;
use super::output;
use super::progress::{CancelToken, ProgressEvent, ProgressSink};
use super::spec::{JobSpec, SpecError, VideoStyleSpec};
use super::steer::Steering;

/// Bounds on a video, checked from its header before anything is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoLimits {
    pub max_frames: usize,
    /// Largest `width * height` of a frame.
    pub max_pixels: u64,
}

impl VideoLimits {
    pub const UNLIMITED: VideoLimits = VideoLimits {
        max_frames: usize::MAX,
        max_pixels: u64::MAX,
    };
}

/// Why a video cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VideoError {
    #[error("not an MP4 file vqclip can read: {0}")]
    NotMp4(String),
    #[error("the MP4 has no H.264 (avc1) video track; vqclip decodes H.264 only")]
    NoH264Track,
    #[error("the video is {width}x{height}, more than the {max} pixels a frame may have")]
    TooLarge { width: u32, height: u32, max: u64 },
    #[error("the video has {frames} frames, more than the {max} allowed")]
    TooManyFrames { frames: usize, max: usize },
    #[error("the H.264 stream cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the video has no frames")]
    Empty,
    #[error("{path}: {reason}")]
    Frame { path: PathBuf, reason: String },
}

/// What a video holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VideoInfo {
    pub width: u32,
    pub height: u32,
    pub frames: usize,
    /// Frames per second: samples over the track's duration.
    pub fps: f32,
}

/// A source video's frames, in order, and the rate they are shown at.
#[derive(Debug, Clone)]
pub struct SourceVideo {
    pub frames: Vec<RgbImage>,
    pub fps: f32,
}

/// True when the bytes start like an ISO BMFF file (`ftyp` first).
pub fn looks_like_mp4(bytes: &[u8]) -> bool {
    bytes.len() >= 12 && &bytes[4..8] == b"ftyp"
}

/// The H.264 track of an MP4: where its samples are and how to decode them.
struct Demuxed<'b> {
    reader: mp4::Mp4Reader<Cursor<&'b [u8]>>,
    track_id: u32,
    info: VideoInfo,
    /// SPS and PPS as Annex B, fed to the decoder before the first sample.
    headers: Vec<u8>,
    /// Bytes of the length before each NAL unit in a sample (avcC).
    length_size: usize,
}

fn demux(bytes: &[u8]) -> Result<Demuxed<'_>, VideoError> {
    let reader = mp4::Mp4Reader::read_header(Cursor::new(bytes), bytes.len() as u64)
        .map_err(|e| VideoError::NotMp4(e.to_string()))?;
    let track = reader
        .tracks()
        .values()
        .filter(|t| {
            matches!(t.track_type(), Ok(mp4::TrackType::Video))
                && matches!(t.media_type(), Ok(mp4::MediaType::H264))
        })
        .min_by_key(|t| t.track_id())
        .ok_or(VideoError::NoH264Track)?;
    let undecodable = |e: mp4::Error| VideoError::Undecodable(e.to_string());
    let mut headers = Vec::new();
    for nal in [
        track.sequence_parameter_set().map_err(undecodable)?,
        track.picture_parameter_set().map_err(undecodable)?,
    ] {
        headers.extend_from_slice(&[0, 0, 0, 1]);
        headers.extend_from_slice(nal);
    }
    let length_size = track
        .trak
        .mdia
        .minf
        .stbl
        .stsd
        .avc1
        .as_ref()
        .map_or(4, |avc1| {
            usize::from(avc1.avcc.length_size_minus_one & 3) + 1
        });
    let frames = track.sample_count() as usize;
    // The crate's own frame_rate() rounds down to whole frames per second.
    let seconds = track.trak.mdia.mdhd.duration as f64 / f64::from(track.timescale().max(1));
    let fps = if seconds > 0.0 {
        (frames as f64 / seconds) as f32
    } else {
        0.0
    };
    let info = VideoInfo {
        width: u32::from(track.width()),
        height: u32::from(track.height()),
        frames,
        fps,
    };
    let track_id = track.track_id();
    Ok(Demuxed {
        reader,
        track_id,
        info,
        headers,
        length_size,
    })
}

/// Reads an MP4's header and checks it against `limits`, decoding nothing.
pub fn probe_mp4(bytes: &[u8], limits: &VideoLimits) -> Result<VideoInfo, VideoError> {
    let info = guarded(|| demux(bytes).map(|d| d.info))?;
    check_limits(&info, limits)?;
    Ok(info)
}

fn check_limits(info: &VideoInfo, limits: &VideoLimits) -> Result<(), VideoError> {
    if info.frames == 0 {
        return Err(VideoError::Empty);
    }
    if u64::from(info.width) * u64::from(info.height) > limits.max_pixels {
        return Err(VideoError::TooLarge {
            width: info.width,
            height: info.height,
            max: limits.max_pixels,
        });
    }
    if info.frames > limits.max_frames {
        return Err(VideoError::TooManyFrames {
            frames: info.frames,
            max: limits.max_frames,
        });
    }
    Ok(())
}

/// A panic inside the demuxer or decoder (malformed input) becomes an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, VideoError>) -> Result<T, VideoError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(VideoError::Undecodable(format!(
            "the decoder failed: {what}"
        )))
    })
}

/// A sample's length-prefixed NAL units as an Annex B stream.
fn to_annex_b(sample: &[u8], length_size: usize) -> Result<Vec<u8>, VideoError> {
    let mut out = Vec::with_capacity(sample.len() + 16);
    let mut rest = sample;
    while !rest.is_empty() {
        if rest.len() < length_size {
            return Err(VideoError::Undecodable(
                "a sample ends inside a NAL length".into(),
            ));
        }
        let (len, tail) = rest.split_at(length_size);
        let len = len.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
        if len > tail.len() {
            return Err(VideoError::Undecodable(format!(
                "a NAL unit claims {len} bytes but the sample has {} left",
                tail.len()
            )));
        }
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    Ok(out)
}

fn to_rgb(yuv: &openh264::decoder::DecodedYUV<'_>) -> RgbImage {
    use openh264::formats::YUVSource;
    let (w, h) = yuv.dimensions();
    let mut rgb = vec![0u8; w * h * 3];
    yuv.write_rgb8(&mut rgb);
    RgbImage::from_raw(w as u32, h as u32, rgb).unwrap_or_default()
}

/// Decodes the first `take` frames (all when `None`) of an MP4 in the order openh264
/// hands them out (display order for streams without B-frames, such as vqclip's own),
/// giving each to `each`, after checking the header against `limits`.
pub fn decode_mp4(
    bytes: &[u8],
    limits: &VideoLimits,
    take: Option<usize>,
    mut each: impl FnMut(RgbImage) -> Result<(), VideoError>,
) -> Result<VideoInfo, VideoError> {
    guarded(move || {
        let mut d = demux(bytes)?;
        check_limits(&d.info, limits)?;
        let wanted = take.map_or(d.info.frames, |t| t.min(d.info.frames));
        let undecodable = |e: openh264::Error| VideoError::Undecodable(e.to_string());
        let mut decoder = openh264::decoder::Decoder::new().map_err(undecodable)?;
        decoder.decode(&d.headers).map_err(undecodable)?;
        let mut produced = 0;
        let check_size = |img: &RgbImage| -> Result<(), VideoError> {
            // The SPS, not the track header, decides the decoded size.
            if u64::from(img.width()) * u64::from(img.height()) > limits.max_pixels {
                return Err(VideoError::TooLarge {
                    width: img.width(),
                    height: img.height(),
                    max: limits.max_pixels,
                });
            }
            Ok(())
        };
        for sample_id in 1..=d.info.frames as u32 {
            if produced >= wanted {
                break;
            }
            let sample = d
                .reader
                .read_sample(d.track_id, sample_id)
                .map_err(|e| VideoError::Undecodable(e.to_string()))?
                .ok_or_else(|| VideoError::Undecodable(format!("sample {sample_id} is missing")))?;
            let annex_b = to_annex_b(&sample.bytes, d.length_size)?;
            if let Some(yuv) = decoder.decode(&annex_b).map_err(undecodable)? {
                let img = to_rgb(&yuv);
                check_size(&img)?;
                each(img)?;
                produced += 1;
            }
        }
        if produced < wanted {
            for yuv in decoder.flush_remaining().map_err(undecodable)? {
                if produced >= wanted {
                    break;
                }
                let img = to_rgb(&yuv);
                check_size(&img)?;
                each(img)?;
                produced += 1;
            }
        }
        if produced < wanted {
            return Err(VideoError::Undecodable(format!(
                "{produced} of {wanted} frames decoded"
            )));
        }
        Ok(VideoInfo {
            frames: produced,
            ..d.info
        })
    })
}

/// Decodes every frame, keeping none: what an upload must pass.
pub fn validate_mp4(bytes: &[u8], limits: &VideoLimits) -> Result<VideoInfo, VideoError> {
    decode_mp4(bytes, limits, None, |_| Ok(()))
}

/// The first `take` frames of an MP4, resized to `width` x `height`.
pub fn read_mp4(
    bytes: &[u8],
    limits: &VideoLimits,
    take: Option<usize>,
    (width, height): (u32, u32),
) -> Result<SourceVideo, VideoError> {
    let mut frames = Vec::new();
    let info = decode_mp4(bytes, limits, take, |img| {
        frames.push(output::resize_exact(&img, width, height));
        Ok(())
    })?;
    Ok(SourceVideo {
        frames,
        fps: info.fps,
    })
}

/// The PNG and JPEG files of a directory in file-name order (generate.py takes the
/// `.png` and `.jpg` files of `--video_style_dir` in directory order, which is no
/// order; sorting makes `00001.png, 00002.png, ...` play as numbered), resized to
/// `width` x `height`, shown at `fps`.
pub fn read_frame_dir(
    dir: &Path,
    take: Option<usize>,
    (width, height): (u32, u32),
    fps: f32,
) -> Result<SourceVideo, VideoError> {
    let frame_err = |path: &Path, reason: String| VideoError::Frame {
        path: path.to_owned(),
        reason,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| frame_err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(frame_err(dir, "holds no .png or .jpg frames".into()));
    }
    paths.truncate(take.unwrap_or(usize::MAX));
    let frames = paths
        .iter()
        .map(|p| {
            image::open(p)
                .map(|img| output::resize_exact(&img.to_rgb8(), width, height))
                .map_err(|e| frame_err(p, e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok(SourceVideo { frames, fps })
}

/// What a video-styling job has done, so an interrupted one resumes at its next frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VideoCheckpoint {
    frames_done: usize,
    seed: u64,
    spec_sha256: String,
    history: History,
}

/// The checkpoint file of a video-styling job, beside its frames.
pub const VIDEO_CHECKPOINT: &str = "video_checkpoint.json";

impl VideoCheckpoint {
    fn read(path: &Path, job: &RenderJob) -> Result<Self, RenderError> {
        let bad = |reason: String| RenderError::Checkpoint {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read(path).map_err(|e| RenderError::io(path, e))?;
        let ckpt: VideoCheckpoint =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if ckpt.seed != job.seed
            || ckpt.spec_sha256 != super::checkpoint::spec_fingerprint(&job.spec)
        {
            return Err(bad(
                "it was written by another job (seed or spec differ)".into()
            ));
        }
        Ok(ckpt)
    }

    fn write(&self, path: &Path) -> Result<(), RenderError> {
        let json = serde_json::to_vec(self).map_err(|e| RenderError::Encode {
            what: "video checkpoint",
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, json).map_err(|e| RenderError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| RenderError::io(path, e))
    }
}

fn style_of(spec: &JobSpec) -> Result<&VideoStyleSpec, RenderError> {
    spec.video_style.as_ref().ok_or_else(|| {
        RenderError::Spec(SpecError::new(
            "video_style",
            "is required for a video-styling job",
            "got none",
        ))
    })
}

/// Renders a video-styling job whose source is an MP4 among `job.inputs` (keyed by
/// `video_style.video`, as the worker loads uploads).
pub fn render_video(
    job: &RenderJob,
    models: &ModelSet,
    progress: &mut dyn ProgressSink,
    cancel: &CancelToken,
) -> Result<RenderOutcome, RenderError> {
    let style = style_of(&job.spec)?;
    let input_err = |reason: String| RenderError::Input {
        reference: style.video.chars().take(80).collect(),
        reason,
    };
    let bytes = job
        .inputs
        .get(style.video.trim())
        .ok_or_else(|| input_err("the video was not provided to the renderer".into()))?;
    let take = style.max_frames.map(|m| m as usize);
    let source = read_mp4(
        bytes,
        &VideoLimits::UNLIMITED,
        take,
        (job.spec.width, job.spec.height),
    )
    .map_err(|e| input_err(e.to_string()))?;
    style_video(job, &source, models, progress, cancel)
}

/// The spec of one frame's render: the frame is the init image, and nothing of the
/// job's own outputs (frames, checkpoints, video) is written by it.
fn frame_spec(spec: &JobSpec, init_key: &str, steps: u32) -> JobSpec {
    let mut frame = spec.clone();
    frame.init_image = Some(init_key.to_owned());
    frame.init_noise = None;
    frame.steps = steps;
    frame.zoom = None;
    frame.video_style = None;
    frame.save_every = 0;
    frame.checkpoint_every = 0;
    frame.video.enabled = false;
    frame
}

/// Styles `source`'s frames (at most `video_style.max_frames`) one after another and
/// writes `frames/NNNNN.png` (one per source frame, named by frame index), `image.png`
/// (the last styled frame), `video.mp4` (at the source's rate, prompt and seed in its
/// metadata) and `metadata.json` under `job.out_dir`.
///
/// Progress: `Step` events count steps over the whole job (`total` = frames ×
/// steps_per_frame); a `Frame` event's `step` is the index of the frame just styled;
/// a `Checkpoint` follows each frame, so an interrupted or crashed job resumes at
/// its next frame.
pub fn style_video(
    job: &RenderJob,
    source: &SourceVideo,
    models: &ModelSet,
    progress: &mut dyn ProgressSink,
    cancel: &CancelToken,
) -> Result<RenderOutcome, RenderError> {
    let style = style_of(&job.spec)?;
    let per_frame = style.steps_per_frame(job.spec.steps).max(1) as usize;
    let count = source
        .frames
        .len()
        .min(style.max_frames.map_or(usize::MAX, |m| m as usize));
    if count == 0 {
        return Err(RenderError::Input {
            reference: style.video.chars().take(80).collect(),
            reason: "the video has no frames".into(),
        });
    }
    let out = &job.out_dir;
    let frames_dir = out.join("frames");
    std::fs::create_dir_all(&frames_dir).map_err(|e| RenderError::io(&frames_dir, e))?;
    let frame_path = |i: usize| frames_dir.join(format!("{i:05}.png"));
    let checkpoint_path = out.join(VIDEO_CHECKPOINT);

    let (start, mut history) = match &job.resume {
        Some(path) => {
            let ckpt = VideoCheckpoint::read(path, job)?;
            let done = ckpt.frames_done.min(count);
            if (0..done).all(|i| frame_path(i).is_file()) {
                (done, ckpt.history)
            } else {
                (0, History::default())
            }
        }
        None => (0, History::default()),
    };

    // Image prompts and the like stay; the source video itself is not an image.
    let mut inputs: HashMap<String, Vec<u8>> = job
        .inputs
        .iter()
        .filter(|(k, _)| k.as_str() != style.video.trim())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let init_key = format!("upload:{}", uuid::Uuid::nil());
    // The styled frame the next one may start from (`carry`).
    let mut previous: Option<RgbImage> = match start {
        0 => None,
        k => image::open(frame_path(k - 1)).ok().map(|img| img.to_rgb8()),
    };
    let total = (count * per_frame) as u32;
    let started = Instant::now();
    let mut similarities = Vec::new();
    for (i, frame) in source.frames.iter().enumerate().take(count).skip(start) {
        let init = match &previous {
            Some(styled) if style.carry > 0.0 => {
                let (w, h) = frame.dimensions();
                output::cross_fade(frame, &output::resize_exact(styled, w, h), style.carry)
            }
            _ => frame.clone(),
        };
        inputs.insert(init_key.clone(), png_bytes(&init)?);
        let frame_job = RenderJob {
            spec: frame_spec(&job.spec, &init_key, per_frame as u32),
            prompts: job.prompts.clone(),
            seed: job.seed,
            out_dir: out.clone(),
            resume: None,
            inputs: std::mem::take(&mut inputs),
            revisions: Vec::new(),
            steering: Steering::new(),
            fork: None,
        };
        let mut session = RenderSession::new(&frame_job, models)?;
        inputs = frame_job.inputs;
        for s in 0..per_frame {
            let done = (i * per_frame + s) as u32;
            if cancel.is_canceled() {
                return Ok(RenderOutcome::Canceled { step: done });
            }
            if cancel.is_interrupted() {
                VideoCheckpoint {
                    frames_done: i,
                    seed: job.seed,
                    spec_sha256: super::checkpoint::spec_fingerprint(&job.spec),
                    history,
                }
                .write(&checkpoint_path)?;
                return Ok(RenderOutcome::Interrupted {
                    step: (i * per_frame) as u32,
                    checkpoint: checkpoint_path,
                });
            }
            let t0 = Instant::now();
            let stats = session.step()?;
            let dt = t0.elapsed().as_secs_f64();
            history.losses.push(stats.losses.clone());
            history.step_seconds.push(dt);
            let step = done + 1;
            let mean =
                history.step_seconds.iter().sum::<f64>() / history.step_seconds.len().max(1) as f64;
            progress.event(ProgressEvent::Step {
                step,
                total,
                loss: stats.loss,
                losses: stats.losses,
                elapsed_s: started.elapsed().as_secs_f64(),
                eta_s: mean * f64::from(total.saturating_sub(step)),
            });
        }
        let path = frame_path(i);
        let styled = output::tensor_to_image(&session.image()?)?;
        output::write_png(&path, &styled, &[])?;
        previous = Some(styled);
        progress.event(ProgressEvent::Frame {
            step: i as u32,
            path,
        });
        if i + 1 == count {
            similarities = session.similarities()?;
        } else {
            VideoCheckpoint {
                frames_done: i + 1,
                seed: job.seed,
                spec_sha256: super::checkpoint::spec_fingerprint(&job.spec),
                history: history.clone(),
            }
            .write(&checkpoint_path)?;
            progress.event(ProgressEvent::Checkpoint {
                step: ((i + 1) * per_frame) as u32,
                path: checkpoint_path.clone(),
            });
        }
    }

    let frames: Vec<PathBuf> = (0..count).map(frame_path).collect();
    let last = image::open(&frames[count - 1])
        .map_err(|e| RenderError::Encode {
            what: "image",
            reason: e.to_string(),
        })?
        .to_rgb8();
    let image_path = out.join("image.png");
    output::write_png(
        &image_path,
        &last,
        &output::png_text(job, &models.identities),
    )?;
    let video = if job.spec.video.enabled {
        let fps = if source.fps.is_finite() && source.fps > 0.0 {
            source.fps
        } else {
            job.spec.video.fps
        };
        let path = out.join("video.mp4");
        output::write_mp4_with(&path, &frames, &output::job_mp4_options(job, fps))?;
        Some(path)
    } else {
        None
    };
    let metadata = out.join("metadata.json");
    output::write_metadata(&metadata, job, models, &history, &similarities, &[])?;
    if checkpoint_path.exists() {
        std::fs::remove_file(&checkpoint_path).map_err(|e| RenderError::io(&checkpoint_path, e))?;
    }
    Ok(RenderOutcome::Completed(Artifacts {
        image: image_path,
        frames,
        video,
        metadata,
    }))
}

fn png_bytes(img: &RgbImage) -> Result<Vec<u8>, RenderError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| RenderError::Encode {
            what: "PNG",
            reason: e.to_string(),
        })?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annex_b_from_length_prefixed_samples() {
        let sample = [0, 0, 0, 2, 0x65, 1, 0, 0, 0, 1, 0x41];
        assert_eq!(
            to_annex_b(&sample, 4).unwrap(),
            vec![0, 0, 0, 1, 0x65, 1, 0, 0, 0, 1, 0x41]
        );
        assert_eq!(to_annex_b(&[0, 1, 9], 2).unwrap(), vec![0, 0, 0, 1, 9]);
        assert!(to_annex_b(&[0, 0, 0, 9, 1], 4).is_err());
        assert!(to_annex_b(&[0, 0], 4).is_err());
    }

    #[test]
    fn garbage_is_not_an_mp4() {
        let limits = VideoLimits::UNLIMITED;
        assert!(matches!(
            validate_mp4(b"hello, not a video at all", &limits),
            Err(VideoError::NotMp4(_))
        ));
        assert!(!looks_like_mp4(b"\x89PNG\r\n\x1a\n...."));
    }
}
