//! generate.py's cutout augmentations (its kornia pipeline), differentiable with
//! respect to the image.
//!
//! Geometric augmentations compute, on the host, where each output pixel samples the
//! input, and then sample with bilinear weights through one `gather`, so the
//! gradient flows to the image exactly. Colour ones are elementwise or per-sample
//! 3×3 colour matrices. Every random draw comes from the job's ChaCha RNG, so a
//! seed fixes the augmentations and a checkpoint can carry their state.
//!
//! Departures from kornia, chosen for speed and differentiability: saturation and
//! hue jitter are linear colour-space operations (a blend with luma, a rotation of
//! the YIQ chroma plane) rather than a round trip through HSV; `Cr` is the identity,
//! as it is in generate.py, since its crop size equals the cutout size.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use super::spec::Augment;

/// The augmentations in the order given, as generate.py chains them.
#[derive(Debug, Clone)]
pub struct Augmentations {
    codes: Vec<Augment>,
}

impl Augmentations {
    pub fn new(codes: &[Augment]) -> Self {
        Self {
            codes: codes.to_vec(),
        }
    }

    pub fn codes(&self) -> &[Augment] {
        &self.codes
    }

    /// Augments a batch of cutouts (N,C,S,S) in [0,1].
    pub fn apply(&self, batch: &Tensor, rng: &mut ChaCha20Rng) -> candle_core::Result<Tensor> {
        let mut x = batch.clone();
        for &code in &self.codes {
            x = apply_one(code, &x, rng)?;
        }
        Ok(x)
    }
}

/// Applies one augmentation with generate.py's probability and strength.
pub fn apply_one(code: Augment, x: &Tensor, rng: &mut ChaCha20Rng) -> candle_core::Result<Tensor> {
    let (n, _, h, w) = x.dims4()?;
    match code {
        Augment::Ji => color_jitter(x, rng),
        Augment::Sh => sharpness(x, rng),
        Augment::Gn => {
            let applied = draw_applied(rng, n, 0.5, false);
            if !applied.iter().any(|&a| a) {
                return Ok(x.clone());
            }
            let mut noise = Vec::with_capacity(x.elem_count());
            let per_sample = x.elem_count() / n;
            for &a in &applied {
                for _ in 0..per_sample {
                    let v: f32 = StandardNormal.sample(rng);
                    noise.push(if a { v } else { 0.0 });
                }
            }
            x + Tensor::from_vec(noise, x.shape(), x.device())?.to_dtype(x.dtype())?
        }
        Augment::Pe => {
            let applied = draw_applied(rng, n, 0.7, false);
            let maps = applied
                .iter()
                .map(|&a| a.then(|| perspective_map(rng, h, w, 0.7)))
                .collect::<Vec<_>>();
            warp_projective(x, &maps)
        }
        Augment::Ro => {
            let applied = draw_applied(rng, n, 0.7, false);
            let maps = applied
                .iter()
                .map(|&a| {
                    a.then(|| {
                        let angle = rng.gen_range(-15.0f64..=15.0).to_radians();
                        affine_map(h, w, angle, (0.0, 0.0), 0.0)
                    })
                })
                .collect::<Vec<_>>();
            warp_projective(x, &maps)
        }
        Augment::Af => {
            let applied = draw_applied(rng, n, 0.7, false);
            let maps = applied
                .iter()
                .map(|&a| {
                    a.then(|| {
                        let angle = rng.gen_range(-15.0f64..=15.0).to_radians();
                        let tx = rng.gen_range(-0.1f64..=0.1) * w as f64;
                        let ty = rng.gen_range(-0.1f64..=0.1) * h as f64;
                        let shear = rng.gen_range(-5.0f64..=5.0).to_radians();
                        affine_map(h, w, angle, (tx, ty), shear)
                    })
                })
                .collect::<Vec<_>>();
            warp_projective(x, &maps)
        }
        Augment::Et => {
            let applied = draw_applied(rng, n, 0.7, false);
            let fields = applied
                .iter()
                .map(|&a| a.then(|| elastic_field(rng, h, w)))
                .collect::<Vec<_>>();
            sample_fields(x, &fields)
        }
        Augment::Ts => {
            // same_on_batch: one warp, applied to every cutout or to none.
            let applied = draw_applied(rng, n, 0.7, true);
            if !applied[0] {
                return Ok(x.clone());
            }
            let field = thin_plate_field(rng, h, w, 0.8);
            sample_fields(x, &vec![Some(field); n])
        }
        // generate.py crops S×S out of an S×S cutout: nothing moves.
        Augment::Cr => Ok(x.clone()),
        Augment::Er => erasing(x, rng),
        Augment::Re => {
            let applied = draw_applied(rng, n, 0.5, false);
            let maps = applied
                .iter()
                .map(|&a| a.then(|| resized_crop_map(rng, h, w)))
                .collect::<Vec<_>>();
            warp_projective(x, &maps)
        }
    }
}

