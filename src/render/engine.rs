//! The optimisation loop. A [`RenderSession`] holds one job's state (z, optimiser,
//! RNG, prompts) and takes one step at a time; [`render`] drives a session to the end,
//! writing frames, checkpoints and the final outputs. Both are batches of one of
//! `batch.rs`'s batched step and driver.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::augment::{apply_all, AugmentParams, Augmentations};
use super::batch_key::BatchKey;
use super::checkpoint::Checkpoint;
use super::cutouts::{resample_crops, Crop, CutoutNoise, Cutouts};
use super::job::{RenderError, RenderJob};
use super::models::ModelSet;
use super::ops::{asin, clamp_with_grad, stop_below};
use super::optim::Optimizer;
use super::output;
use super::prompts::PromptSet;
use super::spec::{CutMethod, ImageRef, InitNoise, InitRegulariser, JobSpec};
use super::steer::{check_steerable, setup_seed, Revision};

/// generate.py's `noise_fac`: cutouts get Gaussian noise of a strength drawn in [0, 0.1).
const CUTOUT_NOISE: f32 = 0.1;

/// What one step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Steps completed, counting this one.
    pub step: u32,
    pub loss: f32,
    /// Per prompt (text, image, noise), then the regulariser when on.
    pub losses: Vec<f32>,
}

/// A prompt's target embeddings for one CLIP model, L2-normalised: (M, D).
#[derive(Debug, Clone)]
struct Target {
    embed: Tensor,
    weight: f32,
    stop: Option<f32>,
}

/// Every prompt's targets for one CLIP model.
struct ClipTargets {
    /// Per story phrase, its text prompts.
    phrases: Vec<Vec<Target>>,
    images: Vec<Target>,
    noise: Vec<Target>,
}

/// One job's optimisation state. Everything that changes between steps lives here, so
/// several sessions can later share one batched forward pass.
pub struct RenderSession<'m> {
    models: &'m ModelSet,
    spec: JobSpec,
    seed: u64,
    device: Device,
    z: Var,
    /// The z the `mse_init` regulariser pulls toward (the latest re-encoding when zooming).
    z_orig: Tensor,
    z_min: Tensor,
    z_max: Tensor,
    optimizer: Optimizer,
    rng: ChaCha20Rng,
    step: u32,
    prompts: PromptSet,
    targets: Vec<ClipTargets>,
    cutouts: Vec<Cutouts>,
    augmentations: Augmentations,
    width: usize,
    height: usize,
    /// The revision in force (0: the job as submitted).
    revision: u32,
    /// Test-only: sampling replayed from a reference run instead of the RNG.
    replay: Option<Box<dyn SamplingReplay>>,
}

/// What one step draws for one CLIP's cutouts: the crops (none for pooled methods),
/// each augmentation's parameters and the cutout noise (none for `original`).
#[doc(hidden)]
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CutoutDraw {
    pub crops: Vec<Crop>,
    pub augments: Vec<AugmentParams>,
    pub noise: Option<CutoutNoise>,
}

/// Test-only hook: supplies a reference implementation's sampled cutouts so a step
/// can be compared with it exactly, and hears the gradient each step computes.
#[doc(hidden)]
pub trait SamplingReplay: Send + Sync {
    /// The draw for CLIP `clip` at step `step` (0-based); `None` falls back to the RNG.
    fn draw(&mut self, step: u32, clip: usize) -> Option<CutoutDraw>;
    /// The gradient of the loss on z at step `step`, before the optimiser uses it.
    fn gradient(&mut self, _step: u32, _grad: &Tensor) {}
}

