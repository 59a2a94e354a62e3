//! 3×3 stride-1 convolutions on the CPU by Winograd's minimal filtering, F(m×m, 3×3): each
//! m×m output tile costs (m+2)² multiplies per channel pair instead of 9m², so the GEMM work
//! of the VQGAN decoder's 3×3 convs, forward and input gradient, falls by 2.25× (m = 2) or
//! 4× (m = 4). The transforms of input and output are separable and run over whole rows of
//! tiles, so they vectorise; the weight transform is redone per call (a few ms for the
//! largest layer) rather than kept, so no second copy of the decoder's weights stays alive.
//!
//! Numerically it computes the same correlation as the im2col kernel in [`super::cpu`], with
//! other rounding: the transforms add and subtract inputs before the products. Tests compare
//! it with the direct sum in f64 and check that the result does not depend on the threads.

use std::cell::RefCell;

use rayon::prelude::*;

use super::cpu::SharedOut;

/// The constant matrices of one F(m×m, 3×3) algorithm, for the correlation
/// `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` of an (m+2)×(m+2) input tile `d` with a 3×3 kernel `g`.
struct Transform<const M: usize, const A: usize> {
    /// Bᵀ, A×A: the input tile's transform.
    bt: [[f32; A]; A],
    /// G, A×3: the kernel's transform.
    g: [[f32; 3]; A],
    /// Aᵀ, M×A: back from the transformed products to the output tile.
    at: [[f32; A]; M],
}

/// F(2×2, 3×3): interpolation points 0, ±1, ∞; every constant is 0, ±1 or ±½.
const F2: Transform<2, 4> = Transform {
    bt: [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ],
    g: [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    at: [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]],
};

/// F(4×4, 3×3): interpolation points 0, ±1, ±2, ∞.
const F4: Transform<4, 6> = Transform {
    bt: [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ],
    g: [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ],
    at: [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ],
};

/// Which algorithm a 3×3 conv of these sizes takes on the CPU, if any. The GEMMs of a
/// Winograd conv have the channel counts as two of their sides and the tiles of a block as
/// the third, so thin layers (the decoder's RGB output, the tiny test models' few channels)
/// stay on im2col, whose one GEMM is deeper. So do outputs under 64²: the weight transform,
/// redone per call, costs c_in·c_out whatever the image size, and below 64² it outweighs the
/// GEMM work saved (`cargo bench --bench layer_timing`: 512 channels at 8² and 16², 256 at
/// 32² are faster on im2col). `VQCLIP_CONV=im2col|winograd2|winograd4` forces one (for
/// timings and comparisons) wherever the channels allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    Im2col,
    F2,
    F4,
}

fn choose(c_in: usize, c_out: usize, ho: usize, wo: usize) -> Choice {
    static MODE: std::sync::OnceLock<Option<Choice>> = std::sync::OnceLock::new();
    let forced = *MODE.get_or_init(|| match std::env::var("VQCLIP_CONV").ok().as_deref() {
        Some("im2col") => Some(Choice::Im2col),
        Some("winograd2") => Some(Choice::F2),
        Some("winograd4") => Some(Choice::F4),
        _ => None,
    });
    if c_in < 16 || c_out < 16 || ho < 8 || wo < 8 {
        return Choice::Im2col;
    }
    forced.unwrap_or(if ho * wo >= 64 * 64 {
        Choice::F4
    } else {
        Choice::Im2col
    })
}

thread_local! {
    /// Per-thread scratch: the transformed inputs of a block, its products, and the rows the
    /// transforms work in.
    static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// The instruction sets [`block`] is compiled for; the widest the CPU has is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// Every instruction set this CPU can run, widest last.
    fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
        }
        all
    }

    fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Isa::available().last().unwrap_or(&Isa::Portable))
    }
}

