//! Real-size smoke: ViT-B/32 and vqgan_imagenet_f16_16384 architectures with random
//! weights, 128×128, 3 steps. Ignored by default (slow on CPU):
//! `cargo test --test render_smoke -- --ignored --nocapture`.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use vqclip::models::{Clip, ClipConfig, Vqgan, VqganConfig};
use vqclip::render::{
    render, CancelToken, JobSpec, ModelIdentities, ModelIdentity, ModelSet, RenderJob,
    RenderOutcome,
};

/// Random weights of the right shapes: norm scales 1, biases 0, the rest Gaussian
/// scaled by fan-in, so activations stay finite through the deep stacks.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let t = if name.ends_with("bias") {
            Tensor::zeros(s, dtype, dev)?
        } else if dims.len() == 1 {
            Tensor::ones(s, dtype, dev)?
        } else {
            let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
            Tensor::randn(0f32, 1.0 / (fan_in as f32).sqrt(), s, dev)?.to_dtype(dtype)?
        };
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

const F16_16384: &str = "model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 16384
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
";

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
#[ignore = "real-size architectures: tens of seconds per step on a CPU"]
fn real_size_random_weights_128px_3_steps() {
    let dev = Device::Cpu;
    let vb = |_: ()| VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
    let t0 = Instant::now();
    let clip = Clip::new(vb(()), &ClipConfig::vit_base_patch32()).unwrap();
    let vqgan = Vqgan::new(vb(()), &VqganConfig::from_yaml_str(F16_16384).unwrap()).unwrap();
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
        peak_rss_kib().unwrap_or(0) / 1024
    );
}
