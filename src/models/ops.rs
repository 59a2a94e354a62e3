//! Input-only backward passes for the frozen models' hot layers.
//!
//! The render loop differentiates a loss with respect to the VQGAN latent only; every weight
//! is frozen. candle's autograd nonetheless computes a conv's weight gradient on every step,
//! and computes its input gradient with `conv_transpose2d`, which runs about ten times slower
//! than the forward conv on CPU (fifteen times on CUDA). A GroupNorm built from primitives
//! becomes a dozen autograd nodes, each allocating and summing its own gradient, and a
//! nearest upsample's backward is a grouped conv that candle runs one channel at a time.
//!
//! Each op here runs its forward with the ordinary candle ops on a detached input, so no
//! autograd graph is recorded, then joins the result to the input through one
//! `InputGradient` node whose backward returns the input gradient only, written as plain
//! forward ops (a conv with the flipped kernel, reshapes and sums), which are candle's fast
//! paths on every device.
//!
//! Which path a layer takes is decided by [`layer_ops`]; the plain-autograd path stays
//! available so that tests can compare the two.

use std::cell::Cell;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Result, Shape, Storage,
    Tensor, D,
};

use super::cpu;

/// How the layer seam builds its graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOps {
    /// Plain candle ops and candle's autograd: the reference, slower in the backward pass.
    Autograd,
    /// Frozen layers get one graph node each, whose backward yields the input gradient only.
    InputGradOnly,
}

/// The environment variable that sets the process-wide default: `autograd` or
/// `input-grad-only` (the default).
pub const LAYER_OPS_ENV: &str = "VQCLIP_LAYER_OPS";

impl LayerOps {
    fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "autograd" => Some(Self::Autograd),
            "input-grad-only" | "input_grad_only" => Some(Self::InputGradOnly),
            _ => None,
        }
    }

    fn process_default() -> Self {
        static DEFAULT: OnceLock<LayerOps> = OnceLock::new();
        *DEFAULT.get_or_init(|| match std::env::var(LAYER_OPS_ENV) {
            Ok(text) => Self::parse(&text).unwrap_or_else(|| {
                tracing::warn!(
                    "{LAYER_OPS_ENV}={text:?} is not autograd or input-grad-only; using input-grad-only"
                );
                Self::InputGradOnly
            }),
            Err(_) => Self::InputGradOnly,
        })
    }
}

thread_local! {
    static THREAD_OVERRIDE: Cell<Option<LayerOps>> = const { Cell::new(None) };
    static ATTACHED: Cell<u64> = const { Cell::new(0) };
}

/// How many layers on this thread have taken the input-gradient-only path so far: lets a
/// test or a profile confirm which path ran, which the results alone cannot show.
pub fn input_grad_layers_attached() -> u64 {
    ATTACHED.with(Cell::get)
}

/// Counts one more layer on the input-gradient-only path (see [`input_grad_layers_attached`]).
pub(crate) fn count_input_grad_layer() {
    ATTACHED.with(|n| n.set(n.get() + 1));
}

/// The path the layer seam takes on this thread: a [`with_layer_ops`] override if one is
/// active, else the process default from [`LAYER_OPS_ENV`].
pub fn layer_ops() -> LayerOps {
    THREAD_OVERRIDE
        .with(Cell::get)
        .unwrap_or_else(LayerOps::process_default)
}

/// Runs `f` with the layer seam set to `ops` on this thread only (tests run in parallel
/// threads, so a process-wide switch would leak between them).
pub fn with_layer_ops<R>(ops: LayerOps, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<LayerOps>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(THREAD_OVERRIDE.with(|o| o.replace(Some(ops))));
    f()
}

type InputGradFn = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// The graph node joining a layer's input `x` to its output `y`, computed off the graph.
///
/// A custom op must return fresh storage and candle offers no other way to attach a backward
/// to an existing tensor, so the forward copies `y`. The op holds `y` only until then: once
/// copied it is dropped, so the graph keeps one output per layer, as an ordinary op would.
/// The backward calls `grad_x(x, grad_y)`.
struct InputGradient {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
    grad_x: Box<InputGradFn>,
}