/// The transformed kernel, (A·A) matrices of (c_out × c_in), one per position of the tile.
fn transform_kernel<const M: usize, const A: usize>(
    tf: &Transform<M, A>,
    w: &[f32],
    c_out: usize,
    c_in: usize,
) -> Vec<f32> {
    let plane = c_out * c_in;
    // The 9 taps as 9 contiguous planes, so that each position is a sum of whole planes.
    let mut taps = vec![0f32; 9 * plane];
    for (i, k) in w.chunks_exact(9).enumerate() {
        for (t, &v) in k.iter().enumerate() {
            taps[t * plane + i] = v;
        }
    }
    let mut u = vec![0f32; A * A * plane];
    u.par_chunks_mut(plane).enumerate().for_each(|(xi, dst)| {
        let (i, j) = (xi / A, xi % A);
        for t in 0..9 {
            let c = tf.g[i][t / 3] * tf.g[j][t % 3];
            if c != 0.0 {
                for (d, &s) in dst.iter_mut().zip(&taps[t * plane..(t + 1) * plane]) {
                    *d += c * s;
                }
            }
        }
    });
    u
}

/// One 3×3 stride-1 correlation: a contiguous (b, c_in, h, w) `x` with a contiguous
/// (c_out, c_in, 3, 3) `w`, zero `padding` (0..=2) on each side, plus an optional bias, into
/// a new (b, c_out, ho, wo) buffer. The caller has checked the shapes.
pub(crate) struct Conv3x3<'a> {
    pub x: &'a [f32],
    /// (b, c_in, h, w) of `x`.
    pub dims: (usize, usize, usize, usize),
    pub w: &'a [f32],
    pub c_out: usize,
    pub bias: Option<&'a [f32]>,
    pub padding: usize,
    pub threads: usize,
}

impl Conv3x3<'_> {
    /// The output and its (ho, wo) by Winograd where [`choose`] picks it for these sizes;
    /// `None` where the im2col kernel is the better one.
    pub(crate) fn winograd(&self) -> Option<(Vec<f32>, usize, usize)> {
        let (_, c_in, h, wd) = self.dims;
        let p = self.padding;
        match choose(c_in, self.c_out, h + 2 * p - 2, wd + 2 * p - 2) {
            Choice::Im2col => None,
            Choice::F2 => Some(self.run(Isa::best(), &F2)),
            Choice::F4 => Some(self.run(Isa::best(), &F4)),
        }
    }

    /// By F(M×M, 3×3), the transforms compiled for `isa` (the tests run each one).
    fn run<const M: usize, const A: usize>(
        &self,
        isa: Isa,
        tf: &Transform<M, A>,
    ) -> (Vec<f32>, usize, usize) {
        let Conv3x3 {
            x,
            dims: (b, c_in, h, wd),
            w,
            c_out,
            bias,
            padding,
            threads,
        } = *self;
        let p = padding;
        let (ho, wo) = (h + 2 * p - 2, wd + 2 * p - 2);
        let mut out = vec![0f32; b * c_out * ho * wo];
        if out.is_empty() {
            return (out, ho, wo);
        }
        let u = transform_kernel(tf, w, c_out, c_in);
        let (th, tw) = (ho.div_ceil(M), wo.div_ceil(M));
        // Whole rows of tiles per block, about 2 MB of transformed values per block.
        let target_tiles = (512 * 1024 / (A * A * c_in.max(c_out))).max(16);
        let tile_rows = (target_tiles / tw).clamp(1, th);
        let blocks_per_image = th.div_ceil(tile_rows);
        let tasks = b * blocks_per_image;
        let outer_parallel = threads > 1 && tasks >= 2 * threads;
        let gemm_par = if outer_parallel || threads == 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        let geom = Geometry {
            c_in,
            c_out,
            h,
            wd,
            p,
            ho,
            wo,
            th,
            tw,
            tile_rows,
            blocks_per_image,
        };
        let job = Job {
            tf,
            g: geom,
            x,
            u: &u,
            bias,
            // Each task writes the output rows of its own tile rows, which no other task touches.
            out: SharedOut(out.as_mut_ptr()),
            gemm_par,
            isa,
        };
        let task = |t: usize| run_block(&job, t);
        if outer_parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
        (out, ho, wo)
    }
}

