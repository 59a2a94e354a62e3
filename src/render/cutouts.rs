//! Cutouts: the crops of the decoded image that CLIP sees, resampled to its input size.
//!
//! candle's bilinear upsampling has no backward and its pooling has one only when the
//! kernel equals the stride, so every resample here is a product with precomputed
//! weight matrices, `R_y · img · R_xᵀ`, which autograd differentiates exactly. The
//! one non-linear case, adaptive max pooling, is a gather plus `max`, both of which
//! candle differentiates.

use candle_core::{IndexOp, Tensor};
use rand::Rng;
use rand_chacha::ChaCha20Rng;

use super::ops::{apply_gather, gather_kernels, GatherKernel, Sample};
use super::spec::CutMethod;
use rayon::prelude::*;

/// A square crop of the image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub x: usize,
    pub y: usize,
    pub size: usize,
}

/// Makes `cutn` cutouts of `cut_size`² pixels per step.
#[derive(Debug, Clone)]
pub struct Cutouts {
    pub method: CutMethod,
    pub cutn: usize,
    pub cut_pow: f32,
    pub cut_size: usize,
}

impl Cutouts {
    pub fn new(method: CutMethod, cutn: usize, cut_pow: f32, cut_size: usize) -> Self {
        Self {
            method,
            cutn,
            cut_pow,
            cut_size,
        }
    }

    /// Crowson's random crops: side `rand^cut_pow · (max − min) + min`, random offset.
    pub fn sample_crops(&self, rng: &mut ChaCha20Rng, height: usize, width: usize) -> Vec<Crop> {
        let max_size = height.min(width);
        let min_size = max_size.min(self.cut_size);
        (0..self.cutn)
            .map(|_| {
                let r: f32 = rng.gen();
                let size =
                    (r.powf(self.cut_pow) * (max_size - min_size) as f32) as usize + min_size;
                let size = size.clamp(1, max_size);
                let x = rng.gen_range(0..=width - size);
                let y = rng.gen_range(0..=height - size);
                Crop { x, y, size }
            })
            .collect()
    }

    /// Whether this method pools the whole image instead of cropping.
    pub fn pools(&self) -> bool {
        matches!(self.method, CutMethod::Latest | CutMethod::Updatedpooling)
    }

    /// The crops a step draws: none for the pooled methods, which take none.
    pub fn draw_crops(&self, rng: &mut ChaCha20Rng, height: usize, width: usize) -> Vec<Crop> {
        if self.pools() {
            Vec::new()
        } else {
            self.sample_crops(rng, height, width)
        }
    }

    /// The cutouts of `image` (1,3,H,W) in [0,1], before augmentation: (cutn,3,S,S).
    ///
    /// The cropping methods resample random crops as generate.py's `resample` does;
    /// the pooled ones (`latest`, `updatedpooling`) average adaptive average and max
    /// pooling of the whole image, the same for every cutout (the augmentations then
    /// make them differ).
    pub fn make(&self, image: &Tensor, rng: &mut ChaCha20Rng) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = image.dims4()?;
        let crops = self.draw_crops(rng, h, w);
        self.make_from(image, &crops)
    }

    /// [`Cutouts::make`] with the crops given (ignored by the pooled methods).
    pub fn make_from(&self, image: &Tensor, crops: &[Crop]) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = image.dims4()?;
        if self.pools() {
            if gather_kernels(image) {
                let (b, c, h, w) = image.dims4()?;
                if b != 1 {
                    candle_core::bail!("cutouts of a batch of {b} images; expected one");
                }
                let pool = Pool {
                    dims: (c, h, w),
                    out: self.cut_size,
                    copies: self.cutn,
                };
                return apply_gather(image, pool);
            }
            let img = image.i(0)?;
            let avg = adaptive_avg_pool(&img, self.cut_size)?;
            let max = adaptive_max_pool(&img, self.cut_size)?;
            let pooled = ((avg + max)? * 0.5)?.unsqueeze(0)?;
            return pooled.repeat((self.cutn, 1, 1, 1));
        }
        if let Some(bad) = crops
            .iter()
            .find(|c| c.size == 0 || c.x + c.size > w || c.y + c.size > h)
        {
            candle_core::bail!("crop {bad:?} does not fit a {w}x{h} image");
        }
        resample_crops(&image.i(0)?, crops, self.cut_size)
    }
}

/// generate.py's `noise_fac` step: a strength per cutout in [0, fac) and Gaussian
/// noise, drawn together so a replay can supply both.
#[derive(Debug, Clone, PartialEq)]
pub struct CutoutNoise {
    /// (N)
    pub facs: Vec<f32>,
    /// (N, C, S, S) row-major, standard normal.
    pub noise: Vec<f32>,
}

