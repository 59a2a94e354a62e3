//! The render loop end to end on the tiny random-weight fixtures (real formats:
//! HF CLIP safetensors, taming VQGAN ckpt + model.yaml), on the CPU.

use std::path::Path;

use base64::Engine as _;
use vqclip::render::{
    render, CancelToken, JobSpec, NoProgress, ProgressEvent, RenderJob, RenderOutcome,
    RenderSession,
};

use crate::support::tiny_models as models;

fn spec(json: &str) -> JobSpec {
    let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
    let defaults = serde_json::json!({
        "width": 16, "height": 16, "cutn": 8, "save_every": 0, "checkpoint_every": 0,
        "augments": [], "seed": 1
    });
    for (k, v) in defaults.as_object().unwrap() {
        value
            .as_object_mut()
            .unwrap()
            .entry(k.clone())
            .or_insert(v.clone());
    }
    serde_json::from_value(value).unwrap()
}

fn job(spec: JobSpec, out: &Path) -> RenderJob {
    RenderJob::new(spec, out)
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

/// Runs `steps` steps; returns (loss per step, similarity before, similarity after).
fn optimise(spec: JobSpec, steps: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let job = job(spec, dir.path());
    let mut session = RenderSession::new(&job, models()).unwrap();
    let before = session.similarities().unwrap();
    let losses: Vec<f32> = (0..steps).map(|_| session.step().unwrap().loss).collect();
    let after = session.similarities().unwrap();
    (losses, before, after)
}

/// Averaged over three seeds: on these tiny random models one run's 30 noisy steps (random
/// cutouts, augments and noise) can end no better than they began, three on average do not.
#[test]
fn text_prompt_loss_falls_and_similarity_rises() {
    let (mut first, mut last, mut before, mut after) = (0.0, 0.0, 0.0, 0.0);
    for seed in 1..=3 {
        let json = format!(r#"{{"prompts": "a red cube", "steps": 30, "seed": {seed}}}"#);
        let (losses, b, a) = optimise(spec(&json), 30);
        eprintln!("seed {seed}: losses {losses:?}, similarity {b:?} -> {a:?}");
        first += mean(&losses[..5]);
        last += mean(&losses[25..]);
        before += b[0];
        after += a[0];
    }
    assert!(
        last < first,
        "mean loss of the first 5 steps {first} (sum over seeds), last 5 {last}"
    );
    assert!(
        after > before,
        "similarity (sum over seeds) {before} -> {after}"
    );
}

#[test]
fn negative_prompt_similarity_falls() {
    let (losses, before, after) =
        optimise(spec(r#"{"prompts": "a red cube:-1", "steps": 30}"#), 30);
    assert!(
        mean(&losses[25..]) < mean(&losses[..5]),
        "losses {losses:?}"
    );
    assert!(after[0] < before[0], "similarity {before:?} -> {after:?}");
}

fn png_data_url(img: &image::RgbImage) -> String {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[test]
fn image_prompt_similarity_rises() {
    let target = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 16) as u8, 255 - (y * 16) as u8, ((x + y) * 8) as u8])
    });
    let json = format!(
        r#"{{"image_prompts": [{{"image": "{}"}}], "steps": 30}}"#,
        png_data_url(&target)
    );
    let (losses, before, after) = optimise(spec(&json), 30);
    assert!(
        mean(&losses[25..]) < mean(&losses[..5]),
        "losses {losses:?}"
    );
    assert!(after[0] > before[0], "similarity {before:?} -> {after:?}");
}

fn run(spec: JobSpec, out: &Path) -> RenderOutcome {
    render(
        &job(spec, out),
        models(),
        &mut NoProgress,
        &CancelToken::new(),
    )
    .unwrap()
}

