//! OpenAI CLIP's ResNet image tower (`clip.model.ModifiedResNet`: RN50, RN101, RN50x4,
//! RN50x16, RN50x64), with weight names as in OpenAI's files (`visual.*`).
//!
//! Its three changes to a torchvision ResNet: a stem of three 3x3 convolutions with an average
//! pool instead of a max pool; anti-aliased strided blocks (an `AvgPool2d(stride)` before the
//! stride-1 conv instead of a strided conv); and an attention pool (one query, the mean token)
//! in place of the global average pool. BatchNorm runs in eval mode, so it is folded into the
//! convolution before it: one conv through the layer seam instead of conv + four affine ops.
//!
//! Every op has a backward the render loop can use: the seam's convs and linears, `relu`,
//! `avg_pool2d` with kernel == stride (candle has no other pooling backward), the stem's
//! stride-2 conv through candle's own conv backward, and the seam's softmax in the pool.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{attention, Conv2d, Linear};

/// `torch.nn.BatchNorm2d`'s default eps, which OpenAI's models keep.
const BN_EPS: f64 = 1e-5;
/// The ResNet halves the resolution five times (stem conv, stem pool, layers 2-4).
pub const RESNET_REDUCTION: usize = 32;

/// The hyper-parameters of a `ModifiedResNet`, as OpenAI's `build_model` derives them from the
/// state dict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetVisionConfig {
    /// Bottleneck blocks in layer1..layer4 (RN50: [3, 4, 6, 3]).
    pub layers: [usize; 4],
    /// Stem output channels (`visual.layer1.0.conv1.weight` rows); layer4 has `width * 32`.
    pub width: usize,
    /// Attention-pool heads: `width * 32 / 64`.
    pub heads: usize,
    /// The input side; the attention pool's grid is `image_size / 32`.
    pub image_size: usize,
    /// The joint embedding size (`attnpool.c_proj` rows).
    pub output_dim: usize,
}