impl CutoutNoise {
    pub fn sample(
        shape: (usize, usize, usize, usize),
        noise_fac: f32,
        rng: &mut ChaCha20Rng,
    ) -> Self {
        use rand::{RngCore, SeedableRng};
        use rand_chacha::ChaCha8Rng;
        use rand_distr::{Distribution, StandardNormal};
        let (n, c, h, w) = shape;
        let facs: Vec<f32> = (0..n).map(|_| rng.gen_range(0.0..noise_fac)).collect();
        // One seed from the job's RNG, then each cutout's noise from its own stream of it,
        // so the cutouts fill in parallel and the values do not depend on the thread count.
        let seed = rng.next_u64();
        let mut noise = vec![0f32; n * c * h * w];
        noise
            .par_chunks_mut((c * h * w).max(1))
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut stream = ChaCha8Rng::seed_from_u64(seed);
                stream.set_stream(i as u64);
                for v in chunk {
                    *v = StandardNormal.sample(&mut stream);
                }
            });
        Self { facs, noise }
    }

    /// `batch + facs · noise`.
    pub fn apply(&self, batch: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = batch.dims4()?;
        if self.facs.len() != n || self.noise.len() != n * c * h * w {
            candle_core::bail!(
                "cutout noise for {} cutouts ({} values), batch {:?}",
                self.facs.len(),
                self.noise.len(),
                batch.shape()
            );
        }
        // The scaled noise in one pass on the host; the sum is the one graph node.
        let per = c * h * w;
        let mut scaled = vec![0f32; n * per];
        scaled
            .par_chunks_mut(per.max(1))
            .zip(self.noise.par_chunks(per.max(1)))
            .zip(&self.facs)
            .for_each(|((dst, src), &fac)| {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = fac * s;
                }
            });
        let scaled =
            Tensor::from_vec(scaled, (n, c, h, w), batch.device())?.to_dtype(batch.dtype())?;
        batch + scaled
    }
}

/// Resamples each crop of `image` (C,H,W) to `out`² pixels: (N,C,out,out).
pub fn resample_crops(image: &Tensor, crops: &[Crop], out: usize) -> candle_core::Result<Tensor> {
    let (c, h, w) = image.dims3()?;
    let n = crops.len();
    if gather_kernels(image) {
        return apply_gather(image, Resample::new(crops, (c, h, w), out)?);
    }
    let mut ry = vec![0f32; n * out * h];
    let mut rx = vec![0f32; n * out * w];
    // Crops of one size share their matrix; sizes repeat often among 32 cutouts.
    let mut matrices: std::collections::HashMap<usize, Vec<f32>> = Default::default();
    for (k, crop) in crops.iter().enumerate() {
        let m = matrices
            .entry(crop.size)
            .or_insert_with(|| crowson_resample_matrix(crop.size, out));
        embed_rows(
            &mut ry[k * out * h..(k + 1) * out * h],
            m,
            out,
            crop.size,
            crop.y,
            h,
        );
        embed_rows(
            &mut rx[k * out * w..(k + 1) * out * w],
            m,
            out,
            crop.size,
            crop.x,
            w,
        );
    }
    let dev = image.device();
    let ry = Tensor::from_vec(ry, (n, out, h), dev)?.to_dtype(image.dtype())?;
    let rx = Tensor::from_vec(rx, (n * out, w), dev)?.to_dtype(image.dtype())?;
    apply_separable(image, &ry, &rx, n, c, h, out)
}

/// `ry` (N,S,H), `rx` (N·S,W): out[k] = ry[k] · image · rx[k]ᵀ for every channel.
fn apply_separable(
    image: &Tensor,
    ry: &Tensor,
    rx: &Tensor,
    n: usize,
    c: usize,
    h: usize,
    out: usize,
) -> candle_core::Result<Tensor> {
    // Columns for all cutouts in one product: (C·H, W) · (W, N·S).
    let cols = image
        .reshape((c * h, image.dim(2)?))?
        .matmul(&rx.t()?)?
        .reshape((c, h, n, out))?
        .permute((2, 1, 0, 3))? // (N, H, C, S)
        .contiguous()?
        .reshape((n, h, c * out))?;
    // Rows, batched per cutout: (N,S,H) · (N,H,C·S).
    ry.matmul(&cols)?
        .reshape((n, out, c, out))?
        .permute((0, 2, 1, 3))?
        .contiguous()
}

/// The nonzero band of each row of a resampling matrix, placed in the full image: per
/// output sample, its first input index and the weights from there on.
type Bands = Vec<(usize, Vec<f32>)>;

