//! generate.py's cutout augmentations (its kornia pipelines), differentiable with
//! respect to the image and equal to kornia's for the same sampled parameters.
//!
//! Each augmentation runs in two halves, as a kornia module does: [`Kornia::sample`]
//! draws the parameters for a batch ([`AugmentParams`], from the job's ChaCha RNG, so
//! a seed fixes them and a checkpoint can carry their state), and
//! [`AugmentParams::apply`] applies them. Tests and the replay hook feed kornia's own
//! parameters into the second half.
//!
//! Geometric augmentations compute, on the host, where each output pixel samples the
//! input (kornia's pixel-space matrices, inverted), then sample with bilinear weights
//! through one `gather`, so the gradient flows to the image exactly. Colour ones are
//! elementwise; hue goes through kornia's HSV round trip, with its piecewise branches
//! picked by masks computed from the values (torch's `where` differentiates the same
//! way). Saturation is what kornia 0.9's `ColorJitter` does, a blend with grey (the
//! HSV saturation is its `ColorJiggle`'s). The reference is kornia 0.9 on torch 2.15,
//! whose `clamp` passes no gradient at the bounds themselves.
//!
//! Known departure: kornia replaces a `RandomResizedCrop` box that is one pixel wide
//! with a column copy; boxes cover at least 10% of the area here, so that only
//! happens for cutouts of 4 px or less, which no CLIP uses.

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use super::ops::{apply_gather, gather_kernels, GatherKernel, Sample};
use super::spec::{Augment, CutMethod};
use crate::models::cpu::ELEMENTWISE_CHUNK;
use rayon::prelude::*;

/// One kornia augmentation module, configured as generate.py configures it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kornia {
    /// `ColorJitter(brightness, contrast, saturation, hue, p)`.
    ColorJitter {
        brightness: f64,
        contrast: f64,
        saturation: f64,
        hue: f64,
        p: f64,
    },
    /// `RandomSharpness(sharpness, p)`.
    Sharpness { sharpness: f64, p: f64 },
    /// `RandomGaussianNoise(mean=0, std, p)`.
    GaussianNoise { std: f64, p: f64 },
    /// `RandomPerspective(distortion_scale, p)`.
    Perspective { distortion: f64, p: f64 },
    /// `RandomRotation(degrees, p)`.
    Rotation { degrees: f64, p: f64 },
    /// `RandomAffine(degrees, translate, shear, padding_mode, p)`.
    Affine {
        degrees: f64,
        translate: f64,
        shear: f64,
        border: bool,
        p: f64,
    },
    /// `RandomElasticTransform(p)`: kernel 63, σ 32, α 1.
    Elastic { p: f64 },
    /// `RandomThinPlateSpline(scale, same_on_batch=True, p)`.
    ThinPlate { scale: f64, p: f64 },
    /// `RandomCrop(cut_size, pad_if_needed, reflect)` on a cutout of that very size.
    Crop,
    /// `RandomErasing((.1, .4), (.3, 1/.3), same_on_batch=True, p)`.
    Erasing { p: f64 },
    /// `RandomResizedCrop(cut_size, scale (0.1, 1), ratio (0.75, 1.333), resample, p)`.
    ResizedCrop { p: f64 },
    /// `RandomHorizontalFlip(p)`.
    HorizontalFlip { p: f64 },
}

impl Kornia {
    /// An augmentation code as generate.py's `MakeCutouts` (`latest`) builds it; `nr`
    /// is `MakeCutoutsNRUpdate`, which differs in perspective and affine strength.
    pub fn from_code(code: Augment, nr: bool) -> Self {
        match code {
            Augment::Ji => Kornia::ColorJitter {
                brightness: 0.1,
                contrast: 0.1,
                saturation: 0.1,
                hue: 0.1,
                p: 0.7,
            },
            Augment::Sh => Kornia::Sharpness {
                sharpness: 0.3,
                p: 0.5,
            },
            Augment::Gn => Kornia::GaussianNoise { std: 1.0, p: 0.5 },
            Augment::Pe => Kornia::Perspective {
                distortion: if nr { 0.5 } else { 0.7 },
                p: 0.7,
            },
            Augment::Ro => Kornia::Rotation {
                degrees: 15.0,
                p: 0.7,
            },
            Augment::Af => Kornia::Affine {
                degrees: if nr { 30.0 } else { 15.0 },
                translate: 0.1,
                shear: 5.0,
                border: false,
                p: 0.7,
            },
            Augment::Et => Kornia::Elastic { p: 0.7 },
            Augment::Ts => Kornia::ThinPlate { scale: 0.8, p: 0.7 },
            Augment::Cr => Kornia::Crop,
            Augment::Er => Kornia::Erasing { p: 0.7 },
            Augment::Re => Kornia::ResizedCrop { p: 0.5 },
        }
    }