#[test]
fn same_seed_same_png_different_seed_different_png() {
    let s = r#"{"prompts": "a forest", "steps": 4, "augments": ["Af", "Pe", "Ji", "Er"], "video": {"enabled": false}}"#;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    run(spec(s), dirs[0].path());
    run(spec(s), dirs[1].path());
    let mut other = spec(s);
    other.seed = Some(2);
    run(other, dirs[2].path());
    let png = |d: &tempfile::TempDir| std::fs::read(d.path().join("image.png")).unwrap();
    assert_eq!(png(&dirs[0]), png(&dirs[1]));
    assert_ne!(png(&dirs[0]), png(&dirs[2]));
}

#[test]
fn checkpoint_and_resume_equal_an_uninterrupted_run() {
    let s = r#"{"prompts": "a castle:1|fog:-0.3", "steps": 6, "checkpoint_every": 3,
                "augments": ["Af", "Pe", "Ji", "Er"], "optimizer": "adam", "video": {"enabled": false}}"#;
    let full = tempfile::tempdir().unwrap();
    run(spec(s), full.path());

    // Interrupt after the checkpoint at step 3, then resume from it.
    let part = tempfile::tempdir().unwrap();
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let mut sink = move |ev: ProgressEvent| {
        if let ProgressEvent::Checkpoint { step: 3, .. } = ev {
            token.interrupt();
        }
    };
    let outcome = render(&job(spec(s), part.path()), models(), &mut sink, &cancel).unwrap();
    let RenderOutcome::Interrupted { step, checkpoint } = outcome else {
        panic!("expected an interruption, got {outcome:?}");
    };
    assert_eq!(step, 3);
    // A checkpoint refuses a job with other render parameters.
    let mut other = job(spec(&s.replace("a castle", "a cottage")), part.path());
    other.resume = Some(checkpoint.clone());
    let err = render(&other, models(), &mut NoProgress, &CancelToken::new()).unwrap_err();
    assert!(
        err.to_string().contains("different render parameters"),
        "{err}"
    );

    let mut resumed = job(spec(s), part.path());
    resumed.resume = Some(checkpoint);
    let outcome = render(&resumed, models(), &mut NoProgress, &CancelToken::new()).unwrap();
    assert!(matches!(outcome, RenderOutcome::Completed(_)));
    let png = |d: &Path| std::fs::read(d.join("image.png")).unwrap();
    assert_eq!(png(full.path()), png(part.path()));
}

#[test]
fn cancellation_stops_within_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let mut steps_seen = 0;
    let mut sink = |ev: ProgressEvent| {
        if let ProgressEvent::Step { step, .. } = ev {
            steps_seen = step;
            if step == 2 {
                token.cancel();
            }
        }
    };
    let outcome = render(
        &job(spec(r#"{"prompts": "x", "steps": 50}"#), dir.path()),
        models(),
        &mut sink,
        &cancel,
    )
    .unwrap();
    assert_eq!(outcome, RenderOutcome::Canceled { step: 2 });
    assert_eq!(steps_seen, 2);
    assert!(!dir.path().join("image.png").exists());
}

#[test]
fn full_render_writes_png_frames_video_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        r#"{"prompts": "a wooden banana temple | trending on artstation:0.5", "steps": 6,
            "save_every": 2, "video": {"fps": 5}, "noise_prompts": [{"seed": 3, "weight": 0.2}]}"#,
    );
    let mut events = Vec::new();
    let mut sink = |ev: ProgressEvent| events.push(ev);
    let outcome = render(
        &job(s, dir.path()),
        models(),
        &mut sink,
        &CancelToken::new(),
    )
    .unwrap();
    let RenderOutcome::Completed(art) = outcome else {
        panic!("{outcome:?}")
    };
    let img = image::open(&art.image).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
    let names: Vec<String> = art
        .frames
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["00000.png", "00002.png", "00004.png", "00006.png"]);
    let frames = events
        .iter()
        .filter(|e| matches!(e, ProgressEvent::Frame { .. }))
        .count();
    assert_eq!(frames, 4);
    let steps: Vec<&ProgressEvent> = events
        .iter()
        .filter(|e| matches!(e, ProgressEvent::Step { .. }))
        .collect();
    assert_eq!(steps.len(), 6);
    if let ProgressEvent::Step {
        step,
        total,
        losses,
        ..
    } = steps[5]
    {
        assert_eq!((*step, *total, losses.len()), (6, 6, 3));
    }

    let video = art.video.expect("video");
    let bytes = std::fs::read(&video).unwrap();
    let size = bytes.len() as u64;
    let reader = mp4::Mp4Reader::read_header(std::io::Cursor::new(bytes), size).unwrap();
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(
        (track.width(), track.height(), track.sample_count()),
        (16, 16, 4)
    );
    assert_eq!(track.duration(), std::time::Duration::from_millis(800));

    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&art.metadata).unwrap()).unwrap();
    assert_eq!(meta["seed"], 1);
    assert_eq!(meta["losses"].as_array().unwrap().len(), 6);
    assert_eq!(meta["final_similarity"].as_array().unwrap().len(), 3);
    assert_eq!(
        meta["models"]["clip"][0]["sha256"].as_str().unwrap().len(),
        64
    );

    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&art.image).unwrap(),
    ));
    let reader = decoder.read_info().unwrap();
    let text: Vec<(&str, &str)> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.as_str(), t.text.as_str()))
        .collect();
    assert!(text.contains(&("seed", "1")));
    assert!(text
        .iter()
        .any(|(k, v)| *k == "prompts" && v.contains("banana temple")));
    assert!(text
        .iter()
        .any(|(k, v)| *k == "software" && v.starts_with("vqclip ")));
}