impl<'m> RenderSession<'m> {
    /// Sets up a job: encodes prompts, draws the initial z, builds the optimiser.
    /// With `job.resume`, z, optimiser and RNG come from the checkpoint instead.
    pub fn new(job: &RenderJob, models: &'m ModelSet) -> Result<Self, RenderError> {
        let device = models.device().clone();
        // Where the job starts: its own checkpoint, a fork's saved frame, or its seed.
        let start = match (&job.resume, &job.fork) {
            (Some(path), _) => Some((Checkpoint::read(path, &device)?, path.as_path(), None)),
            (None, Some(fork)) => Some((
                Checkpoint::read(&fork.path, &device)?,
                fork.path.as_path(),
                Some(fork.reset_optimizer),
            )),
            (None, None) => None,
        };
        // A resume starts under the revision in force when its checkpoint was written.
        let in_force = match &start {
            Some((ckpt, path, None)) if ckpt.revision > 0 => Some(
                job.revisions
                    .iter()
                    .find(|r| r.number == ckpt.revision)
                    .ok_or_else(|| RenderError::Checkpoint {
                        path: path.to_path_buf(),
                        reason: format!(
                            "was written under revision {}, which this job does not have",
                            ckpt.revision
                        ),
                    })?,
            ),
            _ => None,
        };
        let (spec, prompts, revision) = match in_force {
            Some(r) => (r.spec.clone(), r.prompts.clone(), r.number),
            None => (job.spec.clone(), job.prompts()?.clone(), 0),
        };
        let vqgan = &models.vqgan;
        let f = vqgan.downsample_factor();
        let (toks_x, toks_y) = (spec.width as usize / f, spec.height as usize / f);
        let (width, height) = (toks_x * f, toks_y * f);
        if toks_x == 0 || toks_y == 0 {
            return Err(RenderError::Spec(super::spec::SpecError::new(
                "width",
                format!("must be at least the VQGAN's downsampling factor {f}"),
                format!("got {}x{}", spec.width, spec.height),
            )));
        }

        let codebook = vqgan.codebook().to_dtype(DType::F32)?;
        let z_min = codebook.min(0)?.reshape((1, (), 1, 1))?;
        let z_max = codebook.max(0)?.reshape((1, (), 1, 1))?;

        let cutouts = cutouts_for(&spec, models);
        let augmentations = Augmentations::for_method(spec.cut_method, &spec.augments);
        // Prompt set-up draws from its own stream so a resumed job, which skips the
        // initial z, still sees the very same target embeddings.
        let no_inputs = Inputs::new();
        let revision_inputs = in_force.map_or(&no_inputs, |r| &r.inputs);
        let targets = Self::all_targets(
            (&[&job.inputs, revision_inputs], job.seed),
            (&spec, &prompts, revision),
            models,
            (&cutouts, &augmentations),
            (width, height),
            &device,
        )?;

        let mut rng = ChaCha20Rng::seed_from_u64(job.seed);
        let (z, z_orig, optimizer, rng, step) = match start {
            Some((ckpt, path, fork)) => {
                match fork {
                    None => ckpt.check_matches(&spec, job.seed, path)?,
                    Some(_) => ckpt.check_size(&spec, path)?,
                }
                let lr = f64::from(spec.lr);
                let optimizer = if fork == Some(true) {
                    Optimizer::new(spec.optimizer, lr, &ckpt.z)?
                } else {
                    Optimizer::from_state(spec.optimizer, lr, ckpt.optimizer)
                };
                (ckpt.z, ckpt.z_orig, optimizer, ckpt.rng, ckpt.step)
            }
            None => {
                let z = Self::initial_z(
                    job,
                    models,
                    (width, height),
                    (toks_x, toks_y),
                    &mut rng,
                    &device,
                )?;
                let optimizer = Optimizer::new(spec.optimizer, f64::from(spec.lr), &z)?;
                (z.clone(), z, optimizer, rng, 0)
            }
        };
        Ok(Self {
            models,
            seed: job.seed,
            device,
            z: Var::from_tensor(&z)?,
            z_orig,
            z_min,
            z_max,
            optimizer,
            rng,
            step,
            prompts,
            targets,
            cutouts,
            augmentations,
            width,
            height,
            spec,
            revision,
            replay: None,
        })
    }

    /// Every CLIP's targets for `spec`'s prompts, from the set-up stream of `revision`.
    fn all_targets(
        (inputs, seed): (&[&Inputs], u64),
        (spec, prompts, revision): (&JobSpec, &PromptSet, u32),
        models: &ModelSet,
        (cutouts, augmentations): (&[Cutouts], &Augmentations),
        size: (usize, usize),
        device: &Device,
    ) -> Result<Vec<ClipTargets>, RenderError> {
        let mut setup_rng = ChaCha20Rng::seed_from_u64(setup_seed(seed, revision));
        let mut targets = Vec::with_capacity(models.clips.len());
        for (k, clip) in models.clips.iter().enumerate() {
            targets.push(Self::encode_targets(
                inputs,
                spec,
                prompts,
                clip,
                &cutouts[k],
                augmentations,
                size,
                &mut setup_rng,
                device,
            )?);
        }
        Ok(targets)
    }

    /// Takes a revision at this step boundary: new prompts are embedded, cutouts and
    /// augmentations rebuilt, the learning rate changed; z, the optimiser's moments and
    /// the RNG go on as they were.
    pub fn apply_revision(
        &mut self,
        job: &RenderJob,
        revision: &Revision,
    ) -> Result<(), RenderError> {
        check_steerable(&self.spec, &revision.spec)?;
        let spec = revision.spec.clone();
        let cutouts = cutouts_for(&spec, self.models);
        let augmentations = Augmentations::for_method(spec.cut_method, &spec.augments);
        self.targets = Self::all_targets(
            (&[&job.inputs, &revision.inputs], self.seed),
            (&spec, &revision.prompts, revision.number),
            self.models,
            (&cutouts, &augmentations),
            (self.width, self.height),
            &self.device,
        )?;
        self.optimizer.set_lr(f64::from(spec.lr));
        self.cutouts = cutouts;
        self.augmentations = augmentations;
        self.prompts = revision.prompts.clone();
        self.spec = spec;
        self.revision = revision.number;
        Ok(())
    }