    /// Draws this module's parameters for a batch of `n` cutouts of `h`×`w` pixels,
    /// with kornia's distributions.
    pub fn sample(
        &self,
        rng: &mut ChaCha20Rng,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> AugmentParams {
        let (hf, wf) = (h as f64, w as f64);
        match *self {
            Kornia::ColorJitter {
                brightness,
                contrast,
                saturation,
                hue,
                p,
            } => {
                let applied = draw_applied(rng, n, p, false);
                let mut around = |v: f64| -> f32 {
                    if v > 0.0 {
                        rng.gen_range((1.0 - v).max(0.0)..=1.0 + v) as f32
                    } else {
                        1.0
                    }
                };
                let mut factors = Vec::with_capacity(n);
                for _ in 0..n {
                    let b = around(brightness);
                    let ct = around(contrast);
                    let s = around(saturation);
                    factors.push([b, ct, s, 0.0]);
                }
                for f in &mut factors {
                    f[3] = if hue > 0.0 {
                        rng.gen_range(-hue..=hue) as f32
                    } else {
                        0.0
                    };
                }
                let mut order = vec![0usize, 1, 2, 3];
                order.shuffle(rng);
                AugmentParams::Jitter {
                    applied,
                    factors,
                    order,
                }
            }
            Kornia::Sharpness { sharpness, p } => {
                let applied = draw_applied(rng, n, p, false);
                let factors = (0..n)
                    .map(|_| rng.gen_range(0.0..=sharpness) as f32)
                    .collect();
                AugmentParams::Sharpness { applied, factors }
            }
            Kornia::GaussianNoise { std, p } => {
                let applied = draw_applied(rng, n, p, false);
                let noise = (0..n * c * h * w)
                    .map(|_| {
                        let v: f64 = StandardNormal.sample(rng);
                        (v * std) as f32
                    })
                    .collect();
                AugmentParams::Noise { applied, noise }
            }
            Kornia::Perspective { distortion, p } => {
                let applied = draw_applied(rng, n, p, false);
                let start = corners(wf, hf);
                let inward = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)];
                let (fx, fy) = (distortion * wf / 2.0, distortion * hf / 2.0);
                let matrices = (0..n)
                    .map(|_| {
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
                        homography_from_points(&start, &end)
                    })
                    .collect();
                AugmentParams::Warp {
                    applied,
                    matrices,
                    border: false,
                }
            }
            Kornia::Rotation { degrees, p } => {
                let applied = draw_applied(rng, n, p, false);
                let matrices = (0..n)
                    .map(|_| rotation_matrix(h, w, rng.gen_range(-degrees..=degrees)))
                    .collect();
                AugmentParams::Warp {
                    applied,
                    matrices,
                    border: false,
                }
            }
            Kornia::Affine {
                degrees,
                translate,
                shear,
                border,
                p,
            } => {
                let applied = draw_applied(rng, n, p, false);
                let matrices = (0..n)
                    .map(|_| {
                        let angle = rng.gen_range(-degrees..=degrees);
                        // kornia 0.9 reads a scalar `translate` as vertical only: its
                        // horizontal translations are all 0.
                        let tx = 0.0;
                        let ty = rng.gen_range(-translate..=translate) * hf;
                        let sx = if shear > 0.0 {
                            rng.gen_range(-shear..=shear)
                        } else {
                            0.0
                        };
                        let centre = ((wf - 1.0) / 2.0, (hf - 1.0) / 2.0);
                        affine_matrix((tx, ty), centre, (1.0, 1.0), angle, (sx, 0.0))
                    })
                    .collect();
                AugmentParams::Warp {
                    applied,
                    matrices,
                    border,
                }
            }
            Kornia::Elastic { p } => {
                let applied = draw_applied(rng, n, p, false);
                let noise = (0..n * 2 * h * w)
                    .map(|_| rng.gen_range(-1.0f32..=1.0))
                    .collect();
                AugmentParams::Elastic { applied, noise }
            }
            Kornia::ThinPlate { scale, p } => {
                let applied = draw_applied(rng, n, p, true);
                let mut dst = TPS_SOURCE;
                for pt in &mut dst {
                    pt.0 += rng.gen_range(-scale..=scale);
                    pt.1 += rng.gen_range(-scale..=scale);
                }
                AugmentParams::ThinPlate {
                    applied,
                    dst: vec![dst; n],
                }
            }
            Kornia::Crop => AugmentParams::Identity,
            Kornia::Erasing { p } => {
                let applied = draw_applied(rng, n, p, true);
                let area = hf * wf * rng.gen_range(0.1..=0.4);
                let ratio = rng.gen_range((0.3f64).ln()..=(1.0f64 / 0.3).ln()).exp();
                let eh = ((area * ratio).sqrt().round() as usize).clamp(1, h);
                let ew = ((area / ratio).sqrt().round() as usize).clamp(1, w);
                let y = rng.gen_range(0..=h - eh);
                let x = rng.gen_range(0..=w - ew);
                AugmentParams::Erase {
                    applied,
                    rect: Rect { x, y, w: ew, h: eh },
                }
            }
            Kornia::ResizedCrop { p } => {
                // kornia draws its p for the whole batch (p_batch).
                let applied = draw_applied(rng, n, p, true);
                let matrices = (0..n).map(|_| resized_crop_matrix(rng, h, w)).collect();
                AugmentParams::Warp {
                    applied,
                    matrices,
                    border: false,
                }
            }
            Kornia::HorizontalFlip { p } => {
                let applied = draw_applied(rng, n, p, false);
                let flip = [[-1.0, 0.0, wf - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
                AugmentParams::Warp {
                    applied,
                    matrices: vec![flip; n],
                    border: false,
                }
            }
        }
    }
}

/// A rectangle of pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

/// A 3×3 matrix in pixel coordinates; warps hold kornia's `transform`, which maps an
/// input pixel to where it lands in the output.
pub type Homography = [[f64; 3]; 3];

/// One augmentation's parameters for a batch, one entry per cutout; `applied` says
/// which cutouts it touches (kornia's `batch_prob`).
#[derive(Debug, Clone, PartialEq)]
pub enum AugmentParams {
    Identity,
    /// Brightness, contrast, saturation factors and hue in turns, applied in `order`
    /// (0 brightness, 1 contrast, 2 saturation, 3 hue).
    Jitter {
        applied: Vec<bool>,
        factors: Vec<[f32; 4]>,
        order: Vec<usize>,
    },
    Sharpness {
        applied: Vec<bool>,
        factors: Vec<f32>,
    },
    /// Additive noise, (N, C, H, W) row-major.
    Noise {
        applied: Vec<bool>,
        noise: Vec<f32>,
    },
    /// Projective warps; `border` clamps samples to the edge instead of zero padding.
    Warp {
        applied: Vec<bool>,
        matrices: Vec<Homography>,
        border: bool,
    },
    /// Elastic noise in [−1, 1], (N, 2, H, W): x then y displacement before blurring.
    Elastic {
        applied: Vec<bool>,
        noise: Vec<f32>,
    },
    /// Where the thin-plate spline moves kornia's five control points (normalised).
    ThinPlate {
        applied: Vec<bool>,
        dst: Vec<[(f64, f64); 5]>,
    },
    /// One rectangle set to 0 in every applied cutout.
    Erase {
        applied: Vec<bool>,
        rect: Rect,
    },
}

impl AugmentParams {
    /// kornia's `RandomPerspective` / `RandomResizedCrop` transform from its points.
    pub fn warp_from_points(
        applied: Vec<bool>,
        start: &[[(f64, f64); 4]],
        end: &[[(f64, f64); 4]],
    ) -> Self {
        let matrices = start
            .iter()
            .zip(end)
            .map(|(s, e)| homography_from_points(s, e))
            .collect();
        AugmentParams::Warp {
            applied,
            matrices,
            border: false,
        }
    }

    /// kornia's `RandomRotation` transform from its angles in degrees.
    pub fn rotation(applied: Vec<bool>, degrees: &[f64], h: usize, w: usize) -> Self {
        AugmentParams::Warp {
            applied,
            matrices: degrees.iter().map(|&d| rotation_matrix(h, w, d)).collect(),
            border: false,
        }
    }

    /// kornia's `RandomAffine` transform from its parameters (angles in degrees).
    #[allow(clippy::too_many_arguments)]
    pub fn affine(
        applied: Vec<bool>,
        translations: &[(f64, f64)],
        centres: &[(f64, f64)],
        scales: &[(f64, f64)],
        angles: &[f64],
        shears: &[(f64, f64)],
        border: bool,
    ) -> Self {
        let matrices = (0..angles.len())
            .map(|i| affine_matrix(translations[i], centres[i], scales[i], angles[i], shears[i]))
            .collect();
        AugmentParams::Warp {
            applied,
            matrices,
            border,
        }
    }

    /// Applies the parameters to a batch (N, C, H, W) in [0, 1].
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let (applied, per_cutout) = match self {
            AugmentParams::Identity => return Ok(x.clone()),
            AugmentParams::Jitter {
                applied, factors, ..
            } => (applied, factors.len()),
            AugmentParams::Sharpness { applied, factors } => (applied, factors.len()),
            AugmentParams::Noise { applied, noise } => {
                (applied, noise.len() / (x.elem_count() / n).max(1))
            }
            AugmentParams::Warp {
                applied, matrices, ..
            } => (applied, matrices.len()),
            AugmentParams::Elastic { applied, noise } => {
                (applied, noise.len() / (2 * h * w).max(1))
            }
            AugmentParams::ThinPlate { applied, dst } => (applied, dst.len()),
            AugmentParams::Erase { applied, .. } => (applied, n),
        };
        if applied.len() != n || per_cutout != n {
            candle_core::bail!(
                "augmentation parameters for {} cutouts ({per_cutout} sets), batch of {n}",
                applied.len()
            );
        }
        match self {
            AugmentParams::Identity => Ok(x.clone()),
            AugmentParams::Jitter {
                applied,
                factors,
                order,
            } => {
                if !applied.iter().any(|&a| a) {
                    return Ok(x.clone());
                }
                select(applied, &color_jitter(x, applied, factors, order)?, x)
            }
            AugmentParams::Sharpness { applied, factors } => {
                if !applied.iter().any(|&a| a) || h < 3 || w < 3 {
                    return Ok(x.clone());
                }
                select(applied, &sharpness(x, factors)?, x)
            }
            AugmentParams::Noise { applied, noise } => {
                if !applied.iter().any(|&a| a) {
                    return Ok(x.clone());
                }
                let per = x.elem_count() / n;
                let masked: Vec<f32> = noise
                    .chunks(per)
                    .zip(applied)
                    .flat_map(|(c, &a)| c.iter().map(move |&v| if a { v } else { 0.0 }))
                    .collect();
                if masked.len() != x.elem_count() {
                    candle_core::bail!("noise of {} values for {:?}", noise.len(), x.shape());
                }
                x + Tensor::from_vec(masked, x.shape(), x.device())?.to_dtype(x.dtype())?
            }
            AugmentParams::Warp {
                applied,
                matrices,
                border,
            } => {
                let fields: Vec<Option<Field>> = applied
                    .iter()
                    .zip(matrices)
                    .map(|(&a, m)| a.then(|| field_from_map(&invert(m), h, w)))
                    .collect();
                sample_fields(x, fields, *border)
            }
            AugmentParams::Elastic { applied, noise } => {
                let per = 2 * h * w;
                let fields: Vec<Option<Field>> = applied
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| a.then(|| elastic_field(&noise[i * per..(i + 1) * per], h, w)))
                    .collect();
                sample_fields(x, fields, false)
            }
            AugmentParams::ThinPlate { applied, dst } => {
                let fields: Vec<Option<Field>> = applied
                    .iter()
                    .zip(dst)
                    .map(|(&a, d)| a.then(|| thin_plate_field(d, h, w)))
                    .collect();
                sample_fields(x, fields, false)
            }
            AugmentParams::Erase { applied, rect } => {
                let mut keep = vec![1f32; n * h * w];
                for (i, _) in applied.iter().enumerate().filter(|(_, &a)| a) {
                    for y in rect.y..(rect.y + rect.h).min(h) {
                        for xx in rect.x..(rect.x + rect.w).min(w) {
                            keep[i * h * w + y * w + xx] = 0.0;
                        }
                    }
                }
                let keep = Tensor::from_vec(keep, (n, 1, h, w), &Device::Cpu)?
                    .to_device(x.device())?
                    .to_dtype(x.dtype())?;
                x.broadcast_mul(&keep)
            }
        }
    }
}