/// The sizes of one conv and of its blocks of tile rows.
struct Geometry {
    c_in: usize,
    c_out: usize,
    h: usize,
    wd: usize,
    p: usize,
    ho: usize,
    wo: usize,
    /// Tile rows and tile columns of the output.
    th: usize,
    tw: usize,
    /// Tile rows per block, and blocks per image.
    tile_rows: usize,
    blocks_per_image: usize,
}

/// One conv's inputs, transformed kernel and output, shared by its blocks.
struct Job<'a, const M: usize, const A: usize> {
    tf: &'a Transform<M, A>,
    g: Geometry,
    x: &'a [f32],
    u: &'a [f32],
    bias: Option<&'a [f32]>,
    out: SharedOut,
    gemm_par: gemm::Parallelism,
    isa: Isa,
}

/// One block (`t` counts blocks over all images): its input tiles transformed, one GEMM per
/// tile position, its output tiles transformed back into `out`. The transforms' loops run
/// along a row of tiles, so they vectorise; they run compiled for `job.isa` (the widest
/// vectors the CPU has), with the same arithmetic on every one (no fused multiply-adds, the
/// same order) and so the same results.
fn run_block<const M: usize, const A: usize>(job: &Job<M, A>, t: usize) {
    let g = &job.g;
    let nty = g
        .tile_rows
        .min(g.th - (t % g.blocks_per_image) * g.tile_rows);
    let n = nty * g.tw;
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let [v, m, work] = &mut *s;
        for (buf, len) in [
            (&mut *v, A * A * g.c_in * n),
            (&mut *m, A * A * g.c_out * n),
            (&mut *work, work_len::<M, A>(g.tw)),
        ] {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
        }
        let bufs = Scratch { v, m, work };
        match job.isa {
            // SAFETY: `Isa::available` checked that the CPU has AVX-512F.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { block_avx512(job, t, bufs) },
            // SAFETY: `Isa::available` checked that the CPU has AVX2.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { block_avx2(job, t, bufs) },
            Isa::Portable => block(job, t, bufs),
        }
    })
}

/// A thread's scratch buffers, long enough for the block at hand.
struct Scratch<'a> {
    v: &'a mut [f32],
    m: &'a mut [f32],
    work: &'a mut [f32],
}

/// The transforms' working rows for `tw` tiles a row: a padded input row, its phases,
/// (d B) of every row of a tile row, and the two stages of the output transform.
fn work_len<const M: usize, const A: usize>(tw: usize) -> usize {
    let pl = tw + 1;
    pl * M + M * pl + A * A * tw + A * M * tw + M * tw
}

/// [`block`] compiled for one instruction set, so that its loops use that vector width.
macro_rules! block_for_isa {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const M: usize, const A: usize>(job: &Job<M, A>, t: usize, bufs: Scratch) {
            block(job, t, bufs)
        }
    };
}
block_for_isa!(block_avx512, "avx512f");
block_for_isa!(block_avx2, "avx2");

/// `dst = init + Σ coef[k] · src(k)`, summed in k order, in one pass over `dst` (a row of
/// tiles, in L1) with every source read in the same pass; zero coefficients are multiplied
/// like the others, which is cheaper than a branch and leaves every sum unchanged.
#[inline(always)]
fn combine<'a, const K: usize>(
    dst: &mut [f32],
    init: f32,
    coef: &[f32; K],
    src: impl Fn(usize) -> &'a [f32],
) {
    let n = dst.len();
    let srcs: [&[f32]; K] = std::array::from_fn(|k| &src(k)[..n]);
    for (i, d) in dst.iter_mut().enumerate() {
        let mut acc = init;
        for k in 0..K {
            // SAFETY: every source was cut to `n` values above, and `i < n`.
            acc += coef[k] * unsafe { *srcs[k].get_unchecked(i) };
        }
        *d = acc;
    }
}