    /// The number of the revision in force; 0 before any.
    pub fn revision(&self) -> u32 {
        self.revision
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_targets(
        inputs: &[&Inputs],
        spec: &JobSpec,
        prompts: &PromptSet,
        clip: &crate::models::Clip,
        cutouts: &Cutouts,
        augmentations: &Augmentations,
        (width, height): (usize, usize),
        rng: &mut ChaCha20Rng,
        device: &Device,
    ) -> Result<ClipTargets, RenderError> {
        let mut phrases = Vec::with_capacity(prompts.phrases.len());
        for phrase in &prompts.phrases {
            let texts: Vec<&str> = phrase.iter().map(|p| p.text.as_str()).collect();
            let (embeds, _) = clip
                .encode_prompts(&texts)
                .map_err(|e| RenderError::Model(e.to_string()))?;
            let embeds = unit(&embeds.to_dtype(DType::F32)?)?;
            phrases.push(
                phrase
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        Ok(Target {
                            embed: embeds.narrow(0, i, 1)?,
                            weight: p.weight,
                            stop: p.stop,
                        })
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?,
            );
        }

        // generate.py embeds an image prompt through the same cutouts and
        // augmentations the render uses, at the render's area.
        let mut images = Vec::with_capacity(spec.image_prompts.len());
        for prompt in &spec.image_prompts {
            let img = load_image(inputs, &prompt.image)?;
            let img = output::resize_keep_area(&img, width as u32, height as u32);
            let x = output::image_to_tensor(&img, device)?;
            let batch = make_cutouts(cutouts, augmentations, &x, rng)?;
            let embed = clip.encode_image(&clip.normalize_pixels(&batch)?)?;
            images.push(Target {
                embed: unit(&embed.to_dtype(DType::F32)?)?.detach(),
                weight: prompt.weight,
                stop: prompt.stop,
            });
        }

        let dim = clip.config().projection_dim;
        let noise_prompts = spec.all_noise_prompts();
        let mut noise = Vec::with_capacity(noise_prompts.len());
        for prompt in &noise_prompts {
            let mut g = ChaCha20Rng::seed_from_u64(prompt.seed);
            let v: Vec<f32> = (0..dim).map(|_| StandardNormal.sample(&mut g)).collect();
            noise.push(Target {
                embed: unit(&Tensor::from_vec(v, (1, dim), device)?)?,
                weight: prompt.weight,
                stop: None,
            });
        }
        Ok(ClipTargets {
            phrases,
            images,
            noise,
        })
    }

    /// generate.py's start: the init image, a noise image, or random codebook tokens.
    fn initial_z(
        job: &RenderJob,
        models: &ModelSet,
        (width, height): (usize, usize),
        (toks_x, toks_y): (usize, usize),
        rng: &mut ChaCha20Rng,
        device: &Device,
    ) -> Result<Tensor, RenderError> {
        let vqgan = &models.vqgan;
        let encode = |img: image::RgbImage| encode_quantized(models, &img, device);
        let (w, h) = (width as u32, height as u32);
        if let Some(reference) = &job.spec.init_image {
            let img = load_image(&[&job.inputs], reference)?;
            return encode(output::resize_exact(&img, w, h));
        }
        match job.spec.init_noise {
            Some(InitNoise::Pixels) => {
                // numpy's randint(0, 255): 255 itself never comes up.
                let mut img = image::RgbImage::new(w, h);
                for p in img.pixels_mut() {
                    *p = image::Rgb([
                        rng.gen_range(0..255),
                        rng.gen_range(0..255),
                        rng.gen_range(0..255),
                    ]);
                }
                encode(img)
            }
            Some(InitNoise::Gradient) => {
                // generate.py's random_gradient_image: red ramps across, green and blue down.
                let start = [0.0, 0.0, f64::from(rng.gen_range(0u8..255))];
                let stop = [
                    f64::from(rng.gen_range(1u8..255)),
                    f64::from(rng.gen_range(2u8..255)),
                    f64::from(rng.gen_range(3u8..128)),
                ];
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let t = |c: usize, horizontal: bool| {
                        let (i, n) = if horizontal { (x, w) } else { (y, h) };
                        let frac = if n > 1 {
                            f64::from(i) / f64::from(n - 1)
                        } else {
                            0.0
                        };
                        (start[c] + (stop[c] - start[c]) * frac) as u8
                    };
                    image::Rgb([t(0, true), t(1, false), t(2, false)])
                });
                encode(img)
            }
            None => {
                let n = vqgan.n_embed() as u32;
                let idx: Vec<u32> = (0..toks_x * toks_y).map(|_| rng.gen_range(0..n)).collect();
                let idx = Tensor::from_vec(idx, (1, toks_y, toks_x), device)?;
                Ok(vqgan.embed_indices(&idx)?.to_dtype(DType::F32)?)
            }
        }
    }

    /// Steps completed so far.
    pub fn step_count(&self) -> u32 {
        self.step
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The latent being optimised, (1, C, h, w).
    pub fn z(&self) -> &Tensor {
        self.z.as_tensor()
    }

    /// The image z decodes to, (1, 3, H, W) in [0, 1].
    pub fn image(&self) -> Result<Tensor, RenderError> {
        Ok(self.synth(&self.z.as_tensor().detach())?.detach())
    }

    /// quantize → decode → [0, 1] with ClampWithGrad, for one z or a batch of them.
    pub(crate) fn synth(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let (z_q, _) = self.models.vqgan.quantize(z)?;
        let img = self.models.vqgan.decode(&z_q)?;
        clamp_with_grad(&img.affine(0.5, 0.5)?, 0.0, 1.0)
    }

    fn phrase_index(&self) -> usize {
        self.prompts
            .phrase_index_at(self.step, self.spec.change_prompt_every)
    }

    /// One full optimisation step: zoom if due, forward, loss, backward, update, clamp.
    /// It is the batched step with a batch of one, so a job steps the same way alone
    /// or sharing a batch.
    pub fn step(&mut self) -> Result<StepStats, RenderError> {
        let mut stats = step_batch(&mut [self])?;
        stats
            .pop()
            .ok_or_else(|| RenderError::Model("a step of one job returned no statistics".into()))
    }

    pub(crate) fn models(&self) -> &'m ModelSet {
        self.models
    }

    /// The latent as a graph leaf, for the batched forward.
    pub(crate) fn z_var(&self) -> &Var {
        &self.z
    }

    /// Whether the coming step is a zoom step: generate.py writes a zoom-video frame of the
    /// current image at each one (from step 0, before `zoom.start` too), then zooms.
    pub(crate) fn zoom_frame_due(&self) -> bool {
        self.spec
            .zoom
            .as_ref()
            .is_some_and(|zoom| self.step.is_multiple_of(zoom.every))
    }

    /// What a step does before the forward pass: the zoom video's re-encode when due,
    /// from step 0 on as in generate.py.
    pub(crate) fn begin_step(&mut self) -> Result<(), RenderError> {
        if let Some(zoom) = self.spec.zoom.clone() {
            if self.step >= zoom.start && self.zoom_frame_due() {
                self.zoom(zoom.scale, zoom.shift_x, zoom.shift_y)?;
            }
        }
        Ok(())
    }

    /// This job's cutout batch for CLIP `k` from its image (1, 3, H, W). Draws on the
    /// job's RNG, so calls must come in CLIP order within a step.
    pub(crate) fn cut(&mut self, k: usize, image: &Tensor) -> candle_core::Result<Tensor> {
        let replayed = match &mut self.replay {
            Some(r) => r.draw(self.step, k),
            None => None,
        };
        match replayed {
            Some(draw) => apply_draw(&self.cutouts[k], image, &draw),
            None => make_cutouts(&self.cutouts[k], &self.augmentations, image, &mut self.rng),
        }
    }

    /// Test-only: replay a reference run's sampling (see [`SamplingReplay`]).
    #[doc(hidden)]
    pub fn set_replay(&mut self, replay: Box<dyn SamplingReplay>) {
        self.replay = Some(replay);
    }

    /// Test-only: start from the given latent (1, C, h, w), with a fresh optimiser.
    #[doc(hidden)]
    pub fn set_z(&mut self, z: &Tensor) -> Result<(), RenderError> {
        let z = z.to_dtype(DType::F32)?.to_device(&self.device)?;
        if z.dims() != self.z.as_tensor().dims() {
            return Err(RenderError::Model(format!(
                "z of shape {:?}, the session's is {:?}",
                z.dims(),
                self.z.as_tensor().dims()
            )));
        }
        self.z = Var::from_tensor(&z)?;
        self.z_orig = z.clone();
        self.optimizer = Optimizer::new(self.spec.optimizer, f64::from(self.spec.lr), &z)?;
        Ok(())
    }

    /// The step's loss terms from the unit embeddings of this job's cutouts, one tensor
    /// per CLIP in ensemble order: per prompt summed over CLIPs, then the regulariser.
    pub(crate) fn loss_terms(&self, embeds: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        let phrase = self.phrase_index();
        let n_prompts = self.targets.first().map_or(0, |t| {
            t.phrases.get(phrase).map_or(0, Vec::len) + t.images.len() + t.noise.len()
        });
        let mut terms: Vec<Tensor> = Vec::with_capacity(n_prompts + 1);
        for (k, embeds) in embeds.iter().enumerate() {
            let targets = &self.targets[k];
            let all = targets
                .phrases
                .get(phrase)
                .into_iter()
                .flatten()
                .chain(&targets.images)
                .chain(&targets.noise);
            for (i, target) in all.enumerate() {
                let loss = prompt_loss(embeds, target)?;
                if k == 0 {
                    terms.push(loss);
                } else {
                    terms[i] = (&terms[i] + loss)?;
                }
            }
        }
        if self.spec.init_weight > 0.0 {
            let z = self.z.as_tensor();
            let w = f64::from(self.spec.init_weight);
            let reg = match self.spec.init_regulariser {
                InitRegulariser::MseInit => ((z - &self.z_orig)?.sqr()?.mean_all()? * (w / 2.0))?,
                InitRegulariser::DecayZero => {
                    let decay = 1.0 / (f64::from(self.step) * 2.0 + 1.0);
                    (z.sqr()?.mean_all()? * (decay * w / 2.0))?
                }
            };
            terms.push(reg);
        }
        Ok(terms)
    }

    /// What a step does after the backward pass: the optimiser's update of z from its
    /// gradient, then the clamp to the codebook's range.
    pub(crate) fn finish_step(
        &mut self,
        grads: &GradStore,
        losses: Vec<f32>,
    ) -> Result<StepStats, RenderError> {
        let grad = grads
            .get(self.z.as_tensor())
            .ok_or_else(|| RenderError::Model("the loss does not depend on z".into()))?;
        if let Some(r) = &mut self.replay {
            r.gradient(self.step, grad);
        }
        self.optimizer.step(&self.z, grad)?;
        let clamped = self
            .z
            .as_tensor()
            .broadcast_maximum(&self.z_min)?
            .broadcast_minimum(&self.z_max)?;
        self.z.set(&clamped)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss: losses.iter().sum(),
            losses,
        })
    }

    /// generate.py's zoom video step: zoom the current image about its centre, shift
    /// it (wrapping), re-encode and quantise it as the new z, restart the optimiser.
    fn zoom(&mut self, scale: f32, shift_x: i32, shift_y: i32) -> Result<(), RenderError> {
        let img = image_truncated(&self.image()?)?;
        let img = zoom_and_shift(&img, scale, shift_x, shift_y);
        let z = encode_quantized(self.models, &img, &self.device)?;
        self.z = Var::from_tensor(&z)?;
        self.z_orig = z.clone();
        self.optimizer = Optimizer::new(self.spec.optimizer, f64::from(self.spec.lr), &z)?;
        Ok(())
    }

    /// CLIP cosine similarity of the current image to each prompt of the current
    /// phrase (text, image, noise), averaged over the CLIP ensemble. The image is
    /// seen whole, resampled to CLIP's size, without augmentation.
    pub fn similarities(&self) -> Result<Vec<f32>, RenderError> {
        let image = self.image()?.squeeze(0)?;
        let phrase = self.phrase_index();
        let mut sums: Vec<f32> = Vec::new();
        for (k, clip) in self.models.clips.iter().enumerate() {
            let side = self.height.min(self.width);
            let crop = Crop {
                x: (self.width - side) / 2,
                y: (self.height - side) / 2,
                size: side,
            };
            let view = resample_crops(&image, &[crop], clip.image_size())?;
            let embed = unit(
                &clip
                    .encode_image(&clip.normalize_pixels(&view)?)?
                    .to_dtype(DType::F32)?,
            )?;
            let targets = &self.targets[k];
            let all = targets
                .phrases
                .get(phrase)
                .into_iter()
                .flatten()
                .chain(&targets.images)
                .chain(&targets.noise);
            for (i, t) in all.enumerate() {
                let sim = embed
                    .matmul(&t.embed.t()?)?
                    .mean_all()?
                    .to_scalar::<f32>()?;
                if sums.len() <= i {
                    sums.push(0.0);
                }
                sums[i] += sim;
            }
        }
        let n = self.models.clips.len().max(1) as f32;
        Ok(sums.into_iter().map(|s| s / n).collect())
    }

    /// The state a checkpoint records.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            step: self.step,
            seed: self.seed,
            spec_sha256: super::checkpoint::spec_fingerprint(&self.spec),
            width: self.width as u32,
            height: self.height as u32,
            z: self.z.as_tensor().clone(),
            z_orig: self.z_orig.clone(),
            optimizer: self.optimizer.state().clone(),
            rng: self.rng.clone(),
            revision: self.revision,
        }
    }
}

