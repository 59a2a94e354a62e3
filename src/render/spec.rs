//! The job spec: the body of `POST /v1/jobs` and of `vqclip render --spec`.
//!
//! Defaults follow nerdyrodent's generate.py so a spec holding only a prompt
//! renders what generate.py would. Unknown fields are rejected so that a typo
//! (`"step": 10`) fails loudly instead of silently rendering 500 steps.

use std::sync::OnceLock;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub use super::check::SpecError;
use super::check::{check_finite_range, check_range};
use super::prompts::{self, PromptSet};
pub use super::prompts::{PromptsSpec, TextPromptSpec};

/// The only spec version this build understands.
pub const SPEC_VERSION: u32 = 1;

/// A render job as submitted by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default = "default_version")]
    pub version: u32,
    /// Text prompts: generate.py syntax (`"text:weight:stop|text2:-0.5"`, `^` between
    /// story phrases) or a list of `{text, weight, stop}`.
    #[serde(default)]
    pub prompts: PromptsSpec,
    #[serde(default)]
    pub image_prompts: Vec<ImagePromptSpec>,
    #[serde(default)]
    pub noise_prompts: Vec<NoisePromptSpec>,
    /// generate.py's `-nps`: noise prompt seeds, paired in order with
    /// `noise_prompt_weights`. generate.py pairs them with `zip`, silently dropping the
    /// unpaired; vqclip requires one weight per seed and rejects other counts (422), and
    /// rejects mixing these with `noise_prompts`. They render as `noise_prompts` would.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noise_prompt_seeds: Vec<u64>,
    /// generate.py's `-npw`: one weight per entry of `noise_prompt_seeds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noise_prompt_weights: Vec<f32>,
    /// An image reference (see [`ImageRef`]) whose VQGAN encoding is the starting z.
    #[serde(default)]
    pub init_image: Option<String>,
    /// Strength of the z regulariser; 0 turns it off (generate.py's default).
    #[serde(default)]
    pub init_weight: f32,
    #[serde(default)]
    pub init_regulariser: InitRegulariser,
    /// Without `init_image` or `init_noise`, z starts from random codebook tokens.
    #[serde(default)]
    pub init_noise: Option<InitNoise>,
    #[serde(default = "default_side")]
    pub width: u32,
    #[serde(default = "default_side")]
    pub height: u32,
    #[serde(default = "default_steps")]
    pub steps: u32,
    /// Random when absent; the resolved seed is always recorded in the outputs.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_lr")]
    pub lr: f32,
    #[serde(default)]
    pub optimizer: OptimizerKind,
    #[serde(default = "default_cutn")]
    pub cutn: u32,
    /// Skews `original`'s crop sizes toward small (>1) or large (<1); `latest` has no crops.
    #[serde(default = "default_cut_pow")]
    pub cut_pow: f32,
    #[serde(default)]
    pub cut_method: CutMethod,
    /// Applied to `latest` and `nrupdated` cutouts, as in generate.py; `original` uses
    /// none, `updated` and `updatedpooling` their own fixed lists.
    #[serde(default = "default_augments")]
    pub augments: Vec<Augment>,
    /// A frame is written every `save_every` steps; 0 writes only the final image.
    #[serde(default = "default_save_every")]
    pub save_every: u32,
    #[serde(default)]
    pub video: VideoSpec,
    /// Video styling: every frame of a source video is optimised toward the prompts
    /// and the styled frames make the video (generate.py's `--video_style_dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_style: Option<VideoStyleSpec>,
    #[serde(default)]
    pub zoom: Option<ZoomSpec>,
    /// Story mode: move to the next `^` phrase every this many steps (wrapping round after
    /// the last, as generate.py does); 0 keeps the first. Image and noise prompts stay in
    /// force through every phrase. generate.py rebuilds its prompt list from the text
    /// phrase alone at the first change, dropping them; vqclip keeps them, since a client
    /// that sent them meant them for the whole render.
    #[serde(default)]
    pub change_prompt_every: u32,
    #[serde(default)]
    pub models: ModelsSpec,
    /// A checkpoint is written every this many steps so a crashed job can resume; 0 never
    /// (a graceful shutdown still writes one).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u32,
}

fn default_version() -> u32 {
    SPEC_VERSION
}
fn default_side() -> u32 {
    512
}
fn default_steps() -> u32 {
    500
}
fn default_lr() -> f32 {
    0.1
}
fn default_cutn() -> u32 {
    32
}
fn default_cut_pow() -> f32 {
    1.0
}
fn default_augments() -> Vec<Augment> {
    vec![Augment::Af, Augment::Pe, Augment::Ji, Augment::Er]
}
fn default_save_every() -> u32 {
    50
}
fn default_checkpoint_every() -> u32 {
    50
}

