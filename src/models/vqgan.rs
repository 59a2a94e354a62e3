//! The taming-transformers VQGAN (`taming.models.vqgan.VQModel`): encoder, vector quantizer
//! and decoder, with weight names exactly as in the original checkpoints.
//!
//! Also the two variants `generate.py` accepts: `GumbelVQ` (its codebook is
//! `quantize.embed.weight`, and `generate.py` snaps to it by nearest neighbour like the others)
//! and the first stage of a `Net2NetTransformer` checkpoint (`first_stage_model.*`), which is a
//! plain `VQModel`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{attention, upsample_nearest2x, Conv2d, GroupNorm};
use super::{weights, ModelError};

/// taming's `Normalize`: GroupNorm(32, eps 1e-6, affine).
const NORM_GROUPS: usize = 32;
const NORM_EPS: f64 = 1e-6;

/// `model.params.ddconfig` of a taming `model.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdConfig {
    #[serde(default)]
    pub double_z: bool,
    pub z_channels: usize,
    pub resolution: usize,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_resolutions: Vec<usize>,
    #[serde(default)]
    pub dropout: f64,
}

fn three() -> usize {
    3
}

/// Which taming quantizer a VQGAN was trained with; it decides where the codebook lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantizer {
    /// `VectorQuantizer` (`VQModel`): codebook `quantize.embedding.weight`.
    #[default]
    Nearest,
    /// `GumbelQuantize` (`GumbelVQ`): codebook `quantize.embed.weight` and the logits
    /// projection `quantize.proj`, a 1x1 conv from the latent to `n_embed` logits.
    Gumbel,
}

/// `model.params` of a taming `model.yaml` (the parts that shape the network).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqganConfig {
    pub embed_dim: usize,
    pub n_embed: usize,
    pub ddconfig: DdConfig,
    /// From the yaml's `target`, not a taming parameter.
    #[serde(default)]
    pub quantizer: Quantizer,
}

/// The taming class names this loader understands, as they appear in `target`.
const TARGET_VQMODEL: &str = "VQModel";
const TARGET_GUMBEL: &str = "GumbelVQ";
const TARGET_NET2NET: &str = "Net2NetTransformer";

/// Where a Net2Net checkpoint keeps its VQGAN: `generate.py` uses `model.first_stage_model`.
pub const NET2NET_FIRST_STAGE_PREFIX: &str = "first_stage_model.";

/// A parsed taming `model.yaml`: the VQGAN's config and, for a Net2Net checkpoint, the prefix
/// of the VQGAN's tensors inside it.
#[derive(Debug, Clone, PartialEq)]
pub struct VqganYaml {
    pub config: VqganConfig,
    /// `Some("first_stage_model.")` for `Net2NetTransformer` checkpoints.
    pub weights_prefix: Option<&'static str>,
}

impl VqganYaml {
    /// Parses a taming `model.yaml` (`model: {target, params: {...}}`), or a bare `params` map.
    /// `VQModel`, `GumbelVQ` and `Net2NetTransformer` (its `first_stage_config`) are accepted.
    pub fn from_yaml_str(text: &str) -> std::result::Result<Self, String> {
        let root: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let (target, params, weights_prefix) = match root.get("model") {
            Some(model) => {
                let target = model
                    .get("target")
                    .and_then(|t| t.as_str())
                    .map(str::to_owned);
                let params = model
                    .get("params")
                    .cloned()
                    .ok_or("model.params is missing")?;
                if target.as_deref().map(class_name) == Some(TARGET_NET2NET) {
                    let first = params.get("first_stage_config").ok_or(
                        "model.target is Net2NetTransformer but model.params.first_stage_config is missing",
                    )?;
                    let first_target = first
                        .get("target")
                        .and_then(|t| t.as_str())
                        .map(str::to_owned);
                    let first_params = first
                        .get("params")
                        .cloned()
                        .ok_or("model.params.first_stage_config.params is missing")?;
                    (first_target, first_params, Some(NET2NET_FIRST_STAGE_PREFIX))
                } else {
                    (target, params, None)
                }
            }
            None => match root.get("params") {
                Some(params) => (None, params.clone(), None),
                None => (None, root.clone(), None),
            },
        };
        let quantizer = match target.as_deref().map(class_name) {
            None | Some(TARGET_VQMODEL) => Quantizer::Nearest,
            Some(TARGET_GUMBEL) => Quantizer::Gumbel,
            Some(_) => {
                return Err(format!(
                    "model.target is {}; supported are taming.models.vqgan.VQModel, \
                     taming.models.vqgan.GumbelVQ and taming.models.cond_transformer.Net2NetTransformer \
                     (its first stage)",
                    target.as_deref().unwrap_or_default()
                ))
            }
        };
        let mut config: VqganConfig = serde_yaml_ng::from_value(params).map_err(|e| {
            format!("expected model.params with embed_dim, n_embed and ddconfig: {e}")
        })?;
        config.quantizer = quantizer;
        config.validate()?;
        Ok(Self {
            config,
            weights_prefix,
        })
    }