/// One cutout maker per CLIP of the ensemble, at each CLIP's input size.
fn cutouts_for(spec: &JobSpec, models: &ModelSet) -> Vec<Cutouts> {
    models
        .clips
        .iter()
        .map(|c| {
            Cutouts::new(
                spec.cut_method,
                spec.cutn as usize,
                spec.cut_pow,
                c.image_size(),
            )
        })
        .collect()
}

/// taming's `VQModel.encode` as generate.py uses it: the image in [-1, 1] through the
/// encoder, then snapped to the codebook, so optimisation (and `mse_init`) starts from the
/// quantised latent.
fn encode_quantized(
    models: &ModelSet,
    img: &image::RgbImage,
    device: &Device,
) -> Result<Tensor, RenderError> {
    let x = output::image_to_tensor(img, device)?;
    // taming's choice of rows for every model kind (GumbelVQ picks by its `proj` logits).
    let (_, indices) = models.vqgan.encode_quantized(&x.affine(2.0, -1.0)?)?;
    // The rows themselves: taming's `z + (z_q - z).detach()` equals them to an ulp.
    Ok(models.vqgan.embed_indices(&indices)?.to_dtype(DType::F32)?)
}

/// generate.py's `out.mul(255).clamp(0, 255)...astype(np.uint8)`: truncated, not rounded.
fn image_truncated(t: &Tensor) -> Result<image::RgbImage, RenderError> {
    let (_, _, h, w) = t.dims4()?;
    let data: Vec<f32> = t
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let bytes = data
        .iter()
        .map(|v| (v * 255.0).clamp(0.0, 255.0) as u8)
        .collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| RenderError::Model("image buffer size mismatch".into()))
}

