//! Gradients the render loop relies on, checked against central finite differences in f64 on
//! the tiny reference models: CLIP image features to the pixels, and the VQGAN decoder through
//! the straight-through quantizer to the latent.

use crate::support::fixture;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use vqclip::models::{Clip, Vqgan};

fn cosine(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    dot / (na * nb)?
}

/// Values uniform in `[lo, hi)` from a seeded generator, so that every run checks the same
/// point (candle's own random tensors are seeded by the OS).
fn seeded(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Compares autograd's gradient `grad` of `f` at `x` with central differences, along a few
/// random directions and at a few single coordinates.
///
/// Every direction is stepped the same Euclidean length `h`, with the fourth-order stencil.
/// Plain central differences err by h²/6 times the third derivative along the step, which
/// grows with the cube of the step length while the derivative grows only linearly; a random
/// direction over n coordinates is about √(n/3) times longer than a coordinate, so stepping
/// `h` times it put the VQGAN decoder's random directions at 1e-5 to 2e-4 relative error,
/// past the tolerance on one random latent in ten. Unit steps alone bring the worst of 60
/// latents to 4e-6, the fourth-order stencil to 5e-8: the comparison measures autograd, not
/// the finite differences.
fn check_against_finite_differences(
    what: &str,
    f: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    grad: &Tensor,
    seed: u64,
) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let h = 1e-4;
    let n = x.elem_count();
    let grad_flat: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let grad_scale = grad_flat.iter().fold(0f64, |m, g| m.max(g.abs()));
    assert!(grad_scale > 0.0, "{what}: the gradient is identically zero");
    let mut directions: Vec<(String, Vec<f64>)> = (0..3)
        .map(|i| {
            let d: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            (format!("random direction {i}"), d)
        })
        .collect();
    // The coordinates with the largest gradients, plus random ones.
    let mut largest: Vec<usize> = (0..n).collect();
    largest.sort_by(|&a, &b| grad_flat[b].abs().total_cmp(&grad_flat[a].abs()));
    let coords: Vec<usize> = largest[..2]
        .iter()
        .copied()
        .chain((0..2).map(|_| rng.gen_range(0..n)))
        .collect();
    for c in coords {
        let mut d = vec![0.0; n];
        d[c] = 1.0;
        directions.push((format!("coordinate {c}"), d));
    }
    for (name, d) in directions {
        let analytic: f64 = d.iter().zip(&grad_flat).map(|(a, b)| a * b).sum();
        let step = h / d.iter().map(|v| v * v).sum::<f64>().sqrt();
        let dir = Tensor::from_vec(d, x.shape(), x.device()).unwrap();
        let at = |k: f64| scalar(&f(&(x + (&dir * (k * step)).unwrap()).unwrap()));
        let numeric = (8.0 * (at(1.0) - at(-1.0)) - (at(2.0) - at(-2.0))) / (12.0 * step);
        let err = (analytic - numeric).abs() / numeric.abs().max(grad_scale * 1e-2);
        assert!(
            err < 1e-5,
            "{what}, {name}: autograd {analytic:e} vs finite differences {numeric:e} (rel err {err:e})"
        );
    }
}

#[test]
fn clip_cosine_similarity_gradient_reaches_pixels() {
    let dev = Device::Cpu;
    let clip = Clip::load_with_dtype(&fixture("clip-tiny"), DType::F64, &dev).unwrap();
    let (text, _) = clip.encode_prompts(&["a lighthouse at night"]).unwrap();
    let text = text.detach();
    let s = clip.image_size();
    let x01 = Var::from_tensor(&seeded(11, &[1, 3, s, s], 0.0, 1.0)).unwrap();
    let similarity = |x: &Tensor| {
        let pixels = clip.normalize_pixels(x).unwrap();
        cosine(&clip.encode_image(&pixels).unwrap(), &text)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = similarity(x01.as_tensor()).backward().unwrap();
    let grad = grads
        .get(x01.as_tensor())
        .expect("no gradient reached the pixels");
    check_against_finite_differences("d cos / d pixels", &similarity, x01.as_tensor(), grad, 1);
}

#[test]
fn clip_text_features_ignore_tokens_after_the_end_token() {
    // The causal mask and the pooling at the end token together make padding irrelevant; a
    // wrong mask or pooling position would let later tokens leak into the features.
    let dev = Device::Cpu;
    let clip = Clip::load_with_dtype(&fixture("clip-tiny"), DType::F64, &dev).unwrap();
    let tok = clip.tokenizer().encode("a cat").unwrap();
    let eot = tok.ids.iter().position(|&i| i == 49407).unwrap();
    assert_eq!(eot, 3);
    let ids = Tensor::from_vec(tok.ids, (1, 77), &dev).unwrap();
    let a = clip.encode_text(&ids).unwrap();
    let mut later = ids.to_vec2::<u32>().unwrap();
    // Tokens after the end token must not change the features (causal mask + pooling).
    later[0][eot + 1] = 320;
    let b = clip
        .encode_text(&Tensor::new(later, &dev).unwrap())
        .unwrap();
    let diff = scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap());
    assert_eq!(diff, 0.0);
}

#[test]
fn vqgan_decoder_gradient_passes_straight_through_quantize() {
    let dev = Device::Cpu;
    let vq = Vqgan::load_with_dtype(&fixture("vqgan-tiny"), DType::F64, &dev).unwrap();
    let z = Var::from_tensor(&seeded(21, &[1, vq.embed_dim(), 4, 5], -2.0, 2.0)).unwrap();
    let target = seeded(22, &[1, 3, 16, 20], -1.0, 1.0);
    let decoder_loss = |q: &Tensor| {
        (vq.decode(q).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };

    let (z_q, indices) = vq.quantize(z.as_tensor()).unwrap();
    let grads = decoder_loss(&z_q).backward().unwrap();
    let grad = grads
        .get(z.as_tensor())
        .expect("no gradient reached z through quantize");

    // z_q holds codebook rows...
    let rows = vq.embed_indices(&indices).unwrap();
    let off = scalar(&(&z_q - &rows).unwrap().abs().unwrap().max_all().unwrap());
    assert!(off < 1e-12, "z_q is not the codebook rows (off by {off})");
    // ...and the gradient at z is the decoder's gradient at z_q (straight-through), which
    // finite differences of the decoder alone measure.
    let z_q = z_q.detach();
    check_against_finite_differences("d loss / d z", &decoder_loss, &z_q, grad, 2);
}

#[test]
fn vqgan_encoder_is_differentiable_to_the_image() {
    // Init-from-image jobs optimise through nothing here, but a broken encoder backward
    // (asymmetric padding, attention) would surface in this check.
    let dev = Device::Cpu;
    let vq = Vqgan::load_with_dtype(&fixture("vqgan-tiny"), DType::F64, &dev).unwrap();
    let img = Var::from_tensor(&seeded(31, &[1, 3, 16, 16], -1.0, 1.0)).unwrap();
    let readout = seeded(32, &[1, vq.embed_dim(), 4, 4], -1.5, 1.5);
    let f = |x: &Tensor| {
        (vq.encode(x).unwrap() * &readout)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = f(img.as_tensor()).backward().unwrap();
    let grad = grads
        .get(img.as_tensor())
        .expect("no gradient reached the image");
    check_against_finite_differences("d encode / d image", &f, img.as_tensor(), grad, 3);
}
