//! The CPU kernels behind the layer seam (`vqclip::models::cpu`): each f32 kernel, forward
//! and input gradient, against candle's autograd run in f64 on the same values (whose
//! gradients `src/models/layers.rs` checks against finite differences), on shapes that
//! reach every branch (several conv tiles, edge padding, 1x1, no bias, batches), and the
//! same inputs giving the same bytes twice.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use vqclip::models::layers::{
    input_grad_layers_attached, upsample_nearest2x, with_layer_ops, Activation, Conv2d, GroupNorm,
    LayerNorm, LayerOps,
};

struct Pass {
    output: Tensor,
    grad: Tensor,
    attached: u64,
}

fn run(
    ops: LayerOps,
    x: &Tensor,
    readout: &Tensor,
    layer: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Pass {
    with_layer_ops(ops, || -> Result<Pass> {
        let v = Var::from_tensor(x)?;
        let before = input_grad_layers_attached();
        let output = layer(v.as_tensor())?;
        let attached = input_grad_layers_attached() - before;
        let loss = (output.to_dtype(readout.dtype())? * readout)?.sum_all()?;
        let grads = loss.backward()?;
        let grad = grads.get(v.as_tensor()).expect("no input gradient").clone();
        Ok(Pass {
            output,
            grad,
            attached,
        })
    })
    .unwrap()
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
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale.max(1e-30)
}

fn bytes(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// `f32_layer` on the CPU kernels against `f64_layer` (the same weights in f64) on candle's
/// autograd: outputs and input gradients within `tol` of the largest element, the kernel
/// path taken (`attached` layers), and a second kernel run identical to the bit.
fn assert_kernel_matches(
    what: &str,
    x: &Tensor,
    f32_layer: &dyn Fn(&Tensor) -> Result<Tensor>,
    f64_layer: &dyn Fn(&Tensor) -> Result<Tensor>,
    attached: u64,
    tol: f64,
) {
    let probe = f32_layer(x).unwrap();
    let readout = Tensor::randn(0f64, 1.0, probe.shape(), &Device::Cpu).unwrap();
    let fast = run(LayerOps::InputGradOnly, x, &readout, f32_layer);
    let x64 = x.to_dtype(DType::F64).unwrap();
    let reference = run(LayerOps::Autograd, &x64, &readout, f64_layer);
    assert_eq!(fast.output.dtype(), DType::F32, "{what}");
    assert_eq!(
        fast.attached, attached,
        "{what}: wrong number of kernel layers"
    );
    assert_eq!(reference.attached, 0, "{what}: the reference used a kernel");
    let fwd = max_rel_diff(&fast.output, &reference.output);
    let grad = max_rel_diff(&fast.grad, &reference.grad);
    assert!(fwd <= tol, "{what}: forward differs by {fwd:e}");
    assert!(grad <= tol, "{what}: input gradient differs by {grad:e}");
    let again = run(LayerOps::InputGradOnly, x, &readout, f32_layer);
    assert!(
        bytes(&again.output) == bytes(&fast.output),
        "{what}: forward not deterministic"
    );
    assert!(
        bytes(&again.grad) == bytes(&fast.grad),
        "{what}: gradient not deterministic"
    );
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn f64(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

#[test]
fn conv_kernel_matches_autograd() {
    // (batch, c_in, c_out, h, w, k, padding): 40 wide rows give several tiles per image;
    // 3x3 padding 2 and 5x5 reach past the edges; 1x1 reads the input in place.
    let cases = [
        (2, 5, 7, 9, 40, 3, 1),
        (1, 8, 4, 30, 70, 3, 1),
        (3, 4, 6, 6, 5, 3, 0),
        (2, 3, 5, 7, 8, 3, 2),
        (1, 6, 3, 11, 9, 5, 2),
        (2, 16, 8, 12, 100, 1, 0),
    ];
    for (b, ci, co, h, w, k, p) in cases {
        let weight = (randn(&[co, ci, k, k]) * 0.3).unwrap();
        let bias = randn(&[co]);
        let conv32 = Conv2d::new(weight.clone(), Some(bias.clone()), 1, p);
        let conv64 = Conv2d::new(f64(&weight), Some(f64(&bias)), 1, p);
        let x = randn(&[b, ci, h, w]);
        assert_kernel_matches(
            &format!("conv {k}x{k} pad {p} on {b}x{ci}x{h}x{w}"),
            &x,
            &|t| conv32.forward(t),
            &|t| conv64.forward(t),
            1,
            1e-5,
        );
    }
    let weight = randn(&[4, 3, 3, 3]);
    let no_bias32 = Conv2d::new(weight.clone(), None, 1, 1);
    let no_bias64 = Conv2d::new(f64(&weight), None, 1, 1);
    assert_kernel_matches(
        "conv without bias",
        &randn(&[2, 3, 10, 13]),
        &|t| no_bias32.forward(t),
        &|t| no_bias64.forward(t),
        1,
        1e-5,
    );
}

#[test]
fn norm_activation_and_upsample_kernels_match_autograd() {
    let c = 12;
    let (gamma, beta) = (randn(&[c]).affine(0.5, 1.0).unwrap(), randn(&[c]));
    let gn32 = GroupNorm::new(gamma.clone(), beta.clone(), 4, 1e-6).unwrap();
    let gn64 = GroupNorm::new(f64(&gamma), f64(&beta), 4, 1e-6).unwrap();
    let x = randn(&[2, c, 7, 9]).affine(3.0, 0.5).unwrap();
    assert_kernel_matches(
        "GroupNorm",
        &x,
        &|t| gn32.forward(t),
        &|t| gn64.forward(t),
        1,
        1e-5,
    );
    assert_kernel_matches(
        "GroupNorm + SiLU, upsample",
        &x,
        &|t| upsample_nearest2x(&gn32.forward_silu(t)?),
        &|t| upsample_nearest2x(&gn64.forward_silu(t)?),
        2,
        1e-5,
    );
    let d = 24;
    let (gamma, beta) = (randn(&[d]).affine(0.5, 1.0).unwrap(), randn(&[d]));
    let ln32 = LayerNorm::new(gamma.clone(), beta.clone(), 1e-5);
    let ln64 = LayerNorm::new(f64(&gamma), f64(&beta), 1e-5);
    let x = randn(&[3, 5, d]).affine(2.0, -0.3).unwrap();
    assert_kernel_matches(
        "LayerNorm, QuickGELU",
        &x,
        &|t| Activation::QuickGelu.forward(&ln32.forward(t)?),
        &|t| Activation::QuickGelu.forward(&ln64.forward(t)?),
        2,
        1e-5,
    );
    // Long enough for several elementwise chunks.
    let x = randn(&[3, 40_000]).affine(4.0, 0.0).unwrap();
    assert_kernel_matches(
        "QuickGELU, many chunks",
        &x,
        &|t| Activation::QuickGelu.forward(t),
        &|t| Activation::QuickGelu.forward(t),
        1,
        1e-5,
    );
}

#[test]
fn kernels_also_run_without_a_graph() {
    // Inference (no input gradient wanted) takes the same kernels and gets plain tensors.
    let weight = randn(&[4, 3, 3, 3]);
    let conv = Conv2d::new(weight.clone(), None, 1, 1);
    let x = randn(&[1, 3, 8, 8]);
    let before = input_grad_layers_attached();
    let y = with_layer_ops(LayerOps::InputGradOnly, || conv.forward(&x)).unwrap();
    assert_eq!(
        input_grad_layers_attached(),
        before,
        "a graph node without a graph"
    );
    let reference = with_layer_ops(LayerOps::Autograd, || conv.forward(&x)).unwrap();
    let diff = max_rel_diff(&y, &reference);
    assert!(diff < 1e-5, "conv without a graph differs by {diff:e}");
}

type Attend = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// `attend` on the CPU kernel (f32) against candle's autograd (f64): output and the gradients
/// of q, k and v through one kernel node, and the same bytes twice.
fn assert_attention_matches(what: &str, [q, k, v]: [&Tensor; 3], attend: &Attend) {
    let probe = attend(q, k, v).unwrap();
    let readout = Tensor::randn(0f64, 1.0, probe.shape(), &Device::Cpu).unwrap();
    let grads = |ops, dtype| {
        with_layer_ops(ops, || -> Result<(Tensor, Vec<Tensor>, u64)> {
            let vars = [q, k, v].map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
            let before = input_grad_layers_attached();
            let out = attend(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            )?;
            let attached = input_grad_layers_attached() - before;
            let g = (out.to_dtype(DType::F64)? * &readout)?
                .sum_all()?
                .backward()?;
            let gs = vars
                .iter()
                .map(|v| g.get(v.as_tensor()).expect("no gradient").clone())
                .collect();
            Ok((out, gs, attached))
        })
        .unwrap()
    };
    let (out, gs, attached) = grads(LayerOps::InputGradOnly, DType::F32);
    let (out_ref, gs_ref, attached_ref) = grads(LayerOps::Autograd, DType::F64);
    assert_eq!((attached, attached_ref), (1, 0), "{what}");
    let fwd = max_rel_diff(&out, &out_ref);
    assert!(fwd < 1e-5, "{what} forward differs by {fwd:e}");
    for (name, (g, r)) in ["q", "k", "v"].iter().zip(gs.iter().zip(&gs_ref)) {
        let diff = max_rel_diff(g, r);
        assert!(diff < 1e-5, "{what} d/d{name} differs by {diff:e}");
    }
    let (again, gs_again, _) = grads(LayerOps::InputGradOnly, DType::F32);
    assert!(
        bytes(&again) == bytes(&out),
        "{what} forward not deterministic"
    );
    for (g, g_again) in gs.iter().zip(&gs_again) {
        assert!(
            bytes(g) == bytes(g_again),
            "{what} gradient not deterministic"
        );
    }
}

#[test]
fn attention_kernel_matches_autograd() {
    use vqclip::models::layers::{attention, multi_head_attention};
    // Three inputs, so the gradient reaches all of them through one kernel node.
    let (b, tq, tk, d) = (6, 7, 7, 16);
    let (q, k, v) = (randn(&[b, tq, d]), randn(&[b, tk, d]), randn(&[b, tk, d]));
    assert_attention_matches("attention", [&q, &k, &v], &|q, k, v| {
        attention(q, k, v, 0.25, None)
    });
    // Heads interleaved in the columns, as the projections write them, read in place.
    let (b, t, heads, d) = (3, 5, 4, 8);
    let qkv = [0, 1, 2].map(|_| randn(&[b, t, heads * d]));
    assert_attention_matches(
        "multi-head attention",
        [&qkv[0], &qkv[1], &qkv[2]],
        &move |q, k, v| multi_head_attention(q, k, v, heads, 0.3, None),
    );
}

#[test]
fn fused_mlp_matches_autograd_and_survives_a_second_backward() {
    use vqclip::models::layers::{mlp, Linear};
    let (rows, width, inner) = (9, 12, 40);
    let (w1, b1, w2, b2) = (
        randn(&[inner, width]),
        randn(&[inner]),
        randn(&[width, inner]),
        randn(&[width]),
    );
    let layers = |dtype| {
        let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
        (
            Linear::new(c(&w1), Some(c(&b1))),
            Linear::new(c(&w2), Some(c(&b2))),
        )
    };
    let (fc1, fc2) = layers(DType::F32);
    let (fc1_64, fc2_64) = layers(DType::F64);
    let x = randn(&[3, rows / 3, width]);
    assert_kernel_matches(
        "mlp",
        &x,
        &|t| mlp(t, &fc1, Activation::QuickGelu, &fc2),
        &|t| mlp(t, &fc1_64, Activation::QuickGelu, &fc2_64),
        1,
        1e-5,
    );
    // The backward takes fc1's kept output; a second backward of the same graph recomputes it.
    let v = Var::from_tensor(&x).unwrap();
    let y = mlp(v.as_tensor(), &fc1, Activation::QuickGelu, &fc2).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let first = loss.backward().unwrap();
    let second = loss.backward().unwrap();
    assert_eq!(
        bytes(first.get(v.as_tensor()).unwrap()),
        bytes(second.get(v.as_tensor()).unwrap())
    );
}