/// Which samples an augmentation with probability `p` touches.
fn draw_applied(rng: &mut ChaCha20Rng, n: usize, p: f64, same_on_batch: bool) -> Vec<bool> {
    if same_on_batch {
        let a = rng.gen_bool(p);
        vec![a; n]
    } else {
        (0..n).map(|_| rng.gen_bool(p)).collect()
    }
}

/// A 3×3 matrix mapping output pixel coordinates to input pixel coordinates.
type Homography = [[f64; 3]; 3];

fn mat_mul(a: &Homography, b: &Homography) -> Homography {
    let mut m = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    m
}

fn invert(m: &Homography) -> Homography {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let c =
        |r0: usize, c0: usize, r1: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    [
        [
            c(1, 1, 2, 2) / det,
            -c(0, 1, 2, 2) / det,
            c(0, 1, 1, 2) / det,
        ],
        [
            -c(1, 0, 2, 2) / det,
            c(0, 0, 2, 2) / det,
            -c(0, 0, 1, 2) / det,
        ],
        [
            c(1, 0, 2, 1) / det,
            -c(0, 0, 2, 1) / det,
            c(0, 0, 1, 1) / det,
        ],
    ]
}

/// Rotation by `angle`, x-shear by `shear`, then translation, about the image centre;
/// returned as the inverse (output → input) map.
fn affine_map(h: usize, w: usize, angle: f64, translate: (f64, f64), shear: f64) -> Homography {
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let to_centre = [[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]];
    let back = [
        [1.0, 0.0, cx + translate.0],
        [0.0, 1.0, cy + translate.1],
        [0.0, 0.0, 1.0],
    ];
    let (s, c) = angle.sin_cos();
    let rotate = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
    let shear = [[1.0, -shear.tan(), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let forward = mat_mul(&back, &mat_mul(&rotate, &mat_mul(&shear, &to_centre)));
    invert(&forward)
}

/// kornia's RandomPerspective: each corner moves inward by up to
/// `distortion · half the side`; returns the output → input homography.
fn perspective_map(rng: &mut ChaCha20Rng, h: usize, w: usize, distortion: f64) -> Homography {
    let (wm, hm) = (w as f64 - 1.0, h as f64 - 1.0);
    let start = [(0.0, 0.0), (wm, 0.0), (wm, hm), (0.0, hm)];
    let inward = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)];
    let (fx, fy) = (distortion * w as f64 / 2.0, distortion * h as f64 / 2.0);
    let end: Vec<(f64, f64)> = start
        .iter()
        .zip(inward)
        .map(|(&(x, y), (dx, dy))| {
            (
                x + dx * fx * rng.gen::<f64>(),
                y + dy * fy * rng.gen::<f64>(),
            )
        })
        .collect();
    // The image's corners land on `end`; sampling needs end → start.
    homography_from_points(&end, &start)
}