/// A cut method's kornia pipeline, in order.
#[derive(Debug, Clone)]
pub struct Augmentations {
    modules: Vec<Kornia>,
}

impl Augmentations {
    /// generate.py's `MakeCutouts` (`latest`) list from augmentation codes.
    pub fn new(codes: &[Augment]) -> Self {
        Self {
            modules: codes.iter().map(|&c| Kornia::from_code(c, false)).collect(),
        }
    }

    /// The pipeline a cut method uses: `latest` and `nrupdated` follow the codes (with
    /// `MakeCutoutsNRUpdate`'s strengths for the latter), `updated` and
    /// `updatedpooling` have fixed lists, `original` none.
    pub fn for_method(method: CutMethod, codes: &[Augment]) -> Self {
        let modules = match method {
            CutMethod::Original => Vec::new(),
            CutMethod::Latest => return Self::new(codes),
            CutMethod::Nrupdated => codes.iter().map(|&c| Kornia::from_code(c, true)).collect(),
            // MakeCutoutsUpdate.
            CutMethod::Updated => vec![
                Kornia::HorizontalFlip { p: 0.5 },
                Kornia::ColorJitter {
                    brightness: 0.0,
                    contrast: 0.0,
                    saturation: 0.01,
                    hue: 0.01,
                    p: 0.7,
                },
                Kornia::Sharpness {
                    sharpness: 0.3,
                    p: 0.4,
                },
                Kornia::Affine {
                    degrees: 30.0,
                    translate: 0.1,
                    shear: 0.0,
                    border: true,
                    p: 0.8,
                },
                Kornia::Perspective {
                    distortion: 0.2,
                    p: 0.4,
                },
            ],
            // MakeCutoutsPoolingUpdate.
            CutMethod::Updatedpooling => vec![
                Kornia::Affine {
                    degrees: 15.0,
                    translate: 0.1,
                    shear: 0.0,
                    border: true,
                    p: 0.7,
                },
                Kornia::Perspective {
                    distortion: 0.7,
                    p: 0.7,
                },
                Kornia::ColorJitter {
                    brightness: 0.0,
                    contrast: 0.0,
                    saturation: 0.1,
                    hue: 0.1,
                    p: 0.7,
                },
                Kornia::Erasing { p: 0.7 },
            ],
        };
        Self { modules }
    }

    pub fn modules(&self) -> &[Kornia] {
        &self.modules
    }

    /// Draws every module's parameters for a batch (N,C,H,W), in pipeline order.
    pub fn sample(
        &self,
        shape: (usize, usize, usize, usize),
        rng: &mut ChaCha20Rng,
    ) -> Vec<AugmentParams> {
        let (n, c, h, w) = shape;
        self.modules
            .iter()
            .map(|m| m.sample(rng, n, c, h, w))
            .collect()
    }

    /// Augments a batch of cutouts (N,C,S,S) in [0,1].
    pub fn apply(&self, batch: &Tensor, rng: &mut ChaCha20Rng) -> candle_core::Result<Tensor> {
        let params = self.sample(batch.dims4()?, rng);
        apply_all(batch, &params)
    }
}

/// Applies parameters in order.
pub fn apply_all(batch: &Tensor, params: &[AugmentParams]) -> candle_core::Result<Tensor> {
    let mut x = batch.clone();
    for p in params {
        x = p.apply(&x)?;
    }
    Ok(x)
}

/// Which samples an augmentation with probability `p` touches.
fn draw_applied(rng: &mut ChaCha20Rng, n: usize, p: f64, same_on_batch: bool) -> Vec<bool> {
    if same_on_batch {
        let a = rng.gen_bool(p.clamp(0.0, 1.0));
        vec![a; n]
    } else {
        (0..n).map(|_| rng.gen_bool(p.clamp(0.0, 1.0))).collect()
    }
}

/// `augmented` where `applied`, `x` elsewhere (per cutout).
fn select(applied: &[bool], augmented: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if applied.iter().all(|&a| a) {
        return Ok(augmented.clone());
    }
    let n = applied.len();
    let m: Vec<f32> = applied.iter().map(|&a| if a { 1.0 } else { 0.0 }).collect();
    let m = Tensor::from_vec(m, (n, 1, 1, 1), x.device())?.to_dtype(x.dtype())?;
    augmented.broadcast_mul(&m)? + x.broadcast_mul(&(1.0 - m)?)?
}

/// kornia's `_clamp_unit_range`: clamps to [0, 1] with the gradient passed on the
/// closed range (candle's clamp halves it at the bounds).
fn clamp_unit_range(x: &Tensor) -> candle_core::Result<Tensor> {
    if gather_kernels(x) {
        return apply_gather(x, UnitClamp { closed: true });
    }
    let xd = x.detach();
    let inside = xd.ge(0.0)?.mul(&xd.le(1.0)?)?.to_dtype(x.dtype())?;
    clamp_with_mask(x, &xd, inside)
}

/// torch's `clamp(0, 1)` as the reference torch (2.15) differentiates it: no
/// gradient at the bounds themselves, only strictly inside.
fn clamp01(x: &Tensor) -> candle_core::Result<Tensor> {
    if gather_kernels(x) {
        return apply_gather(x, UnitClamp { closed: false });
    }
    let xd = x.detach();
    let inside = xd.gt(0.0)?.mul(&xd.lt(1.0)?)?.to_dtype(x.dtype())?;
    clamp_with_mask(x, &xd, inside)
}

fn clamp_with_mask(x: &Tensor, xd: &Tensor, inside: Tensor) -> candle_core::Result<Tensor> {
    let value = xd.clamp(0.0, 1.0)?;
    // inside·x + (1 − inside)·clamped: x's value and slope where inside, a constant out.
    (x * &inside)? + (value * (1.0 - inside)?)?
}

/// The clamps to [0, 1] as one pass each way, keeping only the input for the backward
/// (the reference keeps five tensors of the batch's size per clamp, and colour jitter
/// clamps up to five times). `closed` passes the gradient at the bounds themselves.
struct UnitClamp {
    closed: bool,
}

impl UnitClamp {
    fn passes<T: Sample>(&self, v: T) -> bool {
        let (lo, hi) = (T::zero(), T::one());
        if self.closed {
            v >= lo && v <= hi
        } else {
            v > lo && v < hi
        }
    }
}

