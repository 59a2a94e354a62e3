//! Differentiable pieces candle lacks: `asin` and generate.py's `ClampWithGrad`.
//!
//! Both use one pattern so they run on every backend: the forward value comes from
//! primitive ops with autograd cut (`detach`), and the gradient enters through
//! [`GradHook`], an identity custom op whose `bwd` is the exact derivative, written
//! with primitive ops too. `(hook(x) − x̄) + ȳ` equals `ȳ` bit for bit, since
//! `x − x = 0` exactly in IEEE arithmetic.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The backward rule a [`GradHook`] applies.
#[derive(Debug, Clone, Copy)]
enum HookRule {
    /// d asin(x)/dx = 1/√(1 − x²).
    Asin,
    /// Crowson's ClampWithGrad: pass the gradient only where a descent step would move
    /// the value back toward `[min, max]` (or where it is already inside).
    Clamp { min: f64, max: f64 },
}

/// An identity op in the forward pass with a hand-written input gradient.
struct GradHook(HookRule);

impl CustomOp1 for GradHook {
    fn name(&self) -> &'static str {
        match self.0 {
            HookRule::Asin => "asin-grad",
            HookRule::Clamp { .. } => "clamp-with-grad",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // `with_hook` passes a fresh compact buffer, so cloning it is the identity.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("grad hook needs a compact input");
        }
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("grad hook needs a compact input");
        }
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = match self.0 {
            HookRule::Asin => {
                // Keep the slope finite at |x| = 1 (antipodal embeddings).
                let denom = (1.0 - arg.sqr()?)?.clamp(1e-12, f64::INFINITY)?.sqrt()?;
                grad_res.div(&denom)?
            }
            HookRule::Clamp { min, max } => {
                let outside = (arg - arg.clamp(min, max)?)?;
                let keep = (grad_res * outside)?.ge(0.0)?.to_dtype(grad_res.dtype())?;
                (grad_res * keep)?
            }
        };
        Ok(Some(grad))
    }
}

/// `(hook(x) − x̄) + value`: the forward value of `value`, the gradient of the hook.
fn with_hook(x: &Tensor, value: &Tensor, rule: HookRule) -> candle_core::Result<Tensor> {
    // `affine` always writes a fresh compact buffer (offset 0), which is what lets the
    // hook's forward be a plain buffer clone on every backend; `copy` keeps offsets.
    let hooked = x.affine(1.0, 0.0)?.apply_op1(GradHook(rule))?;
    (hooked - x.detach())? + value.detach()
}

/// `asin(x)` for x in [−1, 1], elementwise, with the exact derivative.
///
/// The value uses Abramowitz & Stegun 4.4.46, `asin|x| = π/2 − √(1−|x|)·P(|x|)`, whose
/// error is below 2e-8, from primitive ops so it runs on any device.
pub fn asin(x: &Tensor) -> candle_core::Result<Tensor> {
    const C: [f64; 8] = [
        1.570_796_305_0,
        -0.214_598_801_3,
        0.088_978_987_4,
        -0.050_174_304_6,
        0.030_891_881_0,
        -0.017_088_125_6,
        0.006_670_090_1,
        -0.001_262_491_1,
    ];
    let xd = x.detach();
    let a = xd.abs()?.clamp(0.0, 1.0)?;
    let mut poly = (a.ones_like()? * C[7])?;
    for &c in C[..7].iter().rev() {
        poly = ((poly * &a)? + c)?;
    }
    let magnitude = (((1.0 - &a)?.sqrt()? * poly)?.neg()? + std::f64::consts::FRAC_PI_2)?;
    let value = (magnitude * xd.sign()?)?;
    with_hook(x, &value, HookRule::Asin)
}

/// generate.py's `clamp_with_grad`: clamps to `[min, max]`, but lets the gradient
/// through wherever following it would not push the value further out of range.
pub fn clamp_with_grad(x: &Tensor, min: f64, max: f64) -> candle_core::Result<Tensor> {
    let value = x.detach().clamp(min, max)?;
    with_hook(x, &value, HookRule::Clamp { min, max })
}

