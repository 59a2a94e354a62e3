//! Video in and out: MP4 decoding of videos made by our own encoder, metadata and
//! frame-rate options of the writer, and video styling end to end on the tiny
//! random-weight fixtures (library and `vqclip render --style-video`).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::fixture;
use image::RgbImage;
use mp4::Metadata as _;
use rand::{Rng, SeedableRng};
use vqclip::render::output::{interpolation_schedule, write_mp4, write_mp4_with, Mp4Options};
use vqclip::render::video::{
    decode_mp4, probe_mp4, read_frame_dir, read_mp4, render_video, style_video, validate_mp4,
    VIDEO_CHECKPOINT,
};
use vqclip::render::{
    CancelToken, JobSpec, ProgressEvent, RenderJob, RenderOutcome, VideoError, VideoLimits,
    VideoSpec,
};

use crate::support::tiny_models as models;

/// Frame `i`: a gradient with a square that moves, plus seeded noise of ±`noise`.
fn noisy_frame(i: u32, w: u32, h: u32, noise: i16, seed: u64) -> RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ u64::from(i));
    RgbImage::from_fn(w, h, |x, y| {
        let inside = (x + 3 * i) % w < w / 3 && y > h / 4 && y < h * 3 / 4;
        let base = [
            (x * 255 / w) as i16,
            (y * 255 / h) as i16,
            if inside { 230 } else { 40 },
        ];
        image::Rgb(base.map(|c| (c + rng.gen_range(-noise..=noise)).clamp(0, 255) as u8))
    })
}

/// Writes `n` noisy frames as PNGs and encodes them at `fps`; returns the MP4 path
/// and the frames.
fn make_mp4(dir: &Path, n: u32, (w, h): (u32, u32), fps: f32) -> (PathBuf, Vec<RgbImage>) {
    let frames_dir = dir.join("source");
    std::fs::create_dir_all(&frames_dir).unwrap();
    let mut paths = Vec::new();
    let mut frames = Vec::new();
    for i in 0..n {
        let img = noisy_frame(i, w, h, 12, 5);
        let p = frames_dir.join(format!("{i:05}.png"));
        img.save(&p).unwrap();
        paths.push(p);
        frames.push(img);
    }
    let out = dir.join("source.mp4");
    write_mp4(&out, &paths, fps).unwrap();
    (out, frames)
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

fn mp4_reader(path: &Path) -> mp4::Mp4Reader<Cursor<Vec<u8>>> {
    let bytes = std::fs::read(path).unwrap();
    let size = bytes.len() as u64;
    mp4::Mp4Reader::read_header(Cursor::new(bytes), size).unwrap()
}

#[test]
fn our_mp4_decodes_to_its_frames_at_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4_path, source) = make_mp4(dir.path(), 6, (64, 48), 12.0);
    let bytes = std::fs::read(&mp4_path).unwrap();

    let info = probe_mp4(&bytes, &VideoLimits::UNLIMITED).unwrap();
    assert_eq!((info.width, info.height, info.frames), (64, 48, 6));
    assert!((info.fps - 12.0).abs() < 1e-3, "{info:?}");

    let mut decoded = Vec::new();
    let info = decode_mp4(&bytes, &VideoLimits::UNLIMITED, None, |img| {
        decoded.push(img);
        Ok(())
    })
    .unwrap();
    assert_eq!(info.frames, 6);
    assert_eq!(decoded.len(), 6);
    for (i, (got, want)) in decoded.iter().zip(&source).enumerate() {
        assert_eq!(got.dimensions(), (64, 48));
        // Lossy H.264 of noise: close to its own source frame, far from the others.
        let own = mean_abs_diff(got, want);
        assert!(own < 20.0, "frame {i}: mean error {own}");
        let other = mean_abs_diff(got, &source[(i + 3) % 6]);
        assert!(other > own, "frame {i}: {own} vs another frame's {other}");
    }

    // Taking fewer frames stops early; read_mp4 resizes them.
    let first = read_mp4(&bytes, &VideoLimits::UNLIMITED, Some(2), (32, 16)).unwrap();
    assert_eq!(first.frames.len(), 2);
    assert_eq!(first.frames[0].dimensions(), (32, 16));
    assert!((first.fps - 12.0).abs() < 1e-3);
}