#[test]
fn story_phrases_change_every_n_steps() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(r#"{"prompts": "a forest ^ a city:-1", "change_prompt_every": 2, "steps": 4}"#);
    let job = job(s, dir.path());
    let mut session = RenderSession::new(&job, models()).unwrap();
    let losses: Vec<f32> = (0..4).map(|_| session.step().unwrap().loss).collect();
    // The second phrase repels, so its spherical-distance loss is negative.
    assert!(losses[0] > 0.0 && losses[1] > 0.0, "{losses:?}");
    assert!(losses[2] < 0.0 && losses[3] < 0.0, "{losses:?}");
}

/// Whether every latent vector of z (1, C, h, w) is a codebook row (to float rounding).
fn on_codebook(z: &candle_core::Tensor) -> bool {
    let (z_q, _) = models().vqgan.quantize(z).unwrap();
    let diff = (z - z_q)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff < 1e-6
}

/// taming's `VQModel.encode` returns the quantised latent, and generate.py starts there:
/// for an init image, for init noise, and after every zoom step (where `mse_init` then
/// pulls too).
#[test]
fn encoded_starts_are_quantised() {
    let init = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 16) as u8, (y * 16) as u8, 90])
    });
    let init = png_data_url(&init);
    for case in [
        format!(r#"{{"init_image": "{init}"}}"#),
        r#"{"init_noise": "pixels"}"#.to_owned(),
        r#"{"init_noise": "gradient"}"#.to_owned(),
    ] {
        let mut value: serde_json::Value = serde_json::from_str(&case).unwrap();
        value["prompts"] = "a lighthouse".into();
        let dir = tempfile::tempdir().unwrap();
        let job = job(spec(&value.to_string()), dir.path());
        let session = RenderSession::new(&job, models()).unwrap();
        assert!(
            on_codebook(session.z()),
            "{case}: initial z is off the codebook"
        );
        assert!(on_codebook(&session.checkpoint().z_orig), "{case}");
    }
    // Zoom every step from step 0: each step starts from a fresh quantised encoding,
    // which is also the mse_init target.
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        r#"{"prompts": "a lighthouse", "zoom": {"every": 1, "scale": 0.9},
            "init_weight": 1.0, "init_regulariser": "mse_init"}"#,
    );
    let job = job(s, dir.path());
    let mut session = RenderSession::new(&job, models()).unwrap();
    let start = session.checkpoint().z_orig;
    for step in 0..3 {
        session.step().unwrap();
        let target = session.checkpoint().z_orig;
        assert!(
            on_codebook(&target),
            "step {step}: zoom target off the codebook"
        );
        assert!(
            !on_codebook(session.z()),
            "step {step}: z should have moved off it"
        );
        if step == 0 {
            let moved = (&target - &start)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "no zoom at step 0");
        }
    }
}

