//! CPU kernels behind the layer seam for f32 tensors: each replaces a chain of candle ops
//! (one pass over memory and one allocation per op, most of them single-threaded) with one
//! or two passes that use every thread of the rayon pool.
//!
//! They compute the same functions as the candle chains in [`super::layers`] and
//! [`super::ops`]; only the order of floating-point additions differs (each kernel is
//! deterministic: work is split by output element, never across a reduction). Tests in
//! `tests/models/kernels.rs` check each against its candle reference (f64 autograd) and finite
//! differences. Inputs that are not f32 on the CPU never reach these kernels.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::ops::count_input_grad_layer;
use super::winograd;

/// Whether `t` can take a CPU kernel: an f32 tensor on the CPU.
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// The threads a heavy op may use: rayon's pool (sized by `RAYON_NUM_THREADS`, or by
/// [`set_threads`] before the first op).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Sizes the process-wide thread pool that every CPU op (candle's matmuls included) runs on.
/// Effective only before the pool's first use; returns whether the pool now has `n` threads.
/// candle splits each matmul into `RAYON_NUM_THREADS` (else one per core) parts; with a
/// smaller pool the parts just queue, so a process that cannot set the variable before its
/// threads start (the server) still runs on `n` threads.
pub fn set_threads(n: usize) -> bool {
    let n = n.max(1);
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_ok();
    built || rayon::current_num_threads() == n
}

/// Keeps the heap's freed memory for reuse instead of handing it back to the kernel. A render
/// step frees and reallocates the same tensor buffers every step (up to tens of MB each); by
/// default glibc returns them and the next step faults in fresh zeroed pages, about 10 % of
/// a 128² CPU step in `clear_page`. Buffers up to 32 MiB then come from the heap; the peak
/// resident memory is unchanged, since the same buffers are live at the peak either way.
/// Call once, before the first allocation of size; a no-op off glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: the CPU kernel needs a contiguous input"),
    }
}

/// Runs `f` on the f32 values of a contiguous CPU tensor (a frozen weight, read in place).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(f32_slice(s, layout, "weight")?),
        _ => candle_core::bail!("CPU kernel: a weight is not on the CPU (internal error)"),
    }
}

type Output = Result<(Vec<f32>, Shape)>;
type ForwardFn = dyn Fn(&[f32], &[usize]) -> Output + Send + Sync;
type InputGradFn = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// A frozen layer as one graph node: `forward` computes the output from the input's values,
/// `grad_x(x, grad_y)` the input gradient. Unlike [`super::ops::attach_input_grad`] the
/// output is computed inside the op, so it is not copied.
struct CpuLayer {
    name: &'static str,
    forward: Box<ForwardFn>,
    grad_x: Box<InputGradFn>,
}

impl CustomOp1 for CpuLayer {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = (self.forward)(f32_slice(s, l, self.name)?, l.dims())?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.grad_x)(x, grad_y)?))
    }
}

/// Applies a CPU kernel layer to `x` (f32 on the CPU): a graph node with an input-gradient
/// backward when `x` carries a graph, a plain result otherwise.
pub(crate) fn cpu_layer(
    name: &'static str,
    x: &Tensor,
    forward: impl Fn(&[f32], &[usize]) -> Output + Send + Sync + 'static,
    grad_x: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() {
        count_input_grad_layer();
    }
    x.apply_op1(CpuLayer {
        name,
        forward: Box::new(forward),
        grad_x: Box::new(grad_x),
    })
}

/// Runs a one-input kernel on `x` (f32 on the CPU); no gradient flows through it.
pub(crate) fn cpu_unary(
    name: &'static str,
    x: &Tensor,
    forward: impl Fn(&[f32], &[usize]) -> Output + Send + Sync + 'static,
) -> Result<Tensor> {
    x.detach().contiguous()?.apply_op1_no_bwd(&CpuLayer {
        name,
        forward: Box::new(forward),
        grad_x: Box::new(move |_: &Tensor, _: &Tensor| -> Result<Tensor> {
            candle_core::bail!("{name}: this kernel has no backward (internal error)")
        }),
    })
}

