//! Finite-difference gradient checks for the differentiable pieces of the render.

use candle_core::{DType, Tensor, Var};

use crate::models::layers::{with_layer_ops, LayerOps};

/// Checks autograd's gradient of `sum(f(x) · w)` (w fixed pseudo-random) against
/// central differences, in f64, on up to 80 elements of `x` spread over the tensor.
pub(crate) fn check_gradient<F>(x: &Tensor, f: F, tol: f64)
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    let x = x.to_dtype(DType::F64).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let y = f(var.as_tensor()).unwrap();
    let n_out = y.elem_count();
    let w: Vec<f64> = (0..n_out)
        .map(|i| ((i as f64) * 0.618_033_988).fract() - 0.5)
        .collect();
    let w = Tensor::from_vec(w, y.shape(), y.device()).unwrap();
    let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
    let grads = loss(&y).backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("f(x) must depend on x")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let n = flat.len();
    let stride = (n / 80).max(1);
    let eps = 1e-5;
    let mut worst = 0f64;
    for i in (0..n).step_by(stride) {
        let eval = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            let xp = Tensor::from_vec(v, x.shape(), x.device()).unwrap();
            loss(&f(&xp).unwrap()).to_scalar::<f64>().unwrap()
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let err = (analytic[i] - numeric).abs() / numeric.abs().max(1.0);
        worst = worst.max(err);
        assert!(
            err <= tol,
            "gradient mismatch at element {i}: autograd {} vs finite difference {numeric}",
            analytic[i]
        );
    }
    assert!(
        analytic.iter().any(|g| g.abs() > 1e-9),
        "gradient is all zero"
    );
    let _ = worst;
}

/// `f(x)` and the gradient of `sum(f(x) · w)` under the layer seam `ops`.
fn value_and_gradient<F>(x: &Tensor, f: &F, ops: LayerOps) -> (Vec<f64>, Vec<f64>)
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    with_layer_ops(ops, || {
        let var = Var::from_tensor(x).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let w: Vec<f64> = (0..y.elem_count())
            .map(|i| ((i as f64) * 0.754_877_666).fract() - 0.5)
            .collect();
        let w = Tensor::from_vec(w, y.shape(), y.device())
            .unwrap()
            .to_dtype(y.dtype())
            .unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let g = grads.get(var.as_tensor()).expect("f(x) must depend on x");
        (flat(&y), flat(g))
    })
}

/// Checks a CPU kernel path of `f` against candle's reference form of the same map (the
/// `autograd` layer seam): values and input gradients agree to `tol` in f64, and the kernel
/// gives the same bytes twice in f32.
pub(crate) fn check_kernel_against_reference<F>(x: &Tensor, f: F, tol: f64)
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    let x64 = x.to_dtype(DType::F64).unwrap();
    let (y, g) = value_and_gradient(&x64, &f, LayerOps::InputGradOnly);
    let (y_ref, g_ref) = value_and_gradient(&x64, &f, LayerOps::Autograd);
    for (what, got, want) in [("value", &y, &y_ref), ("gradient", &g, &g_ref)] {
        assert_eq!(got.len(), want.len(), "{what} sizes differ");
        let worst = got
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f64, f64::max);
        assert!(worst <= tol, "kernel {what} off the reference by {worst}");
    }
    assert!(g.iter().any(|v| v.abs() > 1e-9), "gradient is all zero");
    let x32 = x.to_dtype(DType::F32).unwrap();
    let once = value_and_gradient(&x32, &f, LayerOps::InputGradOnly);
    let twice = value_and_gradient(&x32, &f, LayerOps::InputGradOnly);
    assert!(
        once.0
            .iter()
            .zip(&twice.0)
            .all(|(a, b)| a.to_bits() == b.to_bits())
            && once
                .1
                .iter()
                .zip(&twice.1)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the kernel is not deterministic"
    );
}