/// A zoom render writes generate.py's zoom-video frame before every zoom step, from
/// step 0, whatever `zoom.start` and `save_every` say.
#[test]
fn zoom_writes_a_frame_at_every_zoom_step() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        r#"{"prompts": "a lighthouse", "steps": 6, "save_every": 0,
            "zoom": {"every": 3, "start": 3, "scale": 1.005}, "video": {"enabled": false}}"#,
    );
    match run(s, dir.path()) {
        RenderOutcome::Completed(art) => {
            let names: Vec<String> = art
                .frames
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, ["00000.png", "00003.png", "00006.png"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_optimizer_cut_method_and_init_runs() {
    let init = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 16) as u8, (y * 16) as u8, 90])
    });
    let init = png_data_url(&init);
    let cases = [
        r#"{"optimizer": "adamw"}"#.to_owned(),
        r#"{"optimizer": "adagrad"}"#.to_owned(),
        r#"{"optimizer": "adamax"}"#.to_owned(),
        r#"{"optimizer": "rmsprop"}"#.to_owned(),
        r#"{"optimizer": "radam"}"#.to_owned(),
        r#"{"optimizer": "diffgrad"}"#.to_owned(),
        r#"{"optimizer": "adamp"}"#.to_owned(),
        r#"{"cut_method": "original", "cut_pow": 2.0}"#.to_owned(),
        r#"{"augments": ["Ji", "Sh", "Gn", "Pe", "Ro", "Af", "Et", "Ts", "Cr", "Er", "Re"]}"#
            .to_owned(),
        r#"{"init_noise": "pixels"}"#.to_owned(),
        r#"{"init_noise": "gradient", "init_weight": 0.5}"#.to_owned(),
        format!(
            r#"{{"init_image": "{init}", "init_weight": 1.0, "init_regulariser": "mse_init"}}"#
        ),
        r#"{"zoom": {"every": 1, "scale": 1.1, "shift_x": 2}}"#.to_owned(),
    ];
    for case in cases {
        let mut value: serde_json::Value = serde_json::from_str(&case).unwrap();
        value["prompts"] = "a lighthouse".into();
        value["steps"] = 2.into();
        let s = spec(&value.to_string());
        let regulariser = s.init_weight > 0.0;
        let dir = tempfile::tempdir().unwrap();
        let job = job(s, dir.path());
        let mut session = RenderSession::new(&job, models()).unwrap();
        let z0 = session.z().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for _ in 0..2 {
            let stats = session.step().unwrap();
            assert!(stats.loss.is_finite(), "{case}: {stats:?}");
            assert_eq!(stats.losses.len(), 1 + usize::from(regulariser), "{case}");
        }
        let z1 = session.z().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(z0, z1, "{case}: z did not move");
    }
}

#[test]
fn uploads_resolve_through_job_inputs() {
    let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let img = image::RgbImage::from_fn(20, 12, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let s = spec(&format!(
        r#"{{"image_prompts": [{{"image": "upload:{id}", "weight": 2}}], "init_image": "{id}", "steps": 1}}"#
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut j = job(s.clone(), dir.path());
    let err = RenderSession::new(&j, models())
        .err()
        .expect("missing upload");
    assert!(err.to_string().contains("not provided"), "{err}");
    j.inputs.insert(format!("upload:{id}"), png.clone());
    j.inputs.insert(id.to_owned(), png);
    let mut session = RenderSession::new(&j, models()).unwrap();
    assert!(session.step().unwrap().loss.is_finite());

    j.inputs.insert(id.to_owned(), b"not an image".to_vec());
    let err = RenderSession::new(&j, models()).err().expect("bad image");
    assert!(err.to_string().contains("not a readable image"), "{err}");
}