type BinaryFn = dyn Fn(&[f32], &[usize], &[f32], &[usize]) -> Output + Send + Sync;

/// A kernel of two same-device f32 inputs with no backward (the input-gradient kernels).
struct CpuBinary {
    name: &'static str,
    f: Box<BinaryFn>,
}

impl CustomOp2 for CpuBinary {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, self.name)?;
        let b = f32_slice(s2, l2, self.name)?;
        let (out, shape) = (self.f)(a, l1.dims(), b, l2.dims())?;
        Ok((CpuStorage::F32(out), shape))
    }
}

/// Runs a two-input kernel on `a` and `b` (f32 on the CPU); no gradient flows through it.
pub(crate) fn cpu_binary(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(&[f32], &[usize], &[f32], &[usize]) -> Output + Send + Sync + 'static,
) -> Result<Tensor> {
    let (a, b) = (a.detach().contiguous()?, b.detach().contiguous()?);
    a.apply_op2_no_bwd(
        &b,
        &CpuBinary {
            name,
            f: Box::new(f),
        },
    )
}

/// A raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every task writes a region of the buffer no other task touches (see the caller).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the raw field.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

thread_local! {
    /// The im2col tile of the conv kernel, kept per thread so that each step does not fault
    /// in fresh pages for it.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The output pixels one conv task covers: enough for the gemm to run at full speed, few
/// enough that the im2col tile stays in the core's cache.
const CONV_TILE_PIXELS: usize = 1024;

/// The kernel of the transposed conv of a (c_out, c_in, k, k) weight: (c_in, c_out, k, k)
/// with both spatial axes reversed, in one pass.
pub(crate) fn flip_kernel(w: &[f32], (c_out, c_in, k): (usize, usize, usize)) -> Vec<f32> {
    let kk = k * k;
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(c_out * kk)
        .enumerate()
        .for_each(|(ci, dst)| {
            for (co, taps) in dst.chunks_mut(kk).enumerate() {
                let src = &w[(co * c_in + ci) * kk..(co * c_in + ci + 1) * kk];
                for (t, &v) in taps.iter_mut().zip(src.iter().rev()) {
                    *t = v;
                }
            }
        });
    out
}

/// Stride-1 2-D convolution of a contiguous (b, c_in, h, w) `x` with a contiguous
/// (c_out, c_in, k, k) `w`, zero `padding` on each side, plus an optional bias: one im2col
/// tile per group of output rows, written straight from the NCHW input with row copies, and
/// one gemm per tile into the NCHW output (the bias is its starting value). The weight is
/// used as stored: its (c_in, ky, kx) order is the tile's row order, so nothing is repacked.
pub(crate) fn conv2d_stride1(
    x: &[f32],
    x_dims: &[usize],
    w: &[f32],
    w_dims: &[usize],
    bias: Option<&[f32]>,
    padding: usize,
) -> Output {
    let (&[b, c_in, h, wd], &[c_out, c_in_w, k, k2]) = (x_dims, w_dims) else {
        candle_core::bail!("conv2d kernel: expected 4-d input and weight")
    };
    let p = padding;
    if c_in != c_in_w
        || k != k2
        || k == 0
        || h + 2 * p < k
        || wd + 2 * p < k
        || bias.is_some_and(|b| b.len() != c_out)
        || x.len() != b * c_in * h * wd
        || w.len() != c_out * c_in * k * k
    {
        candle_core::bail!(
            "conv2d kernel: input {x_dims:?} does not fit weight {w_dims:?} with padding {p}"
        )
    }
    let (ho, wo) = (h + 2 * p + 1 - k, wd + 2 * p + 1 - k);
    if k == 3 && p <= 2 {
        let conv = winograd::Conv3x3 {
            x,
            dims: (b, c_in, h, wd),
            w,
            c_out,
            bias,
            padding: p,
            threads: threads(),
        };
        if let Some((out, ho, wo)) = conv.winograd() {
            return Ok((out, Shape::from((b, c_out, ho, wo))));
        }
    }
    let hw_out = ho * wo;
    let kk = c_in * k * k;
    let mut out = vec![0f32; b * c_out * hw_out];
    if out.is_empty() {
        return Ok((out, Shape::from((b, c_out, ho, wo))));
    }
    let rows_per_tile = (CONV_TILE_PIXELS / wo).clamp(1, ho);
    let tiles_per_image = ho.div_ceil(rows_per_tile);
    let tasks = b * tiles_per_image;
    let threads = threads();
    // Many tasks: one single-threaded gemm each, in parallel. Few (the small, deep layers):
    // one after another, each gemm split across the threads.
    let outer_parallel = threads > 1 && tasks >= 2 * threads;
    let gemm_par = if outer_parallel || threads == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    let direct = k == 1 && p == 0;
    let out_ptr = SharedOut(out.as_mut_ptr());
    let task = |t: usize| {
        let (img, tile) = (t / tiles_per_image, t % tiles_per_image);
        let oy0 = tile * rows_per_tile;
        let oy1 = (oy0 + rows_per_tile).min(ho);
        let npix = (oy1 - oy0) * wo;
        let x_img = &x[img * c_in * h * wd..(img + 1) * c_in * h * wd];
        // SAFETY: this task alone writes output pixels [oy0, oy1) of image `img` in every
        // channel (c_out rows of npix values, hw_out apart); `out` outlives the tasks.
        let dst = out_ptr.at(img * c_out * hw_out + oy0 * wo);
        if let Some(bias) = bias {
            for (co, &bv) in bias.iter().enumerate() {
                unsafe { std::slice::from_raw_parts_mut(dst.add(co * hw_out), npix) }.fill(bv);
            }
        }
        // SAFETY: dst, w and rhs cover the (c_out x npix), (c_out x kk) and (kk x npix)
        // matrices at the strides given.
        let gemm_into = |rhs: *const f32, rhs_rs: isize| unsafe {
            gemm::gemm(
                c_out,
                npix,
                kk,
                dst,
                1,
                hw_out as isize,
                bias.is_some(),
                w.as_ptr(),
                1,
                kk as isize,
                rhs,
                1,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm_par,
            )
        };
        if direct {
            // A 1x1 conv reads the input rows as they are.
            gemm_into(x_img[oy0 * wo..].as_ptr(), (h * wd) as isize);
            return;
        }
        COLUMNS.with(|cols| {
            let mut cols = cols.borrow_mut();
            if cols.len() < kk * npix {
                cols.resize(kk * npix, 0.0);
            }
            let cols = &mut cols[..kk * npix];
            for (row, col_row) in cols.chunks_exact_mut(npix).enumerate() {
                let (c, ky, kx) = (row / (k * k), (row / k) % k, row % k);
                let plane = &x_img[c * h * wd..(c + 1) * h * wd];
                // The output columns whose input column ox + kx - p lies inside the image.
                let lo = p.saturating_sub(kx).min(wo);
                let hi = (wd + p).saturating_sub(kx).min(wo).max(lo);
                for (oy, seg) in (oy0..oy1).zip(col_row.chunks_exact_mut(wo)) {
                    let iy = oy + ky;
                    if iy < p || iy - p >= h {
                        seg.fill(0.0);
                        continue;
                    }
                    let src = &plane[(iy - p) * wd..(iy - p + 1) * wd];
                    seg[..lo].fill(0.0);
                    seg[lo..hi].copy_from_slice(&src[lo + kx - p..hi + kx - p]);
                    seg[hi..].fill(0.0);
                }
            }
            gemm_into(cols.as_ptr(), npix as isize);
        });
    };
    if outer_parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    Ok((out, Shape::from((b, c_out, ho, wo))))
}

/// `y = x Wᵀ + b` over the last dim of a contiguous `x`, `w` (out, in) as stored, and
/// `d loss / d x = grad_y W` ([`linear_input_grad`]): one gemm each, split across the
/// threads, the bias as the gemm's starting value.
pub(crate) fn linear(
    x: &[f32],
    dims: &[usize],
    w: &[f32],
    w_dims: &[usize],
    bias: Option<&[f32]>,
) -> Output {
    let (&[out_dim, in_dim], Some(&last)) = (w_dims, dims.last()) else {
        candle_core::bail!("linear kernel: weight {w_dims:?}, input {dims:?}")
    };
    if last != in_dim || in_dim == 0 || bias.is_some_and(|b| b.len() != out_dim) {
        candle_core::bail!("linear kernel: input {dims:?} against weight {w_dims:?}")
    }
    let rows = x.len() / in_dim;
    let mut out = vec![0f32; rows * out_dim];
    if let Some(bias) = bias {
        out.par_chunks_mut(out_dim.max(1))
            .for_each(|row| row.copy_from_slice(bias));
    }
    // SAFETY: the three matrices are (rows x out), (rows x in) and (in x out, as the
    // transpose of the stored (out x in)) at the strides given.
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            in_dim as isize,
            w.as_ptr(),
            in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(),
        )
    }
    let mut out_dims = dims.to_vec();
    if let Some(l) = out_dims.last_mut() {
        *l = out_dim;
    }
    Ok((out, Shape::from(out_dims)))
}

