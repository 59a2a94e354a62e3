//! The input-gradient-only layer ops against candle's autograd: same forward, same input
//! gradient, on random inputs, per op and through the whole VQGAN decoder.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use vqclip::models::layers::{
    input_grad_layers_attached, upsample_nearest2x, with_layer_ops, Activation, Conv2d, GroupNorm,
    LayerNorm, LayerOps, Linear,
};
use vqclip::models::Vqgan;

/// A layer's output and `d sum(output * readout) / d input` under one layer path, with the
/// number of layers that took the input-gradient-only path.
struct Pass {
    output: Tensor,
    grad: Tensor,
    attached: u64,
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-30);
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale
}

/// Runs `layer` on both paths with one shared readout and checks they agree within `tol`
/// (relative to the largest element), and that each path really ran: the layer attaches one
/// input-gradient node on the fast path (`fast_path`), none on the autograd path.
fn assert_paths_agree(
    what: &str,
    x: &Tensor,
    layer: &dyn Fn(&Tensor) -> Result<Tensor>,
    tol: f64,
    fast_path: bool,
) {
    // One readout for both paths, so the two gradients are of the same loss.
    let shape_probe = layer(x).unwrap();
    let readout = Tensor::randn(0f32, 1.0, shape_probe.shape(), x.device())
        .unwrap()
        .to_dtype(shape_probe.dtype())
        .unwrap();
    let run_with = |ops| {
        with_layer_ops(ops, || -> Result<Pass> {
            let v = Var::from_tensor(x)?;
            let before = input_grad_layers_attached();
            let output = layer(v.as_tensor())?;
            let attached = input_grad_layers_attached() - before;
            let grads = (&output * &readout)?.sum_all()?.backward()?;
            let grad = grads
                .get(v.as_tensor())
                .expect("no gradient reached the input")
                .clone();
            Ok(Pass {
                output,
                grad,
                attached,
            })
        })
        .unwrap()
    };
    let reference = run_with(LayerOps::Autograd);
    let fast = run_with(LayerOps::InputGradOnly);
    let fwd = max_rel_diff(&fast.output, &reference.output);
    let grad = max_rel_diff(&fast.grad, &reference.grad);
    assert!(fwd <= tol, "{what}: forward differs by {fwd:e} (relative)");
    assert!(
        grad <= tol,
        "{what}: input gradient differs by {grad:e} (relative)"
    );
    assert_eq!(
        reference.attached, 0,
        "{what}: the autograd path used a custom op"
    );
    assert_eq!(
        fast.attached,
        u64::from(fast_path),
        "{what}: the wrong path ran under InputGradOnly"
    );
}

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn conv(c_out: usize, c_in: usize, k: usize, stride: usize, pad: usize, dtype: DType) -> Conv2d {
    let w = (randn(&[c_out, c_in, k, k], dtype) * 0.2).unwrap();
    Conv2d::new(w, Some(randn(&[c_out], dtype)), stride, pad)
}

#[test]
fn conv2d_input_grad_matches_autograd() {
    let x = randn(&[2, 5, 9, 7], DType::F64);
    for (k, pad) in [(3, 1), (3, 0), (1, 0), (5, 2), (3, 2)] {
        let c = conv(6, 5, k, 1, pad, DType::F64);
        assert_paths_agree(
            &format!("conv {k}x{k} padding {pad}"),
            &x,
            &|t| c.forward(t),
            1e-12,
            true,
        );
    }
    let no_bias = Conv2d::new(randn(&[4, 5, 3, 3], DType::F64), None, 1, 1);
    assert_paths_agree(
        "conv without bias",
        &x,
        &|t| no_bias.forward(t),
        1e-12,
        true,
    );
}

#[test]
fn conv2d_input_grad_matches_autograd_in_f32() {
    let x = randn(&[1, 16, 12, 12], DType::F32);
    let c = conv(8, 16, 3, 1, 1, DType::F32);
    assert_paths_agree("conv 3x3 f32", &x, &|t| c.forward(t), 1e-5, true);
}

#[test]
fn strided_conv_keeps_autograd_and_its_gradient() {
    let x = randn(&[1, 3, 9, 9], DType::F64);
    let c = conv(4, 3, 3, 2, 0, DType::F64);
    assert_paths_agree("conv stride 2", &x, &|t| c.forward(t), 1e-12, false);
}

#[test]
fn patchify_conv_input_grad_matches_autograd() {
    // Stride equal to the kernel, no padding: CLIP's patch embedding. 11 and 14 leave rows and
    // columns past the last whole patch, whose gradient is zero. (candle's own backward sizes
    // both dims from the height's remainder, so the reference fails when the two differ.)
    for (h, w) in [(12, 9), (11, 14)] {
        let x = randn(&[2, 3, h, w], DType::F64);
        let c = Conv2d::new(randn(&[5, 3, 3, 3], DType::F64), None, 3, 0);
        assert_paths_agree(
            &format!("patchify conv on {h}x{w}"),
            &x,
            &|t| c.forward(t),
            1e-12,
            true,
        );
    }
}