/// generate.py's `replace_grad(dists, maximum(dists, stop))`: the value of `x`, with
/// the gradient cut wherever `x < stop`.
pub fn stop_below(x: &Tensor, stop: f64) -> candle_core::Result<Tensor> {
    let live = x.detach().ge(stop)?.to_dtype(x.dtype())?;
    let dead = (1.0 - &live)?;
    (x * live)? + (x.detach() * dead)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::gradcheck::check_gradient;
    use candle_core::{Device, Var};

    #[test]
    fn asin_value_and_gradient() {
        let xs: Vec<f64> = (-20..=20).map(|i| i as f64 * 0.0475).collect();
        let x = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let got: Vec<f64> = asin(&x).unwrap().to_vec1().unwrap();
        for (g, v) in got.iter().zip(&xs) {
            assert!(
                (g - v.asin()).abs() < 5e-8,
                "asin({v}) = {g}, expected {}",
                v.asin()
            );
        }
        let f32s = x.to_dtype(candle_core::DType::F32).unwrap();
        let got: Vec<f32> = asin(&f32s).unwrap().to_vec1().unwrap();
        assert!((got[40] - 0.95f32.asin()).abs() < 1e-6);

        let var = Var::from_tensor(&x).unwrap();
        let grad = asin(var.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad: Vec<f64> = grad.get(var.as_tensor()).unwrap().to_vec1().unwrap();
        for (g, v) in grad.iter().zip(&xs) {
            assert!((g - 1.0 / (1.0 - v * v).sqrt()).abs() < 1e-9);
        }
        // Away from 0, where the approximation's 2e-8 offset would swamp a difference
        // quotient (the gradient itself is exact there too).
        let off_zero = (&x + 0.011).unwrap().clamp(-0.99, 0.99).unwrap();
        check_gradient(&off_zero, asin, 1e-5);
        // The loss's composition: 2·asin(d/2)² over distances in (0, 2).
        let dists = (off_zero.abs().unwrap() * 1.9).unwrap();
        check_gradient(&dists, |d| asin(&(d / 2.0)?)?.sqr()? * 2.0, 1e-5);
    }

    #[test]
    fn clamp_with_grad_matches_crowson() {
        let x = Var::from_tensor(
            &Tensor::new(&[-0.5f32, 0.3, 1.5, -0.2, 1.2, 0.7], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = clamp_with_grad(x.as_tensor(), 0.0, 1.0).unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            vec![0.0, 0.3, 1.0, 0.0, 1.0, 0.7]
        );
        // Upstream gradient signs chosen so that elements 0 and 2 would move back into
        // range under descent (kept) and 3 and 4 further out (cut).
        let up = Tensor::new(&[-1.0f32, 2.0, 3.0, 4.0, -5.0, 6.0], &Device::Cpu).unwrap();
        let grads = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![-1.0, 2.0, 3.0, 0.0, 0.0, 6.0]);
    }

    #[test]
    fn hooks_accept_views_with_offsets_and_strides() {
        let x = Tensor::new(&[[-1.0f32, 0.25], [0.5, 2.0], [0.75, -0.5]], &Device::Cpu).unwrap();
        let view = x.narrow(0, 1, 2).unwrap().t().unwrap();
        let y = clamp_with_grad(&view, 0.0, 1.0).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            vec![vec![0.5, 0.75], vec![1.0, 0.0]]
        );
        let a = asin(&view.affine(0.4, 0.0).unwrap()).unwrap();
        assert!((a.to_vec2::<f32>().unwrap()[0][1] - 0.3f32.asin()).abs() < 1e-6);
    }

    #[test]
    fn stop_cuts_gradient_below() {
        let x = Var::from_tensor(&Tensor::new(&[0.1f32, 0.5, 0.9], &Device::Cpu).unwrap()).unwrap();
        let y = stop_below(x.as_tensor(), 0.4).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.1, 0.5, 0.9]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 1.0]
        );
    }
}