#[test]
fn bad_or_oversized_videos_are_refused_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4_path, _) = make_mp4(dir.path(), 4, (32, 32), 10.0);
    let bytes = std::fs::read(&mp4_path).unwrap();

    let few = VideoLimits {
        max_frames: 3,
        max_pixels: u64::MAX,
    };
    assert_eq!(
        validate_mp4(&bytes, &few).unwrap_err(),
        VideoError::TooManyFrames { frames: 4, max: 3 }
    );
    let small = VideoLimits {
        max_frames: 100,
        max_pixels: 32 * 31,
    };
    assert!(matches!(
        validate_mp4(&bytes, &small),
        Err(VideoError::TooLarge { max: 992, .. })
    ));
    assert!(matches!(
        validate_mp4(b"definitely not an mp4 file", &VideoLimits::UNLIMITED),
        Err(VideoError::NotMp4(_))
    ));
    // Cut off inside the media data: the header is gone or the samples are.
    let mut truncated = bytes.clone();
    truncated.truncate(bytes.len() / 2);
    assert!(validate_mp4(&truncated, &VideoLimits::UNLIMITED).is_err());
    // Samples overwritten with garbage: openh264 refuses them or yields no pictures.
    let mut scrambled = bytes.clone();
    let mdat = scrambled
        .windows(4)
        .position(|w| w == b"mdat")
        .expect("an mdat box");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for b in &mut scrambled[mdat + 4..mdat + 4 + 200] {
        *b = rng.gen();
    }
    assert!(validate_mp4(&scrambled, &VideoLimits::UNLIMITED).is_err());
    validate_mp4(&bytes, &VideoLimits::UNLIMITED).unwrap();
}

#[test]
fn mp4_metadata_reads_back_and_the_video_still_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, frames) = make_mp4(dir.path(), 3, (32, 32), 10.0);
    let paths: Vec<PathBuf> = (0..frames.len())
        .map(|i| dir.path().join(format!("source/{i:05}.png")))
        .collect();
    let out = dir.path().join("meta.mp4");
    let options = Mp4Options {
        fps: 10.0,
        output_fps: None,
        title: Some("a wooden “banana” temple | 猫".into()),
        description: Some("a wooden “banana” temple | 猫\nseed: 42".into()),
    };
    write_mp4_with(&out, &paths, &options).unwrap();
    let reader = mp4_reader(&out);
    let meta = reader.metadata();
    assert_eq!(
        meta.title().as_deref(),
        Some("a wooden “banana” temple | 猫")
    );
    assert!(meta.summary().unwrap().ends_with("seed: 42"));
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.sample_count(), 3);
    let info = validate_mp4(&std::fs::read(&out).unwrap(), &VideoLimits::UNLIMITED).unwrap();
    assert_eq!(info.frames, 3);
}

#[test]
fn output_fps_interpolates_and_keeps_the_length() {
    // 5 frames at 10 fps are half a second; at 30 fps that is 15 frames.
    let schedule = interpolation_schedule(5, 10.0, Some(30.0));
    assert_eq!(schedule.len(), 15);
    assert_eq!((schedule[0].0, schedule[0].2), (0, 0.0));
    let (a, b, t) = schedule[1];
    assert_eq!((a, b), (0, 1));
    assert!((t - 1.0 / 3.0).abs() < 1e-6);
    assert_eq!(schedule[14].0, 4);
    assert_eq!(interpolation_schedule(4, 10.0, None).len(), 4);

    let dir = tempfile::tempdir().unwrap();
    let black = dir.path().join("0.png");
    let white = dir.path().join("1.png");
    RgbImage::from_pixel(32, 32, image::Rgb([0, 0, 0]))
        .save(&black)
        .unwrap();
    RgbImage::from_pixel(32, 32, image::Rgb([240, 240, 240]))
        .save(&white)
        .unwrap();
    let out = dir.path().join("i.mp4");
    let options = Mp4Options {
        fps: 5.0,
        output_fps: Some(20.0),
        ..Default::default()
    };
    write_mp4_with(&out, &[black, white], &options).unwrap();
    let reader = mp4_reader(&out);
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.sample_count(), 8);
    assert_eq!(track.duration(), std::time::Duration::from_millis(400));
    let mut decoded = Vec::new();
    decode_mp4(
        &std::fs::read(&out).unwrap(),
        &VideoLimits::UNLIMITED,
        None,
        |img| {
            decoded.push(img.get_pixel(16, 16)[0]);
            Ok(())
        },
    )
    .unwrap();
    // Black, then a ramp a quarter of the way at a time, then white.
    assert!(decoded[0] < 20, "{decoded:?}");
    assert!((decoded[2] as i32 - 120).abs() < 25, "{decoded:?}");
    assert!(decoded[4] > 220, "{decoded:?}");
}

