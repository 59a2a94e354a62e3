//! Per-layer forward and backward timings of the VQGAN decoder's layers at the real
//! f16_16384 shapes, autograd against the input-gradient-only ops, and the whole decoder.
//! Measurements, not checks of speed (the machine may be loaded), so a benchmark rather than
//! a test; each layer's two paths must still give the same input gradient. The history in
//! BENCHMARKS.md was taken with the dev profile:
//!
//! ```text
//! cargo bench --profile dev --bench layer_timing
//! ```
//!
//! `VQCLIP_TIMING_SIZE` sets the decoded image side (default 128).

use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use vqclip::models::layers::{
    attention, upsample_nearest2x, with_layer_ops, Conv2d, GroupNorm, LayerNorm, LayerOps, Linear,
};
use vqclip::models::{architectures, Clip, Vqgan};

const PATHS: [LayerOps; 2] = [LayerOps::Autograd, LayerOps::InputGradOnly];

fn image_side() -> usize {
    std::env::var("VQCLIP_TIMING_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128)
}

fn randn(shape: &[usize], std: f32) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
}

fn median(mut secs: Vec<f64>) -> f64 {
    secs.sort_by(f64::total_cmp);
    secs[secs.len() / 2]
}

/// Median forward and backward (to the input only) seconds of `sum(layer(x) * readout)`
/// under `ops`,
/// each ended by a device sync, and the input gradient, so that the two paths' results are
/// compared as they are timed.
fn time_layer(
    ops: LayerOps,
    x: &Tensor,
    readout: &Tensor,
    reps: usize,
    layer: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> (f64, f64, Tensor) {
    with_layer_ops(ops, || {
        let dev = x.device();
        let v = Var::from_tensor(x).unwrap();
        let (mut fwd, mut bwd, mut grad) = (vec![], vec![], None);
        for _ in 0..reps {
            let start = Instant::now();
            let loss = (layer(v.as_tensor()).unwrap() * readout)
                .unwrap()
                .sum_all()
                .unwrap();
            dev.synchronize().unwrap();
            fwd.push(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let grads = loss.backward().unwrap();
            dev.synchronize().unwrap();
            bwd.push(start.elapsed().as_secs_f64());
            grad = grads.get(v.as_tensor()).cloned();
        }
        (median(fwd), median(bwd), grad.expect("no input gradient"))
    })
}

fn report(what: &str, x: &Tensor, reps: usize, layer: &dyn Fn(&Tensor) -> Result<Tensor>) {
    // A random readout: a plain sum would give GroupNorm a zero input gradient.
    let shape = layer(x).unwrap().shape().clone();
    let readout = Tensor::randn(0f32, 1.0, shape, x.device()).unwrap();
    let mut grads = vec![];
    for ops in PATHS {
        let (fwd, bwd, grad) = time_layer(ops, x, &readout, reps, layer);
        println!(
            "| {what:<32} | {:<14} | {:>9.1} | {:>9.1} |",
            format!("{ops:?}"),
            fwd * 1e3,
            bwd * 1e3
        );
        grads.push(grad);
    }
    let diff = (&grads[0] - &grads[1])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = grads[0]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff <= 1e-4 * scale.max(1e-12),
        "{what}: the two paths' input gradients differ by {diff} (scale {scale})"
    );
}

fn header() {
    println!("| layer (f32, batch 1)             | path           |    fwd ms |    bwd ms |");
    println!("|---|---|---|---|");
}

fn decoder_layers_at_real_shapes() {
    let side = image_side();
    let reps = 3;
    header();
    // (channels, spatial side) of the f16 decoder's levels for a `side`² image.
    let levels = [
        (512, side / 16),
        (512, side / 8),
        (256, side / 4),
        (256, side / 2),
        (128, side),
    ];
    for (c, s) in levels {
        let x = randn(&[1, c, s, s], 1.0);
        let conv = Conv2d::new(randn(&[c, c, 3, 3], 0.02), Some(randn(&[c], 0.02)), 1, 1);
        report(&format!("conv3x3 {c}ch {s}²"), &x, reps, &|t| {
            conv.forward(t)
        });
        let gn = GroupNorm::new(
            Tensor::ones(c, DType::F32, &Device::Cpu).unwrap(),
            randn(&[c], 0.02),
            32,
            1e-6,
        )
        .unwrap();
        report(&format!("GroupNorm+SiLU {c}ch {s}²"), &x, reps, &|t| {
            gn.forward_silu(t)
        });
        if s < side {
            report(&format!("upsample2x {c}ch {s}²"), &x, reps, &|t| {
                upsample_nearest2x(t)
            });
        }
    }
    // The decoder's attention: 1x1 projections then softmax(q kᵀ) v over the latent's pixels.
    let (c, s) = (512, side / 16);
    let x = randn(&[1, c, s, s], 1.0);
    let proj = Conv2d::new(randn(&[c, c, 1, 1], 0.02), Some(randn(&[c], 0.02)), 1, 0);
    report(&format!("conv1x1 {c}ch {s}²"), &x, reps, &|t| {
        proj.forward(t)
    });
    report(&format!("attention {c}ch {s}²"), &x, reps, &|t| {
        let tokens = t.flatten_from(2)?.transpose(1, 2)?;
        attention(&tokens, &tokens, &tokens, (c as f64).powf(-0.5), None)
    });
}

fn whole_decoder_forward_and_backward() {
    let side = image_side();
    let cfg = architectures::vqgan_config("vqgan_imagenet_f16_16384").unwrap();
    let vq = Vqgan::new(
        architectures::random_weights(DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let z = randn(&[1, 256, side / 16, side / 16], 1.0);
    println!("f16_16384 decoder, random weights, {side}² image");
    header();
    report(&format!("decoder {side}²"), &z, 1, &|t| vq.decode(t));
}

fn clip_image_encoder_forward_and_backward() {
    let cfg = architectures::clip_config("ViT-B/32").unwrap();
    let clip = Clip::new(
        architectures::random_weights(DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let s = clip.image_size();
    let cutn = 8;
    let pixels = randn(&[cutn, 3, s, s], 1.0);
    println!("ViT-B/32 image encoder, random weights, {cutn} cutouts of {s}²");
    header();
    report(&format!("CLIP image {cutn}x{s}²"), &pixels, 1, &|t| {
        clip.encode_image(t)
    });
    let tokens = cutn * 50;
    let x = randn(&[tokens, 768], 1.0);
    let fc1 = Linear::new(randn(&[3072, 768], 0.02), Some(randn(&[3072], 0.02)));
    report(&format!("Linear 768->3072 {tokens} tokens"), &x, 3, &|t| {
        fc1.forward(t)
    });
    let ln = LayerNorm::new(
        Tensor::ones(768, DType::F32, &Device::Cpu).unwrap(),
        randn(&[768], 0.02),
        1e-5,
    );
    report(&format!("LayerNorm 768 {tokens} tokens"), &x, 3, &|t| {
        ln.forward(t)
    });
    let patch = Conv2d::new(randn(&[768, 3, 32, 32], 0.02), None, 32, 0);
    report(
        &format!("patch conv 32/32 {cutn}x{s}²"),
        &pixels,
        3,
        &|t| patch.forward(t),
    );
}

fn main() {
    decoder_layers_at_real_shapes();
    whole_decoder_forward_and_backward();
    clip_image_encoder_forward_and_backward();
}