impl Default for JobSpec {
    fn default() -> Self {
        // Deserialising `{}` is the single source of truth for defaults.
        serde_json::from_str("{}").expect("the empty spec deserialises")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePromptSpec {
    /// An [`ImageRef`]: `upload:<uuid>`, a bare uuid, or `data:image/...;base64,...`.
    pub image: String,
    #[serde(default = "default_weight")]
    pub weight: f32,
    #[serde(default)]
    pub stop: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisePromptSpec {
    pub seed: u64,
    #[serde(default = "default_weight")]
    pub weight: f32,
}

fn default_weight() -> f32 {
    1.0
}

/// How `init_weight` pulls on z.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitRegulariser {
    /// Crowson's notebook: `mse(z, z_init) * init_weight / 2`.
    MseInit,
    /// nerdyrodent's generate.py: `mse(z, 0) * init_weight / (2 * (2i + 1))`, fading out.
    #[default]
    DecayZero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitNoise {
    /// Uniform random pixels, VQGAN-encoded.
    Pixels,
    /// A random colour gradient, VQGAN-encoded.
    Gradient,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adam,
    Adamw,
    Adagrad,
    Adamax,
    Rmsprop,
    Radam,
    /// torch_optimizer's DiffGrad with generate.py's `eps=1e-9, weight_decay=1e-9`.
    Diffgrad,
    /// torch_optimizer's AdamP with its defaults.
    Adamp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutMethod {
    /// Crowson's random-size crops, pre-filtered when downscaling.
    Original,
    /// nerdyrodent's pooled whole-image cutouts followed by augmentations.
    #[default]
    Latest,
    /// generate.py's `MakeCutoutsUpdate`: random crops, then a fixed kornia list
    /// (flip, light jitter, sharpness, affine with border padding, perspective).
    Updated,
    /// generate.py's `MakeCutoutsNRUpdate`: random crops, then the `augments` list.
    Nrupdated,
    /// generate.py's `MakeCutoutsPoolingUpdate`: pooled copies, then a fixed list
    /// (affine with border padding, perspective, jitter, erasing).
    Updatedpooling,
}

/// generate.py's augmentation codes, kept verbatim so existing command lines translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Augment {
    /// Colour jitter.
    Ji,
    /// Sharpness.
    Sh,
    /// Gaussian noise.
    Gn,
    /// Perspective.
    Pe,
    /// Rotation.
    Ro,
    /// Affine (rotation, translation, shear).
    Af,
    /// Elastic transform.
    Et,
    /// Thin-plate spline.
    Ts,
    /// Random crop with reflect padding.
    Cr,
    /// Random erasing.
    Er,
    /// Random resized crop.
    Re,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Frames per second; with `output_fps`, the rate the frames are interpolated
    /// from (generate.py's `--input_video_fps`).
    #[serde(default = "default_fps")]
    pub fps: f32,
    /// generate.py's `--video_length`: the frame rate becomes
    /// `clamp(frames / length_seconds, 10, 60)`, replacing `fps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_seconds: Option<f32>,
    /// generate.py's `--output_video_fps`: frames shown at `fps` are interpolated up
    /// to this rate. generate.py has ffmpeg's motion-compensated `minterpolate`; vqclip
    /// cross-fades neighbouring frames (no ffmpeg in the process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_fps: Option<f32>,
}

impl VideoSpec {
    /// generate.py's bounds on the frame rate it derives from `--video_length`.
    pub const LENGTH_FPS_RANGE: (f32, f32) = (10.0, 60.0);

    /// The rate `frames` frames are shown at: `fps`, or generate.py's
    /// `clamp(frames / length, 10, 60)` when `length_seconds` is set.
    pub fn frame_rate(&self, frames: usize) -> f32 {
        match self.length_seconds {
            Some(length) if length > 0.0 => {
                let (lo, hi) = Self::LENGTH_FPS_RANGE;
                (frames as f32 / length).clamp(lo, hi)
            }
            _ => self.fps,
        }
    }
}

/// The source and pace of a video-styling job. As in generate.py every frame renders
/// with the same seed (generate.py draws a fresh one per frame when `--seed` is not
/// given; vqclip always has a resolved seed), from a fresh optimiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoStyleSpec {
    /// `upload:<id>` of an MP4 sent to `POST /v1/uploads`. On the command line,
    /// `--style-video` names a frame directory or an MP4 file and fills this in.
    pub video: String,
    /// Optimisation steps for each frame; absent: `steps` (generate.py runs its
    /// `--iterations` for every frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_frame: Option<u32>,
    /// Style only the first this many frames; absent: every frame, up to the
    /// deployment's `limits.max_video_frames`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames: Option<u32>,
    /// How much of the previous styled frame is blended into each source frame before
    /// it is encoded as that frame's init image. 0 (generate.py) starts every frame
    /// from its source frame alone; above 0 each frame starts partly from the previous
    /// result, which steadies the style from frame to frame; 1 ignores the source after
    /// the first frame.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub carry: f32,
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

impl VideoStyleSpec {
    pub fn steps_per_frame(&self, spec_steps: u32) -> u32 {
        self.steps_per_frame.unwrap_or(spec_steps)
    }
}

fn default_true() -> bool {
    true
}
fn default_fps() -> f32 {
    10.0
}

impl Default for VideoSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            fps: default_fps(),
            length_seconds: None,
            output_fps: None,
        }
    }
}

/// generate.py's zoom video: every `every` steps (from `start`) the image is zoomed and
/// shifted, re-encoded to a new z, and the optimiser restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoomSpec {
    #[serde(default)]
    pub start: u32,
    #[serde(default = "default_zoom_every")]
    pub every: u32,
    #[serde(default = "default_zoom_scale")]
    pub scale: f32,
    #[serde(default)]
    pub shift_x: i32,
    #[serde(default)]
    pub shift_y: i32,
}

fn default_zoom_every() -> u32 {
    10
}
fn default_zoom_scale() -> f32 {
    0.99
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSpec {
    /// A catalogue name or a local path.
    #[serde(default = "default_vqgan")]
    pub vqgan: String,
    /// One or more CLIP models; their losses are summed.
    #[serde(default = "default_clip")]
    pub clip: Vec<String>,
}

fn default_vqgan() -> String {
    "vqgan_imagenet_f16_16384".to_owned()
}
fn default_clip() -> Vec<String> {
    vec!["ViT-B/32".to_owned()]
}

impl Default for ModelsSpec {
    fn default() -> Self {
        Self {
            vqgan: default_vqgan(),
            clip: default_clip(),
        }
    }
}

/// Where an image in a spec comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image stored by `POST /v1/uploads`; the caller resolves it to bytes.
    Upload(uuid::Uuid),
    /// Image bytes carried inline as a `data:` URL.
    Inline { media_type: String, bytes: Vec<u8> },
}