/// The homography taking each `from[i]` to `to[i]` (four point pairs).
fn homography_from_points(from: &[(f64, f64)], to: &[(f64, f64)]) -> Homography {
    let mut a = [[0.0f64; 9]; 8];
    for i in 0..4 {
        let (x, y) = from[i];
        let (u, v) = to[i];
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
    }
    let rows: Vec<Vec<f64>> = a.iter().map(|r| r.to_vec()).collect();
    let h = solve(rows, 8);
    [[h[0], h[1], h[2]], [h[3], h[4], h[5]], [h[6], h[7], 1.0]]
}

/// Solves an n×n system given as augmented rows (n+1 columns), partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, n: usize) -> Vec<f64> {
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        let p = a[col][col];
        if p.abs() < 1e-12 {
            continue;
        }
        let pivot_row = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            let f = r[col] / p;
            if row != col && f != 0.0 {
                for (v, pv) in r.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * pv;
                }
            }
        }
    }
    (0..n)
        .map(|i| {
            if a[i][i].abs() < 1e-12 {
                0.0
            } else {
                a[i][n] / a[i][i]
            }
        })
        .collect()
}

/// kornia's RandomResizedCrop (scale 0.1–1, ratio 3/4–4/3), resampled to the full size.
fn resized_crop_map(rng: &mut ChaCha20Rng, h: usize, w: usize) -> Homography {
    let area = (h * w) as f64;
    let (lo, hi) = ((0.75f64).ln(), (1.333f64).ln());
    let mut crop = (w as f64, h as f64);
    for _ in 0..10 {
        let target = area * rng.gen_range(0.1..=1.0);
        let ratio = rng.gen_range(lo..=hi).exp();
        let cw = (target * ratio).sqrt();
        let ch = (target / ratio).sqrt();
        if cw <= w as f64 && ch <= h as f64 {
            crop = (cw, ch);
            break;
        }
    }
    let x0 = rng.gen_range(0.0..=(w as f64 - crop.0));
    let y0 = rng.gen_range(0.0..=(h as f64 - crop.1));
    let sx = (crop.0 - 1.0).max(0.0) / (w as f64 - 1.0).max(1.0);
    let sy = (crop.1 - 1.0).max(0.0) / (h as f64 - 1.0).max(1.0);
    [[sx, 0.0, x0], [0.0, sy, y0], [0.0, 0.0, 1.0]]
}

/// Input coordinates (x, y) in pixels for every output pixel of one sample.
type Field = Vec<(f32, f32)>;

fn field_from_map(m: &Homography, h: usize, w: usize) -> Field {
    let mut f = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let d = m[2][0] * xf + m[2][1] * yf + m[2][2];
            let sx = (m[0][0] * xf + m[0][1] * yf + m[0][2]) / d;
            let sy = (m[1][0] * xf + m[1][1] * yf + m[1][2]) / d;
            f.push((sx as f32, sy as f32));
        }
    }
    f
}

fn warp_projective(x: &Tensor, maps: &[Option<Homography>]) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let fields: Vec<Option<Field>> = maps
        .iter()
        .map(|m| m.as_ref().map(|m| field_from_map(m, h, w)))
        .collect();
    sample_fields(x, &fields)
}