/// See [`linear`]: `grad_y` (.., out) times `w` (out, in).
pub(crate) fn linear_input_grad(g: &[f32], dims: &[usize], w: &[f32], w_dims: &[usize]) -> Output {
    let (&[out_dim, in_dim], Some(&last)) = (w_dims, dims.last()) else {
        candle_core::bail!("linear grad kernel: weight {w_dims:?}, gradient {dims:?}")
    };
    if last != out_dim || out_dim == 0 {
        candle_core::bail!("linear grad kernel: gradient {dims:?} against weight {w_dims:?}")
    }
    let rows = g.len() / out_dim;
    let mut out = vec![0f32; rows * in_dim];
    // SAFETY: (rows x in) = (rows x out) (out x in), all row-major at the strides given.
    unsafe {
        gemm::gemm(
            rows,
            in_dim,
            out_dim,
            out.as_mut_ptr(),
            1,
            in_dim as isize,
            false,
            g.as_ptr(),
            1,
            out_dim as isize,
            w.as_ptr(),
            1,
            in_dim as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(),
        )
    }
    let mut out_dims = dims.to_vec();
    if let Some(l) = out_dims.last_mut() {
        *l = in_dim;
    }
    Ok((out, Shape::from(out_dims)))
}

fn gemm_parallelism() -> gemm::Parallelism {
    match threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// GroupNorm's shape: (images x groups, values per group, values per channel plane).
fn group_dims(dims: &[usize], groups: usize, channels: usize) -> Result<(usize, usize)> {
    let &[_, c, h, w] = dims else {
        candle_core::bail!("group norm kernel: expected (b, c, h, w), got {dims:?}")
    };
    if groups == 0 || !c.is_multiple_of(groups) || c != channels || h * w == 0 {
        candle_core::bail!("group norm kernel: {dims:?} with {groups} groups, {channels} weights")
    }
    Ok(((c / groups) * h * w, h * w))
}

/// Per-(image, group) mean and reciprocal standard deviation, accumulated in f64 (a group
/// holds up to a few million values).
fn group_stats(x: &[f32], per_group: usize, eps: f64) -> Vec<(f32, f32)> {
    x.par_chunks(per_group)
        .map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = g
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
        })
        .collect()
}