/// The box Pillow's `crop` takes for generate.py's `zoom_at(img, w/2, h/2, scale)`:
/// `centre ± side / (2·scale)`, each edge rounded half-to-even as Python's `round`.
/// It may reach past the image (a scale below 1 zooms out). Returns (x0, x1) along a side.
pub(crate) fn zoom_crop_span(side: u32, scale: f32) -> (i64, i64) {
    let centre = f64::from(side) / 2.0;
    // generate.py parses the scale as a Python float: the f64 nearest the decimal the user
    // wrote, which the f32's shortest decimal form gives back (1.2f32 widened is 1.20000005,
    // and would round 6 px at 1.2 to a 5 px crop instead of 6).
    let scale: f64 = scale.to_string().parse().unwrap_or(f64::from(scale));
    let half = f64::from(side) / (scale * 2.0);
    let round = |v: f64| v.round_ties_even() as i64;
    (round(centre - half), round(centre + half))
}

/// generate.py's zoom: Pillow's `crop` of [`zoom_crop_span`] (outside the image is
/// black), resized back with Lanczos, then `ImageChops.offset` (a wrapping shift).
/// The resampling is the `image` crate's Lanczos3, so a pixel may differ from Pillow's by
/// a level; the crop box is Pillow's exactly.
pub(crate) fn zoom_and_shift(
    img: &image::RgbImage,
    scale: f32,
    shift_x: i32,
    shift_y: i32,
) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let zoomed = if scale != 1.0 {
        let (x0, x1) = zoom_crop_span(w, scale);
        let (y0, y1) = zoom_crop_span(h, scale);
        let (cw, ch) = ((x1 - x0).max(1) as u32, (y1 - y0).max(1) as u32);
        let crop = image::RgbImage::from_fn(cw, ch, |x, y| {
            let (sx, sy) = (x0 + i64::from(x), y0 + i64::from(y));
            if (0..i64::from(w)).contains(&sx) && (0..i64::from(h)).contains(&sy) {
                *img.get_pixel(sx as u32, sy as u32)
            } else {
                image::Rgb([0, 0, 0])
            }
        });
        image::imageops::resize(&crop, w, h, image::imageops::FilterType::Lanczos3)
    } else {
        img.clone()
    };
    if shift_x == 0 && shift_y == 0 {
        return zoomed;
    }
    image::RgbImage::from_fn(w, h, |x, y| {
        let sx = (i64::from(x) - i64::from(shift_x)).rem_euclid(i64::from(w)) as u32;
        let sy = (i64::from(y) - i64::from(shift_y)).rem_euclid(i64::from(h)) as u32;
        *zoomed.get_pixel(sx, sy)
    })
}

