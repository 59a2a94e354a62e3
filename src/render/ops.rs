//! Differentiable pieces candle lacks: `asin`, generate.py's `ClampWithGrad`, and the
//! one-pass CPU kernels of the cutout resampling and augmentation gathers ([`GatherKernel`]).
//!
//! The first two use one pattern so they run on every backend: the forward value comes from
//! primitive ops with autograd cut (`detach`), and the gradient enters through
//! [`GradHook`], an identity custom op whose `bwd` is the exact derivative, written
//! with primitive ops too. `(hook(x) − x̄) + ȳ` equals `ȳ` bit for bit, since
//! `x − x = 0` exactly in IEEE arithmetic.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor,
};

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

/// A resampling of one CPU tensor (a crop, a pooling, a warp) written as one pass over
/// memory, with its input gradient as one more. candle's form of the same maps (weight
/// matrices, index gathers, elementwise products) makes a pass and an allocation per op and
/// keeps each intermediate alive for the backward; a kernel keeps only its parameters.
///
/// `forward` and `input_grad` see contiguous f32 or f64 values; the input gradient may read
/// the input (a max pooling recomputes its argmax instead of storing it).
pub(crate) trait GatherKernel: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The output's dims for an input of `dims`, or an error when the kernel cannot take it.
    fn out_dims(&self, dims: &[usize]) -> candle_core::Result<Vec<usize>>;
    fn forward<T: Sample>(&self, x: &[T], out: &mut [T]);
    /// Writes `d loss / d x` into `gx` (zeroed, the input's size) from `x` and `d loss / d out`.
    fn input_grad<T: Sample>(&self, x: &[T], grad_out: &[T], gx: &mut [T]);
}

/// The element types the gather kernels run on: f32 (the render) and f64 (the gradient
/// checks against finite differences).
pub(crate) trait Sample:
    candle_core::WithDType + std::ops::AddAssign + std::ops::Mul<Output = Self>
{
    fn of(v: f32) -> Self;
    fn floor(self) -> Self;
}

impl Sample for f32 {
    fn of(v: f32) -> Self {
        v
    }
    fn floor(self) -> Self {
        f32::floor(self)
    }
}

impl Sample for f64 {
    fn of(v: f32) -> Self {
        f64::from(v)
    }
    fn floor(self) -> Self {
        f64::floor(self)
    }
}

/// Whether `x` can take a [`GatherKernel`]: f32 or f64 on the CPU, and the layer seam on its
/// kernels (`VQCLIP_LAYER_OPS=autograd` keeps candle's reference form, so tests compare both).
pub(crate) fn gather_kernels(x: &Tensor) -> bool {
    use crate::models::layers::{layer_ops, LayerOps};
    x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && layer_ops() == LayerOps::InputGradOnly
}

fn contiguous_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{name}: the kernel needs a contiguous input"),
    }
}

struct GatherForward<K>(std::sync::Arc<K>);

impl<K: GatherKernel> GatherForward<K> {
    fn run<T: Sample>(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_slice::<T>(s, l, self.0.name())?;
        let dims = self.0.out_dims(l.dims())?;
        let mut out = vec![T::zero(); dims.iter().product()];
        self.0.forward(x, &mut out);
        Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
    }
}

impl<K: GatherKernel> CustomOp1 for GatherForward<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => self.run::<f32>(s, l),
            CpuStorage::F64(_) => self.run::<f64>(s, l),
            _ => candle_core::bail!("{}: f32 or f64 only", self.0.name()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = x.apply_op2_no_bwd(&grad_out.contiguous()?, &GatherInputGrad(self.0.clone()))?;
        Ok(Some(grad))
    }
}

struct GatherInputGrad<K>(std::sync::Arc<K>);

impl<K: GatherKernel> GatherInputGrad<K> {
    fn run<T: Sample>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.0.name();
        let x = contiguous_slice::<T>(s1, l1, name)?;
        let g = contiguous_slice::<T>(s2, l2, name)?;
        let out_dims = self.0.out_dims(l1.dims())?;
        if l2.dims() != out_dims.as_slice() {
            candle_core::bail!(
                "{name}: gradient {:?} for an output {out_dims:?}",
                l2.dims()
            )
        }
        let mut gx = vec![T::zero(); x.len()];
        self.0.input_grad(x, g, &mut gx);
        Ok((T::to_cpu_storage_owned(gx), l1.shape().clone()))
    }
}

impl<K: GatherKernel> CustomOp2 for GatherInputGrad<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.run::<f32>((s1, l1), (s2, l2)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.run::<f64>((s1, l1), (s2, l2)),
            _ => candle_core::bail!("{}: f32 or f64 input and gradient", self.0.name()),
        }
    }
}

/// Applies `kernel` to `x` (f32 or f64 on the CPU, see [`gather_kernels`]): one graph node
/// whose backward is the kernel's input gradient.
pub(crate) fn apply_gather<K: GatherKernel>(x: &Tensor, kernel: K) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op1(GatherForward(std::sync::Arc::new(kernel)))
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