/// The bands of `m` (out × size) with its columns shifted by `offset`.
fn bands(m: &[f32], size: usize, offset: usize) -> Bands {
    m.chunks(size)
        .map(|row| {
            let first = row.iter().position(|&v| v != 0.0).unwrap_or(0);
            let last = row.iter().rposition(|&v| v != 0.0).unwrap_or(0);
            (offset + first, row[first..=last.max(first)].to_vec())
        })
        .collect()
}

/// generate.py's crop-and-resample of every cutout as one pass over the image: per cutout
/// and channel, the rows through the (sparse) vertical filter into a crop-sized scratch
/// row block, then the columns straight into the output. The reference form multiplies
/// dense (out × H) and (out × W) matrices and keeps its permuted intermediates.
struct Resample {
    /// Per crop: its vertical and horizontal bands, and its span of columns.
    crops: Vec<(Bands, Bands, std::ops::Range<usize>)>,
    dims: (usize, usize, usize),
    out: usize,
}

impl Resample {
    fn new(crops: &[Crop], dims: (usize, usize, usize), out: usize) -> candle_core::Result<Self> {
        let (_, h, w) = dims;
        let mut matrices: std::collections::HashMap<usize, Vec<f32>> = Default::default();
        let crops = crops
            .iter()
            .map(|crop| {
                if crop.size == 0 || crop.x + crop.size > w || crop.y + crop.size > h {
                    candle_core::bail!("crop {crop:?} does not fit a {w}x{h} image");
                }
                let m = matrices
                    .entry(crop.size)
                    .or_insert_with(|| crowson_resample_matrix(crop.size, out));
                Ok((
                    bands(m, crop.size, crop.y),
                    bands(m, crop.size, crop.x),
                    crop.x..crop.x + crop.size,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { crops, dims, out })
    }
}

impl GatherKernel for Resample {
    fn name(&self) -> &'static str {
        "cpu-crop-resample"
    }

    fn out_dims(&self, dims: &[usize]) -> candle_core::Result<Vec<usize>> {
        let (c, h, w) = self.dims;
        if dims != [c, h, w] {
            candle_core::bail!("crop resample kernel for {:?}, got {dims:?}", self.dims)
        }
        Ok(vec![self.crops.len(), c, self.out, self.out])
    }

    fn forward<T: Sample>(&self, x: &[T], out: &mut [T]) {
        let (c, h, w) = self.dims;
        let s = self.out;
        out.par_chunks_mut(s * s).enumerate().for_each(|(task, o)| {
            let (rows, cols, span) = &self.crops[task / c];
            let plane = &x[(task % c) * h * w..(task % c + 1) * h * w];
            let width = span.len();
            let mut tmp = vec![T::zero(); s * width];
            for ((first, wy), t) in rows.iter().zip(tmp.chunks_mut(width)) {
                for (j, &wv) in wy.iter().enumerate() {
                    let src = &plane[(first + j) * w + span.start..(first + j) * w + span.end];
                    let wv = T::of(wv);
                    for (t, &v) in t.iter_mut().zip(src) {
                        *t += wv * v;
                    }
                }
            }
            for (o, t) in o.chunks_mut(s).zip(tmp.chunks(width)) {
                for (o, (first, wx)) in o.iter_mut().zip(cols) {
                    let mut acc = T::zero();
                    for (&wv, &v) in wx.iter().zip(&t[first - span.start..]) {
                        acc += T::of(wv) * v;
                    }
                    *o = acc;
                }
            }
        });
    }

    fn input_grad<T: Sample>(&self, _x: &[T], g: &[T], gx: &mut [T]) {
        let (c, h, w) = self.dims;
        let s = self.out;
        // One task per channel, the crops summed in order: the result does not depend on
        // the thread count.
        gx.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(ch, plane)| {
                for (k, (rows, cols, span)) in self.crops.iter().enumerate() {
                    let gk = &g[(k * c + ch) * s * s..(k * c + ch + 1) * s * s];
                    let width = span.len();
                    let mut tmp = vec![T::zero(); s * width];
                    for (go, t) in gk.chunks(s).zip(tmp.chunks_mut(width)) {
                        for (&gv, (first, wx)) in go.iter().zip(cols) {
                            for (t, &wv) in t[first - span.start..].iter_mut().zip(wx) {
                                *t += T::of(wv) * gv;
                            }
                        }
                    }
                    for ((first, wy), t) in rows.iter().zip(tmp.chunks(width)) {
                        for (j, &wv) in wy.iter().enumerate() {
                            let dst = &mut plane
                                [(first + j) * w + span.start..(first + j) * w + span.end];
                            let wv = T::of(wv);
                            for (d, &tv) in dst.iter_mut().zip(t) {
                                *d += wv * tv;
                            }
                        }
                    }
                }
            });
    }
}

/// generate.py's pooled cutouts (`latest`, `updatedpooling`): the mean of adaptive average
/// and adaptive max pooling of the whole image (1, C, H, W), `copies` times, in one pass;
/// the backward sums the copies' gradients and spreads them in one more, the max's to the
/// first maximum of each window in row-major order (recomputed, as torch credits ties).
struct Pool {
    dims: (usize, usize, usize),
    out: usize,
    copies: usize,
}

impl Pool {
    /// Per output row or column: its window and `1 / len`.
    fn windows(input: usize, out: usize) -> Vec<(std::ops::Range<usize>, f32)> {
        (0..out)
            .map(|i| {
                let (s, e) = adaptive_window(i, input, out);
                (s..e, 1.0 / (e - s) as f32)
            })
            .collect()
    }