#[test]
fn linear_input_grad_matches_autograd() {
    let x = randn(&[2, 7, 6], DType::F64);
    let with_bias = Linear::new(randn(&[4, 6], DType::F64), Some(randn(&[4], DType::F64)));
    assert_paths_agree("linear", &x, &|t| with_bias.forward(t), 1e-12, true);
    let no_bias = Linear::new(randn(&[3, 6], DType::F64), None);
    assert_paths_agree(
        "linear without bias",
        &x,
        &|t| no_bias.forward(t),
        1e-12,
        true,
    );
}

#[test]
fn group_norm_and_silu_input_grad_match_autograd() {
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-11 } else { 1e-5 };
        let x = randn(&[2, 8, 5, 6], dtype).affine(3.0, 0.5).unwrap();
        let gn = GroupNorm::new(
            randn(&[8], dtype).affine(0.5, 1.0).unwrap(),
            (randn(&[8], dtype) * 0.5).unwrap(),
            4,
            1e-6,
        )
        .unwrap();
        assert_paths_agree(
            &format!("GroupNorm {dtype:?}"),
            &x,
            &|t| gn.forward(t),
            tol,
            true,
        );
        assert_paths_agree(
            &format!("GroupNorm + SiLU {dtype:?}"),
            &x,
            &|t| gn.forward_silu(t),
            tol,
            true,
        );
    }
}

#[test]
fn layer_norm_and_quick_gelu_input_grad_match_autograd() {
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-11 } else { 1e-5 };
        let x = randn(&[2, 5, 12], dtype).affine(2.0, -0.3).unwrap();
        let ln = LayerNorm::new(
            randn(&[12], dtype).affine(0.5, 1.0).unwrap(),
            randn(&[12], dtype),
            1e-5,
        );
        let what = format!("LayerNorm {dtype:?}");
        assert_paths_agree(&what, &x, &|t| ln.forward(t), tol, true);
        let what = format!("QuickGELU {dtype:?}");
        assert_paths_agree(&what, &x, &|t| Activation::QuickGelu.forward(t), tol, true);
    }
}

#[test]
fn upsample_input_grad_matches_autograd() {
    let x = randn(&[2, 3, 4, 5], DType::F64);
    assert_paths_agree("upsample 2x", &x, &upsample_nearest2x, 1e-14, true);
}

#[test]
fn trainable_weights_keep_their_gradient() {
    // A layer whose weight is a Var must not drop the weight's gradient silently.
    let w = Var::from_tensor(&randn(&[4, 3, 3, 3], DType::F64)).unwrap();
    let c = Conv2d::new(w.as_tensor().clone(), None, 1, 1);
    let x = Var::from_tensor(&randn(&[1, 3, 6, 6], DType::F64)).unwrap();
    let grads = with_layer_ops(LayerOps::InputGradOnly, || {
        c.forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    });
    assert!(
        grads.get(w.as_tensor()).is_some(),
        "weight gradient dropped"
    );
    assert!(grads.get(x.as_tensor()).is_some(), "input gradient dropped");
}

#[test]
fn vqgan_decoder_gradient_matches_autograd() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vqgan-tiny");
    let vq = Vqgan::load_with_dtype(&dir, DType::F64, &Device::Cpu).unwrap();
    let z = randn(&[1, vq.embed_dim(), 4, 5], DType::F64);
    let target = randn(&[1, 3, 16, 20], DType::F64);
    let loss_grad = |ops| {
        with_layer_ops(ops, || {
            let z = Var::from_tensor(&z).unwrap();
            let before = input_grad_layers_attached();
            let image = vq.decode(z.as_tensor()).unwrap();
            let attached = input_grad_layers_attached() - before;
            let loss = (&image - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let grad = grads
                .get(z.as_tensor())
                .expect("no gradient reached z")
                .clone();
            (image, grad, attached)
        })
    };
    let (image_ref, grad_ref, attached_ref) = loss_grad(LayerOps::Autograd);
    let (image, grad, attached) = loss_grad(LayerOps::InputGradOnly);
    assert_eq!(attached_ref, 0);
    // Every conv, norm and upsample of post_quant_conv + decoder: far more than a handful.
    assert!(attached > 20, "only {attached} layers took the fast path");
    let fwd = max_rel_diff(&image, &image_ref);
    let back = max_rel_diff(&grad, &grad_ref);
    assert!(fwd < 1e-12, "decoded image differs by {fwd:e}");
    assert!(back < 1e-10, "d loss / d z differs by {back:e}");
}