/// The cutout batch CLIP sees: crops, then (except for `original`) augmentations
/// and noise, drawn from the job's RNG in that order.
fn make_cutouts(
    cutouts: &Cutouts,
    augmentations: &Augmentations,
    image: &Tensor,
    rng: &mut ChaCha20Rng,
) -> candle_core::Result<Tensor> {
    let (_, c, h, w) = image.dims4()?;
    let crops = cutouts.draw_crops(rng, h, w);
    let shape = (cutouts.cutn, c, cutouts.cut_size, cutouts.cut_size);
    let (augments, noise) = match cutouts.method {
        CutMethod::Original => (Vec::new(), None),
        _ => {
            let augments = augmentations.sample(shape, rng);
            (
                augments,
                Some(CutoutNoise::sample(shape, CUTOUT_NOISE, rng)),
            )
        }
    };
    apply_draw(
        cutouts,
        image,
        &CutoutDraw {
            crops,
            augments,
            noise,
        },
    )
}

/// Applies one draw: generate.py's `original` clamps its crops; the other methods
/// augment and add noise.
fn apply_draw(cutouts: &Cutouts, image: &Tensor, draw: &CutoutDraw) -> candle_core::Result<Tensor> {
    let batch = cutouts.make_from(image, &draw.crops)?;
    match cutouts.method {
        CutMethod::Original => clamp_with_grad(&batch, 0.0, 1.0),
        _ => {
            let batch = apply_all(&batch, &draw.augments)?;
            match &draw.noise {
                Some(noise) => noise.apply(&batch),
                None => Ok(batch),
            }
        }
    }
}