/// Bilinear sampling with zero padding; `None` leaves a sample untouched.
pub fn sample_fields(x: &Tensor, fields: &[Option<Field>]) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if fields.iter().all(Option::is_none) {
        return Ok(x.clone());
    }
    let hw = h * w;
    let mut index = vec![0u32; n * 4 * hw];
    let mut weight = vec![0f32; n * 4 * hw];
    for (s, field) in fields.iter().enumerate() {
        let base = s * 4 * hw;
        match field {
            None => {
                for p in 0..hw {
                    index[base + p] = p as u32;
                    weight[base + p] = 1.0;
                }
            }
            Some(field) => {
                for (p, &(sx, sy)) in field.iter().enumerate() {
                    let (x0, y0) = (sx.floor(), sy.floor());
                    let (fx, fy) = (sx - x0, sy - y0);
                    let corners = [
                        (x0, y0, (1.0 - fx) * (1.0 - fy)),
                        (x0 + 1.0, y0, fx * (1.0 - fy)),
                        (x0, y0 + 1.0, (1.0 - fx) * fy),
                        (x0 + 1.0, y0 + 1.0, fx * fy),
                    ];
                    for (k, &(cx, cy, wt)) in corners.iter().enumerate() {
                        let inside = cx >= 0.0 && cy >= 0.0 && cx < w as f32 && cy < h as f32;
                        if inside && wt != 0.0 {
                            index[base + k * hw + p] = (cy as usize * w + cx as usize) as u32;
                            weight[base + k * hw + p] = wt;
                        }
                    }
                }
            }
        }
    }
    let dev = x.device();
    let index = Tensor::from_vec(index, (n, 1, 4 * hw), dev)?
        .broadcast_as((n, c, 4 * hw))?
        .contiguous()?;
    let weight = Tensor::from_vec(weight, (n, 1, 4, hw), dev)?.to_dtype(x.dtype())?;
    x.reshape((n, c, hw))?
        .gather(&index, 2)?
        .reshape((n, c, 4, hw))?
        .broadcast_mul(&weight)?
        .sum(2)?
        .reshape((n, c, h, w))
}

/// kornia's RandomElasticTransform defaults: uniform noise in [−1, 1] blurred by a
/// Gaussian (kernel 63, σ 32), α 1, as a displacement in normalised coordinates.
fn elastic_field(rng: &mut ChaCha20Rng, h: usize, w: usize) -> Field {
    let noise = |rng: &mut ChaCha20Rng| -> Vec<f64> {
        (0..h * w).map(|_| rng.gen_range(-1.0..=1.0)).collect()
    };
    let dx = gaussian_blur(&noise(rng), h, w, 63, 32.0);
    let dy = gaussian_blur(&noise(rng), h, w, 63, 32.0);
    let mut f = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            f.push((
                (x as f64 + dx[i] * w as f64 / 2.0) as f32,
                (y as f64 + dy[i] * h as f64 / 2.0) as f32,
            ));
        }
    }
    f
}

/// Separable Gaussian blur with reflect padding.
fn gaussian_blur(v: &[f64], h: usize, w: usize, kernel: usize, sigma: f64) -> Vec<f64> {
    let half = (kernel / 2) as isize;
    let taps: Vec<f64> = (-half..=half)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = taps.iter().sum();
    let taps: Vec<f64> = taps.iter().map(|t| t / total).collect();
    let reflect = |i: isize, len: usize| -> usize {
        let len = len as isize;
        if len == 1 {
            return 0;
        }
        let period = 2 * (len - 1);
        let j = i.rem_euclid(period);
        (if j >= len { period - j } else { j }) as usize
    };
    let mut rows = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = taps
                .iter()
                .enumerate()
                .map(|(k, t)| t * v[y * w + reflect(x as isize + k as isize - half, w)])
                .sum();
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = taps
                .iter()
                .enumerate()
                .map(|(k, t)| t * rows[reflect(y as isize + k as isize - half, h) * w + x])
                .sum();
        }
    }
    out
}