impl GatherKernel for UnitClamp {
    fn name(&self) -> &'static str {
        "cpu-unit-clamp"
    }

    fn out_dims(&self, dims: &[usize]) -> candle_core::Result<Vec<usize>> {
        Ok(dims.to_vec())
    }

    fn forward<T: Sample>(&self, x: &[T], out: &mut [T]) {
        let (lo, hi) = (T::zero(), T::one());
        out.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(x.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(o, x)| {
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = if v < lo {
                        lo
                    } else if v > hi {
                        hi
                    } else {
                        v
                    };
                }
            });
    }

    fn input_grad<T: Sample>(&self, x: &[T], g: &[T], gx: &mut [T]) {
        gx.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(
                x.par_chunks(ELEMENTWISE_CHUNK)
                    .zip(g.par_chunks(ELEMENTWISE_CHUNK)),
            )
            .for_each(|(o, (x, g))| {
                for ((o, &v), &gv) in o.iter_mut().zip(x).zip(g) {
                    *o = if self.passes(v) { gv } else { T::zero() };
                }
            });
    }
}

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

/// The image corners, clockwise from the top left, as kornia lists them.
fn corners(w: f64, h: f64) -> [(f64, f64); 4] {
    [
        (0.0, 0.0),
        (w - 1.0, 0.0),
        (w - 1.0, h - 1.0),
        (0.0, h - 1.0),
    ]
}

/// kornia's `get_rotation_matrix2d(centre, angle, scale)`: about `centre`, positive
/// angles counter-clockwise on screen.
fn rotation_about(centre: (f64, f64), degrees: f64, scale: (f64, f64)) -> Homography {
    let (s, c) = degrees.to_radians().sin_cos();
    let shift = [[1.0, 0.0, centre.0], [0.0, 1.0, centre.1], [0.0, 0.0, 1.0]];
    let unshift = [
        [1.0, 0.0, -centre.0],
        [0.0, 1.0, -centre.1],
        [0.0, 0.0, 1.0],
    ];
    let rotate = [[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]];
    let scale = [[scale.0, 0.0, 0.0], [0.0, scale.1, 0.0], [0.0, 0.0, 1.0]];
    mat_mul(&shift, &mat_mul(&rotate, &mat_mul(&scale, &unshift)))
}

/// kornia's `RandomRotation` transform: about the image centre.
fn rotation_matrix(h: usize, w: usize, degrees: f64) -> Homography {
    let centre = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    rotation_about(centre, degrees, (1.0, 1.0))
}

/// kornia's `get_affine_matrix2d`: rotation by −angle and scale about the centre,
/// then the translation, composed with the shear (degrees) about the centre.
fn affine_matrix(
    translation: (f64, f64),
    centre: (f64, f64),
    scale: (f64, f64),
    degrees: f64,
    shear: (f64, f64),
) -> Homography {
    let mut m = rotation_about(centre, -degrees, scale);
    m[0][2] += translation.0;
    m[1][2] += translation.1;
    let (tx, ty) = (shear.0.to_radians().tan(), shear.1.to_radians().tan());
    let (x, y) = centre;
    let shear = [
        [1.0, -tx, tx * y],
        [-ty, 1.0 + tx * ty, ty * (x - tx * y)],
        [0.0, 0.0, 1.0],
    ];
    mat_mul(&m, &shear)
}

/// The homography taking each `from[i]` to `to[i]` (four point pairs), as kornia's
/// `get_perspective_transform`.
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

/// kornia's ResizedCropGenerator (scale 0.1–1, ratio 3/4–4/3): an integer box,
/// resampled onto the whole cutout.
fn resized_crop_matrix(rng: &mut ChaCha20Rng, h: usize, w: usize) -> Homography {
    let area = (h * w) as f64;
    let (lo, hi) = ((0.75f64).ln(), (1.333f64).ln());
    let mut crop = (w, h);
    for _ in 0..10 {
        let target = area * rng.gen_range(0.1..=1.0);
        let ratio = rng.gen_range(lo..=hi).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if (2..=w).contains(&cw) && (2..=h).contains(&ch) {
            crop = (cw, ch);
            break;
        }
    }
    let x0 = rng.gen_range(0..=w - crop.0) as f64;
    let y0 = rng.gen_range(0..=h - crop.1) as f64;
    let (x1, y1) = (x0 + crop.0 as f64 - 1.0, y0 + crop.1 as f64 - 1.0);
    let src = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)];
    homography_from_points(&src, &corners(w as f64, h as f64))
}

/// Input coordinates (x, y) in pixels for every output pixel of one sample.
type Field = Vec<(f32, f32)>;

/// Where each output pixel samples, from the output → input map `m`.
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

/// The four bilinear taps of a sample at pixel position (`sx`, `sy`) in an `h`×`w` plane, as
/// torch's `grid_sample` weighs them: (index, weight), a tap outside the plane (zero padding)
/// or of zero weight as (0, 0). `border` clamps the position to the edge first.
#[inline(always)]
fn bilinear_taps(sx: f32, sy: f32, h: usize, w: usize, border: bool) -> [(u32, f32); 4] {
    let (sx, sy) = if border {
        (sx.clamp(0.0, (w - 1) as f32), sy.clamp(0.0, (h - 1) as f32))
    } else {
        (sx, sy)
    };
    let (x0, y0) = (sx.floor(), sy.floor());
    let (fx, fy) = (sx - x0, sy - y0);
    let corners = [
        (x0, y0, (1.0 - fx) * (1.0 - fy)),
        (x0 + 1.0, y0, fx * (1.0 - fy)),
        (x0, y0 + 1.0, (1.0 - fx) * fy),
        (x0 + 1.0, y0 + 1.0, fx * fy),
    ];
    corners.map(|(cx, cy, wt)| {
        let inside = cx >= 0.0 && cy >= 0.0 && cx < w as f32 && cy < h as f32;
        if inside && wt != 0.0 {
            ((cy as usize * w + cx as usize) as u32, wt)
        } else {
            (0, 0.0)
        }
    })
}

