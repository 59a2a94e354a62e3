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

/// The constant matrices of one F(m×m, 3×3) algorithm, for the correlation
/// `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` of an (m+2)×(m+2) input tile `d` with a 3×3 kernel `g`.
pub(crate) struct Transform<const M: usize, const A: usize> {
    /// Bᵀ, A×A: the input tile's transform.
    bt: [[f32; A]; A],
    /// G, A×3: the kernel's transform.
    g: [[f32; 3]; A],
    /// Aᵀ, M×A: back from the transformed products to the output tile.
    at: [[f32; A]; M],
}

/// F(2×2, 3×3): interpolation points 0, ±1, ∞; every constant is 0, ±1 or ±½.
pub(crate) const F2: Transform<2, 4> = Transform {
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
pub(crate) const F4: Transform<4, 6> = Transform {
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
pub(crate) enum Choice {
    Im2col,
    F2,
    F4,
}

pub(crate) fn choose(c_in: usize, c_out: usize, ho: usize, wo: usize) -> Choice {
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

/// A raw output pointer shared by tasks that write disjoint rows of one buffer.
#[derive(Clone, Copy)]
struct Rows(*mut f32);
// SAFETY: every task writes output rows no other task touches (see `conv3x3`).
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
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

/// Stride-1 correlation of a contiguous (b, c_in, h, w) `x` with a contiguous
/// (c_out, c_in, 3, 3) `w`, zero `padding` (0..=2) on each side, plus an optional bias, into
/// a new (b, c_out, ho, wo) buffer. The caller has checked the shapes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3<const M: usize, const A: usize>(
    tf: &Transform<M, A>,
    x: &[f32],
    (b, c_in, h, wd): (usize, usize, usize, usize),
    w: &[f32],
    c_out: usize,
    bias: Option<&[f32]>,
    padding: usize,
    threads: usize,
) -> (Vec<f32>, usize, usize) {
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
    let out_rows = Rows(out.as_mut_ptr());
    let task = |t: usize| run_block(tf, &geom, x, &u, bias, out_rows, gemm_par, t);
    if outer_parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    (out, ho, wo)
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

/// One block (`t` counts blocks over all images): its input tiles transformed, one GEMM per
/// tile position, its output tiles transformed back into `out`. The transforms' loops run
/// along a row of tiles, so they vectorise; this picks the widest vectors the CPU has, with
/// the same arithmetic (no fused multiply-adds, the same order) and so the same results.
#[allow(clippy::too_many_arguments)]
fn run_block<const M: usize, const A: usize>(
    tf: &Transform<M, A>,
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    out: Rows,
    gemm_par: gemm::Parallelism,
    t: usize,
) {
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
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, checked just above.
                return unsafe { block_avx512(tf, g, x, u, bias, out, gemm_par, t, bufs) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { block_avx2(tf, g, x, u, bias, out, gemm_par, t, bufs) };
            }
        }
        block(tf, g, x, u, bias, out, gemm_par, t, bufs)
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512<const M: usize, const A: usize>(
    tf: &Transform<M, A>,
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    out: Rows,
    gemm_par: gemm::Parallelism,
    t: usize,
    bufs: Scratch,
) {
    block(tf, g, x, u, bias, out, gemm_par, t, bufs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2<const M: usize, const A: usize>(
    tf: &Transform<M, A>,
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    out: Rows,
    gemm_par: gemm::Parallelism,
    t: usize,
    bufs: Scratch,
) {
    block(tf, g, x, u, bias, out, gemm_par, t, bufs)
}

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
#[allow(clippy::too_many_arguments)]
fn block<const M: usize, const A: usize>(
    tf: &Transform<M, A>,
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    out: Rows,
    gemm_par: gemm::Parallelism,
    t: usize,
    bufs: Scratch,
) {
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
            for threads in [1, 2] {
                let (got, ho, wo) = conv3x3(tf, &x, dims, &w, c_out, Some(&bias), p, threads);
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
