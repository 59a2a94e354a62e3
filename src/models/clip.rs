//! CLIP (text and vision towers plus projections) with Hugging Face `CLIPModel` weight names.
//!
//! Written against the layer seam so that gradients reach the pixels: the render loop
//! differentiates image features with respect to the input image.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::clip_openai;
use super::clip_resnet::{ModifiedResNet, ResNetVisionConfig};
use super::layers::{mlp, multi_head_attention, Activation, Conv2d, LayerNorm, Linear};
use super::tokenizer::ClipTokenizer;
use super::{weights, ModelError};

/// The per-channel mean and std CLIP was trained with (`CLIPImageProcessor` defaults).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_5, 0.261_302_6, 0.275_777_1];

/// `text_config` of a HF CLIP `config.json`; defaults are HF's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// HF pools at `argmax(ids)` when this is 2 (the value in the OpenAI configs, from before
    /// the field was fixed) and at the first `eos_token_id` otherwise.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

/// `vision_config` of a HF CLIP `config.json`; defaults are HF's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// A HF CLIP `config.json` (`CLIPConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// OpenAI's ResNet image tower (RN50 ...) in place of the ViT; then only
    /// `vision_config.image_size` of the ViT config is meaningful. Not a HF field: these
    /// models come from OpenAI's files, their config read off the tensor shapes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_resnet: Option<ResNetVisionConfig>,
}

fn default_projection_dim() -> usize {
    512
}

impl ClipConfig {
    /// The OpenAI ViT-B/32 architecture (`openai/clip-vit-base-patch32`).
    pub fn vit_base_patch32() -> Self {
        Self {
            text_config: ClipTextConfig {
                eos_token_id: 2,
                ..Default::default()
            },
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
            vision_resnet: None,
        }
    }

    /// Parses a HF `config.json`. Older configs carry the sizes in `text_config_dict` /
    /// `vision_config_dict`; like transformers, those win over `text_config` / `vision_config`.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let mut root: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let obj = root
            .as_object_mut()
            .ok_or("config.json must be a JSON object")?;
        if let Some(model_type) = obj.get("model_type").and_then(|v| v.as_str()) {
            if model_type != "clip" {
                return Err(format!("model_type is {model_type:?}, expected \"clip\""));
            }
        }
        for tower in ["text_config", "vision_config"] {
            // transformers expands a `*_dict` with the sub-config's defaults and lets every
            // resulting key win, so the tower is the dict over defaults (e.g. eos_token_id
            // becomes 49407 in ViT-L/14 although its text_config says 2).
            if let Some(dict @ serde_json::Value::Object(_)) = obj.remove(&format!("{tower}_dict"))
            {
                obj.insert(tower.to_owned(), dict);
            }
            // transformers writes `null` for keys it does not set; serde defaults handle absence.
            if let Some(serde_json::Value::Object(cfg)) = obj.get_mut(tower) {
                cfg.retain(|_, v| !v.is_null());
            }
        }
        let cfg: Self = serde_json::from_value(root).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json_file(path: &Path) -> std::result::Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| ModelError::config(path, e))
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err("text_config.hidden_size must be a multiple of num_attention_heads".into());
        }
        if let Some(resnet) = &self.vision_resnet {
            if resnet.output_dim != self.projection_dim {
                return Err(format!(
                    "the ResNet's output_dim {} differs from projection_dim {}",
                    resnet.output_dim, self.projection_dim
                ));
            }
            return resnet.validate();
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(
                "vision_config.hidden_size must be a multiple of num_attention_heads".into(),
            );
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err("vision_config.image_size must be a multiple of patch_size".into());
        }
        Ok(())
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, hidden: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), hidden, hidden)?,
            k_proj: Linear::load(vb.pp("k_proj"), hidden, hidden)?,
            v_proj: Linear::load(vb.pp("v_proj"), hidden, hidden)?,
            out_proj: Linear::load(vb.pp("out_proj"), hidden, hidden)?,
            heads,
            head_dim: hidden / heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = multi_head_attention(&q, &k, &v, self.heads, scale, mask)?;
        self.out_proj.forward(&out)
    }
}