/// The parameters of a frozen GroupNorm, held by its kernels.
#[derive(Debug, Clone)]
pub(crate) struct GroupNormKernel {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl GroupNormKernel {
    /// `y = GroupNorm(x)` (then SiLU when `silu`): one pass for the statistics, one for `y`.
    pub fn forward(&self, x: &[f32], dims: &[usize]) -> Output {
        let (per_group, hw) = group_dims(dims, self.groups, self.gamma.len())?;
        let stats = group_stats(x, per_group, self.eps);
        let ch_per_group = per_group / hw;
        let c = self.gamma.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(plane, (o, xi))| {
                let (mean, rstd) = stats[plane / ch_per_group];
                let ch = plane % c;
                let scale = self.gamma[ch] * rstd;
                let shift = self.beta[ch] - mean * scale;
                if self.silu {
                    for (o, &v) in o.iter_mut().zip(xi) {
                        let a = v * scale + shift;
                        *o = a * sigmoid(a);
                    }
                } else {
                    for (o, &v) in o.iter_mut().zip(xi) {
                        *o = v * scale + shift;
                    }
                }
            });
        Ok((out, Shape::from(dims)))
    }

    /// `d loss / d x` from `x` and `grad_y`: with `x̂` the normalised input and
    /// `ĝ = γ · dL/da` (times `silu'(a)`), `(ĝ - mean ĝ - x̂ · mean(ĝ x̂)) / σ` per group. Two
    /// passes per group: `ĝ` and its sums, then the gradient.
    pub fn input_grad(&self, x: &[f32], dims: &[usize], gy: &[f32]) -> Output {
        let (per_group, hw) = group_dims(dims, self.groups, self.gamma.len())?;
        if gy.len() != x.len() {
            candle_core::bail!("group norm grad kernel: input and gradient sizes differ")
        }
        let c = self.gamma.len();
        let ch_per_group = per_group / hw;
        let stats = group_stats(x, per_group, self.eps);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group).zip(gy.par_chunks(per_group)))
            .enumerate()
            .for_each(|(group, (o, (xg, gg)))| {
                let (mean, rstd) = stats[group];
                let first_ch = (group * ch_per_group) % c;
                let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                for (j, (o, (xv, gv))) in o
                    .chunks_mut(hw)
                    .zip(xg.chunks(hw).zip(gg.chunks(hw)))
                    .enumerate()
                {
                    let (ga, be) = (self.gamma[first_ch + j], self.beta[first_ch + j]);
                    let (mut sg, mut sgx) = (0f32, 0f32);
                    for ((o, &xv), &gv) in o.iter_mut().zip(xv).zip(gv) {
                        let xh = (xv - mean) * rstd;
                        let gd = if self.silu {
                            // silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a).
                            let a = ga * xh + be;
                            let s = sigmoid(a);
                            gv * s * (1.0 + a * (1.0 - s))
                        } else {
                            gv
                        };
                        let gh = gd * ga;
                        *o = gh;
                        sg += gh;
                        sgx += gh * xh;
                    }
                    sum_g += f64::from(sg);
                    sum_gx += f64::from(sgx);
                }
                let n = per_group as f64;
                let (mg, mgx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
                for (o, &xv) in o.iter_mut().zip(xg) {
                    let xh = (xv - mean) * rstd;
                    *o = (*o - mg - xh * mgx) * rstd;
                }
            });
        Ok((out, Shape::from(dims)))
    }
}