    /// The first maximum of window (`ys`, `xs`) of `plane` in row-major order.
    fn argmax<T: Sample>(
        plane: &[T],
        w: usize,
        ys: &std::ops::Range<usize>,
        xs: &std::ops::Range<usize>,
    ) -> usize {
        let mut best = ys.start * w + xs.start;
        for y in ys.clone() {
            for x in xs.clone() {
                if plane[y * w + x] > plane[best] {
                    best = y * w + x;
                }
            }
        }
        best
    }
}

impl GatherKernel for Pool {
    fn name(&self) -> &'static str {
        "cpu-pooled-cutouts"
    }

    fn out_dims(&self, dims: &[usize]) -> candle_core::Result<Vec<usize>> {
        let (c, h, w) = self.dims;
        if dims != [1, c, h, w] {
            candle_core::bail!("pooled cutouts kernel for {:?}, got {dims:?}", self.dims)
        }
        Ok(vec![self.copies, c, self.out, self.out])
    }

    fn forward<T: Sample>(&self, x: &[T], out: &mut [T]) {
        let (c, h, w) = self.dims;
        let s = self.out;
        let (rows, cols) = (Self::windows(h, s), Self::windows(w, s));
        let (first, rest) = out.split_at_mut((c * s * s).min(out.len()));
        first
            .par_chunks_mut(s * s)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                for (o, (ys, wy)) in o.chunks_mut(s).zip(&rows) {
                    for (o, (xs, wx)) in o.iter_mut().zip(&cols) {
                        let mut avg = T::zero();
                        for y in ys.clone() {
                            let mut row = T::zero();
                            for &v in &plane[y * w + xs.start..y * w + xs.end] {
                                row += T::of(*wx) * v;
                            }
                            avg += T::of(*wy) * row;
                        }
                        let max = plane[Self::argmax(plane, w, ys, xs)];
                        *o = (avg + max) * T::of(0.5);
                    }
                }
            });
        for copy in rest.chunks_mut(first.len().max(1)) {
            copy.copy_from_slice(first);
        }
    }

    fn input_grad<T: Sample>(&self, x: &[T], g: &[T], gx: &mut [T]) {
        let (c, h, w) = self.dims;
        let s = self.out;
        let (rows, cols) = (Self::windows(h, s), Self::windows(w, s));
        gx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .enumerate()
            .for_each(|(ch, (gplane, plane))| {
                for (i, (ys, wy)) in rows.iter().enumerate() {
                    for (j, (xs, wx)) in cols.iter().enumerate() {
                        let mut gsum = T::zero();
                        for copy in 0..self.copies {
                            gsum += g[((copy * c + ch) * s + i) * s + j];
                        }
                        let half = gsum * T::of(0.5);
                        let share = half * T::of(*wy) * T::of(*wx);
                        for y in ys.clone() {
                            for d in &mut gplane[y * w + xs.start..y * w + xs.end] {
                                *d += share;
                            }
                        }
                        gplane[Self::argmax(plane, w, ys, xs)] += half;
                    }
                }
            });
    }
}

/// Copies `m` (out × size) into `dst` (out × full) at column `offset`.
fn embed_rows(dst: &mut [f32], m: &[f32], out: usize, size: usize, offset: usize, full: usize) {
    for i in 0..out {
        dst[i * full + offset..i * full + offset + size]
            .copy_from_slice(&m[i * size..(i + 1) * size]);
    }
}