impl InputGradient {
    /// Runs `copy` on the output's storage, which the forward then no longer needs.
    fn copy_output<S>(&self, copy: impl FnOnce(&Storage, &Layout) -> Result<S>) -> Result<S> {
        let output = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned lock", self.name)))?
            .take();
        let Some(y) = output else {
            candle_core::bail!("{}: the forward ran twice (internal error)", self.name)
        };
        let (storage, layout) = y.storage_and_layout();
        // Each backend's `try_clone` copies the whole buffer, so `y` must start it.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!(
                "{}: the layer output must be contiguous from offset 0 (internal error)",
                self.name
            )
        }
        copy(&storage, layout)
    }

    fn device_mismatch<S>(&self) -> Result<S> {
        candle_core::bail!(
            "{}: the layer's input and output are on different devices (internal error)",
            self.name
        )
    }
}

impl CustomOp1 for InputGradient {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.copy_output(|storage, layout| match storage {
            Storage::Cpu(y) => Ok((y.try_clone(layout)?, layout.shape().clone())),
            _ => self.device_mismatch(),
        })
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.copy_output(|storage, layout| match storage {
            Storage::Cuda(y) => Ok((y.try_clone(layout)?, layout.shape().clone())),
            _ => self.device_mismatch(),
        })
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.copy_output(|storage, layout| match storage {
            Storage::Metal(y) => Ok((y.try_clone(layout)?, layout.shape().clone())),
            _ => self.device_mismatch(),
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.grad_x)(x, grad_y)?))
    }
}

/// Returns `y` (computed from `x.detach()`) as a tensor whose gradient flows to `x` through
/// `grad_x(x, grad_y)`. When `x` carries no graph there is nothing to join and `y` is
/// returned as is.
pub fn attach_input_grad(
    name: &'static str,
    x: &Tensor,
    y: Tensor,
    grad_x: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    let y = y.detach().contiguous()?;
    let y = if y.layout().start_offset() == 0 {
        y
    } else {
        y.copy()?
    };
    count_input_grad_layer();
    x.apply_op1(InputGradient {
        name,
        output: Mutex::new(Some(y)),
        grad_x: Box::new(grad_x),
    })
}

/// The kernel of a stride-1 conv's input gradient: `w` (out, in, k, k) flipped in both
/// spatial dims with in and out swapped, so that a forward conv of the output gradient with
/// it (padding `k - 1 - p`) is the transposed conv. Frozen weights make it a constant, so it
/// is built once per layer, on the first backward, and kept (off the CPU f32 kernels, which
/// flip per backward instead of holding a second copy of the weights).
#[derive(Debug, Clone, Default)]
pub struct FlippedKernel(Arc<OnceLock<Tensor>>);

impl FlippedKernel {
    fn get(&self, weight: &Tensor) -> Result<Tensor> {
        if let Some(k) = self.0.get() {
            return Ok(k.clone());
        }
        let (_, _, kh, kw) = weight.dims4()?;
        let reversed = |n: usize| {
            Tensor::from_vec((0..n as u32).rev().collect::<Vec<_>>(), n, weight.device())
        };
        let flipped = weight
            .detach()
            .index_select(&reversed(kh)?, 2)?
            .index_select(&reversed(kw)?, 3)?
            .transpose(0, 1)?
            .contiguous()?;
        // Two threads racing here build the same tensor; either one is kept.
        Ok(self.0.get_or_init(|| flipped).clone())
    }
}