fn row_stats(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps as f32).sqrt())
}

/// The parameters of a frozen LayerNorm (over the last dim), held by its kernels.
#[derive(Debug, Clone)]
pub(crate) struct LayerNormKernel {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub eps: f64,
}

impl LayerNormKernel {
    fn check(&self, len: usize, dims: &[usize]) -> Result<usize> {
        let d = self.gamma.len();
        if d == 0 || self.beta.len() != d || dims.last() != Some(&d) || !len.is_multiple_of(d) {
            candle_core::bail!("layer norm kernel: {dims:?} against {d} weights")
        }
        Ok(d)
    }

    pub fn forward(&self, x: &[f32], dims: &[usize]) -> Output {
        let d = self.check(x.len(), dims)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let (mean, rstd) = row_stats(row, self.eps);
                for (((o, &v), &g), &b) in o.iter_mut().zip(row).zip(&self.gamma).zip(&self.beta) {
                    *o = (v - mean) * rstd * g + b;
                }
            });
        Ok((out, Shape::from(dims)))
    }

    /// The GroupNorm gradient formula with one group per row.
    pub fn input_grad(&self, x: &[f32], dims: &[usize], gy: &[f32]) -> Output {
        let d = self.check(x.len(), dims)?;
        if gy.len() != x.len() {
            candle_core::bail!("layer norm grad kernel: input and gradient sizes differ")
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(gy.par_chunks(d)))
            .for_each(|(o, (row, g))| {
                let (mean, rstd) = row_stats(row, self.eps);
                let (mut sg, mut sgx) = (0f32, 0f32);
                for (((o, &v), &gv), &ga) in o.iter_mut().zip(row).zip(g).zip(&self.gamma) {
                    let gh = gv * ga;
                    *o = gh;
                    sg += gh;
                    sgx += gh * (v - mean) * rstd;
                }
                let (mg, mgx) = (sg / d as f32, sgx / d as f32);
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (*o - mg - (v - mean) * rstd * mgx) * rstd;
                }
            });
        Ok((out, Shape::from(dims)))
    }
}

