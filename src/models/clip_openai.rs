//! OpenAI's own CLIP files (the `clip` package's `.pt`: TorchScript archives, or a plain state
//! dict, or either converted to safetensors): the architecture read off the tensor shapes as
//! `clip.model.build_model` does, and the tensors renamed to the Hugging Face names the text
//! tower (and a ViT image tower) here are written against. A ResNet image tower keeps its
//! `visual.*` names.

use std::collections::HashMap;

use candle_core::Tensor;

use super::clip::{ClipConfig, ClipTextConfig, ClipVisionConfig};
use super::clip_resnet::{count_indexed, ResNetVisionConfig, RESNET_REDUCTION};
use super::layers::Activation;

/// OpenAI's heads: `width // 64` for the text transformer and the ViT, `width * 32 // 64` for
/// the ResNet's attention pool.
const HEAD_WIDTH: usize = 64;

/// Whether a state dict is in OpenAI's layout rather than HF's `CLIPModel`.
pub fn is_openai_state_dict<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n == "token_embedding.weight" || n == "ln_final.weight")
}

/// The tensors an OpenAI file holds that the model uses (not `logit_scale`, not the
/// `input_resolution`/`context_length`/`vocab_size` scalars some files carry).
pub fn is_openai_model_tensor(name: &str) -> bool {
    !matches!(
        name,
        "logit_scale" | "input_resolution" | "context_length" | "vocab_size"
    )
}

fn dims<'a>(
    tensors: &'a HashMap<String, Tensor>,
    name: &str,
) -> Result<&'a [usize], String> {
    tensors
        .get(name)
        .map(|t| t.dims())
        .ok_or_else(|| format!("no tensor {name}; is this an OpenAI CLIP file?"))
}