/// `d loss / d x` of `y = conv2d(x, weight, padding, stride 1)` given `grad_y`.
pub fn conv2d_input_grad(
    grad_y: &Tensor,
    weight: &Tensor,
    flipped: &FlippedKernel,
    padding: usize,
) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    if kh != kw || padding >= kh {
        candle_core::bail!(
            "conv2d input gradient needs a square kernel wider than its padding, got {kh}x{kw} with padding {padding}"
        )
    }
    if cpu::is_cpu_f32(grad_y) && cpu::is_cpu_f32(weight) && weight.is_contiguous() {
        // The flipped kernel is built per backward (one pass over the weight, a few ms for the
        // whole decoder) and dropped after: caching it kept a second copy of every conv
        // weight alive, 175 MB for f16_16384's decoder.
        let (weight, pad) = (weight.detach(), kh - 1 - padding);
        return cpu::cpu_unary("cpu-conv2d-input-grad", grad_y, move |g, dims| {
            cpu::with_f32(&weight, |w| {
                let kernel = cpu::flip_kernel(w, (c_out, c_in, kh));
                cpu::conv2d_stride1(g, dims, &kernel, &[c_in, c_out, kh, kh], None, pad)
            })
        });
    }
    if kh == 1 {
        // A 1x1 conv is a matmul over channels; its input gradient is the transposed matmul.
        let (b, _, h, w) = grad_y.dims4()?;
        let w_t = weight.detach().reshape((c_out, c_in))?.t()?;
        let g = grad_y.reshape((b, c_out, h * w))?;
        return w_t.broadcast_left(b)?.matmul(&g)?.reshape((b, c_in, h, w));
    }
    grad_y.conv2d(&flipped.get(weight)?, kh - 1 - padding, 1, 1, 1)
}

/// `d loss / d x` of a conv whose stride equals its kernel and which has no padding (CLIP's
/// patch embedding): the patches do not overlap, so the gradient of each patch is one matmul
/// with the weight, laid back out in place. Rows and columns past the last whole patch never
/// reach the output and get zero.
pub fn patchify_conv2d_input_grad(
    grad_y: &Tensor,
    weight: &Tensor,
    input_dims: &[usize],
) -> Result<Tensor> {
    let (c_out, c_in, k, _) = weight.dims4()?;
    let (b, _, hp, wp) = grad_y.dims4()?;
    let [_, _, h, w] = input_dims else {
        candle_core::bail!("patchify conv input gradient needs a 4-d input, got {input_dims:?}")
    };
    let w_t = weight.detach().reshape((c_out, c_in * k * k))?.t()?;
    let patches = w_t
        .broadcast_left(b)?
        .matmul(&grad_y.reshape((b, c_out, hp * wp))?)?;
    let grad = patches
        .reshape((b, c_in, k, k, hp, wp))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c_in, hp * k, wp * k))?;
    let grad = match h.checked_sub(hp * k) {
        Some(extra) if extra > 0 => grad.pad_with_zeros(2, 0, extra)?,
        _ => grad,
    };
    match w.checked_sub(wp * k) {
        Some(extra) if extra > 0 => grad.pad_with_zeros(3, 0, extra),
        _ => Ok(grad),
    }
}

/// `d loss / d x` of `y = x Wᵀ + b` over the last dim, for `x` of shape `input_dims`.
pub fn linear_input_grad(grad_y: &Tensor, weight: &Tensor, input_dims: &[usize]) -> Result<Tensor> {
    let out_dim = weight.dim(0)?;
    let rows = grad_y.elem_count() / out_dim.max(1);
    grad_y
        .reshape((rows, out_dim))?
        .matmul(&weight.detach())?
        .reshape(input_dims)
}

/// Norms accumulate in f32 even when weights are half precision.
pub(crate) fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// `torch.nn.GroupNorm`'s parameters as the backward needs them.
#[derive(Debug, Clone)]
pub struct GroupNormParams {
    pub weight: Tensor,
    pub bias: Tensor,
    pub num_groups: usize,
    pub eps: f64,
}