/// torch's `grid_sample` (bilinear) at pixel positions, zero or border padding;
/// `None` leaves a sample untouched. One pass forward and one backward on the CPU
/// ([`Warp`]); candle's gather, product and sum elsewhere.
fn sample_fields(
    x: &Tensor,
    fields: Vec<Option<Field>>,
    border: bool,
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if fields.iter().all(Option::is_none) {
        return Ok(x.clone());
    }
    if fields.len() != n || fields.iter().flatten().any(|f| f.len() != h * w) {
        candle_core::bail!(
            "{} sampling fields for a batch {:?}",
            fields.len(),
            x.shape()
        );
    }
    if gather_kernels(x) {
        return apply_gather(
            x,
            Warp {
                fields,
                border,
                dims: (n, c, h, w),
            },
        );
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
                    for (k, (i, wt)) in bilinear_taps(sx, sy, h, w, border).into_iter().enumerate()
                    {
                        index[base + k * hw + p] = i;
                        weight[base + k * hw + p] = wt;
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

/// Bilinear sampling of a batch (N, C, H, W) at per-sample fields, as one pass: each output
/// pixel's taps are computed once for all its channels, and only the fields (8 bytes a
/// pixel) are kept for the backward, not candle's index, gathered and weighted tensors
/// (48 bytes a pixel and channel).
struct Warp {
    fields: Vec<Option<Field>>,
    border: bool,
    dims: (usize, usize, usize, usize),
}

impl GatherKernel for Warp {
    fn name(&self) -> &'static str {
        "cpu-bilinear-warp"
    }

    fn out_dims(&self, dims: &[usize]) -> candle_core::Result<Vec<usize>> {
        let (n, c, h, w) = self.dims;
        if dims != [n, c, h, w] {
            candle_core::bail!("warp kernel for {:?}, got {dims:?}", self.dims)
        }
        Ok(dims.to_vec())
    }

    fn forward<T: Sample>(&self, x: &[T], out: &mut [T]) {
        let (_, c, h, w) = self.dims;
        let hw = h * w;
        out.par_chunks_mut(c * hw)
            .zip(x.par_chunks(c * hw))
            .zip(&self.fields)
            .for_each(|((o, xs), field)| {
                let Some(field) = field else {
                    o.copy_from_slice(xs);
                    return;
                };
                for (p, &(sx, sy)) in field.iter().enumerate() {
                    let taps = bilinear_taps(sx, sy, h, w, self.border)
                        .map(|(i, wt)| (i as usize, T::of(wt)));
                    for ch in 0..c {
                        let plane = &xs[ch * hw..(ch + 1) * hw];
                        let mut acc = T::zero();
                        for &(i, wt) in &taps {
                            acc += wt * plane[i];
                        }
                        o[ch * hw + p] = acc;
                    }
                }
            });
    }

    fn input_grad<T: Sample>(&self, _x: &[T], g: &[T], gx: &mut [T]) {
        let (_, c, h, w) = self.dims;
        let hw = h * w;
        // Each sample's gradient is its own: the scatter never crosses a task.
        gx.par_chunks_mut(c * hw)
            .zip(g.par_chunks(c * hw))
            .zip(&self.fields)
            .for_each(|((gx, g), field)| {
                let Some(field) = field else {
                    gx.copy_from_slice(g);
                    return;
                };
                for (p, &(sx, sy)) in field.iter().enumerate() {
                    let taps = bilinear_taps(sx, sy, h, w, self.border)
                        .map(|(i, wt)| (i as usize, T::of(wt)));
                    for ch in 0..c {
                        let gv = g[ch * hw + p];
                        let plane = &mut gx[ch * hw..(ch + 1) * hw];
                        for &(i, wt) in &taps {
                            plane[i] += wt * gv;
                        }
                    }
                }
            });
    }
}

/// kornia's `elastic_transform2d` defaults: the noise blurred by a Gaussian (kernel
/// 63, σ 32, zero padding), α 1, as a displacement in normalised coordinates.
fn elastic_field(noise: &[f32], h: usize, w: usize) -> Field {
    let as_f64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let dx = gaussian_blur(&as_f64(&noise[..h * w]), h, w, 63, 32.0);
    let dy = gaussian_blur(&as_f64(&noise[h * w..2 * h * w]), h, w, 63, 32.0);
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

/// Separable Gaussian blur with zero padding (kornia's `border_type="constant"`).
fn gaussian_blur(v: &[f64], h: usize, w: usize, kernel: usize, sigma: f64) -> Vec<f64> {
    let half = (kernel / 2) as isize;
    let taps: Vec<f64> = (-half..=half)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = taps.iter().sum();
    let taps: Vec<f64> = taps.iter().map(|t| t / total).collect();
    let at = |i: isize, len: usize| (0..len as isize).contains(&i).then_some(i as usize);
    let mut rows = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = taps
                .iter()
                .enumerate()
                .filter_map(|(k, t)| {
                    at(x as isize + k as isize - half, w).map(|j| t * v[y * w + j])
                })
                .sum();
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = taps
                .iter()
                .enumerate()
                .filter_map(|(k, t)| {
                    at(y as isize + k as isize - half, h).map(|j| t * rows[j * w + x])
                })
                .sum();
        }
    }
    out
}

/// kornia's thin-plate control points, in normalised coordinates.
pub const TPS_SOURCE: [(f64, f64); 5] = [
    (-1.0, -1.0),
    (-1.0, 1.0),
    (1.0, -1.0),
    (1.0, 1.0),
    (0.0, 0.0),
];

/// kornia's `RandomThinPlateSpline` warp, quirks kept: `get_tps_transform(dst, src)`
/// builds its kernel block from the distances between moved and original points and
/// its affine block from the moved ones, and the warp uses the original points as
/// kernel centres; pixel centres normalised with `align_corners=False`.
fn thin_plate_field(dst: &[(f64, f64); 5], h: usize, w: usize) -> Field {
    let src = TPS_SOURCE;
    let kernel = |a: (f64, f64), b: (f64, f64)| {
        let r2 = (a.0 - b.0).powi(2) + (a.1 - b.1).powi(2);
        if r2 > 0.0 {
            0.5 * r2 * r2.ln()
        } else {
            0.0
        }
    };
    // L = [[K(dst, src), P(dst)], [P(dst)ᵀ, 0]] with P rows (1, x, y); values src.
    let fit = |values: [f64; 5]| -> Vec<f64> {
        let mut rows = vec![vec![0.0; 9]; 8];
        for i in 0..5 {
            for j in 0..5 {
                rows[i][j] = kernel(dst[i], src[j]);
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
        let bend: f64 = (0..5).map(|i| c[i] * kernel(p, src[i])).sum();
        bend + c[5] + c[6] * p.0 + c[7] * p.1
    };
    let (wf, hf) = (w as f64, h as f64);
    let mut f = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let p = (
                (2.0 * x as f64 + 1.0) / wf - 1.0,
                (2.0 * y as f64 + 1.0) / hf - 1.0,
            );
            let (sx, sy) = (eval(&cx, p), eval(&cy, p));
            f.push((
                (((sx + 1.0) * wf - 1.0) / 2.0) as f32,
                (((sy + 1.0) * hf - 1.0) / 2.0) as f32,
            ));
        }
    }
    f
}

/// Per-cutout factors as an (N,1,1,1) tensor.
fn per_sample(v: &[f32], x: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v.to_vec(), (v.len(), 1, 1, 1), x.device())?.to_dtype(x.dtype())
}

/// kornia's `ColorJitter`: clamp, then brightness (multiply), contrast (blend with the
/// mean grey), saturation (blend with grey), each clamped, and hue (an HSV rotation)
/// in `order`, then clamp. As kornia does, a step is skipped when every touched
/// cutout's factor is neutral.
fn color_jitter(
    x: &Tensor,
    applied: &[bool],
    factors: &[[f32; 4]],
    order: &[usize],
) -> candle_core::Result<Tensor> {
    const NEUTRAL: [f32; 4] = [1.0, 1.0, 1.0, 0.0];
    let (n, c, _, _) = x.dims4()?;
    if c != 3 || factors.len() != n {
        candle_core::bail!("colour jitter needs RGB cutouts and one factor set each");
    }
    let column = |k: usize| -> Vec<f32> { factors.iter().map(|f| f[k]).collect() };
    let mut y = clamp_unit_range(x)?;
    for &op in order {
        let neutral = NEUTRAL
            .get(op)
            .is_some_and(|&v| factors.iter().zip(applied).all(|(f, &a)| !a || f[op] == v));
        if neutral {
            continue;
        }
        y = match op {
            0 | 2 | 3 if gather_kernels(&y) => apply_gather(
                &y,
                PixelJitter {
                    step: op,
                    factors: column(op),
                    dims: y.dims4()?,
                },
            )?,
            0 => clamp01(&y.broadcast_mul(&per_sample(&column(0), x)?)?)?,
            1 => {
                let f = per_sample(&column(1), x)?;
                let mean = grey(&y)?.mean_keepdim(2)?.mean_keepdim(3)?;
                clamp01(
                    &y.broadcast_mul(&f)?
                        .broadcast_add(&mean.broadcast_mul(&(1.0 - &f)?)?)?,
                )?
            }
            2 => {
                let f = per_sample(&column(2), x)?;
                let g = grey(&y)?;
                clamp01(
                    &y.broadcast_mul(&f)?
                        .broadcast_add(&g.broadcast_mul(&(1.0 - &f)?)?)?,
                )?
            }
            3 => {
                let turns = per_sample(&column(3), x)?;
                adjust_hue(&y, &(turns * std::f64::consts::TAU)?)?
            }
            other => candle_core::bail!("colour jitter step {other} is not 0..3"),
        };
    }
    clamp_unit_range(&y)
}

/// kornia's `rgb_to_grayscale` (Rec. 601 luma), (N,1,H,W).
fn grey(x: &Tensor) -> candle_core::Result<Tensor> {
    let r = x.narrow(1, 0, 1)?;
    let g = x.narrow(1, 1, 1)?;
    let b = x.narrow(1, 2, 1)?;
    ((r * 0.299)? + (g * 0.587)?)? + (b * 0.114)?
}

