//! Finite-difference gradient checks for the differentiable pieces of the render.

use candle_core::{DType, Tensor, Var};

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