/// `d loss / d x` of `y = GroupNorm(x)`, or of `y = silu(GroupNorm(x))` when `silu`.
///
/// With `x̂ = (x - μ) / σ` over each group of n values, `a = γ x̂ + β` and `ĝ = γ · dL/da`:
/// `dL/dx = (ĝ - mean(ĝ) - x̂ · mean(ĝ x̂)) / σ`, the means taken per group. The statistics are
/// recomputed from `x` rather than kept from the forward, which costs two reductions and
/// keeps nothing alive between the passes.
pub fn group_norm_input_grad(
    x: &Tensor,
    grad_y: &Tensor,
    p: &GroupNormParams,
    silu: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let groups = p.num_groups;
    let per_group = (c / groups) * h * w;
    let grouped = upcast(&x.detach())?.reshape((b, groups, per_group))?;
    let mean = grouped.mean_keepdim(2)?;
    let centred = grouped.broadcast_sub(&mean)?;
    let rstd = (centred.sqr()?.mean_keepdim(2)? + p.eps)?.sqrt()?.recip()?;
    let normed = centred.broadcast_mul(&rstd)?.reshape((b, c, h * w))?;
    let gamma = upcast(&p.weight.detach())?.reshape((1, c, 1))?;
    let grad = upcast(grad_y)?.reshape((b, c, h * w))?;
    let grad_affine = if silu {
        // silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a).
        let beta = upcast(&p.bias.detach())?.reshape((1, c, 1))?;
        let a = normed.broadcast_mul(&gamma)?.broadcast_add(&beta)?;
        let s = candle_nn::ops::sigmoid(&a)?;
        let slope = ((a * (1.0 - &s)?)? + 1.0)?.mul(&s)?;
        (grad * slope)?
    } else {
        grad
    };
    let grad_normed = grad_affine
        .broadcast_mul(&gamma)?
        .reshape((b, groups, per_group))?;
    let normed = normed.reshape((b, groups, per_group))?;
    let mean_grad = grad_normed.mean_keepdim(2)?;
    let mean_grad_normed = (&grad_normed * &normed)?.mean_keepdim(2)?;
    let grad_x = grad_normed
        .broadcast_sub(&mean_grad)?
        .sub(&normed.broadcast_mul(&mean_grad_normed)?)?
        .broadcast_mul(&rstd)?;
    grad_x.reshape((b, c, h, w))?.to_dtype(x.dtype())
}

/// `d loss / d x` of `y = LayerNorm(x)` over the last dim, weight `weight`: the GroupNorm
/// formula of [`group_norm_input_grad`] with one group per row.
pub fn layer_norm_input_grad(
    x: &Tensor,
    grad_y: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let x32 = upcast(&x.detach())?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centred = x32.broadcast_sub(&mean)?;
    let rstd = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = centred.broadcast_mul(&rstd)?;
    let grad_normed = upcast(grad_y)?.broadcast_mul(&upcast(&weight.detach())?)?;
    let mean_grad = grad_normed.mean_keepdim(D::Minus1)?;
    let mean_grad_normed = (&grad_normed * &normed)?.mean_keepdim(D::Minus1)?;
    grad_normed
        .broadcast_sub(&mean_grad)?
        .sub(&normed.broadcast_mul(&mean_grad_normed)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(x.dtype())
}

/// The slope in `x * sigmoid(QUICK_GELU_SLOPE * x)`, OpenAI CLIP's activation.
pub const QUICK_GELU_SLOPE: f64 = 1.702;

/// `d loss / d x` of `y = x * sigmoid(k x)`, `k` = [`QUICK_GELU_SLOPE`]:
/// `dy/dx = s + k x s (1 - s)` with `s = sigmoid(k x)`.
pub fn quick_gelu_input_grad(x: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    let s = candle_nn::ops::sigmoid(&(&x * QUICK_GELU_SLOPE)?)?;
    let slope = ((&x * QUICK_GELU_SLOPE)?.mul(&(1.0 - &s)?)?.mul(&s)? + &s)?;
    grad_y.mul(&slope)
}

/// `d loss / d x` of a nearest 2x upsample: each input pixel's gradient is the sum over the
/// 2x2 block it was copied to. Two strided adds (row pairs, then column pairs) run about 40
/// times faster on CPU than a reshape to (.., 2, .., 2) and two sums, whose size-2 reductions
/// cost a loop each.
pub fn upsample_nearest2x_input_grad(grad_y: &Tensor) -> Result<Tensor> {
    let (b, c, h2, w2) = grad_y.dims4()?;
    let (h, w) = (h2 / 2, w2 / 2);
    let rows = grad_y.reshape((b * c * h, 2, w2))?;
    let rows = rows.narrow(1, 0, 1)?.add(&rows.narrow(1, 1, 1)?)?;
    let cols = rows.reshape((b * c * h * w, 2))?;
    cols.narrow(1, 0, 1)?
        .add(&cols.narrow(1, 1, 1)?)?
        .reshape((b, c, h, w))
}