/// `x mod m` for m > 0, with slope 1 (the floor is piecewise constant).
fn modulo(x: &Tensor, m: f64) -> candle_core::Result<Tensor> {
    let k = (x.detach() / m)?.floor()?;
    x - (k * m)?
}

/// Float mask of a comparison computed on values only.
fn mask(t: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    t.to_dtype(dtype)
}

/// kornia's `adjust_hue`: `rgb_to_hsv`, add `shift` radians (N,1,1,1) to the hue
/// modulo 2π, `hsv_to_rgb`.
fn adjust_hue(x: &Tensor, shift: &Tensor) -> candle_core::Result<Tensor> {
    use std::f64::consts::TAU;
    let dt = x.dtype();
    let (r, g, b) = (x.narrow(1, 0, 1)?, x.narrow(1, 1, 1)?, x.narrow(1, 2, 1)?);
    let (rd, gd, bd) = (r.detach(), g.detach(), b.detach());
    let max = channel_extreme(x, true)?;
    let min = channel_extreme(x, false)?;
    let delta = (&max - &min)?;
    let v = max.clone();
    let max_zero = mask(max.detach().eq(0.0)?, dt)?;
    let s = delta.div(&((&max + 1e-8)?.mul(&(1.0 - &max_zero)?)? + &max_zero)?)?;
    let delta_zero = mask(delta.detach().eq(0.0)?, dt)?;
    let deltac = ((&delta * (1.0 - &delta_zero)?)? + &delta_zero)?;
    let (rc, gc, bc) = ((&max - &r)?, (&max - &g)?, (&max - &b)?);
    let h1 = (&bc - &gc)?;
    let h2 = ((&rc - &bc)? + (&deltac * 2.0)?)?;
    let h3 = ((&gc - &rc)? + (&deltac * 4.0)?)?;
    let is_r = mask(rd.ge(&gd)?.mul(&rd.ge(&bd)?)?, dt)?;
    let is_g = ((1.0 - &is_r)? * mask(gd.ge(&bd)?, dt)?)?;
    let is_b = ((1.0 - &is_r)? - &is_g)?;
    let hue = (((h1 * &is_r)? + (h2 * &is_g)?)? + (h3 * &is_b)?)?.div(&deltac)?;
    let hue = (modulo(&(hue / 6.0)?, 1.0)? * TAU)?;
    let hue = wrap_full_turn(&hue)?;
    // adjust_hue_raw
    let hue = wrap_full_turn(&modulo(&hue.broadcast_add(shift)?, TAU)?)?;
    // hsv_to_rgb
    let h6 = ((hue / TAU)? * 6.0)?;
    let h6m = modulo(&h6, 6.0)?;
    let hi = modulo(&h6.detach().floor()?, 6.0)?.clamp(0.0, 5.0)?;
    let f = (&h6m - &hi)?;
    let p = (&v * (1.0 - &s)?)?;
    let q = (&v * (1.0 - (&f * &s)?)?)?;
    let t = (&v * (1.0 - ((1.0 - &f)? * &s)?)?)?;
    let sector: Vec<Tensor> = (0..6)
        .map(|k| mask(hi.eq(k as f64)?, dt))
        .collect::<candle_core::Result<_>>()?;
    let pick = |vals: [&Tensor; 6]| -> candle_core::Result<Tensor> {
        let mut acc = (vals[0] * &sector[0])?;
        for k in 1..6 {
            acc = (acc + (vals[k] * &sector[k])?)?;
        }
        Ok(acc)
    };
    let r = pick([&v, &q, &p, &p, &t, &v])?;
    let g = pick([&t, &v, &v, &q, &p, &p])?;
    let b = pick([&p, &p, &t, &v, &v, &q])?;
    Tensor::cat(&[r, g, b], 1)
}

/// A value and its derivatives with respect to one pixel's (r, g, b): forward-mode
/// differentiation of [`adjust_hue`]'s chain, one pixel at a time, so its backward needs
/// only the input instead of the ~40 intermediate tensors the reference keeps. The three
/// components are written out rather than mapped, which keeps the unoptimised (dev
/// profile) build of the crate from spending seconds a step in closure calls.
#[derive(Clone, Copy)]
struct Dual<T> {
    v: T,
    d: [T; 3],
}

impl<T: Sample> Dual<T> {
    #[inline(always)]
    fn constant(v: T) -> Self {
        Self {
            v,
            d: [T::zero(); 3],
        }
    }
    #[inline(always)]
    fn seed(v: T, channel: usize) -> Self {
        let mut d = [T::zero(); 3];
        d[channel] = T::one();
        Self { v, d }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Self {
            v: self.v + o.v,
            d: [self.d[0] + o.d[0], self.d[1] + o.d[1], self.d[2] + o.d[2]],
        }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Self {
            v: self.v - o.v,
            d: [self.d[0] - o.d[0], self.d[1] - o.d[1], self.d[2] - o.d[2]],
        }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Self {
            v: self.v * o.v,
            d: [
                self.d[0] * o.v + self.v * o.d[0],
                self.d[1] * o.v + self.v * o.d[1],
                self.d[2] * o.v + self.v * o.d[2],
            ],
        }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        Self {
            v: self.v / o.v,
            d: {
                let o2 = o.v * o.v;
                [
                    (self.d[0] * o.v - self.v * o.d[0]) / o2,
                    (self.d[1] * o.v - self.v * o.d[1]) / o2,
                    (self.d[2] * o.v - self.v * o.d[2]) / o2,
                ]
            },
        }
    }
    /// `self · k + c` (candle's `affine`, and its scalar arithmetic).
    #[inline(always)]
    fn affine(self, k: T, c: T) -> Self {
        Self {
            v: self.v * k + c,
            d: [self.d[0] * k, self.d[1] * k, self.d[2] * k],
        }
    }
    /// `self mod m` with slope 1, as [`modulo`].
    #[inline(always)]
    fn modulo(self, m: T) -> Self {
        let k = (self.v * (T::one() / m)).floor();
        Self {
            v: self.v - k * m,
            d: self.d,
        }
    }
    /// [`clamp01`]: the slope passes strictly inside (0, 1).
    #[inline(always)]
    fn clamp01(self) -> Self {
        let (zero, one) = (T::zero(), T::one());
        if self.v > zero && self.v < one {
            self
        } else {
            Self::constant(if self.v > zero { one } else { zero })
        }
    }
    /// [`wrap_full_turn`].
    #[inline(always)]
    fn wrap_full_turn(self) -> Self {
        let below = if self.v < T::from_f64(std::f64::consts::TAU) {
            T::one()
        } else {
            T::zero()
        };
        self.affine(below, T::zero())
    }
}

/// [`channel_extreme`] of one pixel: the extreme, its slope split between tied channels.
fn channel_extreme_dual<T: Sample>(rgb: [T; 3], largest: bool) -> Dual<T> {
    let pick = |a: T, b: T| if (b > a) == largest && b != a { b } else { a };
    let v = pick(pick(rgb[0], rgb[1]), rgb[2]);
    let hits = rgb.map(|c| if c == v { T::one() } else { T::zero() });
    let count = hits[0] + hits[1] + hits[2];
    Dual {
        v,
        d: hits.map(|h| h / count),
    }
}