/// Rows scaled to unit length (torch's F.normalize).
pub(crate) fn unit(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// generate.py's `Prompt.forward`: mean squared spherical distance between the cutout
/// embeddings (N, D) and the target's (M, D), signed by the weight, with `stop`.
fn prompt_loss(embeds: &Tensor, target: &Target) -> candle_core::Result<Tensor> {
    let diff = embeds
        .unsqueeze(1)?
        .broadcast_sub(&target.embed.unsqueeze(0)?)?;
    // The epsilon keeps the gradient finite (not NaN) where a cutout matches its target.
    let dist = (diff.sqr()?.sum(2)? + 1e-12)?.sqrt()?;
    let dists = (asin(&(dist * 0.5)?)?.sqr()? * 2.0)?;
    let sign = if target.weight < 0.0 { -1.0 } else { 1.0 };
    let dists = (dists * sign)?;
    let dists = match target.stop {
        Some(stop) => stop_below(&dists, f64::from(stop))?,
        None => dists,
    };
    dists.mean_all()? * f64::from(target.weight.abs())
}

/// The bytes of an image a spec refers to.
/// Image bytes by the reference a spec names them with (see [`RenderJob::inputs`]).
type Inputs = std::collections::HashMap<String, Vec<u8>>;

/// The bytes of an image a spec refers to, looked up in `inputs` in order.
fn load_image(inputs: &[&Inputs], reference: &str) -> Result<image::RgbImage, RenderError> {
    let input_err = |reason: String| RenderError::Input {
        reference: reference.chars().take(80).collect(),
        reason,
    };
    let bytes: Vec<u8> = match ImageRef::parse(reference).map_err(input_err)? {
        ImageRef::Inline { bytes, .. } => bytes,
        ImageRef::Upload(id) => {
            let keys = [
                reference.trim().to_owned(),
                format!("upload:{id}"),
                id.to_string(),
            ];
            keys.iter()
                .find_map(|k| inputs.iter().find_map(|i| i.get(k)))
                .cloned()
                .ok_or_else(|| input_err("the upload was not provided to the renderer".into()))?
        }
    };
    let img = image::load_from_memory(&bytes)
        .map_err(|e| input_err(format!("not a readable image: {e}")))?;
    Ok(img.to_rgb8())
}

/// Why `sessions` cannot share a step, if they cannot: they must use the very same
/// loaded models and agree on the [`BatchKey`].
pub fn check_batchable(sessions: &[&mut RenderSession<'_>]) -> Result<(), RenderError> {
    let Some((first, rest)) = sessions.split_first() else {
        return Err(RenderError::Incompatible(
            "a batch needs at least one job".into(),
        ));
    };
    let key = BatchKey::of(first.spec());
    for (i, other) in rest.iter().enumerate() {
        let i = i + 1;
        if !std::ptr::eq(first.models(), other.models()) {
            return Err(RenderError::Incompatible(format!(
                "job {i} uses another model set than job 0; only jobs rendered with the same loaded VQGAN and CLIPs can be batched"
            )));
        }
        if let Some(why) = key.mismatch(&BatchKey::of(other.spec())) {
            return Err(RenderError::Incompatible(format!("job {i}: {why}")));
        }
    }
    Ok(())
}

/// One optimisation step for every session, as one batch: the zs are concatenated,
/// quantised and decoded together; each job cuts and augments its own image with its
/// own RNG; each CLIP sees every job's cutouts in one batch; each job's loss is its
/// solo step's loss; the losses are summed for one backward; then each job's own
/// optimiser updates and clamps its z. Returns each job's statistics, in order.
pub fn step_batch(sessions: &mut [&mut RenderSession<'_>]) -> Result<Vec<StepStats>, RenderError> {
    check_batchable(sessions)?;
    for session in sessions.iter_mut() {
        session.begin_step()?;
    }
    let models = sessions[0].models();
    let zs: Vec<&Tensor> = sessions.iter().map(|s| s.z_var().as_tensor()).collect();
    let images = sessions[0].synth(&Tensor::cat(&zs, 0)?)?;

    // Per job, per CLIP: the unit embeddings of its cutouts.
    let mut embeds: Vec<Vec<Tensor>> = vec![Vec::with_capacity(models.clips.len()); sessions.len()];
    for (k, clip) in models.clips.iter().enumerate() {
        // Jobs may differ in cutn and cut method; their cutouts simply stack.
        let mut counts = Vec::with_capacity(sessions.len());
        let mut cutouts = Vec::with_capacity(sessions.len());
        for (j, session) in sessions.iter_mut().enumerate() {
            let batch = session.cut(k, &images.narrow(0, j, 1)?)?;
            counts.push(batch.dim(0)?);
            cutouts.push(batch);
        }
        let all = unit(
            &clip
                .encode_image(&clip.normalize_pixels(&Tensor::cat(&cutouts, 0)?)?)?
                .to_dtype(DType::F32)?,
        )?;
        let mut offset = 0;
        for (j, n) in counts.into_iter().enumerate() {
            embeds[j].push(all.narrow(0, offset, n)?);
            offset += n;
        }
    }

    // Per job, its loss terms as one vector; the job's loss is their sum.
    let mut terms = Vec::with_capacity(sessions.len());
    for (session, embeds) in sessions.iter().zip(&embeds) {
        terms.push(Tensor::stack(&session.loss_terms(embeds)?, 0)?);
    }
    let totals = terms
        .iter()
        .map(|t| t.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    // No job's loss depends on another's z, so each z's gradient from the sum is the
    // gradient of its own loss.
    let grads = Tensor::stack(&totals, 0)?.sum_all()?.backward()?;
    // One read-back for every job's losses, after the backward pass is queued.
    let counts: Vec<usize> = terms.iter().map(|t| t.elem_count()).collect();
    let mut values = Tensor::cat(&terms, 0)?.to_vec1::<f32>()?.into_iter();
    sessions
        .iter_mut()
        .zip(counts)
        .map(|(session, n)| session.finish_step(&grads, values.by_ref().take(n).collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::gradcheck::check_gradient;

    /// Pillow's crop box for generate.py's `zoom_at`, rounded half-to-even as Python does.
    #[test]
    fn zoom_crop_matches_generate_py_rounding() {
        // 512 / 2.01 = 254.726...: edges 1.27 and 510.73 round to 1 and 511, 510 px.
        assert_eq!(zoom_crop_span(512, 1.005), (1, 511));
        // Zooming out reaches past the image: 512 / 1.98 = 258.59..., -2.59 and 514.59.
        assert_eq!(zoom_crop_span(512, 0.99), (-3, 515));
        assert_eq!(zoom_crop_span(512, 2.0), (128, 384));
        assert_eq!(zoom_crop_span(16, 1.0), (0, 16));
        assert_eq!(zoom_crop_span(10, 0.8), (-1, 11));
        // 6 / 2.4 = 2.5: edges 0.5 and 5.5 go to the even neighbours 0 and 6.
        assert_eq!(zoom_crop_span(6, 1.2), (0, 6));
    }

    #[test]
    fn zoom_below_one_zooms_out_with_black_and_shift_wraps() {
        let white = image::RgbImage::from_pixel(16, 16, image::Rgb([255, 255, 255]));
        let out = zoom_and_shift(&white, 0.5, 0, 0);
        assert_eq!(out.dimensions(), (16, 16));
        // The crop is 32 px with the image in its middle: black border, white centre.
        assert!(out.get_pixel(0, 0)[0] < 10, "{:?}", out.get_pixel(0, 0));
        assert!(out.get_pixel(8, 8)[0] > 245, "{:?}", out.get_pixel(8, 8));
        let ramp = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let shifted = zoom_and_shift(&ramp, 1.0, 2, -1);
        assert_eq!(shifted.get_pixel(2, 0), ramp.get_pixel(0, 1));
        assert_eq!(shifted.get_pixel(0, 7), ramp.get_pixel(6, 0));
    }

    fn embeds(n: usize, d: usize, phase: f32) -> Tensor {
        let v: Vec<f32> = (0..n * d)
            .map(|i| ((i as f32) * 0.37 + phase).sin())
            .collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn prompt_loss_is_generate_py_spherical_distance() {
        let a = unit(&embeds(3, 5, 0.0)).unwrap();
        let b = unit(&embeds(2, 5, 1.0)).unwrap();
        let target = |weight: f32, stop: Option<f32>| Target {
            embed: b.clone(),
            weight,
            stop,
        };
        // Direct formula: mean over (cutout, target) pairs of 2·asin(|a−b|/2)².
        let (av, bv): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (a.to_vec2().unwrap(), b.to_vec2().unwrap());
        let mut sum = 0.0f64;
        for x in &av {
            for y in &bv {
                let d: f64 = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| f64::from(p - q).powi(2))
                    .sum::<f64>()
                    .sqrt();
                sum += 2.0 * (d / 2.0).asin().powi(2);
            }
        }
        let expected = sum / 6.0;
        let got = prompt_loss(&a, &target(0.5, None))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (f64::from(got) - 0.5 * expected).abs() < 1e-5,
            "{got} vs {}",
            0.5 * expected
        );
        let neg = prompt_loss(&a, &target(-2.0, None))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((f64::from(neg) + 2.0 * expected).abs() < 1e-5);

        let raw = embeds(3, 5, 0.0);
        let target64 = |weight: f32| Target {
            embed: b.to_dtype(DType::F64).unwrap(),
            weight,
            stop: None,
        };
        check_gradient(&raw, |e| prompt_loss(&unit(e)?, &target64(0.7)), 1e-4);
        check_gradient(&raw, |e| prompt_loss(&unit(e)?, &target64(-1.3)), 1e-4);
        // A stop above every distance cuts the whole gradient.
        let e = Var::from_tensor(&raw).unwrap();
        let loss = prompt_loss(&unit(e.as_tensor()).unwrap(), &target(1.0, Some(10.0))).unwrap();
        let g = loss.backward().unwrap();
        let g = g
            .get(e.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(g.to_scalar::<f32>().unwrap(), 0.0);
    }
}