/// generate.py's `resample` along one axis as an (out × size) matrix: a Lanczos-2
/// low-pass (reflect padded) when shrinking, then bicubic interpolation with
/// `align_corners=True`.
pub fn crowson_resample_matrix(size: usize, out: usize) -> Vec<f32> {
    let bicubic = bicubic_matrix(size, out);
    if out >= size {
        return bicubic;
    }
    // Both factors are sparse (4 bicubic taps, a short Lanczos kernel), so compose them
    // tap by tap: O(out · 4 · taps) instead of a dense O(out · size²) product.
    let taps = lanczos_taps(out as f64 / size as f64);
    let pad = (taps.len() - 1) / 2;
    let mut m = vec![0f32; out * size];
    for i in 0..out {
        let row = &mut m[i * size..(i + 1) * size];
        for (k, &b) in bicubic[i * size..(i + 1) * size].iter().enumerate() {
            if b == 0.0 {
                continue;
            }
            for (t, &tap) in taps.iter().enumerate() {
                let j = reflect(k as isize + t as isize - pad as isize, size);
                row[j] += b * tap as f32;
            }
        }
    }
    m
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
    }
}

/// The taps of generate.py's `lanczos(ramp(ratio, 2), 2)`.
fn lanczos_taps(ratio: f64) -> Vec<f64> {
    let n = (2.0 / ratio + 1.0).ceil() as usize;
    let ramp: Vec<f64> = (0..n).map(|i| i as f64 * ratio).collect();
    let mut xs: Vec<f64> = ramp[1..].iter().rev().map(|v| -v).collect();
    xs.extend_from_slice(&ramp);
    let xs = &xs[1..xs.len() - 1];
    let taps: Vec<f64> = xs
        .iter()
        .map(|&x| {
            if -2.0 < x && x < 2.0 {
                sinc(x) * sinc(x / 2.0)
            } else {
                0.0
            }
        })
        .collect();
    let sum: f64 = taps.iter().sum();
    taps.into_iter().map(|t| t / sum).collect()
}

/// Reflect padding as torch's `F.pad(..., 'reflect')` does (the edge is not repeated).
fn reflect(i: isize, len: usize) -> usize {
    let len = len as isize;
    if len == 1 {
        return 0;
    }
    let period = 2 * (len - 1);
    let mut j = i.rem_euclid(period);
    if j >= len {
        j = period - j;
    }
    j as usize
}

/// torch's cubic convolution kernel with a = −0.75.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Bicubic interpolation from `size` to `out` samples, `align_corners=True`, border
/// samples clamped as torch does.
fn bicubic_matrix(size: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * size];
    let scale = if out > 1 {
        (size as f64 - 1.0) / (out as f64 - 1.0)
    } else {
        0.0
    };
    for i in 0..out {
        let src = i as f64 * scale;
        let x0 = src.floor();
        let w = cubic_weights(src - x0);
        for (k, wk) in w.iter().enumerate() {
            let j = (x0 as isize + k as isize - 1).clamp(0, size as isize - 1) as usize;
            m[i * size + j] += *wk as f32;
        }
    }
    m
}

/// torch's adaptive pooling windows: `[floor(i·in/out), ceil((i+1)·in/out))`.
fn adaptive_window(i: usize, input: usize, out: usize) -> (usize, usize) {
    let start = i * input / out;
    let end = ((i + 1) * input).div_ceil(out);
    (start, end)
}

/// The (out × input) matrix of adaptive average pooling along one axis.
pub fn adaptive_avg_matrix(input: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * input];
    for i in 0..out {
        let (s, e) = adaptive_window(i, input, out);
        let w = 1.0 / (e - s) as f32;
        for j in s..e {
            m[i * input + j] = w;
        }
    }
    m
}

/// Adaptive average pooling of (C,H,W) to (C,out,out), as a matrix product.
pub fn adaptive_avg_pool(image: &Tensor, out: usize) -> candle_core::Result<Tensor> {
    let (c, h, w) = image.dims3()?;
    let dev = image.device();
    let ry =
        Tensor::from_vec(adaptive_avg_matrix(h, out), (1, out, h), dev)?.to_dtype(image.dtype())?;
    let rx =
        Tensor::from_vec(adaptive_avg_matrix(w, out), (out, w), dev)?.to_dtype(image.dtype())?;
    apply_separable(image, &ry, &rx, 1, c, h, out)?.squeeze(0)
}

/// Gather indices for adaptive max pooling along one axis: (out · window), where
/// short windows point at `pad_index` (a row of −∞ stand-ins) so they never win.
fn adaptive_max_indices(input: usize, out: usize, pad_index: usize) -> (Vec<u32>, usize) {
    let window = (0..out)
        .map(|i| {
            let (s, e) = adaptive_window(i, input, out);
            e - s
        })
        .max()
        .unwrap_or(1);
    let mut idx = Vec::with_capacity(out * window);
    for i in 0..out {
        let (s, e) = adaptive_window(i, input, out);
        for k in 0..window {
            idx.push(if s + k < e {
                (s + k) as u32
            } else {
                pad_index as u32
            });
        }
    }
    (idx, window)
}