    /// Reads and parses a `model.yaml`.
    pub fn from_yaml_file(path: &Path) -> std::result::Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_yaml_str(&text).map_err(|e| ModelError::config(path, e))
    }
}

/// `taming.models.vqgan.GumbelVQ` -> `GumbelVQ`.
fn class_name(target: &str) -> &str {
    target.rsplit('.').next().unwrap_or(target)
}

impl VqganConfig {
    /// Parses a taming `model.yaml`; see [`VqganYaml::from_yaml_str`].
    pub fn from_yaml_str(text: &str) -> std::result::Result<Self, String> {
        VqganYaml::from_yaml_str(text).map(|y| y.config)
    }

    /// Reads and parses a `model.yaml`.
    pub fn from_yaml_file(path: &Path) -> std::result::Result<Self, ModelError> {
        VqganYaml::from_yaml_file(path).map(|y| y.config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let dd = &self.ddconfig;
        if self.quantizer == Quantizer::Gumbel && self.embed_dim != dd.z_channels {
            // GumbelQuantize's proj takes z_channels but is fed quant_conv's embed_dim output.
            return Err(format!(
                "GumbelVQ needs embed_dim == ddconfig.z_channels (got {} and {})",
                self.embed_dim, dd.z_channels
            ));
        }
        if dd.double_z {
            // VQModel's quant_conv takes z_channels; double_z belongs to the KL autoencoders.
            return Err(
                "ddconfig.double_z is true, which taming's VQModel does not support".into(),
            );
        }
        if dd.ch_mult.is_empty() {
            return Err("ddconfig.ch_mult is empty".into());
        }
        if dd.ch == 0 || dd.z_channels == 0 || self.embed_dim == 0 || self.n_embed == 0 {
            return Err("ch, z_channels, embed_dim and n_embed must be positive".into());
        }
        for m in &dd.ch_mult {
            if !(dd.ch * m).is_multiple_of(NORM_GROUPS) {
                return Err(format!(
                    "ddconfig.ch * ch_mult = {} is not a multiple of GroupNorm's {NORM_GROUPS} groups",
                    dd.ch * m
                ));
            }
        }
        Ok(())
    }

    /// The spatial factor between image and latent: `2^(len(ch_mult) - 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.ddconfig.ch_mult.len() - 1)
    }
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, in_ch: usize, out_ch: usize) -> Result<Self> {
        let nin_shortcut = if in_ch != out_ch {
            Some(Conv2d::load(vb.pp("nin_shortcut"), in_ch, out_ch, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), NORM_GROUPS, in_ch, NORM_EPS)?,
            conv1: Conv2d::load(vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            norm2: GroupNorm::load(vb.pp("norm2"), NORM_GROUPS, out_ch, NORM_EPS)?,
            conv2: Conv2d::load(vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            nin_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        // Dropout is identity at inference and in the render loop (the decoder is frozen).
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention with 1x1-conv projections.
struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    fn new(vb: VarBuilder, ch: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), NORM_GROUPS, ch, NORM_EPS)?,
            q: Conv2d::load(vb.pp("q"), ch, ch, 1, 1, 0)?,
            k: Conv2d::load(vb.pp("k"), ch, ch, 1, 1, 0)?,
            v: Conv2d::load(vb.pp("v"), ch, ch, 1, 1, 0)?,
            proj_out: Conv2d::load(vb.pp("proj_out"), ch, ch, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let tokens = |t: Tensor| t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous();
        let q = tokens(self.q.forward(&normed)?)?;
        let k = tokens(self.k.forward(&normed)?)?;
        let v = tokens(self.v.forward(&normed)?)?;
        let attended = attention(&q, &k, &v, (c as f64).powf(-0.5), None)?;
        let attended = attended.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + self.proj_out.forward(&attended)?
    }
}

/// One resolution level: ResNet blocks, each optionally followed by attention.
struct Level {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    /// Downsample (encoder) or upsample (decoder) conv; absent at the last level.
    resample: Option<Conv2d>,
}

impl Level {
    fn forward_blocks(&self, mut h: Tensor) -> Result<Tensor> {
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attns.get(i) {
                h = attn.forward(&h)?;
            }
        }
        Ok(h)
    }
}

struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(vb: VarBuilder, ch: usize) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(vb.pp("block_1"), ch, ch)?,
            attn_1: AttnBlock::new(vb.pp("attn_1"), ch)?,
            block_2: ResnetBlock::new(vb.pp("block_2"), ch, ch)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, dd: &DdConfig) -> Result<Self> {
        let conv_in = Conv2d::load(vb.pp("conv_in"), dd.in_channels, dd.ch, 3, 1, 1)?;
        let mut curr_res = dd.resolution;
        let mut block_in = dd.ch;
        let mut down = Vec::with_capacity(dd.ch_mult.len());
        for (i_level, mult) in dd.ch_mult.iter().enumerate() {
            let vb_level = vb.pp("down").pp(i_level);
            let block_out = dd.ch * mult;
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for i_block in 0..dd.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    vb_level.pp("block").pp(i_block),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if dd.attn_resolutions.contains(&curr_res) {
                    attns.push(AttnBlock::new(vb_level.pp("attn").pp(i_block), block_in)?);
                }
            }
            let resample = if i_level + 1 != dd.ch_mult.len() {
                curr_res /= 2;
                // stride 2, no padding: the asymmetric (0,1,0,1) padding happens in forward.
                Some(Conv2d::load(
                    vb_level.pp("downsample").pp("conv"),
                    block_in,
                    block_in,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            down,
            mid: Mid::new(vb.pp("mid"), block_in)?,
            norm_out: GroupNorm::load(vb.pp("norm_out"), NORM_GROUPS, block_in, NORM_EPS)?,
            conv_out: Conv2d::load(vb.pp("conv_out"), block_in, dd.z_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            h = level.forward_blocks(h)?;
            if let Some(conv) = &level.resample {
                // taming pads right and bottom only, then convolves with stride 2.
                h = conv.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    /// Indexed like upstream's `decoder.up.{i}`: index 0 is the highest resolution; forward
    /// walks them in reverse.
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, dd: &DdConfig) -> Result<Self> {
        let levels = dd.ch_mult.len();
        let mut block_in = dd.ch * dd.ch_mult[levels - 1];
        let mut curr_res = dd.resolution >> (levels - 1);
        let conv_in = Conv2d::load(vb.pp("conv_in"), dd.z_channels, block_in, 3, 1, 1)?;
        let mid = Mid::new(vb.pp("mid"), block_in)?;
        let mut up: Vec<Level> = Vec::with_capacity(levels);
        for i_level in (0..levels).rev() {
            let vb_level = vb.pp("up").pp(i_level);
            let block_out = dd.ch * dd.ch_mult[i_level];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for i_block in 0..=dd.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    vb_level.pp("block").pp(i_block),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if dd.attn_resolutions.contains(&curr_res) {
                    attns.push(AttnBlock::new(vb_level.pp("attn").pp(i_block), block_in)?);
                }
            }
            let resample = if i_level != 0 {
                curr_res *= 2;
                Some(Conv2d::load(
                    vb_level.pp("upsample").pp("conv"),
                    block_in,
                    block_in,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: GroupNorm::load(vb.pp("norm_out"), NORM_GROUPS, block_in, NORM_EPS)?,
            conv_out: Conv2d::load(vb.pp("conv_out"), block_in, dd.out_ch, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for level in self.up.iter().rev() {
            h = level.forward_blocks(h)?;
            if let Some(conv) = &level.resample {
                h = conv.forward(&upsample_nearest2x(&h)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// A taming VQGAN (`VQModel`) ready to encode, quantize and decode.
pub struct Vqgan {
    config: VqganConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    codebook: Tensor,
    /// `||e||^2` per codebook row, precomputed for the nearest-neighbour search.
    codebook_sq: Tensor,
    /// GumbelVQ's `quantize.proj`: latent to codebook logits, used by [`Vqgan::encode_quantized`].
    gumbel_proj: Option<Conv2d>,
}

impl Vqgan {
    /// Builds the model from weights named as upstream (`encoder.*`, `decoder.*`,
    /// `quant_conv.*`, `post_quant_conv.*`, and `quantize.embedding.weight`, or for GumbelVQ
    /// `quantize.embed.weight` and `quantize.proj.*`).
    pub fn new(vb: VarBuilder, cfg: &VqganConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let dd = &cfg.ddconfig;
        let (codebook, gumbel_proj) = match cfg.quantizer {
            Quantizer::Nearest => (
                vb.pp("quantize")
                    .pp("embedding")
                    .get((cfg.n_embed, cfg.embed_dim), "weight")?,
                None,
            ),
            Quantizer::Gumbel => (
                vb.pp("quantize")
                    .pp("embed")
                    .get((cfg.n_embed, cfg.embed_dim), "weight")?,
                Some(Conv2d::load(
                    vb.pp("quantize").pp("proj"),
                    dd.z_channels,
                    cfg.n_embed,
                    1,
                    1,
                    0,
                )?),
            ),
        };
        let codebook_sq = codebook
            .to_dtype(search_dtype(codebook.dtype()))?
            .sqr()?
            .sum(1)?;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), dd)?,
            decoder: Decoder::new(vb.pp("decoder"), dd)?,
            quant_conv: Conv2d::load(vb.pp("quant_conv"), dd.z_channels, cfg.embed_dim, 1, 1, 0)?,
            post_quant_conv: Conv2d::load(
                vb.pp("post_quant_conv"),
                cfg.embed_dim,
                dd.z_channels,
                1,
                1,
                0,
            )?,
            codebook,
            codebook_sq,
            gumbel_proj,
        })
    }

    /// Loads f32 weights; see [`Vqgan::load_with_dtype`].
    pub fn load(path: &Path, device: &Device) -> std::result::Result<Self, ModelError> {
        Self::load_with_dtype(path, DType::F32, device)
    }

    /// Loads a VQGAN from a `.ckpt` or `.safetensors` file with its `model.yaml` beside it, or
    /// from a directory holding both. The discriminator (`loss.*`) is never read; of a Net2Net
    /// checkpoint only the first stage (`first_stage_model.*`) is, as `generate.py` uses it.
    pub fn load_with_dtype(
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let files = VqganFiles::locate(path)?;
        let yaml = VqganYaml::from_yaml_file(&files.config)?;
        let tensors = match yaml.weights_prefix {
            None => weights::read_tensors(&files.weights, dtype, device, &is_model_tensor)?,
            Some(prefix) => {
                let all = weights::read_tensors(&files.weights, dtype, device, &|name| {
                    name.starts_with(prefix)
                })?;
                all.into_iter()
                    .map(|(name, t)| (name[prefix.len()..].to_owned(), t))
                    .collect()
            }
        };
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::new(vb, &yaml.config).map_err(|e| weights::build_error(&files.weights, e))
    }

    pub fn config(&self) -> &VqganConfig {
        &self.config
    }

    /// (n_embed, embed_dim), the rows `quantize` snaps to.
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    pub fn downsample_factor(&self) -> usize {
        self.config.downsample_factor()
    }

    pub fn embed_dim(&self) -> usize {
        self.config.embed_dim
    }

    pub fn n_embed(&self) -> usize {
        self.config.n_embed
    }

    /// Image (B, 3, H, W) in [-1, 1] to latent z (B, embed_dim, H/f, W/f), after `quant_conv`.
    pub fn encode(&self, img: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = img.dims4()?;
        let f = self.downsample_factor();
        if c != self.config.ddconfig.in_channels || h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "VQGAN encode needs (B, {}, H, W) with H and W multiples of {f}, got {:?}",
                self.config.ddconfig.in_channels,
                img.dims()
            )
        }
        self.quant_conv.forward(&self.encoder.forward(img)?)
    }

    /// The quantised latent of an image, as taming's `encode` returns it, with the indices.
    ///
    /// `VQModel`: the nearest codebook row to each `encode` vector. `GumbelVQ`: the codebook
    /// row of the largest `quantize.proj` logit. taming adds Gumbel noise before that argmax
    /// even in eval mode, so its encode is random; this is the noise-free mode of that draw.
    pub fn encode_quantized(&self, img: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = self.encode(img)?;
        match &self.gumbel_proj {
            None => self.quantize(&z),
            Some(proj) => {
                let logits = proj.forward(&z.detach())?;
                let indices = logits.argmax(1)?;
                Ok((self.embed_indices(&indices)?.to_dtype(z.dtype())?, indices))
            }
        }
    }

    /// Snaps each latent vector to its nearest codebook row (taming's `VectorQuantizer`, and
    /// what `generate.py` does for every model, GumbelVQ included).
    ///
    /// Returns `z_q = z + (e - z).detach()`, so the value is the codebook row while the
    /// gradient passes straight through to `z`, and the indices (B, h, w) as u32.
    pub fn quantize(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = z.dims4()?;
        if c != self.config.embed_dim {
            candle_core::bail!("quantize needs {} channels, got {c}", self.config.embed_dim)
        }
        let search_dtype = search_dtype(z.dtype());
        let flat = z
            .detach()
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, c))?
            .to_dtype(search_dtype)?;
        let codebook = self.codebook.to_dtype(search_dtype)?;
        // ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, the same expansion (and rounding) as taming.
        let dist = flat
            .sqr()?
            .sum_keepdim(1)?
            .broadcast_add(&self.codebook_sq.to_dtype(search_dtype)?.unsqueeze(0)?)?
            .sub(&(flat.matmul(&codebook.t()?)? * 2.0)?)?;
        let indices = dist.argmin(1)?;
        let snapped = self
            .codebook
            .index_select(&indices, 0)?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .to_dtype(z.dtype())?;
        let z_q = (z + (snapped - z)?.detach())?;
        Ok((z_q, indices.reshape((b, h, w))?))
    }

    /// Codebook rows for given indices (B, h, w) as a latent (B, embed_dim, h, w).
    pub fn embed_indices(&self, indices: &Tensor) -> Result<Tensor> {
        let (b, h, w) = indices.dims3()?;
        self.codebook
            .index_select(&indices.flatten_all()?, 0)?
            .reshape((b, h, w, self.config.embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// `post_quant_conv` + decoder: latent (B, embed_dim, h, w) to an image, roughly in [-1, 1].
    pub fn decode(&self, z_q: &Tensor) -> Result<Tensor> {
        let c = z_q.dims4()?.1;
        if c != self.config.embed_dim {
            candle_core::bail!("decode needs {} channels, got {c}", self.config.embed_dim)
        }
        self.decoder.forward(&self.post_quant_conv.forward(z_q)?)
    }
}

/// Whether a checkpoint tensor belongs to the VQGAN itself: taming checkpoints also hold the
/// training losses' weights (`loss.discriminator.*`, `loss.perceptual_loss.*`), never needed.
pub fn is_model_tensor(name: &str) -> bool {
    !name.starts_with("loss.")
}

/// The dtype of the nearest-codebook search: half precision would blur near-ties.
fn search_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Where a VQGAN's config and weights live, found from a file or directory path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VqganFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
}

impl VqganFiles {
    /// Accepts a weights file (`.ckpt` / `.safetensors`) with `model.yaml`, `config.yaml` or
    /// `<stem>.yaml` beside it, or a directory holding a weights file and a yaml.
    pub fn locate(path: &Path) -> std::result::Result<Self, ModelError> {
        if path.is_dir() {
            let weights = pick_weights(path)?;
            let config = pick_yaml(path, &weights)?;
            Ok(Self { config, weights })
        } else if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new("."));
            let config = pick_yaml(dir, path)?;
            Ok(Self {
                config,
                weights: path.to_owned(),
            })
        } else {
            Err(ModelError::Missing {
                path: path.to_owned(),
                hint: "Pass a VQGAN .ckpt/.safetensors file or a directory holding one and its model.yaml.".into(),
            })
        }
    }
}

fn list_dir(dir: &Path) -> std::result::Result<Vec<PathBuf>, ModelError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

fn pick_weights(dir: &Path) -> std::result::Result<PathBuf, ModelError> {
    for name in ["model.safetensors", "last.ckpt", "model.ckpt"] {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    let candidates: Vec<PathBuf> = list_dir(dir)?
        .into_iter()
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("ckpt" | "safetensors")
            )
        })
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ModelError::Missing {
            path: dir.join("last.ckpt"),
            hint: "No VQGAN weights in this directory: put the taming checkpoint there as last.ckpt (or model.safetensors).".into(),
        }),
        many => Err(ModelError::config(
            dir,
            format!(
                "several weights files ({}); pass the one to use",
                many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn pick_yaml(dir: &Path, weights: &Path) -> std::result::Result<PathBuf, ModelError> {
    let mut names = vec!["model.yaml".to_owned(), "config.yaml".to_owned()];
    if let Some(stem) = weights.file_stem().and_then(|s| s.to_str()) {
        names.insert(0, format!("{stem}.yaml"));
    }
    for name in &names {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    let yamls: Vec<PathBuf> = list_dir(dir)?
        .into_iter()
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    match yamls.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(ModelError::Missing {
            path: dir.join("model.yaml"),
            hint: format!(
                "The VQGAN config is missing: put taming's model.yaml (or {}) next to {}.",
                names[0],
                weights.display()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F16_16384: &str = "model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 16384
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 0
        disc_weight: 0.75
        disc_num_layers: 2
        codebook_weight: 1.0
";

    #[test]
    fn parses_taming_model_yaml() {
        let cfg = VqganConfig::from_yaml_str(F16_16384).unwrap();
        assert_eq!(cfg.embed_dim, 256);
        assert_eq!(cfg.n_embed, 16384);
        assert_eq!(cfg.ddconfig.ch_mult, vec![1, 1, 2, 2, 4]);
        assert_eq!(cfg.ddconfig.attn_resolutions, vec![16]);
        assert_eq!(cfg.downsample_factor(), 16);
    }

    #[test]
    fn gumbel_and_net2net_yamls_parse() {
        let gumbel = F16_16384.replace(
            "taming.models.vqgan.VQModel",
            "taming.models.vqgan.GumbelVQ",
        );
        let yaml = VqganYaml::from_yaml_str(&gumbel).unwrap();
        assert_eq!(yaml.config.quantizer, Quantizer::Gumbel);
        assert_eq!(yaml.weights_prefix, None);
        let narrow = gumbel.replace("z_channels: 256", "z_channels: 128");
        let err = VqganConfig::from_yaml_str(&narrow).unwrap_err();
        assert!(err.contains("embed_dim == ddconfig.z_channels"), "{err}");

        // The first stage nested in a Net2Net config, indented one level deeper.
        let first_stage: String = F16_16384
            .lines()
            .skip(3)
            .map(|l| format!("    {l}\n"))
            .collect();
        let net2net = format!(
            "model:\n  target: taming.models.cond_transformer.Net2NetTransformer\n  params:\n    \
             cond_stage_key: segmentation\n    transformer_config:\n      target: x.GPT\n    \
             first_stage_config:\n      target: taming.models.vqgan.VQModel\n{first_stage}"
        );
        let yaml = VqganYaml::from_yaml_str(&net2net).unwrap();
        assert_eq!(yaml.weights_prefix, Some(NET2NET_FIRST_STAGE_PREFIX));
        assert_eq!(yaml.config, VqganConfig::from_yaml_str(F16_16384).unwrap());
        let headless = net2net.replace("first_stage_config", "cond_stage_config");
        let err = VqganConfig::from_yaml_str(&headless).unwrap_err();
        assert!(err.contains("first_stage_config"), "{err}");
    }

    #[test]
    fn rejects_other_quantizers_with_a_reason() {
        let ema = F16_16384.replace("taming.models.vqgan.VQModel", "taming.models.vqgan.EMAVQ");
        let err = VqganConfig::from_yaml_str(&ema).unwrap_err();
        assert!(err.contains("EMAVQ") && err.contains("GumbelVQ"), "{err}");
        let kl = F16_16384.replace("double_z: false", "double_z: true");
        let err = VqganConfig::from_yaml_str(&kl).unwrap_err();
        assert!(err.contains("double_z"), "{err}");
        let odd = F16_16384.replace("ch: 128", "ch: 100");
        let err = VqganConfig::from_yaml_str(&odd).unwrap_err();
        assert!(err.contains("GroupNorm"), "{err}");
    }

    #[test]
    fn missing_yaml_names_the_file_to_add() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("last.ckpt"), b"").unwrap();
        let err = VqganFiles::locate(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.yaml"), "{err}");
    }
}