impl ImageRef {
    /// Parses `upload:<uuid>`, a bare uuid, or `data:image/<type>;base64,<data>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("data:") {
            let (header, data) = rest
                .split_once(',')
                .ok_or("a data URL needs a comma before its payload")?;
            let media_type = header
                .strip_suffix(";base64")
                .ok_or("only base64 data URLs are accepted (data:image/png;base64,...)")?;
            if !media_type.starts_with("image/") {
                return Err(format!("media type {media_type:?} is not an image"));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| format!("invalid base64: {e}"))?;
            if bytes.is_empty() {
                return Err("the inline image is empty".to_owned());
            }
            return Ok(ImageRef::Inline {
                media_type: media_type.to_owned(),
                bytes,
            });
        }
        let id = s.strip_prefix("upload:").unwrap_or(s);
        uuid::Uuid::parse_str(id)
            .map(ImageRef::Upload)
            .map_err(|_| {
                "expected `upload:<id>` from POST /v1/uploads, a bare upload id, or \
                 `data:image/png;base64,...`"
                    .to_owned()
            })
    }
}

/// Bounds a deployment puts on jobs; the service fills these from its config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest `width * height`.
    pub max_pixels: u64,
    /// Largest `width` or `height`.
    pub max_side: u32,
    pub max_steps: u32,
    pub max_cutn: u32,
    /// Most prompts of all kinds together (every story phrase counted).
    pub max_prompts: usize,
    /// CLIP's context length including start and end tokens.
    pub max_prompt_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pixels: 1024 * 1024,
            max_side: 2048,
            max_steps: 2000,
            max_cutn: 128,
            max_prompts: 16,
            max_prompt_tokens: 77,
        }
    }
}

impl Limits {
    /// No bounds but CLIP's context: for specs that are not a client's request (the
    /// command line, a job the service already accepted).
    pub fn unbounded() -> Self {
        Self {
            max_pixels: u64::MAX,
            max_side: u32::MAX,
            max_steps: u32::MAX,
            max_cutn: u32::MAX,
            max_prompts: usize::MAX,
            ..Self::default()
        }
    }
}

/// The version of [`Validated`] this build writes and trusts. A stored job whose
/// validation has another version, or none (jobs stored before it was kept), is
/// validated again before it renders. Raise it whenever `Validated` or the rules that
/// produce it change.
pub const VALIDATION_VERSION: u32 = 1;

/// What validating a spec worked out: kept beside the spec, so that no later hop
/// parses, tokenizes or resolves it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validated {
    pub version: u32,
    /// The text prompts, parsed.
    pub prompts: PromptSet,
    /// CLIP tokens of each text prompt, start and end markers included, in the order
    /// a client counts them (`prompts[i]`).
    pub token_counts: Vec<usize>,
    /// Every image the spec names, resolved.
    pub images: Vec<ImageInput>,
}

impl Validated {
    /// The images stored by `POST /v1/uploads` that the render needs, with the
    /// reference each is named by in the spec.
    pub fn uploads(&self) -> impl Iterator<Item = (&str, uuid::Uuid)> {
        self.images.iter().filter_map(|i| match i.source {
            ImageSource::Upload(id) => Some((i.reference.as_str(), id)),
            ImageSource::Inline { .. } => None,
        })
    }
}

/// One image a spec names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInput {
    /// The spec field: `image_prompts[0].image`, `init_image` or `video_style.video`.
    pub field: String,
    /// As written in the spec, trimmed; the renderer's inputs are keyed by it.
    pub reference: String,
    pub source: ImageSource,
}

/// Where an image comes from, once its reference is parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    Upload(uuid::Uuid),
    Inline {
        media_type: String,
        /// Decoded by validation, for the checks made before the job is stored. Not
        /// stored: the spec's data URL already holds them.
        #[serde(skip)]
        bytes: Vec<u8>,
    },
}

impl From<ImageRef> for ImageSource {
    fn from(r: ImageRef) -> Self {
        match r {
            ImageRef::Upload(id) => ImageSource::Upload(id),
            ImageRef::Inline { media_type, bytes } => ImageSource::Inline { media_type, bytes },
        }
    }
}

/// A job's document as the service stores it, read for rendering: the spec, the
/// service's own fields beside it (left unread here), and what validation at submit
/// worked out (absent in jobs stored before it was kept).
#[derive(Debug, Clone, Deserialize)]
pub struct StoredSpec {
    #[serde(flatten)]
    pub spec: JobSpec,
    /// Read as it stands: a document of another version may not have this shape.
    #[serde(default)]
    validated: Option<serde_json::Value>,
}

impl StoredSpec {
    /// The key the validation is stored under, beside the spec's own fields.
    pub const VALIDATED_KEY: &'static str = "validated";

    /// The spec with what validation worked out. A document validated by this
    /// version is trusted as it is; any other (older, or from a newer build after a
    /// rollback) is validated again. The service accepted the job already, so only
    /// CLIP's context bounds it now.
    pub fn into_validated(self) -> Result<(JobSpec, Validated), SpecError> {
        let current = self
            .validated
            .filter(|v| {
                v.get("version").and_then(|v| v.as_u64()) == Some(VALIDATION_VERSION.into())
            })
            .and_then(|v| serde_json::from_value::<Validated>(v).ok());
        let validated = match current {
            Some(v) => v,
            None => self.spec.validate(&Limits::unbounded())?,
        };
        Ok((self.spec, validated))
    }
}