/// kornia's RandomThinPlateSpline: the four corners and the centre (normalised
/// coordinates) each move by up to `scale`; a thin-plate spline through the moved
/// points gives where each output pixel samples.
fn thin_plate_field(rng: &mut ChaCha20Rng, h: usize, w: usize, scale: f64) -> Field {
    let src = [
        (-1.0, -1.0),
        (-1.0, 1.0),
        (1.0, -1.0),
        (1.0, 1.0),
        (0.0, 0.0),
    ];
    let dst: Vec<(f64, f64)> = src
        .iter()
        .map(|&(x, y)| {
            (
                x + rng.gen_range(-scale..=scale),
                y + rng.gen_range(-scale..=scale),
            )
        })
        .collect();
    let kernel = |a: (f64, f64), b: (f64, f64)| {
        let r2 = (a.0 - b.0).powi(2) + (a.1 - b.1).powi(2);
        if r2 == 0.0 {
            0.0
        } else {
            r2 * r2.sqrt().ln()
        }
    };
    // Fit f with f(dst_i) = src_i: output positions at the moved points sample the
    // original control points.
    let fit = |values: [f64; 5]| -> Vec<f64> {
        let mut rows = vec![vec![0.0; 9]; 8];
        for i in 0..5 {
            for j in 0..5 {
                rows[i][j] = kernel(dst[i], dst[j]);
            }
            rows[i][5] = 1.0;
            rows[i][6] = dst[i].0;
            rows[i][7] = dst[i].1;
            rows[5][i] = 1.0;
            rows[6][i] = dst[i].0;
            rows[7][i] = dst[i].1;
            rows[i][8] = values[i];
        }
        solve(rows, 8)
    };
    let cx = fit(src.map(|p| p.0));
    let cy = fit(src.map(|p| p.1));
    let eval = |c: &[f64], p: (f64, f64)| -> f64 {
        let bend: f64 = (0..5).map(|i| c[i] * kernel(p, dst[i])).sum();
        bend + c[5] + c[6] * p.0 + c[7] * p.1
    };
    let mut f = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let p = (
                2.0 * x as f64 / (w as f64 - 1.0).max(1.0) - 1.0,
                2.0 * y as f64 / (h as f64 - 1.0).max(1.0) - 1.0,
            );
            let (sx, sy) = (eval(&cx, p), eval(&cy, p));
            f.push((
                ((sx + 1.0) / 2.0 * (w as f64 - 1.0)) as f32,
                ((sy + 1.0) / 2.0 * (h as f64 - 1.0)) as f32,
            ));
        }
    }
    f
}

/// kornia's ColorJitter(0.1, 0.1, 0.1, 0.1, p=0.7): brightness, contrast, saturation
/// and hue in a random order, with per-sample factors, clamped to [0, 1] after each.
fn color_jitter(x: &Tensor, rng: &mut ChaCha20Rng) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let applied = draw_applied(rng, n, 0.7, false);
    if !applied.iter().any(|&a| a) || c != 3 {
        return Ok(x.clone());
    }
    let mut factor = |neutral: f64, lo: f64, hi: f64| -> Vec<f32> {
        applied
            .iter()
            .map(|&a| {
                if a {
                    rng.gen_range(lo..=hi) as f32
                } else {
                    neutral as f32
                }
            })
            .collect()
    };
    let brightness = factor(1.0, 0.9, 1.1);
    let contrast = factor(1.0, 0.9, 1.1);
    let saturation = factor(1.0, 0.9, 1.1);
    let hue = factor(0.0, -0.1, 0.1);
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);

    let dev = x.device();
    let per_sample = |v: Vec<f32>| -> candle_core::Result<Tensor> {
        Tensor::from_vec(v, (n, 1, 1, 1), dev)?.to_dtype(x.dtype())
    };
    let mut y = x.clone();
    for op in order {
        y = match op {
            0 => y.broadcast_add(&(per_sample(brightness.clone())? - 1.0)?)?,
            1 => y.broadcast_mul(&per_sample(contrast.clone())?)?,
            2 => {
                let luma = luma(&y)?;
                let s = per_sample(saturation.clone())?;
                (y.broadcast_sub(&luma)?.broadcast_mul(&s)?).broadcast_add(&luma)?
            }
            _ => {
                let m: Vec<f32> = hue.iter().flat_map(|&t| hue_rotation(t as f64)).collect();
                let m = Tensor::from_vec(m, (n, 3, 3), dev)?.to_dtype(x.dtype())?;
                m.matmul(&y.reshape((n, 3, h * w))?)?
                    .reshape((n, 3, h, w))?
            }
        }
        .clamp(0.0, 1.0)?;
    }
    Ok(y)
}

/// Rec. 601 luma, (N,1,H,W).
fn luma(x: &Tensor) -> candle_core::Result<Tensor> {
    let wts = Tensor::new(&[0.299f32, 0.587, 0.114], x.device())?
        .to_dtype(x.dtype())?
        .reshape((1, 3, 1, 1))?;
    x.broadcast_mul(&wts)?.sum_keepdim(1)
}