/// Elements per parallel task of the elementwise kernels.
pub(crate) const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// `x * sigmoid(k x)` (QuickGELU with `k` = 1.702).
pub(crate) fn quick_gelu(x: &[f32], dims: &[usize], k: f32) -> Output {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(x.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(o, xi)| {
            for (o, &v) in o.iter_mut().zip(xi) {
                *o = v * sigmoid(k * v);
            }
        });
    Ok((out, Shape::from(dims)))
}

/// `d loss / d x` of [`quick_gelu`]: `grad_y (s + k x s (1 - s))`, `s = sigmoid(k x)`.
pub(crate) fn quick_gelu_grad(x: &[f32], dims: &[usize], gy: &[f32], k: f32) -> Output {
    if gy.len() != x.len() {
        candle_core::bail!("quick gelu grad kernel: input and gradient sizes differ")
    }
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            x.par_chunks(ELEMENTWISE_CHUNK)
                .zip(gy.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(o, (xi, gi))| {
            for ((o, &v), &g) in o.iter_mut().zip(xi).zip(gi) {
                let s = sigmoid(k * v);
                *o = g * (s + k * v * s * (1.0 - s));
            }
        });
    Ok((out, Shape::from(dims)))
}

/// Nearest 2x upsample of a (b, c, h, w): one pass.
pub(crate) fn upsample_nearest2x(x: &[f32], dims: &[usize]) -> Output {
    let &[b, c, h, w] = dims else {
        candle_core::bail!("upsample kernel: expected (b, c, h, w), got {dims:?}")
    };
    let mut out = vec![0f32; x.len() * 4];
    if w > 0 {
        out.par_chunks_mut(4 * w)
            .zip(x.par_chunks(w))
            .for_each(|(o, row)| {
                let (top, bottom) = o.split_at_mut(2 * w);
                for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
                    pair[0] = v;
                    pair[1] = v;
                }
                bottom.copy_from_slice(top);
            });
    }
    Ok((out, Shape::from((b, c, 2 * h, 2 * w))))
}

/// The input gradient of [`upsample_nearest2x`] from `grad_y` (b, c, 2h, 2w): each input
/// pixel's 2x2 block summed, in one pass.
pub(crate) fn upsample_nearest2x_grad(g: &[f32], dims: &[usize]) -> Output {
    let &[b, c, h2, w2] = dims else {
        candle_core::bail!("upsample grad kernel: expected (b, c, h, w), got {dims:?}")
    };
    if h2 % 2 != 0 || w2 % 2 != 0 {
        candle_core::bail!("upsample grad kernel: odd gradient size {dims:?}")
    }
    let w = w2 / 2;
    let mut out = vec![0f32; g.len() / 4];
    if w > 0 {
        out.par_chunks_mut(w)
            .zip(g.par_chunks(2 * w2))
            .for_each(|(o, rows)| {
                let (top, bottom) = rows.split_at(w2);
                for (i, o) in o.iter_mut().enumerate() {
                    *o = top[2 * i] + top[2 * i + 1] + bottom[2 * i] + bottom[2 * i + 1];
                }
            });
    }
    Ok((out, Shape::from((b, c, h2 / 2, w))))
}