#[test]
fn video_length_sets_the_rate_as_generate_py_does() {
    let mut video = VideoSpec::default();
    assert_eq!(video.frame_rate(100), 10.0);
    video.length_seconds = Some(4.0);
    assert_eq!(video.frame_rate(100), 25.0);
    // np.clip(total_frames / length, 10, 60)
    assert_eq!(video.frame_rate(10), 10.0);
    assert_eq!(video.frame_rate(1000), 60.0);
}

fn style_spec(video: &str, steps_per_frame: u32, max_frames: Option<u32>) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "prompts": "a red cube",
        "width": 16, "height": 16, "cutn": 4, "augments": [], "seed": 3,
        "save_every": 0, "checkpoint_every": 0,
        "video_style": {"video": video, "steps_per_frame": steps_per_frame, "max_frames": max_frames},
    }))
    .unwrap()
}

fn upload_job(mp4: &[u8], out: &Path, steps_per_frame: u32, max_frames: Option<u32>) -> RenderJob {
    let reference = format!("upload:{}", uuid::Uuid::now_v7());
    let mut job = RenderJob::new(style_spec(&reference, steps_per_frame, max_frames), out);
    job.inputs.insert(reference, mp4.to_vec());
    job
}

#[test]
fn video_styling_writes_one_styled_frame_per_source_frame_and_the_video() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4_path, _) = make_mp4(dir.path(), 4, (32, 32), 12.0);
    let bytes = std::fs::read(&mp4_path).unwrap();
    let out = dir.path().join("out");
    let job = upload_job(&bytes, &out, 2, Some(3));
    job.spec
        .validate(&vqclip::render::Limits::default())
        .unwrap();
    let mut events = Vec::new();
    let mut sink = |ev: ProgressEvent| events.push(ev);
    let outcome = render_video(&job, models(), &mut sink, &CancelToken::new()).unwrap();
    let RenderOutcome::Completed(art) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(art.frames.len(), 3);
    for (i, f) in art.frames.iter().enumerate() {
        assert_eq!(f, &out.join(format!("frames/{i:05}.png")));
        let img = image::open(f).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
    let steps: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Step { step, total, .. } => Some((*step, *total)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, (1..=6).map(|s| (s, 6)).collect::<Vec<_>>());
    let frames: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Frame { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(frames, vec![0, 1, 2]);

    let video = art.video.expect("a styled video");
    let reader = mp4_reader(&video);
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.sample_count(), 3);
    assert_eq!((track.width(), track.height()), (16, 16));
    assert_eq!(track.duration(), std::time::Duration::from_millis(250));
    assert_eq!(reader.metadata().title().as_deref(), Some("a red cube"));
    assert!(reader.metadata().summary().unwrap().contains("seed: 3"));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&art.metadata).unwrap()).unwrap();
    assert_eq!(meta["steps_done"], 6);
    assert_eq!(meta["spec"]["video_style"]["max_frames"], 3);
    assert!(!out.join(VIDEO_CHECKPOINT).exists());

    // Styling changed the frames: a styled frame is not the decoded source frame.
    let source = read_mp4(&bytes, &VideoLimits::UNLIMITED, Some(1), (16, 16)).unwrap();
    let styled = image::open(&art.frames[0]).unwrap().to_rgb8();
    assert!(mean_abs_diff(&styled, &source.frames[0]) > 1.0);
}