/// Adaptive max pooling of (C,H,W) to (C,out,out). Separable: the max over a
/// rectangle is the max over its rows of the max over its columns. Columns go first
/// and each stage keeps the first maximum, which together is the first maximum of
/// the window in row-major order: the one element torch's backward credits when
/// values tie (flat, clamped regions of a render do).
pub fn adaptive_max_pool(image: &Tensor, out: usize) -> candle_core::Result<Tensor> {
    let (c, h, w) = image.dims3()?;
    let dev = image.device();
    // A sentinel far below any pixel, appended so padded window slots never win.
    let floor =
        |shape: (usize, usize, usize)| Tensor::full(-1e4f32, shape, dev)?.to_dtype(image.dtype());

    let padded = Tensor::cat(&[image, &floor((c, h, 1))?], 2)?;
    let (idx, win) = adaptive_max_indices(w, out, w);
    let idx = Tensor::from_vec(idx, out * win, dev)?;
    let cols = first_max(&padded.index_select(&idx, 2)?.reshape((c, h, out, win))?, 3)?; // (C, H, out)

    let padded = Tensor::cat(&[&cols, &floor((c, 1, out))?], 1)?;
    let (idx, win) = adaptive_max_indices(h, out, h);
    let idx = Tensor::from_vec(idx, out * win, dev)?;
    first_max(
        &padded.index_select(&idx, 1)?.reshape((c, out, win, out))?,
        2,
    )
}

/// The maximum along `dim` (removed), differentiated into its first occurrence only.
fn first_max(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let arg = t.detach().argmax_keepdim(dim)?;
    t.contiguous()?
        .gather(&arg.contiguous()?, dim)?
        .squeeze(dim)
}