impl JobSpec {
    /// Checks every field against `limits` without loading a model, and returns what
    /// the checks worked out (parsed prompts, token counts, image sources).
    ///
    /// A text prompt longer than CLIP's 77-token context is rejected, not truncated:
    /// a silently shortened prompt renders something the client did not ask for, and
    /// the API can only say so loudly by refusing the job (HTTP 400).
    pub fn validate(&self, limits: &Limits) -> Result<Validated, SpecError> {
        if self.version != SPEC_VERSION {
            return Err(SpecError::new(
                "version",
                format!("must be {SPEC_VERSION}"),
                format!(
                    "got {}; this server understands version {SPEC_VERSION}",
                    self.version
                ),
            ));
        }
        self.validate_size(limits)?;
        check_range("steps", self.steps, 1, limits.max_steps)?;
        check_range("cutn", self.cutn, 1, limits.max_cutn)?;
        check_finite_range("cut_pow", self.cut_pow, 0.01, 10.0)?;
        if self.lr <= 0.0 {
            return Err(SpecError::new(
                "lr",
                "must be positive",
                format!("got {}, allowed (0, 10]", self.lr),
            ));
        }
        check_finite_range("lr", self.lr, 0.0, 10.0)?;
        let (prompt_set, token_counts, mut images) = self.validate_prompts(limits)?;
        images.extend(self.validate_init()?);
        if self.change_prompt_every > 0 && prompt_set.phrases.len() < 2 {
            return Err(SpecError::new(
                "change_prompt_every",
                "needs story phrases separated by `^` in prompts",
                format!(
                    "got change_prompt_every = {} with {} phrase",
                    self.change_prompt_every,
                    prompt_set.phrases.len()
                ),
            ));
        }
        if self.video.enabled {
            self.validate_video()?;
        }
        if let Some(style) = &self.video_style {
            self.validate_video_style(style, limits)?;
            // Left unresolved when it is not an upload: the command line names a file
            // or directory here, and the API refuses anything but an upload.
            if let Ok(ImageRef::Upload(id)) = ImageRef::parse(&style.video) {
                images.push(ImageInput {
                    field: "video_style.video".into(),
                    reference: style.video.trim().to_owned(),
                    source: ImageSource::Upload(id),
                });
            }
        }
        if let Some(zoom) = &self.zoom {
            check_range("zoom.every", zoom.every, 1, u32::MAX)?;
            check_finite_range("zoom.scale", zoom.scale, 0.5, 2.0)?;
            check_range(
                "zoom.shift_x",
                zoom.shift_x,
                -(self.width as i32),
                self.width as i32,
            )?;
            check_range(
                "zoom.shift_y",
                zoom.shift_y,
                -(self.height as i32),
                self.height as i32,
            )?;
        }
        self.validate_models()?;
        Ok(Validated {
            version: VALIDATION_VERSION,
            prompts: prompt_set,
            token_counts,
            images,
        })
    }

    fn validate_size(&self, limits: &Limits) -> Result<(), SpecError> {
        for (field, side) in [("width", self.width), ("height", self.height)] {
            let allowed = format!("allowed 16..={} in steps of 16", limits.max_side);
            if side % 16 != 0 || side == 0 {
                return Err(SpecError::new(
                    field,
                    "must be a multiple of 16",
                    format!("got {side}, {allowed}"),
                ));
            }
            if side > limits.max_side {
                return Err(SpecError::new(
                    field,
                    format!("must be at most {}", limits.max_side),
                    format!("got {side}, {allowed}"),
                ));
            }
        }
        let pixels = u64::from(self.width) * u64::from(self.height);
        if pixels > limits.max_pixels {
            return Err(SpecError::new(
                "width",
                format!("width * height must be at most {}", limits.max_pixels),
                format!("got {}x{} = {pixels} pixels", self.width, self.height),
            ));
        }
        Ok(())
    }

    /// Every noise prompt, from either shape: `noise_prompts`, or the pairs of
    /// `noise_prompt_seeds` and `noise_prompt_weights` (validation guarantees one form and
    /// equal counts).
    pub fn all_noise_prompts(&self) -> Vec<NoisePromptSpec> {
        let paired = self
            .noise_prompt_seeds
            .iter()
            .zip(&self.noise_prompt_weights)
            .map(|(&seed, &weight)| NoisePromptSpec { seed, weight });
        self.noise_prompts.iter().cloned().chain(paired).collect()
    }

    fn validate_noise_pairs(&self) -> Result<(), SpecError> {
        let (seeds, weights) = (
            self.noise_prompt_seeds.len(),
            self.noise_prompt_weights.len(),
        );
        if seeds != weights {
            return Err(SpecError::new(
                "noise_prompt_weights",
                "must give exactly one weight per entry of noise_prompt_seeds",
                format!(
                    "got {seeds} seeds and {weights} weights; generate.py's zip would silently \
                     drop the unpaired ones, so vqclip refuses rather than guess"
                ),
            ));
        }
        if seeds > 0 && !self.noise_prompts.is_empty() {
            return Err(SpecError::new(
                "noise_prompt_seeds",
                "cannot be combined with noise_prompts",
                "give noise prompts either as noise_prompts [{seed, weight}] or as \
                 noise_prompt_seeds with noise_prompt_weights",
            ));
        }
        Ok(())
    }

    /// The parsed prompts, their token counts and the image prompts' sources.
    fn validate_prompts(
        &self,
        limits: &Limits,
    ) -> Result<(PromptSet, Vec<usize>, Vec<ImageInput>), SpecError> {
        let set = prompts::prompt_set(&self.prompts)?;
        self.validate_noise_pairs()?;
        let noise = self.all_noise_prompts();
        let text_count: usize = set.phrases.iter().map(Vec::len).sum();
        let total = text_count + self.image_prompts.len() + noise.len();
        if total == 0 {
            return Err(SpecError::new(
                "prompts",
                "at least one text, image or noise prompt is required",
                "got none; e.g. \"prompts\": \"a wooden banana temple\"",
            ));
        }
        if total > limits.max_prompts {
            return Err(SpecError::new(
                "prompts",
                format!("at most {} prompts in all", limits.max_prompts),
                format!(
                    "got {text_count} text (all story phrases), {} image and {} noise prompts",
                    self.image_prompts.len(),
                    noise.len()
                ),
            ));
        }
        let mut token_counts = Vec::with_capacity(text_count);
        for (p, phrase) in set.phrases.iter().enumerate() {
            for (i, prompt) in phrase.iter().enumerate() {
                let field = format!("prompts[{}]", phrase_index(p, i, &set));
                check_finite_range(&format!("{field}.weight"), prompt.weight, -1e3, 1e3)?;
                if let Some(stop) = prompt.stop {
                    check_finite_range(&format!("{field}.stop"), stop, -10.0, 10.0)?;
                }
                token_counts.push(check_token_length(&field, &prompt.text, limits)?);
            }
        }
        let mut images = Vec::with_capacity(self.image_prompts.len());
        for (i, prompt) in self.image_prompts.iter().enumerate() {
            let field = format!("image_prompts[{i}]");
            let image = ImageRef::parse(&prompt.image).map_err(|e| {
                SpecError::new(format!("{field}.image"), "must be an image reference", e)
            })?;
            images.push(ImageInput {
                field: format!("{field}.image"),
                reference: prompt.image.trim().to_owned(),
                source: image.into(),
            });
            check_finite_range(&format!("{field}.weight"), prompt.weight, -1e3, 1e3)?;
            if let Some(stop) = prompt.stop {
                check_finite_range(&format!("{field}.stop"), stop, -10.0, 10.0)?;
            }
        }
        for (i, prompt) in self.noise_prompts.iter().enumerate() {
            check_finite_range(
                &format!("noise_prompts[{i}].weight"),
                prompt.weight,
                -1e3,
                1e3,
            )?;
        }
        for (i, &weight) in self.noise_prompt_weights.iter().enumerate() {
            check_finite_range(&format!("noise_prompt_weights[{i}]"), weight, -1e3, 1e3)?;
        }
        Ok((set, token_counts, images))
    }