/// [`adjust_hue`] of one pixel by `shift` radians, op for op, with the derivatives.
fn hue_pixel<T: Sample>(rgb: [T; 3], shift: T) -> [Dual<T>; 3] {
    use std::f64::consts::TAU;
    let (zero, one) = (T::zero(), T::one());
    let mask = |b: bool| if b { one } else { zero };
    let tau = T::from_f64(TAU);
    let [r, g, b] = [0, 1, 2].map(|c| Dual::seed(rgb[c], c));
    let max = channel_extreme_dual(rgb, true);
    let min = channel_extreme_dual(rgb, false);
    let delta = max.sub(min);
    let v = max;
    let max_zero = mask(max.v == zero);
    let denom = max
        .affine(one, T::from_f64(1e-8))
        .affine(one - max_zero, zero)
        .add(Dual::constant(max_zero));
    let s = delta.div(denom);
    let delta_zero = mask(delta.v == zero);
    let deltac = delta
        .affine(one - delta_zero, zero)
        .add(Dual::constant(delta_zero));
    let (rc, gc, bc) = (max.sub(r), max.sub(g), max.sub(b));
    let h1 = bc.sub(gc);
    let h2 = rc.sub(bc).add(deltac.affine(T::from_f64(2.0), zero));
    let h3 = gc.sub(rc).add(deltac.affine(T::from_f64(4.0), zero));
    let is_r = mask(rgb[0] >= rgb[1]) * mask(rgb[0] >= rgb[2]);
    let is_g = (one - is_r) * mask(rgb[1] >= rgb[2]);
    let is_b = (one - is_r) - is_g;
    let hue = h1
        .affine(is_r, zero)
        .add(h2.affine(is_g, zero))
        .add(h3.affine(is_b, zero))
        .div(deltac);
    let hue = hue
        .affine(T::from_f64(1.0 / 6.0), zero)
        .modulo(one)
        .affine(tau, zero)
        .wrap_full_turn();
    let hue = hue.affine(one, shift).modulo(tau).wrap_full_turn();
    let h6 = hue
        .affine(T::from_f64(1.0 / TAU), zero)
        .affine(T::from_f64(6.0), zero);
    let six = T::from_f64(6.0);
    let h6m = h6.modulo(six);
    let floor = h6.v.floor();
    let hi = floor - (floor * (one / six)).floor() * six;
    let hi = if hi < zero {
        zero
    } else if hi > T::from_f64(5.0) {
        T::from_f64(5.0)
    } else {
        hi
    };
    let f = h6m.sub(Dual::constant(hi));
    let neg = T::from_f64(-1.0);
    let p = v.mul(s.affine(neg, one));
    let q = v.mul(f.mul(s).affine(neg, one));
    let t = v.mul(f.affine(neg, one).mul(s).affine(neg, one));
    let sector: [T; 6] = std::array::from_fn(|k| mask(hi == T::from_f64(k as f64)));
    let pick = |vals: [Dual<T>; 6]| {
        let mut acc = vals[0].affine(sector[0], zero);
        for k in 1..6 {
            acc = acc.add(vals[k].affine(sector[k], zero));
        }
        acc
    };
    [
        pick([v, q, p, p, t, v]),
        pick([t, v, v, q, p, p]),
        pick([p, p, t, v, v, q]),
    ]
}

/// The per-pixel steps of kornia's colour jitter on RGB cutouts (N, 3, H, W), each with
/// its clamp: brightness (`step` 0), saturation (2) and hue (3, `factors` in turns), one
/// factor per sample. One pass forward, and one backward that recomputes each pixel's
/// chain with its 3×3 Jacobian, so only the input is kept (the reference keeps 5–40
/// tensors of the batch's size per step).
struct PixelJitter {
    step: usize,
    factors: Vec<f32>,
    dims: (usize, usize, usize, usize),
}

impl PixelJitter {
    fn pixel<T: Sample>(&self, rgb: [T; 3], sample: usize) -> [Dual<T>; 3] {
        let f = T::of(self.factors[sample]);
        let zero = T::zero();
        let seeds = [0, 1, 2].map(|c| Dual::seed(rgb[c], c));
        match self.step {
            0 => seeds.map(|c| c.affine(f, zero).clamp01()),
            2 => {
                let [r, g, b] = seeds;
                let grey = r
                    .affine(T::from_f64(0.299), zero)
                    .add(g.affine(T::from_f64(0.587), zero))
                    .add(b.affine(T::from_f64(0.114), zero));
                let rest = f * T::from_f64(-1.0) + T::one();
                seeds.map(|c| c.affine(f, zero).add(grey.affine(rest, zero)).clamp01())
            }
            _ => hue_pixel(rgb, f * T::from_f64(std::f64::consts::TAU)),
        }
    }
}

impl GatherKernel for PixelJitter {
    fn name(&self) -> &'static str {
        "cpu-colour-jitter"
    }

    fn out_dims(&self, dims: &[usize]) -> candle_core::Result<Vec<usize>> {
        let (n, c, h, w) = self.dims;
        if dims != [n, c, h, w] || c != 3 || self.factors.len() != n {
            candle_core::bail!("colour jitter kernel for {:?}, got {dims:?}", self.dims)
        }
        Ok(dims.to_vec())
    }

    fn forward<T: Sample>(&self, x: &[T], out: &mut [T]) {
        let hw = self.dims.2 * self.dims.3;
        out.par_chunks_mut(3 * hw)
            .zip(x.par_chunks(3 * hw))
            .enumerate()
            .for_each(|(sample, (o, x))| {
                for p in 0..hw {
                    let rgb = self.pixel([x[p], x[hw + p], x[2 * hw + p]], sample);
                    for (c, v) in rgb.iter().enumerate() {
                        o[c * hw + p] = v.v;
                    }
                }
            });
    }

    fn input_grad<T: Sample>(&self, x: &[T], g: &[T], gx: &mut [T]) {
        let hw = self.dims.2 * self.dims.3;
        gx.par_chunks_mut(3 * hw)
            .zip(x.par_chunks(3 * hw).zip(g.par_chunks(3 * hw)))
            .enumerate()
            .for_each(|(sample, (gx, (x, g)))| {
                for p in 0..hw {
                    let rgb = self.pixel([x[p], x[hw + p], x[2 * hw + p]], sample);
                    for c in 0..3 {
                        let mut acc = T::zero();
                        for (o, out) in rgb.iter().enumerate() {
                            acc += g[o * hw + p] * out.d[c];
                        }
                        gx[c * hw + p] = acc;
                    }
                }
            });
    }
}

/// The largest (or smallest) channel, (N,1,H,W), with torch's `amax`/`amin`
/// gradient: split evenly between tied channels (candle's gives each the whole).
fn channel_extreme(x: &Tensor, largest: bool) -> candle_core::Result<Tensor> {
    let xd = x.detach();
    let value = if largest {
        xd.max_keepdim(1)?
    } else {
        xd.min_keepdim(1)?
    };
    let hit = xd.broadcast_eq(&value)?.to_dtype(x.dtype())?;
    let share = (x * &hit)?.sum_keepdim(1)?.div(&hit.sum_keepdim(1)?)?;
    // value + (share − sharē): exactly the extreme, with the shared slope.
    value + (&share - share.detach())?
}

/// kornia's `masked_fill(h >= 2π, 0)` after a modulo, which float rounding can leave
/// at exactly 2π.
fn wrap_full_turn(h: &Tensor) -> candle_core::Result<Tensor> {
    let below = h.detach().lt(std::f64::consts::TAU)?.to_dtype(h.dtype())?;
    h * below
}