/// Pre-norm transformer block: attention and MLP, each with a residual.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        act: Activation,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), hidden, eps)?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), hidden, heads)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), hidden, eps)?,
            fc1: Linear::load(vb.pp("mlp").pp("fc1"), hidden, intermediate)?,
            fc2: Linear::load(vb.pp("mlp").pp("fc2"), intermediate, hidden)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let out = mlp(
            &self.layer_norm2.forward(&h)?,
            &self.fc1,
            self.act,
            &self.fc2,
        )?;
        h + out
    }
}

struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        n: usize,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        act: Activation,
        eps: f64,
    ) -> Result<Self> {
        let layers = (0..n)
            .map(|i| {
                EncoderLayer::new(vb.pp("layers").pp(i), hidden, intermediate, heads, act, eps)
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, mut x: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        for layer in &self.layers {
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }
}

struct TextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl TextTransformer {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .get((c.vocab_size, c.hidden_size), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((c.max_position_embeddings, c.hidden_size), "weight")?,
            encoder: Encoder::new(
                vb.pp("encoder"),
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.hidden_act,
                c.layer_norm_eps,
            )?,
            final_layer_norm: LayerNorm::load(
                vb.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            config: c.clone(),
        })
    }

    /// Where each sequence is pooled, following HF: `argmax(ids)` for the legacy
    /// `eos_token_id == 2`, else the first `eos_token_id`.
    fn pool_positions(&self, ids: &[Vec<u32>]) -> Result<Vec<u32>> {
        ids.iter()
            .map(|row| {
                let pos = if self.config.eos_token_id == 2 {
                    // torch.argmax returns the first maximum.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max)
                } else {
                    row.iter().position(|&id| id == self.config.eos_token_id)
                };
                pos.map(|p| p as u32).ok_or_else(|| {
                    candle_core::Error::msg(format!(
                        "text ids hold no end-of-text token {}; tokenize with ClipTokenizer",
                        self.config.eos_token_id
                    ))
                })
            })
            .collect()
    }

    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "text of {t} tokens exceeds the model's {} positions",
                self.config.max_position_embeddings
            )
        }
        let ids = ids.to_dtype(DType::U32)?;
        let rows = ids.to_vec2::<u32>()?;
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )
        }
        let hidden = self.config.hidden_size;
        let tokens = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, hidden))?;
        let x = tokens.broadcast_add(&self.position_embedding.i(..t)?)?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        let x = self.encoder.forward(x, Some(&mask))?;
        let x = self.final_layer_norm.forward(&x)?;
        let positions: Vec<u32> = self
            .pool_positions(&rows)?
            .into_iter()
            .enumerate()
            .map(|(i, p)| i as u32 * t as u32 + p)
            .collect();
        let positions = Tensor::new(positions, x.device())?;
        x.reshape((b * t, hidden))?.index_select(&positions, 0)
    }
}

/// Additive mask that hides later tokens: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

struct VisionTransformer {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl VisionTransformer {
    fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let patches = (c.image_size / c.patch_size).pow(2);
        Ok(Self {
            class_embedding: emb.get(c.hidden_size, "class_embedding")?,
            patch_embedding: Conv2d::load_no_bias(
                emb.pp("patch_embedding"),
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                c.patch_size,
            )?,
            position_embedding: emb
                .pp("position_embedding")
                .get((patches + 1, c.hidden_size), "weight")?,
            // (sic) upstream's spelling.
            pre_layrnorm: LayerNorm::load(vb.pp("pre_layrnorm"), c.hidden_size, c.layer_norm_eps)?,
            encoder: Encoder::new(
                vb.pp("encoder"),
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.hidden_act,
                c.layer_norm_eps,
            )?,
            post_layernorm: LayerNorm::load(
                vb.pp("post_layernorm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            config: c.clone(),
        })
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let s = self.config.image_size;
        if c != self.config.num_channels || h != s || w != s {
            candle_core::bail!(
                "CLIP vision input must be (B, {}, {s}, {s}), got {:?}; resize or cut out first",
                self.config.num_channels,
                pixels.dims()
            )
        }
        let hidden = self.config.hidden_size;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self
            .class_embedding
            .to_dtype(patches.dtype())?
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let x = self.pre_layrnorm.forward(&x)?;
        let x = self.encoder.forward(x, None)?;
        self.post_layernorm.forward(&x.i((.., 0, ..))?)
    }
}

/// The image tower: a ViT with its projection, or OpenAI's ResNet (which projects in its
/// attention pool).
enum VisionTower {
    Vit {
        model: VisionTransformer,
        projection: Linear,
    },
    ResNet(ModifiedResNet),
}

/// A CLIP model: text and vision towers with their projections into the joint space.
pub struct Clip {
    text_model: TextTransformer,
    vision: VisionTower,
    text_projection: Linear,
    config: ClipConfig,
    tokenizer: ClipTokenizer,
    pixel_mean: Tensor,
    pixel_std: Tensor,
}

impl Clip {
    /// Builds CLIP from weights named as in HF `CLIPModel`, with the bundled tokenizer.
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let tokenizer = ClipTokenizer::bundled().map_err(candle_core::Error::wrap)?;
        Self::with_tokenizer(vb, cfg, tokenizer)
    }