/// `build_model`'s reading of the architecture from the shapes.
pub fn config_from_state_dict(tensors: &HashMap<String, Tensor>) -> Result<ClipConfig, String> {
    let names = || tensors.keys().map(String::as_str);
    let embed_dim = dims(tensors, "text_projection")?[1];
    let context_length = dims(tensors, "positional_embedding")?[0];
    let vocab_size = dims(tensors, "token_embedding.weight")?[0];
    let width = dims(tensors, "ln_final.weight")?[0];
    let text_layers = count_indexed(names(), "transformer.resblocks.");
    if text_layers == 0 || width < HEAD_WIDTH {
        return Err(format!(
            "text transformer of width {width} with {text_layers} layers: not an OpenAI CLIP"
        ));
    }
    let text_config = ClipTextConfig {
        vocab_size,
        hidden_size: width,
        intermediate_size: width * 4,
        num_hidden_layers: text_layers,
        num_attention_heads: width / HEAD_WIDTH,
        max_position_embeddings: context_length,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
        // OpenAI pools at text.argmax(-1): HF's legacy eos_token_id 2 does the same.
        eos_token_id: 2,
    };
    let (vision_config, vision_resnet) = if tensors.contains_key("visual.proj") {
        let width = dims(tensors, "visual.conv1.weight")?[0];
        let patch = dims(tensors, "visual.conv1.weight")?[3];
        let grid = ((dims(tensors, "visual.positional_embedding")?[0] - 1) as f64).sqrt();
        let layers = count_indexed(names(), "visual.transformer.resblocks.");
        let vision = ClipVisionConfig {
            hidden_size: width,
            intermediate_size: width * 4,
            num_hidden_layers: layers,
            num_attention_heads: width / HEAD_WIDTH,
            num_channels: 3,
            image_size: patch * grid.round() as usize,
            patch_size: patch,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        (vision, None)
    } else {
        let layers = [1, 2, 3, 4].map(|b| count_indexed(names(), &format!("visual.layer{b}.")));
        let width = dims(tensors, "visual.layer1.0.conv1.weight")?[0];
        let tokens = dims(tensors, "visual.attnpool.positional_embedding")?[0];
        let grid = ((tokens - 1) as f64).sqrt().round() as usize;
        if grid * grid + 1 != tokens {
            return Err(format!(
                "visual.attnpool.positional_embedding has {tokens} rows, not a square grid plus one"
            ));
        }
        let resnet = ResNetVisionConfig {
            layers,
            width,
            heads: width * 32 / HEAD_WIDTH,
            image_size: grid * RESNET_REDUCTION,
            output_dim: embed_dim,
        };
        resnet.validate()?;
        let vision = ClipVisionConfig {
            image_size: resnet.image_size,
            ..ClipVisionConfig::default()
        };
        (vision, Some(resnet))
    };
    let cfg = ClipConfig {
        text_config,
        vision_config,
        projection_dim: embed_dim,
        vision_resnet,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Renames an OpenAI state dict to the names [`super::Clip::new`] reads: the text transformer
/// (and a ViT) to HF's, splitting `in_proj_*` into q/k/v and transposing the projections
/// (OpenAI multiplies `x @ proj`, HF stores `Linear` weights as (out, in)).
pub fn to_hf_names(
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let vit = tensors.contains_key("visual.proj");
    let mut out = HashMap::with_capacity(tensors.len() + 16);
    for (name, t) in tensors {
        let renamed = |s: &str| Some(s.to_owned());
        let mapped: Option<String> = match name.as_str() {
            "token_embedding.weight" => renamed("text_model.embeddings.token_embedding.weight"),
            "positional_embedding" => renamed("text_model.embeddings.position_embedding.weight"),
            "ln_final.weight" => renamed("text_model.final_layer_norm.weight"),
            "ln_final.bias" => renamed("text_model.final_layer_norm.bias"),
            "text_projection" => {
                out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            n if n.starts_with("transformer.resblocks.") => {
                let rest = &n["transformer.resblocks.".len()..];
                insert_block(&mut out, "text_model.encoder.layers.", rest, t)?;
                continue;
            }
            n if vit && n.starts_with("visual.") => {
                let rest = &n["visual.".len()..];
                match rest {
                    "conv1.weight" => {
                        renamed("vision_model.embeddings.patch_embedding.weight")
                    }
                    "class_embedding" => renamed("vision_model.embeddings.class_embedding"),
                    "positional_embedding" => {
                        renamed("vision_model.embeddings.position_embedding.weight")
                    }
                    "ln_pre.weight" => renamed("vision_model.pre_layrnorm.weight"),
                    "ln_pre.bias" => renamed("vision_model.pre_layrnorm.bias"),
                    "ln_post.weight" => renamed("vision_model.post_layernorm.weight"),
                    "ln_post.bias" => renamed("vision_model.post_layernorm.bias"),
                    "proj" => {
                        out.insert("visual_projection.weight".into(), t.t()?.contiguous()?);
                        continue;
                    }
                    r if r.starts_with("transformer.resblocks.") => {
                        let rest = &r["transformer.resblocks.".len()..];
                        insert_block(&mut out, "vision_model.encoder.layers.", rest, t)?;
                        continue;
                    }
                    _ => None,
                }
            }
            n if n.starts_with("visual.") => Some(name.clone()),
            _ => None,
        };
        if let Some(mapped) = mapped {
            out.insert(mapped, t);
        }
    }
    Ok(out)
}

/// One residual attention block: `{i}.ln_1.weight` etc. under HF's encoder-layer names.
fn insert_block(
    out: &mut HashMap<String, Tensor>,
    hf_prefix: &str,
    rest: &str,
    t: Tensor,
) -> candle_core::Result<()> {
    let Some((index, field)) = rest.split_once('.') else {
        return Ok(());
    };
    let layer = format!("{hf_prefix}{index}.");
    let simple = match field {
        "ln_1.weight" => "layer_norm1.weight",
        "ln_1.bias" => "layer_norm1.bias",
        "ln_2.weight" => "layer_norm2.weight",
        "ln_2.bias" => "layer_norm2.bias",
        "attn.out_proj.weight" => "self_attn.out_proj.weight",
        "attn.out_proj.bias" => "self_attn.out_proj.bias",
        "mlp.c_fc.weight" => "mlp.fc1.weight",
        "mlp.c_fc.bias" => "mlp.fc1.bias",
        "mlp.c_proj.weight" => "mlp.fc2.weight",
        "mlp.c_proj.bias" => "mlp.fc2.bias",
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            // (3 * width, ...) stacked q, k, v: nn.MultiheadAttention's packed projection.
            let kind = if field.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            let width = t.dim(0)? / 3;
            for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.insert(
                    format!("{layer}self_attn.{proj}.{kind}"),
                    t.narrow(0, i * width, width)?.contiguous()?,
                );
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    out.insert(format!("{layer}{simple}"), t);
    Ok(())
}