impl ResNetVisionConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let embed = self.width * 32;
        if self.width == 0 || self.heads == 0 || !embed.is_multiple_of(self.heads) {
            return Err(format!(
                "ResNet width {} gives {embed} attention-pool channels, not divisible into {} heads",
                self.width, self.heads
            ));
        }
        if self.layers.contains(&0) {
            return Err(format!(
                "every ResNet stage needs a block, got {:?}",
                self.layers
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(RESNET_REDUCTION) {
            return Err(format!(
                "ResNet image size {} is not a multiple of {RESNET_REDUCTION}",
                self.image_size
            ));
        }
        Ok(())
    }
}

/// A bias-free conv followed by an eval-mode BatchNorm, folded into one conv:
/// `w' = w * g / sqrt(var + eps)`, `b' = beta - mean * g / sqrt(var + eps)`.
fn conv_bn(
    conv: VarBuilder,
    bn: VarBuilder,
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let weight = conv.get((out_ch, in_ch, kernel, kernel), "weight")?;
    let gamma = bn.get(out_ch, "weight")?;
    let beta = bn.get(out_ch, "bias")?;
    let mean = bn.get(out_ch, "running_mean")?;
    let var = bn.get(out_ch, "running_var")?;
    let scale = gamma.div(&(var + BN_EPS)?.sqrt()?)?;
    let weight = weight.broadcast_mul(&scale.reshape((out_ch, 1, 1, 1))?)?;
    let bias = (beta - mean.mul(&scale)?)?;
    Ok(Conv2d::new(weight, Some(bias), stride, padding))
}

/// `AvgPool2d(k)`: kernel == stride, the one pooling candle differentiates.
fn avg_pool(x: &Tensor, k: usize) -> Result<Tensor> {
    if k == 1 {
        Ok(x.clone())
    } else {
        x.avg_pool2d(k)
    }
}

struct Bottleneck {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    stride: usize,
    /// `downsample.0` (1x1 conv) + `downsample.1` (BN) after `downsample.-1` (the avg pool).
    downsample: Option<Conv2d>,
}

impl Bottleneck {
    const EXPANSION: usize = 4;

    fn new(vb: VarBuilder, inplanes: usize, planes: usize, stride: usize) -> Result<Self> {
        let out = planes * Self::EXPANSION;
        let downsample = if stride > 1 || inplanes != out {
            let ds = vb.pp("downsample");
            Some(conv_bn(ds.pp("0"), ds.pp("1"), inplanes, out, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            conv1: conv_bn(vb.pp("conv1"), vb.pp("bn1"), inplanes, planes, 1, 1, 0)?,
            conv2: conv_bn(vb.pp("conv2"), vb.pp("bn2"), planes, planes, 3, 1, 1)?,
            conv3: conv_bn(vb.pp("conv3"), vb.pp("bn3"), planes, out, 1, 1, 0)?,
            stride,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.conv1.forward(x)?.relu()?;
        let out = self.conv2.forward(&out)?.relu()?;
        let out = self.conv3.forward(&avg_pool(&out, self.stride)?)?;
        let identity = match &self.downsample {
            Some(conv) => conv.forward(&avg_pool(x, self.stride)?)?,
            None => x.clone(),
        };
        (out + identity)?.relu()
    }
}

/// `AttentionPool2d`: multi-head attention of the mean token (plus position) over the grid.
struct AttentionPool {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    c_proj: Linear,
    heads: usize,
}

impl AttentionPool {
    fn new(vb: VarBuilder, grid: usize, embed: usize, heads: usize, output: usize) -> Result<Self> {
        Ok(Self {
            positional_embedding: vb.get((grid * grid + 1, embed), "positional_embedding")?,
            q_proj: Linear::load(vb.pp("q_proj"), embed, embed)?,
            k_proj: Linear::load(vb.pp("k_proj"), embed, embed)?,
            v_proj: Linear::load(vb.pp("v_proj"), embed, embed)?,
            c_proj: Linear::load(vb.pp("c_proj"), embed, output)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?; // (B, HW, C)
        let mean = tokens.mean_keepdim(1)?;
        let x = Tensor::cat(&[&mean, &tokens], 1)?
            .broadcast_add(&self.positional_embedding.to_dtype(tokens.dtype())?)?;
        let t = x.dim(1)?;
        let head_dim = c / self.heads;
        let split = |y: Tensor, n: usize| {
            y.reshape((b, n, self.heads, head_dim))?
                .transpose(1, 2)?
                .reshape((b * self.heads, n, head_dim))
        };
        let q = split(self.q_proj.forward(&x.narrow(1, 0, 1)?)?, 1)?;
        let k = split(self.k_proj.forward(&x)?, t)?;
        let v = split(self.v_proj.forward(&x)?, t)?;
        let pooled = attention(&q, &k, &v, (head_dim as f64).powf(-0.5), None)?
            .reshape((b, self.heads, head_dim))?
            .reshape((b, c))?;
        self.c_proj.forward(&pooled)
    }
}

/// OpenAI CLIP's `ModifiedResNet` image encoder: normalised pixels to image features.
pub struct ModifiedResNet {
    stem: [Conv2d; 3],
    layers: Vec<Bottleneck>,
    attnpool: AttentionPool,
    config: ResNetVisionConfig,
}

impl ModifiedResNet {
    /// Builds the tower from `vb` at `visual`.
    pub fn new(vb: VarBuilder, cfg: &ResNetVisionConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let w = cfg.width;
        let stem = [
            conv_bn(vb.pp("conv1"), vb.pp("bn1"), 3, w / 2, 3, 2, 1)?,
            conv_bn(vb.pp("conv2"), vb.pp("bn2"), w / 2, w / 2, 3, 1, 1)?,
            conv_bn(vb.pp("conv3"), vb.pp("bn3"), w / 2, w, 3, 1, 1)?,
        ];
        let mut layers = Vec::new();
        let mut inplanes = w;
        for (stage, &blocks) in cfg.layers.iter().enumerate() {
            let planes = w << stage;
            let vb_stage = vb.pp(format!("layer{}", stage + 1));
            for i in 0..blocks {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                layers.push(Bottleneck::new(vb_stage.pp(i), inplanes, planes, stride)?);
                inplanes = planes * Bottleneck::EXPANSION;
            }
        }
        let attnpool = AttentionPool::new(
            vb.pp("attnpool"),
            cfg.image_size / RESNET_REDUCTION,
            w * 32,
            cfg.heads,
            cfg.output_dim,
        )?;
        Ok(Self {
            stem,
            layers,
            attnpool,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ResNetVisionConfig {
        &self.config
    }

    /// Normalised pixels (B, 3, S, S) to image features (B, output_dim), not L2-normalised.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        let s = self.config.image_size;
        if c != 3 || h != s || w != s {
            candle_core::bail!(
                "CLIP ResNet input must be (B, 3, {s}, {s}), got {:?}; resize or cut out first",
                pixels.dims()
            )
        }
        let mut x = pixels.clone();
        for conv in &self.stem {
            x = conv.forward(&x)?.relu()?;
        }
        let mut x = x.avg_pool2d(2)?;
        for block in &self.layers {
            x = block.forward(&x)?;
        }
        self.attnpool.forward(&x)
    }
}

/// Counts the distinct `prefix{i}.` indices among `names` (OpenAI's `build_model` counting).
pub(crate) fn count_indexed<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if let Some(rest) = name.strip_prefix(prefix) {
            if let Some(index) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                seen.insert(index);
            }
        }
    }
    seen.len()
}