    fn with_tokenizer(vb: VarBuilder, cfg: &ClipConfig, tokenizer: ClipTokenizer) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let device = vb.device().clone();
        let stat =
            |v: [f32; 3]| Tensor::from_slice(&v, (1, 3, 1, 1), &device)?.to_dtype(vb.dtype());
        let vision = match &cfg.vision_resnet {
            Some(resnet) => VisionTower::ResNet(ModifiedResNet::new(vb.pp("visual"), resnet)?),
            None => VisionTower::Vit {
                model: VisionTransformer::new(vb.pp("vision_model"), &cfg.vision_config)?,
                projection: Linear::load_no_bias(
                    vb.pp("visual_projection"),
                    cfg.vision_config.hidden_size,
                    cfg.projection_dim,
                )?,
            },
        };
        Ok(Self {
            text_model: TextTransformer::new(vb.pp("text_model"), &cfg.text_config)?,
            vision,
            text_projection: Linear::load_no_bias(
                vb.pp("text_projection"),
                cfg.text_config.hidden_size,
                cfg.projection_dim,
            )?,
            pixel_mean: stat(CLIP_MEAN)?,
            pixel_std: stat(CLIP_STD)?,
            config: cfg.clone(),
            tokenizer,
        })
    }

    /// Loads f32 weights; see [`Clip::load_with_dtype`].
    pub fn load(path: &Path, device: &Device) -> std::result::Result<Self, ModelError> {
        Self::load_with_dtype(path, DType::F32, device)
    }

    /// Loads a HF CLIP directory (`config.json` + `model.safetensors` or `pytorch_model.bin`),
    /// or a weights file with `config.json` beside it, or one of OpenAI's own files (the
    /// `clip` package's `.pt`, TorchScript or state dict, or its safetensors conversion), alone
    /// or in a directory without `config.json`.
    pub fn load_with_dtype(
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        if let Some(weights_path) = openai_weights(path)? {
            let tensors = weights::read_tensors(
                &weights_path,
                dtype,
                device,
                &clip_openai::is_openai_model_tensor,
            )?;
            if clip_openai::is_openai_state_dict(tensors.keys().map(String::as_str)) {
                return Self::from_openai_tensors(&weights_path, tensors, dtype, device);
            }
            // HF weights without their config.json: locate_clip says what is missing.
        }
        let (dir, weights_path) = locate_clip(path)?;
        let cfg = ClipConfig::from_json_file(&dir.join("config.json"))?;
        let tokenizer = ClipTokenizer::from_dir(&dir)?;
        // Only the towers and projections: skips `logit_scale` and any position_ids buffer.
        let tensors = weights::read_tensors(&weights_path, dtype, device, &|name| {
            name.starts_with("text_model.")
                || name.starts_with("vision_model.")
                || name.ends_with("_projection.weight")
        })?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::with_tokenizer(vb, &cfg, tokenizer)
            .map_err(|e| weights::build_error(&weights_path, e))
    }