#[test]
fn an_interrupted_video_job_resumes_at_its_next_frame_and_ends_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4_path, _) = make_mp4(dir.path(), 3, (32, 32), 10.0);
    let bytes = std::fs::read(&mp4_path).unwrap();

    let straight_out = dir.path().join("straight");
    let straight = upload_job(&bytes, &straight_out, 2, None);
    let outcome = render_video(
        &straight,
        models(),
        &mut vqclip::render::NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    assert!(matches!(outcome, RenderOutcome::Completed(_)));

    // The same job, interrupted once its first frame is written.
    let out = dir.path().join("resumed");
    let mut job = straight.clone();
    job.out_dir = out.clone();
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let mut sink = move |ev: ProgressEvent| {
        if matches!(ev, ProgressEvent::Frame { step: 0, .. }) {
            token.interrupt();
        }
    };
    let outcome = render_video(&job, models(), &mut sink, &cancel).unwrap();
    let RenderOutcome::Interrupted { step, checkpoint } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(step, 2);
    assert_eq!(checkpoint, out.join(VIDEO_CHECKPOINT));
    let first_frame = std::fs::read(out.join("frames/00000.png")).unwrap();

    job.resume = Some(checkpoint);
    let mut steps = Vec::new();
    let mut sink = |ev: ProgressEvent| {
        if let ProgressEvent::Step { step, .. } = ev {
            steps.push(step);
        }
    };
    let outcome = render_video(&job, models(), &mut sink, &CancelToken::new()).unwrap();
    let RenderOutcome::Completed(art) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(steps, vec![3, 4, 5, 6]);
    assert_eq!(std::fs::read(&art.frames[0]).unwrap(), first_frame);
    for i in 0..3 {
        let name = format!("frames/{i:05}.png");
        assert_eq!(
            std::fs::read(out.join(&name)).unwrap(),
            std::fs::read(straight_out.join(&name)).unwrap(),
            "{name}"
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&art.metadata).unwrap()).unwrap();
    assert_eq!(meta["steps_done"], 6);
}

#[test]
fn a_frame_directory_is_read_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    for (name, shade) in [("b.png", 200u8), ("a.jpg", 20), ("c.png", 120)] {
        RgbImage::from_pixel(8, 8, image::Rgb([shade; 3]))
            .save(dir.path().join(name))
            .unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not a frame").unwrap();
    let source = read_frame_dir(dir.path(), None, (16, 16), 8.0).unwrap();
    assert_eq!(source.fps, 8.0);
    let shades: Vec<u8> = source.frames.iter().map(|f| f.get_pixel(4, 4)[0]).collect();
    assert_eq!(shades.len(), 3);
    assert!(
        shades[0] < 40 && shades[1] > 180 && (100..140).contains(&shades[2]),
        "{shades:?}"
    );
    assert_eq!(source.frames[0].dimensions(), (16, 16));
    assert_eq!(
        read_frame_dir(dir.path(), Some(2), (16, 16), 8.0)
            .unwrap()
            .frames
            .len(),
        2
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        read_frame_dir(empty.path(), None, (16, 16), 8.0),
        Err(VideoError::Frame { .. })
    ));
}

#[test]
fn style_video_over_a_frame_directory_keeps_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let frames_dir = dir.path().join("frames_in");
    std::fs::create_dir_all(&frames_dir).unwrap();
    for i in 0..2 {
        noisy_frame(i, 24, 24, 10, 9)
            .save(frames_dir.join(format!("{i:03}.png")))
            .unwrap();
    }
    let source = read_frame_dir(&frames_dir, None, (16, 16), 8.0).unwrap();
    let spec = style_spec(&frames_dir.display().to_string(), 1, None);
    let job = RenderJob::new(spec, dir.path().join("out"));
    let outcome = style_video(
        &job,
        &source,
        models(),
        &mut vqclip::render::NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    let RenderOutcome::Completed(art) = outcome else {
        panic!("{outcome:?}");
    };
    let reader = mp4_reader(&art.video.unwrap());
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.sample_count(), 2);
    assert_eq!(track.duration(), std::time::Duration::from_millis(250));
}