/// The RGB matrix rotating hue by `turns` of a full circle (in YIQ), row-major.
fn hue_rotation(turns: f64) -> [f32; 9] {
    let to_yiq = [
        [0.299, 0.587, 0.114],
        [0.596, -0.274, -0.322],
        [0.211, -0.523, 0.312],
    ];
    let (s, c) = (turns * std::f64::consts::TAU).sin_cos();
    let rotate = [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]];
    let m = mat_mul(&invert(&to_yiq), &mat_mul(&rotate, &to_yiq));
    let mut out = [0f32; 9];
    for i in 0..3 {
        for j in 0..3 {
            out[i * 3 + j] = m[i][j] as f32;
        }
    }
    out
}

/// kornia's RandomSharpness(0.3, p=0.5): blend toward the PIL smoothing filter with a
/// factor in [0, 0.3] (0 is fully smoothed); borders keep their pixels.
fn sharpness(x: &Tensor, rng: &mut ChaCha20Rng) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let applied = draw_applied(rng, n, 0.5, false);
    if !applied.iter().any(|&a| a) || h < 3 || w < 3 {
        return Ok(x.clone());
    }
    let factors: Vec<f32> = applied
        .iter()
        .map(|&a| if a { rng.gen_range(0.0..=0.3) } else { 1.0 })
        .collect();
    let kernel = Tensor::new(&[[1f32, 1., 1.], [1., 5., 1.], [1., 1., 1.]], x.device())?
        .to_dtype(x.dtype())?
        .affine(1.0 / 13.0, 0.0)?
        .reshape((1, 1, 3, 3))?
        .repeat((c, 1, 1, 1))?;
    let smooth = x.conv2d(&kernel, 0, 1, 1, c)?.clamp(0.0, 1.0)?; // (n, c, h-2, w-2)
    let smooth = smooth.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut interior = vec![0f32; h * w];
    for y in 1..h - 1 {
        for xx in 1..w - 1 {
            interior[y * w + xx] = 1.0;
        }
    }
    let interior = Tensor::from_vec(interior, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    // Where interior: smooth + f·(x − smooth); on the border: x.
    let f = Tensor::from_vec(factors, (n, 1, 1, 1), x.device())?.to_dtype(x.dtype())?;
    let blended = (x - &smooth)?.broadcast_mul(&f)?.add(&smooth)?;
    let border = (1.0 - &interior)?;
    (blended.broadcast_mul(&interior)? + x.broadcast_mul(&border)?)?.clamp(0.0, 1.0)
}