/// A frozen 1-d parameter (γ, β) as a plain vector, for the kernels that hold it.
pub(crate) fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.detach()
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()
}

/// `softmax(q kᵀ · scale) v` per head over contiguous (batch, t, heads · d) `q`, `k`, `v`
/// (head `h` is columns `h·d..(h+1)·d`, the layout of the projections that produce them),
/// output in the same layout, one task per batch entry, with the input gradients of all
/// three in its backward. Reading the heads in place spares the split and merge copies
/// (and the graph keeping both). The softmax is recomputed in the backward rather than kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attention {
    pub scale: f32,
    pub heads: usize,
}

/// (batch, tq, tk, d, dv) per head of an attention call with `heads` heads, checked.
fn attention_dims(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    heads: usize,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (&[b, tq, dq], &[bk, tk, dk], &[bv, tv, dvh]) = (q, k, v) else {
        candle_core::bail!("attention kernel: expected 3-d q, k, v, got {q:?} {k:?} {v:?}")
    };
    if b != bk || b != bv || dq != dk || tk != tv || tk == 0 || heads == 0 {
        candle_core::bail!("attention kernel: q {q:?}, k {k:?}, v {v:?} do not fit")
    }
    if !dq.is_multiple_of(heads) || !dvh.is_multiple_of(heads) {
        candle_core::bail!(
            "attention kernel: {dq} and {dvh} columns do not split into {heads} heads"
        )
    }
    Ok((b, tq, tk, dq / heads, dvh / heads))
}

/// `dst (m x n, row stride rs) = alpha · dst + beta · a (m x k) b (k x n)`, `a` and `b`
/// given with their row and column strides: a single-threaded gemm for the per-head tasks.
fn small_gemm(
    (m, n, k): (usize, usize, usize),
    (dst, rs): (&mut [f32], usize),
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    beta: f32,
) {
    assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * rs + n);
    assert!(m == 0 || k == 0 || a.0.len() > (m - 1) * a.1 + (k - 1) * a.2);
    assert!(k == 0 || n == 0 || b.0.len() > (k - 1) * b.1 + (n - 1) * b.2);
    // SAFETY: the asserts above keep every element the gemm touches inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            rs as isize,
            false,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            0.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Row softmax in place.