/// Uniform noise strengths per cutout then Gaussian noise, generate.py's `noise_fac`
/// step after the augmentations.
pub fn add_cutout_noise(
    batch: &Tensor,
    noise_fac: f32,
    rng: &mut ChaCha20Rng,
) -> candle_core::Result<Tensor> {
    CutoutNoise::sample(batch.dims4()?, noise_fac, rng).apply(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::gradcheck::{check_gradient, check_kernel_against_reference};
    use candle_core::Device;
    use rand::SeedableRng;

    fn host(data: Vec<f32>, shape: &[usize]) -> candle_core::Result<Tensor> {
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    fn ramp_image(c: usize, h: usize, w: usize) -> Tensor {
        let data: Vec<f32> = (0..c * h * w)
            .map(|i| 0.5 + 0.5 * ((i as f32) * 1.37 + 0.1).sin())
            .collect();
        host(data, &[c, h, w]).unwrap()
    }

    fn to_vec3(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
        t.to_vec3().unwrap()
    }

    #[test]
    fn cutout_noise_is_standard_normal_and_the_same_on_any_thread_count() {
        let draw = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut rng = ChaCha20Rng::seed_from_u64(7);
            let noise = pool.install(|| CutoutNoise::sample((4, 3, 32, 32), 0.1, &mut rng));
            (noise, rng.gen::<u64>())
        };
        let (one, after_one) = draw(1);
        let (two, after_two) = draw(2);
        assert_eq!(one, two);
        assert_eq!(after_one, after_two, "the job's RNG advances the same");
        assert!(one.facs.iter().all(|f| (0.0..0.1).contains(f)));
        // Each cutout's noise is its own stream: no two cutouts repeat each other.
        let per = 3 * 32 * 32;
        assert_ne!(one.noise[..per], one.noise[per..2 * per]);
        let n = one.noise.len() as f64;
        let mean = one.noise.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = one
            .noise
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        // Another seed, other noise.
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        assert_ne!(
            CutoutNoise::sample((4, 3, 32, 32), 0.1, &mut rng).noise,
            one.noise
        );
    }

    #[test]
    fn cutout_noise_adds_its_scaled_values() {
        let batch = host(vec![1.0; 8], &[2, 1, 2, 2]).unwrap();
        let noise = CutoutNoise {
            facs: vec![0.5, 2.0],
            noise: (0..8).map(|i| i as f32).collect(),
        };
        let out: Vec<f32> = noise
            .apply(&batch)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out, vec![1.0, 1.5, 2.0, 2.5, 9.0, 11.0, 13.0, 15.0]);
        let short = CutoutNoise {
            facs: vec![0.5],
            noise: vec![0.0; 4],
        };
        assert!(short.apply(&batch).is_err());
    }

    #[test]
    fn full_crop_at_same_size_is_identity() {
        let img = ramp_image(3, 16, 16);
        let out = resample_crops(
            &img,
            &[Crop {
                x: 0,
                y: 0,
                size: 16,
            }],
            16,
        )
        .unwrap();
        let diff = (out.squeeze(0).unwrap() - &img)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let out = adaptive_avg_pool(&img, 16).unwrap();
        assert_eq!(to_vec3(&out), to_vec3(&img));
        let out = adaptive_max_pool(&img, 16).unwrap();
        assert_eq!(to_vec3(&out), to_vec3(&img));
    }

    #[test]
    fn pooling_equals_direct_window_reductions() {
        let (h, w, s) = (13, 10, 4);
        let img = ramp_image(2, h, w);
        let v = to_vec3(&img);
        let avg = to_vec3(&adaptive_avg_pool(&img, s).unwrap());
        let max = to_vec3(&adaptive_max_pool(&img, s).unwrap());
        for c in 0..2 {
            for i in 0..s {
                for j in 0..s {
                    let (ys, ye) = ((i * h) / s, ((i + 1) * h).div_ceil(s));
                    let (xs, xe) = ((j * w) / s, ((j + 1) * w).div_ceil(s));
                    let mut sum = 0.0;
                    let mut m = f32::MIN;
                    for row in &v[c][ys..ye] {
                        for &p in &row[xs..xe] {
                            sum += p;
                            m = m.max(p);
                        }
                    }
                    let mean = sum / ((ye - ys) * (xe - xs)) as f32;
                    assert!((avg[c][i][j] - mean).abs() < 1e-5);
                    assert_eq!(max[c][i][j], m);
                }
            }
        }
    }

    /// Reference values from torch: generate.py's `resample(x, (4, 4))` on
    /// `x = torch.arange(64.).reshape(1,1,8,8).sin()` (lanczos prefilter, reflect pad,
    /// bicubic with align_corners=True).
    #[test]
    fn downscale_matches_generate_py_resample() {
        let data: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
        let img = host(data, &[1, 8, 8]).unwrap();
        let out = resample_crops(
            &img,
            &[Crop {
                x: 0,
                y: 0,
                size: 8,
            }],
            4,
        )
        .unwrap();
        let got: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        let expected = TORCH_RESAMPLE_8_TO_4;
        assert_eq!(got.len(), 16);
        for (g, e) in got.iter().zip(expected.iter()) {
            assert!((g - e).abs() < 1e-4, "got {got:?}\nexpected {expected:?}");
        }
    }

    #[rustfmt::skip]
    const TORCH_RESAMPLE_8_TO_4: [f32; 16] = [0.715985, -0.158159, -0.381032, 0.676784, -0.395036, 0.0571681, 0.236487, -0.363496, 0.330591, -0.276137, 0.0012802, 0.379385, -0.627463, 0.458933, 0.0544367, -0.698609];
    #[rustfmt::skip]
    const TORCH_RESAMPLE_6_TO_9: [f32; 81] = [1.0, 0.811034, 0.295297, -0.27973, -0.82427, -1.00565, -0.848878, -0.278932, 0.283662, 0.987302, 0.880607, 0.437899, -0.130822, -0.721148, -0.993745, -0.922223, -0.415074, 0.135766, 0.936069, 0.950062, 0.626172, 0.0855275, -0.550145, -0.94343, -0.99565, -0.59492, -0.0793107, 0.868774, 0.968503, 0.740097, 0.237239, -0.409968, -0.876549, -1.01543, -0.703851, -0.230317, 0.763319, 0.965896, 0.860894, 0.417642, -0.226853, -0.7714, -1.01325, -0.819452, -0.410032, 0.625236, 0.922002, 0.944892, 0.580192, -0.0340421, -0.633278, -0.967755, -0.900026, -0.572221, 0.499695, 0.86674, 0.993127, 0.700036, 0.123445, -0.507535, -0.910221, -0.946429, -0.69194, 0.300967, 0.749556, 1.01505, 0.835685, 0.338283, -0.308163, -0.787859, -0.967932, -0.827786, 0.154251, 0.649544, 1.0065, 0.911266, 0.481233, -0.160824, -0.683305, -0.960202, -0.903692];

    /// Upscaling (a crop smaller than CLIP's input) is plain bicubic, no prefilter:
    /// `resample(torch.arange(36.).reshape(1,1,6,6).cos(), (9, 9))`.
    #[test]
    fn upscale_matches_generate_py_resample() {
        let data: Vec<f32> = (0..36).map(|i| (i as f32).cos()).collect();
        let img = host(data, &[1, 6, 6]).unwrap();
        let out = resample_crops(
            &img,
            &[Crop {
                x: 0,
                y: 0,
                size: 6,
            }],
            9,
        )
        .unwrap();
        let got: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        for (g, e) in got.iter().zip(TORCH_RESAMPLE_6_TO_9.iter()) {
            assert!((g - e).abs() < 1e-4, "got {got:?}");
        }
    }

    #[test]
    fn crops_select_their_region() {
        // A crop at the output size is a plain copy of its region.
        let img = ramp_image(3, 12, 12);
        let crop = Crop {
            x: 3,
            y: 5,
            size: 4,
        };
        let out = resample_crops(
            &img,
            &[
                crop,
                Crop {
                    x: 0,
                    y: 0,
                    size: 12,
                },
            ],
            4,
        )
        .unwrap();
        let region = img.narrow(1, 5, 4).unwrap().narrow(2, 3, 4).unwrap();
        assert_eq!(to_vec3(&out.i(0).unwrap()), to_vec3(&region));
    }

    #[test]
    fn crop_sizes_follow_cut_pow() {
        let cut = Cutouts::new(CutMethod::Original, 200, 1.0, 8);
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let crops = cut.sample_crops(&mut rng, 20, 30);
        assert!(crops
            .iter()
            .all(|c| (8..=20).contains(&c.size) && c.x + c.size <= 30 && c.y + c.size <= 20));
        assert!(crops.iter().any(|c| c.size > 16) && crops.iter().any(|c| c.size < 12));
        let mean = |p: f32| {
            let cut = Cutouts::new(CutMethod::Original, 400, p, 8);
            let crops = cut.sample_crops(&mut ChaCha20Rng::seed_from_u64(1), 64, 64);
            crops.iter().map(|c| c.size as f32).sum::<f32>() / 400.0
        };
        assert!(mean(3.0) < mean(1.0));
    }

    #[test]
    fn resampler_gradients_match_finite_differences() {
        let img = ramp_image(2, 9, 11);
        let crops = [
            Crop {
                x: 1,
                y: 0,
                size: 9,
            },
            Crop {
                x: 4,
                y: 2,
                size: 5,
            },
        ];
        check_gradient(&img, |x| resample_crops(x, &crops, 4), 1e-2);
        check_gradient(&img, |x| resample_crops(x, &crops, 7), 1e-2);
        check_gradient(&img, |x| adaptive_avg_pool(x, 4), 1e-2);
        check_gradient(&img, |x| adaptive_max_pool(x, 4), 1e-2);
    }

    #[test]
    fn crop_and_pool_kernels_match_the_reference() {
        let img = ramp_image(3, 19, 23);
        let crops = [
            Crop {
                x: 0,
                y: 0,
                size: 19,
            },
            Crop {
                x: 5,
                y: 2,
                size: 11,
            },
            Crop {
                x: 20,
                y: 16,
                size: 3,
            },
        ];
        // Shrinking (Lanczos then bicubic), same size and enlarging (bicubic only).
        for out in [4, 11, 24] {
            check_kernel_against_reference(&img, |x| resample_crops(x, &crops, out), 1e-12);
        }
        // Flat patches tie within pooling windows: both forms must credit the same pixel.
        let mut v: Vec<f32> = img.flatten_all().unwrap().to_vec1().unwrap();
        for (i, p) in v.iter_mut().enumerate() {
            if (i / 23) % 19 < 8 && i % 23 < 9 {
                *p = 0.25;
            }
        }
        let img = host(v, &[1, 3, 19, 23]).unwrap();
        for (method, out) in [(CutMethod::Latest, 5), (CutMethod::Updatedpooling, 30)] {
            let cut = Cutouts::new(method, 3, 1.0, out);
            check_kernel_against_reference(&img, |x| cut.make_from(x, &[]), 1e-12);
        }
    }

    #[test]
    fn latest_cutouts_are_pooled_copies() {
        let cut = Cutouts::new(CutMethod::Latest, 3, 1.0, 4);
        let img = ramp_image(3, 8, 8).unsqueeze(0).unwrap();
        let out = cut.make(&img, &mut ChaCha20Rng::seed_from_u64(0)).unwrap();
        assert_eq!(out.dims(), &[3, 3, 4, 4]);
        let img0 = img.i(0).unwrap();
        let expected = ((adaptive_avg_pool(&img0, 4).unwrap()
            + adaptive_max_pool(&img0, 4).unwrap())
        .unwrap()
            * 0.5)
            .unwrap();
        assert_eq!(to_vec3(&out.i(2).unwrap()), to_vec3(&expected));
    }
}
