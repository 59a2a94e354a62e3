//! The catalogue models' architectures without their weights, and random weights to fill
//! them: what `vqclip bench` and the real-size tests build when no checkpoint is at hand.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::clip_resnet::ResNetVisionConfig;
use super::{ClipConfig, ClipTextConfig, ClipVisionConfig, ModelError, VqganConfig};

/// The CLIP architectures of the catalogue, by name.
pub const CLIP_ARCHITECTURES: &[&str] = &[
    "ViT-B/32",
    "ViT-B/16",
    "ViT-L/14",
    "ViT-L/14@336px",
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
];

/// The VQGAN architectures of the catalogue, by name.
pub const VQGAN_ARCHITECTURES: &[&str] = &[
    "vqgan_imagenet_f16_16384",
    "vqgan_imagenet_f16_1024",
    "wikiart_16384",
    "vqgan_gumbel_f8_8192",
];

/// OpenAI's ResNet CLIPs as `build_model` reads them off their files: (vision layers, width,
/// image size, embed dim, text width).
fn resnet_clip(name: &str) -> Option<([usize; 4], usize, usize, usize, usize)> {
    Some(match name {
        "RN50" => ([3, 4, 6, 3], 64, 224, 1024, 512),
        "RN101" => ([3, 4, 23, 3], 64, 224, 512, 512),
        "RN50x4" => ([4, 6, 10, 6], 80, 288, 640, 640),
        "RN50x16" => ([6, 8, 18, 8], 96, 384, 768, 768),
        "RN50x64" => ([3, 15, 36, 10], 128, 448, 1024, 1024),
        _ => return None,
    })
}

/// The upstream `config.json` of a catalogue CLIP (for OpenAI's ResNets, the config vqclip
/// derives from their files).
pub fn clip_config(name: &str) -> Result<ClipConfig, ModelError> {
    if let Some((layers, width, image_size, embed, text_width)) = resnet_clip(name) {
        let cfg = ClipConfig {
            text_config: ClipTextConfig {
                hidden_size: text_width,
                intermediate_size: text_width * 4,
                num_attention_heads: text_width / 64,
                eos_token_id: 2,
                ..ClipTextConfig::default()
            },
            vision_config: ClipVisionConfig {
                image_size,
                ..ClipVisionConfig::default()
            },
            projection_dim: embed,
            vision_resnet: Some(ResNetVisionConfig {
                layers,
                width,
                heads: width * 32 / 64,
                image_size,
                output_dim: embed,
            }),
        };
        cfg.validate().map_err(ModelError::Input)?;
        return Ok(cfg);
    }
    let json = match name {
        "ViT-B/32" => include_str!("data/configs/clip-vit-base-patch32.json"),
        "ViT-B/16" => include_str!("data/configs/clip-vit-base-patch16.json"),
        "ViT-L/14" => include_str!("data/configs/clip-vit-large-patch14.json"),
        "ViT-L/14@336px" => include_str!("data/configs/clip-vit-large-patch14-336.json"),
        other => {
            return Err(ModelError::Input(format!(
                "unknown CLIP architecture {other:?}: use one of {CLIP_ARCHITECTURES:?}"
            )))
        }
    };
    ClipConfig::from_json_str(json).map_err(ModelError::Input)
}

/// The taming `model.yaml` of a catalogue VQGAN. The imagenet and wikiart f16 models share
/// one architecture; only the codebook size differs.
pub fn vqgan_config(name: &str) -> Result<VqganConfig, ModelError> {
    if name == "vqgan_gumbel_f8_8192" {
        let yaml = "model:
  target: taming.models.vqgan.GumbelVQ
  params:
    kl_weight: 1.0e-08
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [32]
      dropout: 0.0
";
        return VqganConfig::from_yaml_str(yaml).map_err(ModelError::Input);
    }
    let n_embed = match name {
        "vqgan_imagenet_f16_16384" | "wikiart_16384" => 16384,
        "vqgan_imagenet_f16_1024" => 1024,
        other => {
            return Err(ModelError::Input(format!(
                "unknown VQGAN architecture {other:?}: use one of {VQGAN_ARCHITECTURES:?}"
            )))
        }
    };
    let yaml = format!(
        "model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: {n_embed}
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
"
    );
    VqganConfig::from_yaml_str(&yaml).map_err(ModelError::Input)
}

/// Weights of the right shapes for whatever a model asks for: norm scales 1, biases 0, the
/// rest Gaussian scaled by fan-in, so activations stay finite through the deep stacks. They
/// are plain tensors, as when loaded from a file, so autograd tracks only the inputs.
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        if name.ends_with("bias") {
            Tensor::zeros(s, dtype, dev)
        } else if dims.len() == 1 {
            Tensor::ones(s, dtype, dev)
        } else {
            let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
            Tensor::randn(0f32, 1.0 / (fan_in as f32).sqrt(), s, dev)?.to_dtype(dtype)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A `VarBuilder` over [`RandomWeights`].
pub fn random_weights(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogue_architecture_parses() {
        for name in CLIP_ARCHITECTURES {
            let cfg = clip_config(name).unwrap();
            assert!(cfg.projection_dim >= 512, "{name}");
        }
        for name in VQGAN_ARCHITECTURES {
            let f = if name.contains("_f8_") { 8 } else { 16 };
            assert_eq!(vqgan_config(name).unwrap().downsample_factor(), f, "{name}");
        }
        assert!(clip_config("ViT-H/14")
            .unwrap_err()
            .to_string()
            .contains("ViT-B/32"));
        assert!(vqgan_config("f8").is_err());
    }

    #[test]
    fn random_weights_follow_the_naming_convention() {
        let vb = random_weights(DType::F32, &Device::Cpu);
        let bias = vb.get(4, "layer.bias").unwrap();
        assert_eq!(bias.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let scale = vb.get(4, "norm.weight").unwrap();
        assert_eq!(scale.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4.0);
        let w = vb.get((64, 256), "fc.weight").unwrap();
        let std = w
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - 1.0 / 16.0).abs() < 0.01, "std {std}");
    }
}