    fn validate_init(&self) -> Result<Option<ImageInput>, SpecError> {
        check_finite_range("init_weight", self.init_weight, 0.0, 1e3)?;
        let Some(image) = &self.init_image else {
            return Ok(None);
        };
        let source = ImageRef::parse(image)
            .map_err(|e| SpecError::new("init_image", "must be an image reference", e))?;
        if self.init_noise.is_some() {
            return Err(SpecError::new(
                "init_noise",
                "cannot be combined with init_image",
                "remove one of init_image and init_noise",
            ));
        }
        Ok(Some(ImageInput {
            field: "init_image".into(),
            reference: image.trim().to_owned(),
            source: source.into(),
        }))
    }

    fn validate_video(&self) -> Result<(), SpecError> {
        let video = &self.video;
        check_finite_range("video.fps", video.fps, 1.0, 60.0)?;
        if let Some(length) = video.length_seconds {
            check_finite_range("video.length_seconds", length, 0.1, 3600.0)?;
        }
        if let Some(out) = video.output_fps {
            // generate.py interpolates only above 9 fps.
            check_finite_range("video.output_fps", out, 10.0, 60.0)?;
            if out < video.fps {
                return Err(SpecError::new(
                    "video.output_fps",
                    "must be at least video.fps, the rate interpolated from",
                    format!("got output_fps {out} below fps {}", video.fps),
                ));
            }
            if video.length_seconds.is_some() {
                return Err(SpecError::new(
                    "video.length_seconds",
                    "cannot be combined with video.output_fps",
                    "generate.py ignores --video_length when it interpolates; set one of them",
                ));
            }
        }
        Ok(())
    }

    fn validate_video_style(
        &self,
        style: &VideoStyleSpec,
        limits: &Limits,
    ) -> Result<(), SpecError> {
        if style.video.trim().is_empty() {
            return Err(SpecError::new(
                "video_style.video",
                "must name the source video",
                "got an empty string; upload an MP4 with POST /v1/uploads and pass its `upload:<id>`",
            ));
        }
        if let Some(n) = style.steps_per_frame {
            check_range("video_style.steps_per_frame", n, 1, limits.max_steps)?;
        }
        if let Some(n) = style.max_frames {
            check_range("video_style.max_frames", n, 1, u32::MAX)?;
        }
        check_finite_range("video_style.carry", style.carry, 0.0, 1.0)?;
        // The source frames are the init images, shown at the source's own rate.
        let conflicts = [
            ("init_image", self.init_image.is_some()),
            ("init_noise", self.init_noise.is_some()),
            ("zoom", self.zoom.is_some()),
            ("video.length_seconds", self.video.length_seconds.is_some()),
            ("video.output_fps", self.video.output_fps.is_some()),
        ];
        for (field, set) in conflicts {
            if set {
                return Err(SpecError::new(
                    field,
                    "cannot be combined with video_style",
                    "each source frame is the init image, and the styled video keeps the source's frame rate",
                ));
            }
        }
        Ok(())
    }

    fn validate_models(&self) -> Result<(), SpecError> {
        if self.models.vqgan.trim().is_empty() {
            return Err(SpecError::new(
                "models.vqgan",
                "must name a VQGAN model",
                "got an empty string; e.g. vqgan_imagenet_f16_16384",
            ));
        }
        if self.models.clip.is_empty() || self.models.clip.len() > 4 {
            return Err(SpecError::new(
                "models.clip",
                "must list 1 to 4 CLIP models",
                format!("got {}", self.models.clip.len()),
            ));
        }
        for (i, name) in self.models.clip.iter().enumerate() {
            if name.trim().is_empty() {
                return Err(SpecError::new(
                    format!("models.clip[{i}]"),
                    "must name a CLIP model",
                    "got an empty string; e.g. ViT-B/32",
                ));
            }
        }
        Ok(())
    }
}

/// Which models a job from an API client may name: catalogue names, the server's own
/// configured defaults, and paths inside the configured model directories. Anything
/// else is refused before the job is queued, so a client can neither make the server
/// open arbitrary files nor learn from failure messages which paths exist.
#[derive(Debug, Clone, Default)]
pub struct ModelPolicy {
    /// Accepted as written: the server's configured defaults.
    fixed: Vec<String>,
    /// Canonical directories; a path is accepted when it resolves inside one of them.
    dirs: Vec<std::path::PathBuf>,
}

impl ModelPolicy {
    /// `dirs` that do not exist (yet) are skipped: nothing can resolve inside them.
    pub fn new(fixed: Vec<String>, dirs: &[std::path::PathBuf]) -> Self {
        let dirs = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
        Self { fixed, dirs }
    }

    fn allows(&self, name: &str, kind: crate::models::catalogue::ModelKind) -> bool {
        if self.fixed.iter().any(|f| f == name) {
            return true;
        }
        if let Some(entry) = crate::models::catalogue::find(name) {
            return entry.kind == kind;
        }
        // Canonical form resolves `..` and symlinks, so neither can step outside.
        std::path::Path::new(name)
            .canonicalize()
            .is_ok_and(|p| self.dirs.iter().any(|d| p.starts_with(d)))
    }