fn softmax_rows(s: &mut [f32], n: usize) {
    for row in s.chunks_exact_mut(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

impl Attention {
    /// The probabilities `softmax(q kᵀ · scale)` of one head into `p` (tq x tk); `q` and
    /// `k` start at the head's first column and have row stride `rs`.
    fn probs(
        &self,
        q: &[f32],
        k: &[f32],
        rs: usize,
        p: &mut [f32],
        (tq, tk, d): (usize, usize, usize),
    ) {
        small_gemm((tq, tk, d), (p, tk), (q, rs, 1), (k, 1, rs), self.scale);
        softmax_rows(p, tk);
    }

    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], dims: [&[usize]; 3]) -> Output {
        let (b, tq, tk, d, dv) = attention_dims(dims[0], dims[1], dims[2], self.heads)?;
        let (hq, hv) = (self.heads * d, self.heads * dv);
        let mut out = vec![0f32; b * tq * hv];
        out.par_chunks_mut(tq * hv).enumerate().for_each(|(i, o)| {
            let mut p = vec![0f32; tq * tk];
            let (qi, ki, vi) = (
                &q[i * tq * hq..(i + 1) * tq * hq],
                &k[i * tk * hq..(i + 1) * tk * hq],
                &v[i * tk * hv..(i + 1) * tk * hv],
            );
            for h in 0..self.heads {
                self.probs(&qi[h * d..], &ki[h * d..], hq, &mut p, (tq, tk, d));
                small_gemm(
                    (tq, dv, tk),
                    (&mut o[h * dv..], hv),
                    (&p, tk, 1),
                    (&vi[h * dv..], hv, 1),
                    1.0,
                );
            }
        });
        Ok((out, Shape::from((b, tq, hv))))
    }

    /// `(dq, dk, dv)` from the inputs and `d loss / d out`: per head, with `P` the
    /// probabilities, `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP - rowsum(dP ⊙ P))`,
    /// `dQ = scale dS K`, `dK = scale dSᵀ Q`.
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        go: &[f32],
        dims: [&[usize]; 3],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (b, tq, tk, d, dv) = attention_dims(dims[0], dims[1], dims[2], self.heads)?;
        let (hq, hv) = (self.heads * d, self.heads * dv);
        if go.len() != b * tq * hv {
            candle_core::bail!("attention grad kernel: gradient of the wrong size")
        }
        let mut gq = vec![0f32; q.len()];
        let mut gk = vec![0f32; k.len()];
        let mut gv = vec![0f32; v.len()];
        gq.par_chunks_mut(tq * hq)
            .zip(gk.par_chunks_mut(tk * hq).zip(gv.par_chunks_mut(tk * hv)))
            .enumerate()
            .for_each(|(i, (gqi, (gki, gvi)))| {
                let qi = &q[i * tq * hq..(i + 1) * tq * hq];
                let ki = &k[i * tk * hq..(i + 1) * tk * hq];
                let vi = &v[i * tk * hv..(i + 1) * tk * hv];
                let goi = &go[i * tq * hv..(i + 1) * tq * hv];
                let mut p = vec![0f32; tq * tk];
                let mut ds = vec![0f32; tq * tk];
                for h in 0..self.heads {
                    let (qh, kh, vh, goh) =
                        (&qi[h * d..], &ki[h * d..], &vi[h * dv..], &goi[h * dv..]);
                    self.probs(qh, kh, hq, &mut p, (tq, tk, d));
                    // dV = Pᵀ dO
                    small_gemm(
                        (tk, dv, tq),
                        (&mut gvi[h * dv..], hv),
                        (&p, 1, tk),
                        (goh, hv, 1),
                        1.0,
                    );
                    // dP = dO Vᵀ, then dS in place.
                    small_gemm((tq, tk, dv), (&mut ds, tk), (goh, hv, 1), (vh, 1, hv), 1.0);
                    for (ds_row, p_row) in ds.chunks_exact_mut(tk).zip(p.chunks_exact(tk)) {
                        let dot: f32 = ds_row.iter().zip(p_row).map(|(a, b)| a * b).sum();
                        for (g, &pv) in ds_row.iter_mut().zip(p_row) {
                            *g = pv * (*g - dot);
                        }
                    }
                    small_gemm(
                        (tq, d, tk),
                        (&mut gqi[h * d..], hq),
                        (&ds, tk, 1),
                        (kh, hq, 1),
                        self.scale,
                    );
                    small_gemm(
                        (tk, d, tq),
                        (&mut gki[h * d..], hq),
                        (&ds, 1, tk),
                        (qh, hq, 1),
                        self.scale,
                    );
                }
            });
        Ok((gq, gk, gv))
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32_slice(s1, l1, "attention")?;
        let k = f32_slice(s2, l2, "attention")?;
        let v = f32_slice(s3, l3, "attention")?;
        let (out, shape) = self.forward(q, k, v, [l1.dims(), l2.dims(), l3.dims()])?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let go = grad_out.contiguous()?;
        let (gq, gk, gv) = with_f32(&q, |qs| {
            with_f32(&k, |ks| {
                with_f32(&v, |vs| {
                    with_f32(&go, |gs| {
                        self.backward(qs, ks, vs, gs, [q.dims(), k.dims(), v.dims()])
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(gq, q.dims(), dev)?),
            Some(Tensor::from_vec(gk, k.dims(), dev)?),
            Some(Tensor::from_vec(gv, v.dims(), dev)?),
        ))
    }
}

/// `softmax(q kᵀ · scale) v` on the CPU kernel for f32 CPU tensors, unmasked, per head of
/// (batch, t, heads · d) inputs.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if q.track_op() || k.track_op() || v.track_op() {
        count_input_grad_layer();
    }
    q.apply_op3(
        &k,
        &v,
        Attention {
            scale: scale as f32,
            heads,
        },
    )
}
