//! Real-size smoke: ViT-B/32 and vqgan_imagenet_f16_16384 architectures with random
//! weights, 128×128, 3 steps. Ignored by default (slow on CPU):
//! `cargo test --test render -- --ignored smoke:: --nocapture`.

use std::time::Instant;

use candle_core::{DType, Device};
use vqclip::models::architectures::{self, peak_rss_bytes, random_weights};
use vqclip::models::{Clip, Vqgan};
use vqclip::render::{
    render, CancelToken, JobSpec, ModelIdentities, ModelIdentity, ModelSet, RenderJob,
    RenderOutcome,
};

#[test]
#[ignore = "real-size architectures: tens of seconds per step on a CPU"]
fn real_size_random_weights_128px_3_steps() {
    let dev = Device::Cpu;
    let vb = || random_weights(DType::F32, &dev);
    let t0 = Instant::now();
    let clip = Clip::new(vb(), &architectures::clip_config("ViT-B/32").unwrap()).unwrap();
    let vqgan_cfg = architectures::vqgan_config("vqgan_imagenet_f16_16384").unwrap();
    let vqgan = Vqgan::new(vb(), &vqgan_cfg).unwrap();
    let id = |name: &str| ModelIdentity {
        name: name.into(),
        path: "random".into(),
        sha256: "random weights".into(),
    };
    let models = ModelSet::from_loaded(
        vqgan,
        vec![clip],
        ModelIdentities {
            vqgan: id("vqgan_imagenet_f16_16384 (random)"),
            clip: vec![id("ViT-B/32 (random)")],
        },
    );
    let build = t0.elapsed();

    let spec: JobSpec = serde_json::from_str(
        r#"{"prompts": "a wooden banana temple in an underwater kingdom", "width": 128,
            "height": 128, "steps": 3, "seed": 0, "save_every": 1, "video": {"fps": 2}}"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t1 = Instant::now();
    let mut step_times = Vec::new();
    let mut last = Instant::now();
    let mut sink = |ev: vqclip::render::ProgressEvent| {
        if let vqclip::render::ProgressEvent::Step { .. } = ev {
            step_times.push(last.elapsed().as_secs_f64());
            last = Instant::now();
        }
    };
    let outcome = render(
        &RenderJob::new(spec, dir.path()),
        &models,
        &mut sink,
        &CancelToken::new(),
    )
    .unwrap();
    let total = t1.elapsed();
    let RenderOutcome::Completed(art) = outcome else {
        panic!("{outcome:?}")
    };
    let img = image::open(&art.image).unwrap();
    assert_eq!((img.width(), img.height()), (128, 128));
    assert!(art.video.is_some());
    println!(
        "real-size smoke: build {:.1}s, render {:.1}s, steps {:?} s, peak RSS {} MiB",
        build.as_secs_f64(),
        total.as_secs_f64(),
        step_times,
        peak_rss_bytes().unwrap_or(0) >> 20
    );
}
