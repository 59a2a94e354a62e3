//! Real-size architectures with random weights: they build, run, and what one pass costs.
//! Ignored by default (minutes on a laptop CPU); run one at a time so peak RSS is its own:
//!
//! ```sh
//! cargo test --test models_realsize -- --ignored --nocapture --test-threads 1 vit_b32
//! cargo test --test models_realsize -- --ignored --nocapture --test-threads 1 f16_16384
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use vqclip::models::{Clip, ClipConfig, Vqgan, VqganConfig};

const F16_16384_YAML: &str = "model:
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

/// Peak resident set size of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Fills every variable with small random values, so timings do not run on zeros.
fn randomise(varmap: &VarMap) {
    for var in varmap.all_vars() {
        let t = Tensor::randn(0f32, 0.02, var.shape(), var.device()).unwrap();
        var.set(&t).unwrap();
    }
}

fn parameter_count(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

#[test]
#[ignore = "real-size model: slow on CPU"]
fn vit_b32_builds_and_encodes() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let cfg = ClipConfig::vit_base_patch32();
    let clip = Clip::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
    randomise(&varmap);
    println!(
        "ViT-B/32: {:.1} M parameters",
        parameter_count(&varmap) as f64 / 1e6
    );

    let ids = Tensor::new(
        clip.tokenizer().encode("a photo of a cat").unwrap().ids,
        &dev,
    )
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    let t = Instant::now();
    let text = clip.encode_text(&ids).unwrap();
    println!("encode_text (1 prompt): {:.3} s", t.elapsed().as_secs_f64());
    assert_eq!(text.dims(), &[1, 512]);

    let x01 = Var::from_tensor(&Tensor::rand(0f32, 1.0, (1, 3, 224, 224), &dev).unwrap()).unwrap();
    let t = Instant::now();
    let image = clip
        .encode_image(&clip.normalize_pixels(x01.as_tensor()).unwrap())
        .unwrap();
    println!(
        "encode_image (1 x 224^2): {:.3} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(image.dims(), &[1, 512]);
    let t = Instant::now();
    let grads = (image * &text)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    println!("backward to pixels: {:.3} s", t.elapsed().as_secs_f64());
    assert!(grads.get(x01.as_tensor()).is_some());
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
}

#[test]
#[ignore = "real-size model: slow on CPU"]
fn f16_16384_builds_and_decodes_256() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let cfg = VqganConfig::from_yaml_str(F16_16384_YAML).unwrap();
    let vq = Vqgan::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
    randomise(&varmap);
    println!(
        "f16_16384: {:.1} M parameters",
        parameter_count(&varmap) as f64 / 1e6
    );
    println!("peak RSS after build: {:.0} MiB", peak_rss_mib());

    let z = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 256, 16, 16), &dev).unwrap()).unwrap();
    let t = Instant::now();
    let img = vq.decode(z.as_tensor()).unwrap();
    let decode_s = t.elapsed().as_secs_f64();
    assert_eq!(img.dims(), &[1, 3, 256, 256]);
    println!(
        "decode 16x16 -> 256^2: {decode_s:.2} s; peak RSS {:.0} MiB",
        peak_rss_mib()
    );

    let t = Instant::now();
    let grads = img.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    println!(
        "backward to z: {:.2} s; peak RSS {:.0} MiB",
        t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    assert!(grads.get(z.as_tensor()).is_some());
}