    /// Builds CLIP from an OpenAI-format state dict; its architecture comes from the tensor
    /// shapes, and a `tokenizer.json` beside the file, if any, replaces the bundled tokenizer.
    fn from_openai_tensors(
        weights_path: &Path,
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let cfg = clip_openai::config_from_state_dict(&clip_openai::shapes(&tensors))
            .map_err(|e| ModelError::weights(weights_path, e))?;
        let tensors =
            clip_openai::to_hf_names(tensors).map_err(|e| ModelError::weights(weights_path, e))?;
        let dir = weights_path.parent().unwrap_or(Path::new("."));
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::with_tokenizer(vb, &cfg, tokenizer).map_err(|e| weights::build_error(weights_path, e))
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The side of the square input `encode_image` takes.
    pub fn image_size(&self) -> usize {
        match &self.config.vision_resnet {
            Some(resnet) => resnet.image_size,
            None => self.config.vision_config.image_size,
        }
    }

    /// The size of the joint embedding both towers project to.
    pub fn projection_dim(&self) -> usize {
        self.config.projection_dim
    }

    /// Whether the image tower is OpenAI's ResNet rather than a ViT.
    pub fn is_resnet(&self) -> bool {
        matches!(self.vision, VisionTower::ResNet(_))
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// `(x - mean) / std` with CLIP's statistics; `x01` is (B, 3, S, S) in [0, 1].
    pub fn normalize_pixels(&self, x01: &Tensor) -> Result<Tensor> {
        x01.broadcast_sub(&self.pixel_mean.to_dtype(x01.dtype())?)?
            .broadcast_div(&self.pixel_std.to_dtype(x01.dtype())?)
    }

    /// Normalised pixels (B, 3, S, S) to image features (B, projection_dim), not L2-normalised.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        match &self.vision {
            VisionTower::Vit { model, projection } => projection.forward(&model.forward(pixels)?),
            VisionTower::ResNet(resnet) => resnet.forward(pixels),
        }
    }

    /// Token ids (B, T ≤ 77) to text features (B, projection_dim), not L2-normalised.
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(&self.text_model.forward(ids)?)
    }

    /// Tokenizes and encodes prompts in one go; `truncated` flags prompts cut at 77 tokens.
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
    ) -> std::result::Result<(Tensor, Vec<bool>), ModelError> {
        let mut ids = Vec::with_capacity(prompts.len() * 77);
        let mut truncated = Vec::with_capacity(prompts.len());
        for p in prompts {
            let tok = self.tokenizer.encode(p)?;
            ids.extend(tok.ids);
            truncated.push(tok.truncated);
        }
        let device = self.pixel_mean.device();
        let ids = Tensor::from_vec(ids, (prompts.len(), 77), device)?;
        Ok((self.encode_text(&ids)?, truncated))
    }
}

/// The weights file `Clip::load` reads for `path` (to identify a model by its hash).
pub fn weights_file(path: &Path) -> std::result::Result<PathBuf, ModelError> {
    match openai_weights(path)? {
        Some(file) => Ok(file),
        None => locate_clip(path).map(|(_, file)| file),
    }
}

/// The weights file of an OpenAI-format CLIP at `path`, or `None` for a HF layout: a file with
/// no `config.json` beside it, or a directory without `config.json` holding one `.pt` (or
/// `model.safetensors`).
fn openai_weights(path: &Path) -> std::result::Result<Option<PathBuf>, ModelError> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Ok((!dir.join("config.json").is_file()).then(|| path.to_owned()));
    }
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| ModelError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("pt" | "pth" | "safetensors")
                )
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ModelError::config(
            path,
            format!(
                "no config.json and several weights files ({}); pass the one to use",
                found
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Finds `(model dir, weights file)` for a CLIP path.
fn locate_clip(path: &Path) -> std::result::Result<(PathBuf, PathBuf), ModelError> {
    let missing_hint =
        "A HF CLIP directory holds config.json and model.safetensors (or pytorch_model.bin).";
    if path.is_dir() {
        let weights = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|n| path.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| ModelError::Missing {
                path: path.join("model.safetensors"),
                hint: format!("No CLIP weights in this directory. {missing_hint}"),
            })?;
        let dir = path.to_owned();
        require_config(&dir, missing_hint)?;
        Ok((dir, weights))
    } else if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        require_config(&dir, missing_hint)?;
        Ok((dir, path.to_owned()))
    } else {
        Err(ModelError::Missing {
            path: path.to_owned(),
            hint: missing_hint.into(),
        })
    }
}

fn require_config(dir: &Path, hint: &str) -> std::result::Result<(), ModelError> {
    let cfg = dir.join("config.json");
    if cfg.is_file() {
        Ok(())
    } else {
        Err(ModelError::Missing {
            path: cfg,
            hint: format!("Put the model's config.json next to its weights. {hint}"),
        })
    }
}