/// kornia's RandomErasing(scale 0.1–0.4, ratio 0.3–3.3, same_on_batch, p=0.7): one
/// rectangle of every cutout set to 0.
fn erasing(x: &Tensor, rng: &mut ChaCha20Rng) -> candle_core::Result<Tensor> {
    let (n, _, h, w) = x.dims4()?;
    if !draw_applied(rng, n, 0.7, true)[0] {
        return Ok(x.clone());
    }
    let area = (h * w) as f64 * rng.gen_range(0.1..=0.4);
    let ratio = rng.gen_range((0.3f64).ln()..=(1.0f64 / 0.3).ln()).exp();
    let eh = ((area * ratio).sqrt().round() as usize).clamp(1, h);
    let ew = ((area / ratio).sqrt().round() as usize).clamp(1, w);
    let y0 = rng.gen_range(0..=h - eh);
    let x0 = rng.gen_range(0..=w - ew);
    let mut keep = vec![1f32; h * w];
    for y in y0..y0 + eh {
        for xx in x0..x0 + ew {
            keep[y * w + xx] = 0.0;
        }
    }
    let keep = Tensor::from_vec(keep, (1, 1, h, w), &Device::Cpu)?
        .to_device(x.device())?
        .to_dtype(x.dtype())?;
    x.broadcast_mul(&keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::gradcheck::check_gradient;
    use rand::SeedableRng;

    fn image(n: usize, s: usize) -> Tensor {
        let data: Vec<f32> = (0..n * 3 * s * s)
            .map(|i| 0.5 + 0.4 * ((i as f32) * 0.731 + 0.2).sin())
            .collect();
        Tensor::from_vec(data, (n, 3, s, s), &Device::Cpu).unwrap()
    }

    /// A seed for which the augmentation touches at least one sample: the gradient
    /// check must exercise the augmentation, not the pass-through.
    fn seed_that_applies(code: Augment, x: &Tensor) -> u64 {
        (0..64)
            .find(|&seed| {
                let y = apply_one(code, x, &mut ChaCha20Rng::seed_from_u64(seed)).unwrap();
                let d = (y - x).unwrap().abs().unwrap().max_all().unwrap();
                d.to_scalar::<f32>().unwrap() > 1e-3
            })
            .expect("augmentation never applied in 64 seeds")
    }

    #[test]
    fn every_augmentation_changes_the_image_and_has_correct_gradients() {
        let x = image(3, 12);
        for code in [
            Augment::Ji,
            Augment::Sh,
            Augment::Gn,
            Augment::Pe,
            Augment::Ro,
            Augment::Af,
            Augment::Et,
            Augment::Ts,
            Augment::Er,
            Augment::Re,
        ] {
            let seed = seed_that_applies(code, &x);
            let f = |t: &Tensor| apply_one(code, t, &mut ChaCha20Rng::seed_from_u64(seed));
            check_gradient(&x, f, 1e-4);
        }
    }

    #[test]
    fn crop_is_identity_at_cutout_size() {
        let x = image(2, 8);
        let y = apply_one(Augment::Cr, &x, &mut ChaCha20Rng::seed_from_u64(0)).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn same_seed_same_augmentation() {
        let x = image(4, 10);
        let augs = Augmentations::new(&[Augment::Af, Augment::Pe, Augment::Ji, Augment::Er]);
        let a = augs.apply(&x, &mut ChaCha20Rng::seed_from_u64(9)).unwrap();
        let b = augs.apply(&x, &mut ChaCha20Rng::seed_from_u64(9)).unwrap();
        let c = augs.apply(&x, &mut ChaCha20Rng::seed_from_u64(10)).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
    }

    #[test]
    fn geometry_maps_behave() {
        // A zero rotation without translation or shear samples each pixel in place.
        let m = affine_map(5, 7, 0.0, (0.0, 0.0), 0.0);
        let f = field_from_map(&m, 5, 7);
        assert!(f.iter().enumerate().all(|(i, &(x, y))| {
            (x - (i % 7) as f32).abs() < 1e-5 && (y - (i / 7) as f32).abs() < 1e-5
        }));
        // Translating by +2 px in x makes output pixel x sample input x − 2.
        let m = affine_map(5, 7, 0.0, (2.0, 0.0), 0.0);
        assert!((field_from_map(&m, 5, 7)[3].0 - 1.0).abs() < 1e-5);
        // The perspective homography maps the moved corners back onto the originals.
        let from = [(1.0, 2.0), (9.0, 0.5), (8.0, 7.0), (0.0, 8.0)];
        let to = [(0.0, 0.0), (9.0, 0.0), (9.0, 9.0), (0.0, 9.0)];
        let hm = homography_from_points(&from, &to);
        for (&(x, y), &(u, v)) in from.iter().zip(&to) {
            let d = hm[2][0] * x + hm[2][1] * y + hm[2][2];
            assert!(((hm[0][0] * x + hm[0][1] * y + hm[0][2]) / d - u).abs() < 1e-9);
            assert!(((hm[1][0] * x + hm[1][1] * y + hm[1][2]) / d - v).abs() < 1e-9);
        }
        // The hue rotation keeps grey grey.
        let m = hue_rotation(0.07);
        for row in 0..3 {
            assert!((m[row * 3] + m[row * 3 + 1] + m[row * 3 + 2] - 1.0).abs() < 1e-5);
        }
    }
}
