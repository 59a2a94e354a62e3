//! Real-size architectures with random weights: they build, run, and what one pass costs.
//! Ignored by default (minutes on a laptop CPU); run one at a time so peak RSS is its own:
//!
//! ```sh
//! cargo test --test models -- --ignored --nocapture --test-threads 1 real_size::vit_b32
//! cargo test --test models -- --ignored --nocapture --test-threads 1 real_size::f16_16384
//! ```

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use vqclip::models::architectures;
use vqclip::models::{Clip, ClipConfig, Vqgan};

/// Peak resident set size of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    architectures::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1u64 << 20) as f64)
}

/// Random weights for whatever `build` asks for, as plain tensors: a VarMap records the names
/// and shapes, then the values are detached so that, as with weights loaded from a file,
/// autograd tracks only the inputs.
fn random_weights(build: impl Fn(VarBuilder)) -> (HashMap<String, Tensor>, usize) {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    let data = varmap.data().lock().unwrap();
    let count = data.values().map(|v| v.elem_count()).sum();
    let weights = data
        .iter()
        .map(|(name, var)| {
            let t = Tensor::randn(0f32, 0.02, var.shape(), var.device()).unwrap();
            (name.clone(), t)
        })
        .collect();
    (weights, count)
}

#[test]
#[ignore = "real-size model: slow on CPU"]
fn vit_b32_builds_and_encodes() {
    let dev = Device::Cpu;
    let cfg = ClipConfig::vit_base_patch32();
    let (weights, count) = random_weights(|vb| {
        Clip::new(vb, &cfg).unwrap();
    });
    let clip = Clip::new(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg).unwrap();
    println!("ViT-B/32: {:.1} M parameters", count as f64 / 1e6);

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
    let cfg = architectures::vqgan_config("vqgan_imagenet_f16_16384").unwrap();
    let (weights, count) = random_weights(|vb| {
        Vqgan::new(vb, &cfg).unwrap();
    });
    let vq = Vqgan::new(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg).unwrap();
    println!("f16_16384: {:.1} M parameters", count as f64 / 1e6);
    println!("peak RSS after build: {:.0} MiB", peak_rss_mib());

    let z0 = Tensor::randn(0f32, 1.0, (1, 256, 16, 16), &dev).unwrap();
    let t = Instant::now();
    let img = vq.decode(&z0).unwrap();
    let decode_s = t.elapsed().as_secs_f64();
    assert_eq!(img.dims(), &[1, 3, 256, 256]);
    drop(img);
    println!(
        "decode 16x16 -> 256^2 (no graph): {decode_s:.2} s; peak RSS {:.0} MiB",
        peak_rss_mib()
    );

    // The render loop's shape: decode from a variable, keeping the graph for backward.
    let z = Var::from_tensor(&z0).unwrap();
    let t = Instant::now();
    let img = vq.decode(z.as_tensor()).unwrap();
    println!(
        "decode from a Var: {:.2} s; peak RSS {:.0} MiB",
        t.elapsed().as_secs_f64(),
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