/// Styles `frames` (16x16) with one step each; returns the styled frames' bytes.
fn style_frames(frames: Vec<RgbImage>, carry: f32, out: &Path) -> Vec<Vec<u8>> {
    let mut spec = style_spec("in-memory", 2, None);
    spec.video_style.as_mut().unwrap().carry = carry;
    spec.validate(&vqclip::render::Limits::default()).unwrap();
    let job = RenderJob::new(spec, out);
    let source = vqclip::render::SourceVideo { frames, fps: 10.0 };
    let outcome = style_video(
        &job,
        &source,
        models(),
        &mut vqclip::render::NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    let RenderOutcome::Completed(art) = outcome else {
        panic!("{outcome:?}");
    };
    art.frames
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect()
}

#[test]
fn each_frame_starts_from_its_source_as_in_generate_py_or_carries_the_previous_result() {
    let dir = tempfile::tempdir().unwrap();
    let a = noisy_frame(0, 16, 16, 20, 1);
    let b = noisy_frame(5, 16, 16, 20, 2);
    // carry 0 (generate.py): the same source frame and seed style the same, wherever
    // the frame stands in the video.
    let plain = style_frames(
        vec![a.clone(), b.clone(), a.clone()],
        0.0,
        &dir.path().join("p"),
    );
    assert_eq!(plain[0], plain[2]);
    assert_ne!(plain[0], plain[1]);
    // carry 1: after the first frame the source is ignored; the second frame starts from
    // the first's result, whatever its own source.
    let one_b = style_frames(vec![a.clone(), b.clone()], 1.0, &dir.path().join("b"));
    let one_a = style_frames(vec![a.clone(), a.clone()], 1.0, &dir.path().join("a"));
    assert_eq!(one_b[0], plain[0]);
    assert_eq!(one_b[1], one_a[1]);
    assert_ne!(one_b[1], plain[1]);
    // In between, the result depends on both.
    let half = style_frames(vec![a, b], 0.5, &dir.path().join("h"));
    assert_ne!(half[1], one_b[1]);
    assert_ne!(half[1], plain[1]);
}

#[test]
fn render_command_styles_a_frame_directory() {
    let dir = tempfile::tempdir().unwrap();
    let frames_dir = dir.path().join("in");
    std::fs::create_dir_all(&frames_dir).unwrap();
    for i in 0..3 {
        noisy_frame(i, 20, 20, 10, 1)
            .save(frames_dir.join(format!("{i:05}.png")))
            .unwrap();
    }
    let out = dir.path().join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args([
            "render",
            "--prompt",
            "a red cube",
            "--width",
            "16",
            "--height",
            "16",
            "--cutn",
            "4",
            "--augments",
            "",
            "--seed",
            "7",
            "--device",
            "cpu",
            "--steps-per-frame",
            "1",
            "--max-frames",
            "2",
            "--fps",
            "6",
        ])
        .arg("--style-video")
        .arg(&frames_dir)
        .arg("--clip")
        .arg(fixture("clip-tiny"))
        .arg("--vqgan")
        .arg(fixture("vqgan-tiny"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("styling 2 frames"), "{stderr}");
    for name in [
        "frames/00000.png",
        "frames/00001.png",
        "image.png",
        "video.mp4",
        "metadata.json",
    ] {
        assert!(out.join(name).is_file(), "{name} missing; {stdout}");
    }
    assert!(!out.join("frames/00002.png").exists());
    let reader = mp4_reader(&out.join("video.mp4"));
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.sample_count(), 2);
    assert!((track.duration().as_secs_f64() - 2.0 / 6.0).abs() < 1e-3);

    // Styling flags without a source say what is missing.
    let output = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["render", "--prompt", "x", "--steps-per-frame", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--style-video"));
}