/// kornia's `RandomSharpness`: clamp the input, blend toward the PIL smoothing filter
/// (clamped) by `factor` (0 is fully smoothed); border pixels keep the input; clamp.
fn sharpness(x: &Tensor, factors: &[f32]) -> candle_core::Result<Tensor> {
    let x = &clamp_unit_range(x)?;
    let (_, c, h, w) = x.dims4()?;
    let kernel = Tensor::new(&[[1f32, 1., 1.], [1., 5., 1.], [1., 1., 1.]], x.device())?
        .to_dtype(x.dtype())?
        .affine(1.0 / 13.0, 0.0)?
        .reshape((1, 1, 3, 3))?
        .repeat((c, 1, 1, 1))?;
    let smooth = clamp01(&x.conv2d(&kernel, 0, 1, 1, c)?)?; // (n, c, h-2, w-2)
    let smooth = smooth.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut interior = vec![0f32; h * w];
    for y in 1..h - 1 {
        for xx in 1..w - 1 {
            interior[y * w + xx] = 1.0;
        }
    }
    let interior = Tensor::from_vec(interior, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    let result = (smooth.broadcast_mul(&interior)? + x.broadcast_mul(&(1.0 - &interior)?)?)?;
    let f = per_sample(factors, x)?;
    clamp01(&(&result + (x - &result)?.broadcast_mul(&f)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::gradcheck::{check_gradient, check_kernel_against_reference};
    use rand::SeedableRng;

    fn image(n: usize, s: usize) -> Tensor {
        let data: Vec<f32> = (0..n * 3 * s * s)
            .map(|i| 0.5 + 0.4 * ((i as f32) * 0.731 + 0.2).sin())
            .collect();
        Tensor::from_vec(data, (n, 3, s, s), &Device::Cpu).unwrap()
    }

    /// Parameters under which the module touches at least one sample: the gradient
    /// check must exercise the augmentation, not the pass-through.
    fn params_that_apply(m: Kornia, x: &Tensor) -> AugmentParams {
        (0..64)
            .find_map(|seed| {
                let p = m.sample(&mut ChaCha20Rng::seed_from_u64(seed), 3, 3, 12, 12);
                let y = p.apply(x).unwrap();
                let d = (y - x).unwrap().abs().unwrap().max_all().unwrap();
                (d.to_scalar::<f32>().unwrap() > 1e-3).then_some(p)
            })
            .expect("augmentation never applied in 64 seeds")
    }

    #[test]
    fn every_augmentation_changes_the_image_and_has_correct_gradients() {
        let x = image(3, 12);
        let mut modules: Vec<Kornia> = [
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
        ]
        .map(|c| Kornia::from_code(c, false))
        .to_vec();
        modules.extend(Augmentations::for_method(CutMethod::Updated, &[]).modules());
        for m in modules {
            let p = params_that_apply(m, &x);
            // f64 so the difference quotients resolve the HSV branches' slopes.
            let x64 = x.to_dtype(DType::F64).unwrap();
            check_gradient(&x64, |t| p.apply(t), 1e-6);
        }
    }

    #[test]
    fn warp_kernel_matches_the_reference() {
        let x = image(3, 12);
        let mut modules: Vec<Kornia> = [Augment::Pe, Augment::Ro, Augment::Af, Augment::Et]
            .into_iter()
            .chain([Augment::Ts, Augment::Re])
            .map(|c| Kornia::from_code(c, false))
            .collect();
        // Border padding and a plain flip, from the `updated` pipeline.
        modules.extend(Augmentations::for_method(CutMethod::Updated, &[]).modules());
        let mut partial = false;
        for m in modules {
            let p = params_that_apply(m, &x);
            if let AugmentParams::Warp { applied, .. } = &p {
                partial |= applied.iter().any(|&a| !a);
            }
            check_kernel_against_reference(&x, |t| p.apply(t), 1e-12);
        }
        assert!(partial, "no warp left a cutout untouched");
    }

    #[test]
    fn clamp_and_jitter_kernels_match_the_reference() {
        let v: Vec<f32> = (0..3 * 3 * 5 * 5)
            .map(|i| [-0.2, 0.0, 0.3, 1.0, 1.4, 0.7][i % 6])
            .collect();
        let edges = Tensor::from_vec(v, (3, 3, 5, 5), &Device::Cpu).unwrap();
        check_kernel_against_reference(&edges, clamp01, 0.0);
        check_kernel_against_reference(&edges, clamp_unit_range, 0.0);
        let x = image(3, 12);
        for code in [Augment::Ji, Augment::Sh] {
            let p = params_that_apply(Kornia::from_code(code, false), &x);
            check_kernel_against_reference(&x, |t| p.apply(t), 1e-12);
        }
        // Hue alone on pixels whose channels tie (grey, and two equal maxima or minima),
        // where the reference splits the extreme's slope and takes its delta = 0 branches.
        let v: Vec<f32> = (0..2 * 3 * 16)
            .map(|i| {
                let (c, p) = ((i / 16) % 3, i % 16);
                match p % 4 {
                    0 => 0.4,
                    1 => [0.6, 0.6, 0.2][c],
                    2 => [0.3, 0.7, 0.3][c],
                    _ => 0.1 + 0.05 * (i % 13) as f32,
                }
            })
            .collect();
        let ties = Tensor::from_vec(v, (2, 3, 4, 4), &Device::Cpu).unwrap();
        let hue = AugmentParams::Jitter {
            applied: vec![true, true],
            factors: vec![[1.0, 1.0, 1.0, 0.3], [1.0, 1.0, 1.0, -0.45]],
            order: vec![3],
        };
        check_kernel_against_reference(&ties, |t| hue.apply(t), 1e-12);
        // Brightness and saturation strong enough to clamp, each alone, then all four steps.
        for (order, factors) in [
            (vec![0], [[1.9, 1.0, 1.0, 0.0], [0.6, 1.0, 1.0, 0.0]]),
            (vec![2], [[1.0, 1.0, 1.8, 0.0], [1.0, 1.0, 0.3, 0.0]]),
            (
                vec![2, 0, 3, 1],
                [[1.2, 0.8, 1.4, 0.2], [0.9, 1.3, 0.7, -0.1]],
            ),
        ] {
            let jitter = AugmentParams::Jitter {
                applied: vec![true, false],
                factors: factors.to_vec(),
                order,
            };
            check_kernel_against_reference(&ties, |t| jitter.apply(t), 1e-12);
        }
    }

    #[test]
    fn crop_is_identity_at_cutout_size() {
        let x = image(2, 8);
        let p = Kornia::Crop.sample(&mut ChaCha20Rng::seed_from_u64(0), 2, 3, 8, 8);
        let y = p.apply(&x).unwrap();
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
    fn hue_of_a_full_turn_is_the_identity_and_grey_stays_grey() {
        let x = image(2, 6);
        let turn = Tensor::new(&[std::f32::consts::TAU, 0.0], &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 1, 1))
            .unwrap();
        let y = adjust_hue(&x, &turn).unwrap();
        let d = (y - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        let grey_img = Tensor::full(0.3f32, (1, 3, 4, 4), &Device::Cpu).unwrap();
        let shift = Tensor::full(1.0f32, (1, 1, 1, 1), &Device::Cpu).unwrap();
        let y = adjust_hue(&grey_img, &shift).unwrap();
        let d = (y - &grey_img).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn geometry_maps_behave() {
        // A zero rotation samples each pixel in place.
        let m = invert(&rotation_matrix(5, 7, 0.0));
        let f = field_from_map(&m, 5, 7);
        assert!(f.iter().enumerate().all(|(i, &(x, y))| {
            (x - (i % 7) as f32).abs() < 1e-5 && (y - (i / 7) as f32).abs() < 1e-5
        }));
        // Translating by +2 px in x makes output pixel x sample input x − 2.
        let m = affine_matrix((2.0, 0.0), (3.0, 2.0), (1.0, 1.0), 0.0, (0.0, 0.0));
        assert!((field_from_map(&invert(&m), 5, 7)[3].0 - 1.0).abs() < 1e-5);
        // The perspective homography maps the moved corners back onto the originals.
        let from = [(1.0, 2.0), (9.0, 0.5), (8.0, 7.0), (0.0, 8.0)];
        let to = [(0.0, 0.0), (9.0, 0.0), (9.0, 9.0), (0.0, 9.0)];
        let hm = homography_from_points(&from, &to);
        for (&(x, y), &(u, v)) in from.iter().zip(&to) {
            let d = hm[2][0] * x + hm[2][1] * y + hm[2][2];
            assert!(((hm[0][0] * x + hm[0][1] * y + hm[0][2]) / d - u).abs() < 1e-9);
            assert!(((hm[1][0] * x + hm[1][1] * y + hm[1][2]) / d - v).abs() < 1e-9);
        }
    }
}