#[inline(always)]
fn block<const M: usize, const A: usize>(job: &Job<M, A>, t: usize, bufs: Scratch) {
    let Job {
        tf,
        ref g,
        x,
        u,
        bias,
        out,
        gemm_par,
        isa: _,
    } = *job;
    let (c_in, c_out, h, wd, p, tw) = (g.c_in, g.c_out, g.h, g.wd, g.p, g.tw);
    let (img, blk) = (t / g.blocks_per_image, t % g.blocks_per_image);
    let ty0 = blk * g.tile_rows;
    let nty = g.tile_rows.min(g.th - ty0);
    let n = nty * tw;
    let x_img = &x[img * c_in * h * wd..(img + 1) * c_in * h * wd];
    // A padded input row split by phase: `ph[k][t]` is the row's pixel t·M + k, so each tile's
    // c-th pixel is `ph[c % M][tx + c / M]`, read along the row without a stride.
    let pl = tw + 1;
    let row_len = pl * M;
    let work_len = work_len::<M, A>(tw);
    let (v, m) = (
        &mut bufs.v[..A * A * c_in * n],
        &mut bufs.m[..A * A * c_out * n],
    );
    let (row, rest) = bufs.work[..work_len].split_at_mut(row_len);
    let (ph, rest) = rest.split_at_mut(M * pl);
    let (e, rest) = rest.split_at_mut(A * A * tw);
    let (f, yo) = rest.split_at_mut(A * M * tw);
    {
        // Bᵀ d B per tile, rows first: `e[r][c']` holds (d B) of input row r for every tile of
        // the tile row, then the columns mix into V[(r', c')][ci][tile].
        for ci in 0..c_in {
            let plane = &x_img[ci * h * wd..(ci + 1) * h * wd];
            for lty in 0..nty {
                let ty = ty0 + lty;
                for r in 0..A {
                    let iy = (ty * M + r) as isize - p as isize;
                    row.fill(0.0);
                    if iy >= 0 && (iy as usize) < h {
                        let src = &plane[iy as usize * wd..(iy as usize + 1) * wd];
                        let len = wd.min(row_len - p);
                        row[p..p + len].copy_from_slice(&src[..len]);
                    }
                    for (t, px) in row.chunks_exact(M).enumerate() {
                        for (k, &val) in px.iter().enumerate() {
                            ph[k * pl + t] = val;
                        }
                    }
                    let ph = &*ph;
                    for c2 in 0..A {
                        combine(&mut e[(r * A + c2) * tw..][..tw], 0.0, &tf.bt[c2], |c| {
                            &ph[(c % M) * pl + c / M..]
                        });
                    }
                }
                let e = &*e;
                for r2 in 0..A {
                    for c2 in 0..A {
                        let off = ((r2 * A + c2) * c_in + ci) * n + lty * tw;
                        combine(&mut v[off..off + tw], 0.0, &tf.bt[r2], |r| {
                            &e[(r * A + c2) * tw..]
                        });
                    }
                }
            }
        }
        // One GEMM per tile position: (c_out × c_in) by (c_in × tiles).
        let plane = c_out * c_in;
        for xi in 0..A * A {
            // SAFETY: the three matrices lie inside `m`, `u` and `v` at the strides given.
            unsafe {
                gemm::gemm(
                    c_out,
                    n,
                    c_in,
                    m.as_mut_ptr().add(xi * c_out * n),
                    1,
                    n as isize,
                    false,
                    u.as_ptr().add(xi * plane),
                    1,
                    c_in as isize,
                    v.as_ptr().add(xi * c_in * n),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm_par,
                )
            }
        }
        // Aᵀ M A per tile, columns first, into the output rows of this block.
        let m = &*m;
        for co in 0..c_out {
            let bv = bias.map_or(0.0, |b| b[co]);
            for lty in 0..nty {
                let base = lty * tw;
                for r2 in 0..A {
                    for oc in 0..M {
                        combine(&mut f[(r2 * M + oc) * tw..][..tw], 0.0, &tf.at[oc], |c2| {
                            &m[((r2 * A + c2) * c_out + co) * n + base..]
                        });
                    }
                }
                let f = &*f;
                for or in 0..M {
                    let oy = (ty0 + lty) * M + or;
                    if oy >= g.ho {
                        break;
                    }
                    for oc in 0..M {
                        combine(&mut yo[oc * tw..][..tw], bv, &tf.at[or], |r2| {
                            &f[(r2 * M + oc) * tw..]
                        });
                    }
                    // SAFETY: output row `oy` of channel `co` of image `img` belongs to this
                    // block's tile rows alone; the output buffer outlives the tasks.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.at(((img * c_out + co) * g.ho + oy) * g.wo),
                            g.wo,
                        )
                    };
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = yo[(i % M) * tw + i / M];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct correlation in f64, the reference for both algorithms.
    fn direct(
        x: &[f32],
        (b, c_in, h, wd): (usize, usize, usize, usize),
        w: &[f32],
        c_out: usize,
        bias: Option<&[f32]>,
        p: usize,
    ) -> Vec<f64> {
        let (ho, wo) = (h + 2 * p - 2, wd + 2 * p - 2);
        let mut out = vec![0f64; b * c_out * ho * wo];
        for i in 0..b {
            for co in 0..c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bias.map_or(0.0, |b| b[co] as f64);
                        for ci in 0..c_in {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < p || ix < p || iy - p >= h || ix - p >= wd {
                                        continue;
                                    }
                                    acc += x[((i * c_in + ci) * h + iy - p) * wd + ix - p] as f64
                                        * w[((co * c_in + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        out[((i * c_out + co) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
        out
    }

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn check<const M: usize, const A: usize>(tf: &Transform<M, A>, tol: f64) {
        // Odd sizes leave partial tiles at the bottom and right; every padding the kernel takes.
        for (dims, c_out, p) in [
            ((1, 5, 9, 11), 7, 1),
            ((2, 3, 8, 8), 4, 0),
            ((1, 4, 7, 13), 3, 2),
            ((1, 17, 19, 6), 18, 1),
        ] {
            let (b, c_in, h, wd) = dims;
            let x = noise(b * c_in * h * wd, 1);
            let w = noise(c_out * c_in * 9, 2);
            let bias = noise(c_out, 3);
            let want = direct(&x, dims, &w, c_out, Some(&bias), p);
            let conv = |threads| Conv3x3 {
                x: &x,
                dims,
                w: &w,
                c_out,
                bias: Some(&bias),
                padding: p,
                threads,
            };
            let best = conv(2).run(Isa::best(), tf).0;
            for isa in Isa::available() {
                let got = conv(2).run(isa, tf).0;
                assert!(
                    got == best,
                    "{isa:?} gives other values than {:?}",
                    Isa::best()
                );
            }
            for threads in [1, 2] {
                let (got, ho, wo) = conv(threads).run(Isa::best(), tf);
                assert_eq!((ho, wo), (h + 2 * p - 2, wd + 2 * p - 2));
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(&g, &w)| (g as f64 - w).abs())
                    .fold(0.0, f64::max);
                assert!(worst < tol, "F({M}, 3) {dims:?} pad {p}: off by {worst}");
            }
        }
    }

    #[test]
    fn f2_matches_the_direct_correlation() {
        check(&F2, 1e-5);
    }

    #[test]
    fn f4_matches_the_direct_correlation() {
        check(&F4, 1e-4);
    }
}