    /// The catalogue's models by kind, as `GET /v1/limits` and the web page list
    /// them: `(vqgan, clip)`.
    pub fn catalogue() -> (Vec<&'static str>, Vec<&'static str>) {
        use crate::models::catalogue::{ModelKind, CATALOGUE};
        let names = |kind: ModelKind| -> Vec<&'static str> {
            CATALOGUE
                .iter()
                .filter(|e| e.kind == kind)
                .map(|e| e.name)
                .collect()
        };
        (names(ModelKind::Vqgan), names(ModelKind::Clip))
    }

    fn known(kind: crate::models::catalogue::ModelKind) -> String {
        crate::models::catalogue::CATALOGUE
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl JobSpec {
    /// Checks `models` against what the server allows. The answer never says whether a
    /// path exists: a missing path and a forbidden one read the same.
    pub fn check_models(&self, policy: &ModelPolicy) -> Result<(), SpecError> {
        use crate::models::catalogue::ModelKind;
        let names = std::iter::once((
            "models.vqgan".to_owned(),
            &self.models.vqgan,
            ModelKind::Vqgan,
        ))
        .chain(
            self.models
                .clip
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("models.clip[{i}]"), n, ModelKind::Clip)),
        );
        for (field, name, kind) in names {
            if !policy.allows(name, kind) {
                return Err(SpecError::new(
                    field,
                    format!("must be a {kind} model of the catalogue or a path under a model directory of this server"),
                    format!(
                        "got {:?}; the {kind} models are {} (GET /v1/limits lists them)",
                        name.chars().take(200).collect::<String>(),
                        ModelPolicy::known(kind)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The index of a prompt across all story phrases, as a client would count them.
fn phrase_index(phrase: usize, index: usize, set: &PromptSet) -> usize {
    set.phrases[..phrase].iter().map(Vec::len).sum::<usize>() + index
}

/// The bundled CLIP tokenizer, built once: validation must not need a model on disk.
fn tokenizer() -> Result<&'static crate::models::ClipTokenizer, SpecError> {
    static TOKENIZER: OnceLock<Result<crate::models::ClipTokenizer, String>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| crate::models::ClipTokenizer::bundled().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| SpecError::new("prompts", "could not be tokenized", e.clone()))
}

/// The prompt's CLIP token count, start and end markers included.
fn check_token_length(field: &str, text: &str, limits: &Limits) -> Result<usize, SpecError> {
    let body = tokenizer()?.encode_body(text).map_err(|e| {
        SpecError::new(
            format!("{field}.text"),
            "could not be tokenized",
            e.to_string(),
        )
    })?;
    // The start and end markers take two places of the context.
    let count = body.len() + 2;
    if count > limits.max_prompt_tokens {
        return Err(SpecError::new(
            format!("{field}.text"),
            format!(
                "must fit CLIP's context of {} tokens, start and end markers included",
                limits.max_prompt_tokens
            ),
            format!("got {count} tokens; shorten the prompt or split it with `|`"),
        ));
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_catalogue_names_defaults_or_paths_inside_model_dirs() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("models");
        std::fs::create_dir_all(dir.join("my-clip")).unwrap();
        std::fs::create_dir_all(root.path().join("outside")).unwrap();
        let policy = ModelPolicy::new(vec!["/srv/default.ckpt".into()], std::slice::from_ref(&dir));
        let with = |vqgan: &str, clip: &str| {
            let mut s = spec(r#"{"prompts": "a cat"}"#);
            s.models.vqgan = vqgan.to_owned();
            s.models.clip = vec![clip.to_owned()];
            s.check_models(&policy)
        };
        with("vqgan_imagenet_f16_16384", "ViT-B/32").unwrap();
        with("/srv/default.ckpt", dir.join("my-clip").to_str().unwrap()).unwrap();
        let escape = format!("{}/../outside", dir.display());
        let refused = [
            ("/etc", "ViT-B/32", "models.vqgan"),
            ("vqgan_imagenet_f16_16384", "/etc", "models.clip[0]"),
            // `..` out of a model directory, an existing and a missing path outside it.
            (
                "vqgan_imagenet_f16_16384",
                escape.as_str(),
                "models.clip[0]",
            ),
            (
                "vqgan_imagenet_f16_16384",
                "/nonexistent/clip",
                "models.clip[0]",
            ),
            // A catalogue name of the wrong kind.
            ("ViT-B/32", "ViT-B/32", "models.vqgan"),
        ];
        for (vqgan, clip, field) in refused {
            let err = with(vqgan, clip).unwrap_err();
            assert_eq!(err.field, field, "{vqgan} {clip}: {err}");
        }
        // A missing path and an existing forbidden one get the same answer.
        let a = with("vqgan_imagenet_f16_16384", "/nonexistent").unwrap_err();
        let b = with("vqgan_imagenet_f16_16384", "/etc").unwrap_err();
        assert_eq!(a.rule, b.rule);
        assert_eq!(
            a.detail.replace("/nonexistent", "/etc"),
            b.detail,
            "the answer must not depend on whether the path exists"
        );
    }

    fn spec(json: &str) -> JobSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_generate_py() {
        let s = spec(r#"{"prompts": "a cat"}"#);
        assert_eq!(s.version, 1);
        assert_eq!((s.width, s.height, s.steps), (512, 512, 500));
        assert_eq!((s.cutn, s.cut_pow, s.lr), (32, 1.0, 0.1));
        assert_eq!(s.cut_method, CutMethod::Latest);
        assert_eq!(s.optimizer, OptimizerKind::Adam);
        assert_eq!(s.augments, default_augments());
        assert_eq!(s.save_every, 50);
        assert_eq!(s.models.clip, vec!["ViT-B/32"]);
        assert_eq!(s.models.vqgan, "vqgan_imagenet_f16_16384");
        s.validate(&Limits::default()).unwrap();
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<JobSpec>(r#"{"prompts": "a", "step": 3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `step`"), "{err}");
        let err = serde_json::from_str::<JobSpec>(r#"{"zoom": {"scal": 1.0}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn width_not_multiple_of_16_names_field_rule_and_range() {
        let s = spec(r#"{"prompts": "a", "width": 500}"#);
        let err = s.validate(&Limits::default()).unwrap_err();
        assert_eq!(err.field, "width");
        assert_eq!(
            err.to_string(),
            "width: must be a multiple of 16; got 500, allowed 16..=2048 in steps of 16"
        );
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits::default();
        let cases = [
            (r#"{"prompts": "a", "steps": 0}"#, "steps"),
            (r#"{"prompts": "a", "steps": 2001}"#, "steps"),
            (r#"{"prompts": "a", "cutn": 129}"#, "cutn"),
            (
                r#"{"prompts": "a", "width": 2048, "height": 1024}"#,
                "width",
            ),
            (r#"{"prompts": "a", "height": 4096}"#, "height"),
            (r#"{"prompts": "a", "lr": 0}"#, "lr"),
            (r#"{"prompts": "a", "video": {"fps": 0}}"#, "video.fps"),
            (r#"{"prompts": "a", "models": {"clip": []}}"#, "models.clip"),
            (r#"{"prompts": "a|:2"}"#, "prompts[1]"),
            (r#"{}"#, "prompts"),
            (
                r#"{"prompts": "a", "change_prompt_every": 5}"#,
                "change_prompt_every",
            ),
            (r#"{"prompts": "a", "init_image": "nope"}"#, "init_image"),
            (
                r#"{"image_prompts": [{"image": "data:text/plain;base64,aGk="}]}"#,
                "image_prompts[0].image",
            ),
        ];
        for (json, field) in cases {
            let err = spec(json).validate(&limits).unwrap_err();
            assert!(err.field.starts_with(field), "{json}: {err}");
        }
    }

    #[test]
    fn too_many_prompts_counts_every_kind() {
        let texts: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
        let json = format!(
            r#"{{"prompts": "{}", "noise_prompts": [{}]}}"#,
            texts.join("|"),
            (0..7)
                .map(|i| format!(r#"{{"seed": {i}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let err = spec(&json).validate(&Limits::default()).unwrap_err();
        assert_eq!(err.field, "prompts");
        assert!(err.rule.contains("16"), "{err}");
    }

    #[test]
    fn overlong_prompt_is_rejected_not_truncated() {
        let long = "word ".repeat(76);
        let err = spec(&format!(r#"{{"prompts": "ok|{long}"}}"#))
            .validate(&Limits::default())
            .unwrap_err();
        assert_eq!(err.field, "prompts[1].text");
        assert!(err.detail.contains("got 78 tokens"), "{err}");
        let fits = "word ".repeat(75);
        spec(&format!(r#"{{"prompts": "{fits}"}}"#))
            .validate(&Limits::default())
            .unwrap();
    }

    #[test]
    fn noise_prompt_pairs_need_equal_counts_and_one_form() {
        let limits = Limits::default();
        let s = spec(r#"{"noise_prompt_seeds": [3, 4], "noise_prompt_weights": [0.5, -1]}"#);
        s.validate(&limits).unwrap();
        let all = s.all_noise_prompts();
        assert_eq!(
            all,
            vec![
                NoisePromptSpec {
                    seed: 3,
                    weight: 0.5
                },
                NoisePromptSpec {
                    seed: 4,
                    weight: -1.0
                }
            ]
        );
        for (json, field) in [
            (
                r#"{"noise_prompt_seeds": [3, 4], "noise_prompt_weights": [0.5]}"#,
                "noise_prompt_weights",
            ),
            (r#"{"noise_prompt_seeds": [3]}"#, "noise_prompt_weights"),
            (
                r#"{"prompts": "a", "noise_prompt_weights": [1]}"#,
                "noise_prompt_weights",
            ),
            (
                r#"{"noise_prompts": [{"seed": 1}], "noise_prompt_seeds": [2], "noise_prompt_weights": [1]}"#,
                "noise_prompt_seeds",
            ),
            (
                r#"{"noise_prompt_seeds": [2], "noise_prompt_weights": [1e9]}"#,
                "noise_prompt_weights[0]",
            ),
        ] {
            let err = spec(json).validate(&limits).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        let err = spec(r#"{"noise_prompt_seeds": [3, 4], "noise_prompt_weights": [0.5]}"#)
            .validate(&limits)
            .unwrap_err();
        assert!(err.detail.contains("2 seeds and 1 weights"), "{err}");
    }

    #[test]
    fn image_refs_parse() {
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert!(matches!(
            ImageRef::parse(&format!("upload:{id}")),
            Ok(ImageRef::Upload(_))
        ));
        assert!(matches!(ImageRef::parse(id), Ok(ImageRef::Upload(_))));
        match ImageRef::parse("data:image/png;base64,iVBORw0KGgo=").unwrap() {
            ImageRef::Inline { media_type, bytes } => {
                assert_eq!(media_type, "image/png");
                assert_eq!(&bytes[1..4], b"PNG");
            }
            other => panic!("{other:?}"),
        }
        assert!(ImageRef::parse("/etc/passwd").is_err());
        assert!(ImageRef::parse("data:image/png,raw").is_err());
        assert!(ImageRef::parse("data:image/png;base64,!!!").is_err());
    }

    #[test]
    fn video_options_and_video_style_are_checked() {
        let limits = Limits::default();
        let ok = spec(
            r#"{"prompts": "a", "video": {"fps": 15, "output_fps": 30},
                "video_style": {"video": "upload:0f8fad5b-d9cb-469f-a165-70867728950e",
                                "steps_per_frame": 5, "max_frames": 2}}"#,
        );
        // Interpolation is for step videos; a styled video keeps the source's rate.
        assert_eq!(ok.validate(&limits).unwrap_err().field, "video.output_fps");
        let styled = spec(
            r#"{"prompts": "a", "steps": 9,
                "video_style": {"video": "upload:0f8fad5b-d9cb-469f-a165-70867728950e"}}"#,
        );
        styled.validate(&limits).unwrap();
        let style = styled.video_style.as_ref().unwrap();
        assert_eq!(style.steps_per_frame(styled.steps), 9);
        // Absent options stay absent when recorded, so older specs keep their fingerprint.
        let text = serde_json::to_string(&spec(r#"{"prompts": "a"}"#)).unwrap();
        assert!(
            !text.contains("video_style") && !text.contains("length_seconds"),
            "{text}"
        );
        spec(r#"{"prompts": "a", "video": {"length_seconds": 4}}"#)
            .validate(&limits)
            .unwrap();
        let cases = [
            (
                r#"{"prompts": "a", "video": {"length_seconds": 0}}"#,
                "video.length_seconds",
            ),
            (
                r#"{"prompts": "a", "video": {"output_fps": 5}}"#,
                "video.output_fps",
            ),
            (
                r#"{"prompts": "a", "video": {"fps": 30, "output_fps": 20}}"#,
                "video.output_fps",
            ),
            (
                r#"{"prompts": "a", "video": {"output_fps": 30, "length_seconds": 3}}"#,
                "video.length_seconds",
            ),
            (
                r#"{"prompts": "a", "video_style": {"video": " "}}"#,
                "video_style.video",
            ),
            (
                r#"{"prompts": "a", "video_style": {"video": "v", "steps_per_frame": 0}}"#,
                "video_style.steps_per_frame",
            ),
            (
                r#"{"prompts": "a", "video_style": {"video": "v", "max_frames": 0}}"#,
                "video_style.max_frames",
            ),
            (
                r#"{"prompts": "a", "zoom": {}, "video_style": {"video": "v"}}"#,
                "zoom",
            ),
            (
                r#"{"prompts": "a", "video_style": {"video": "v", "carry": 1.5}}"#,
                "video_style.carry",
            ),
            (
                r#"{"prompts": "a", "init_image": "upload:0f8fad5b-d9cb-469f-a165-70867728950e",
                    "video_style": {"video": "v"}}"#,
                "init_image",
            ),
        ];
        for (json, field) in cases {
            let err = spec(json).validate(&limits).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }

    #[test]
    fn list_prompts_round_trip() {
        let s = spec(
            r#"{"prompts": [{"text": "a: b", "weight": -0.5, "stop": -1}], "zoom": {"every": 5}}"#,
        );
        s.validate(&Limits::default()).unwrap();
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(s.zoom.unwrap().scale, 0.99);
        // Service fields belong to the API's request, not to the render spec.
        let err = serde_json::from_str::<JobSpec>(r#"{"prompts": "a", "priority": 1}"#);
        assert!(err.is_err());
    }

    #[test]
    fn validation_keeps_what_it_worked_out() {
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let s = spec(&format!(
            r#"{{"prompts": "a red apple:2 ^ a pear", "change_prompt_every": 3,
                "image_prompts": [{{"image": " upload:{id} "}}],
                "init_image": "data:image/png;base64,iVBORw0KGgo="}}"#
        ));
        let v = s.validate(&Limits::default()).unwrap();
        assert_eq!(v.version, VALIDATION_VERSION);
        assert_eq!(v.prompts.phrases.len(), 2);
        assert_eq!(v.prompts.phrases[0][0].weight, 2.0);
        // "a red apple" is three body tokens, "a pear" two; both plus start and end.
        assert_eq!(v.token_counts, vec![5, 4]);
        let uploads: Vec<_> = v.uploads().collect();
        assert_eq!(
            uploads,
            vec![(format!("upload:{id}").as_str(), id.parse().unwrap())]
        );
        assert_eq!(v.images[1].field, "init_image");
        assert!(
            matches!(&v.images[1].source, ImageSource::Inline { media_type, bytes } if media_type == "image/png" && bytes.len() == 8)
        );
        // Stored and read back, it is the same but for the inline bytes.
        let back: Validated = serde_json::from_value(serde_json::to_value(&v).unwrap()).unwrap();
        assert_eq!(back.prompts, v.prompts);
        assert_eq!(back.images[0], v.images[0]);
        assert!(
            matches!(&back.images[1].source, ImageSource::Inline { bytes, .. } if bytes.is_empty())
        );
        assert_eq!(
            Limits::unbounded().max_prompt_tokens,
            Limits::default().max_prompt_tokens
        );
    }

    #[test]
    fn a_stored_validation_of_this_version_is_trusted_and_any_other_redone() {
        let mut doc = serde_json::json!({"prompts": "a cat", "priority": 3, "keep": true,
                                         "webhook": null});
        let fresh = spec(r#"{"prompts": "a cat"}"#)
            .validate(&Limits::default())
            .unwrap();
        // Trusted as stored: the stored prompts win over the spec's text, which is
        // not parsed again.
        let mut stored = fresh.clone();
        stored.prompts.phrases[0][0].text = "as stored".into();
        doc["validated"] = serde_json::to_value(&stored).unwrap();
        let read = |doc: &serde_json::Value| {
            serde_json::from_value::<StoredSpec>(doc.clone())
                .unwrap()
                .into_validated()
                .unwrap()
        };
        assert_eq!(read(&doc).1.prompts.phrases[0][0].text, "as stored");
        // Another version, a shape this build does not know, or none: validated again.
        for validated in [
            serde_json::json!({"version": 0, "prompts": {"phrases": []}}),
            serde_json::json!({"version": VALIDATION_VERSION, "prompts": "?"}),
            serde_json::Value::Null,
        ] {
            doc["validated"] = validated;
            let (spec, v) = read(&doc);
            assert_eq!(v, fresh);
            assert_eq!(spec.prompts, PromptsSpec::Syntax("a cat".into()));
        }
        // A stored spec that no longer validates says why.
        doc["width"] = serde_json::json!(500);
        let err = serde_json::from_value::<StoredSpec>(doc)
            .unwrap()
            .into_validated()
            .unwrap_err();
        assert_eq!(err.field, "width");
    }
}
