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
    // BatchNorm's `num_batches_tracked` only counts training steps.
    !matches!(
        name,
        "logit_scale" | "input_resolution" | "context_length" | "vocab_size"
    ) && !name.ends_with(".num_batches_tracked")
}

/// Size `index` of tensor `name`, or why the file is not an OpenAI CLIP.
fn dim(shapes: &HashMap<String, Vec<usize>>, name: &str, index: usize) -> Result<usize, String> {
    let dims = shapes
        .get(name)
        .ok_or_else(|| format!("no tensor {name}; is this an OpenAI CLIP file?"))?;
    dims.get(index)
        .copied()
        .ok_or_else(|| format!("tensor {name} has shape {dims:?}; is this an OpenAI CLIP file?"))
}

/// The shape of every tensor, which is all `build_model` looks at.
pub fn shapes(tensors: &HashMap<String, Tensor>) -> HashMap<String, Vec<usize>> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect()
}

/// `build_model`'s reading of the architecture from the tensor shapes.
pub fn config_from_state_dict(shapes: &HashMap<String, Vec<usize>>) -> Result<ClipConfig, String> {
    let names = || shapes.keys().map(String::as_str);
    let embed_dim = dim(shapes, "text_projection", 1)?;
    let context_length = dim(shapes, "positional_embedding", 0)?;
    let vocab_size = dim(shapes, "token_embedding.weight", 0)?;
    let width = dim(shapes, "ln_final.weight", 0)?;
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
    let (vision_config, vision_resnet) = if shapes.contains_key("visual.proj") {
        let width = dim(shapes, "visual.conv1.weight", 0)?;
        let patch = dim(shapes, "visual.conv1.weight", 3)?;
        let tokens = dim(shapes, "visual.positional_embedding", 0)?;
        let grid = (tokens.saturating_sub(1) as f64).sqrt().round() as usize;
        let vision = ClipVisionConfig {
            hidden_size: width,
            intermediate_size: width * 4,
            num_hidden_layers: count_indexed(names(), "visual.transformer.resblocks."),
            num_attention_heads: width / HEAD_WIDTH,
            num_channels: 3,
            image_size: patch * grid,
            patch_size: patch,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        (vision, None)
    } else {
        let layers = [1, 2, 3, 4].map(|b| count_indexed(names(), &format!("visual.layer{b}.")));
        let width = dim(shapes, "visual.layer1.0.conv1.weight", 0)?;
        let tokens = dim(shapes, "visual.attnpool.positional_embedding", 0)?;
        let grid = (tokens.saturating_sub(1) as f64).sqrt().round() as usize;
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

/// Where one OpenAI tensor goes among the names [`super::Clip::new`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renamed {
    As(String),
    /// OpenAI multiplies `x @ proj`; HF stores `Linear` weights as (out, in).
    Transposed(String),
    /// `nn.MultiheadAttention`'s packed (3 * width, ...) projection, split into q, k, v.
    SplitQkv([String; 3]),
    /// Not used by the model.
    Dropped,
}

/// The HF name of an OpenAI tensor: the text transformer (and a ViT image tower) take HF's
/// names; a ResNet keeps its `visual.*` names.
pub fn hf_name(name: &str, vit: bool) -> Renamed {
    if !is_openai_model_tensor(name) {
        return Renamed::Dropped;
    }
    let text = match name {
        "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
        "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
        "text_projection" => return Renamed::Transposed("text_projection.weight".into()),
        _ => None,
    };
    if let Some(n) = text {
        return Renamed::As(n.into());
    }
    if let Some(rest) = name.strip_prefix("transformer.resblocks.") {
        return block_name("text_model.encoder.layers.", rest);
    }
    let Some(visual) = name.strip_prefix("visual.") else {
        return Renamed::Dropped;
    };
    if !vit {
        return Renamed::As(name.into());
    }
    let vit_name = match visual {
        "conv1.weight" => "vision_model.embeddings.patch_embedding.weight",
        "class_embedding" => "vision_model.embeddings.class_embedding",
        "positional_embedding" => "vision_model.embeddings.position_embedding.weight",
        "ln_pre.weight" => "vision_model.pre_layrnorm.weight",
        "ln_pre.bias" => "vision_model.pre_layrnorm.bias",
        "ln_post.weight" => "vision_model.post_layernorm.weight",
        "ln_post.bias" => "vision_model.post_layernorm.bias",
        "proj" => return Renamed::Transposed("visual_projection.weight".into()),
        _ => {
            return match visual.strip_prefix("transformer.resblocks.") {
                Some(rest) => block_name("vision_model.encoder.layers.", rest),
                None => Renamed::Dropped,
            }
        }
    };
    Renamed::As(vit_name.into())
}

/// One residual attention block's tensor (`{i}.ln_1.weight` ...) under HF's layer names.
fn block_name(hf_prefix: &str, rest: &str) -> Renamed {
    let Some((index, field)) = rest.split_once('.') else {
        return Renamed::Dropped;
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
            let kind = if field.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            return Renamed::SplitQkv(
                ["q_proj", "k_proj", "v_proj"].map(|p| format!("{layer}self_attn.{p}.{kind}")),
            );
        }
        _ => return Renamed::Dropped,
    };
    Renamed::As(format!("{layer}{simple}"))
}

/// Whether the state dict's image tower is a ViT (OpenAI's `build_model` test).
pub fn is_vit<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n == "visual.proj")
}

/// Renames an OpenAI state dict to the names [`super::Clip::new`] reads (see [`hf_name`]).
pub fn to_hf_names(
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let vit = is_vit(tensors.keys().map(String::as_str));
    let mut out = HashMap::with_capacity(tensors.len() + 16);
    for (name, t) in tensors {
        match hf_name(&name, vit) {
            Renamed::As(n) => {
                out.insert(n, t);
            }
            Renamed::Transposed(n) => {
                out.insert(n, t.t()?.contiguous()?);
            }
            Renamed::SplitQkv(names) => {
                let width = t.dim(0)? / 3;
                for (i, n) in names.into_iter().enumerate() {
                    out.insert(n, t.narrow(0, i * width, width)?.contiguous()?);
                }
            }
            Renamed::Dropped => {}
        }
    }
    Ok(out)
}

/// [`to_hf_names`] on shapes alone, to check real-size architectures without their weights.
pub fn hf_shapes(shapes: &HashMap<String, Vec<usize>>) -> HashMap<String, Vec<usize>> {
    let vit = is_vit(shapes.keys().map(String::as_str));
    let mut out = HashMap::new();
    for (name, dims) in shapes {
        match hf_name(name, vit) {
            Renamed::As(n) => {
                out.insert(n, dims.clone());
            }
            Renamed::Transposed(n) => {
                out.insert(n, dims.iter().rev().copied().collect());
            }
            Renamed::SplitQkv(names) => {
                let mut part = dims.clone();
                if let Some(rows) = part.first_mut() {
                    *rows /= 3;
                }
                for n in names {
                    out.insert(n, part.clone());
                }
            }
            Renamed::Dropped => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(entries: &[(&str, &[usize])]) -> HashMap<String, Vec<usize>> {
        entries
            .iter()
            .map(|(n, s)| ((*n).to_owned(), s.to_vec()))
            .collect()
    }

    const TEXT: &[(&str, &[usize])] = &[
        ("text_projection", &[64, 16]),
        ("positional_embedding", &[77, 64]),
        ("token_embedding.weight", &[640, 64]),
        ("ln_final.weight", &[64]),
        ("transformer.resblocks.0.attn.in_proj_weight", &[192, 64]),
    ];

    #[test]
    fn malformed_files_say_what_is_wrong() {
        let err = config_from_state_dict(&shapes(&TEXT[1..])).unwrap_err();
        assert!(err.contains("text_projection"), "{err}");

        let mut bad_grid = shapes(TEXT);
        bad_grid.extend(shapes(&[
            ("visual.layer1.0.conv1.weight", &[4, 4, 1, 1]),
            ("visual.attnpool.positional_embedding", &[6, 128]),
        ]));
        let err = config_from_state_dict(&bad_grid).unwrap_err();
        assert!(err.contains("square grid"), "{err}");

        let mut scalar = shapes(TEXT);
        scalar.insert("text_projection".into(), vec![64]);
        let err = config_from_state_dict(&scalar).unwrap_err();
        assert!(err.contains("has shape [64]"), "{err}");
    }

    #[test]
    fn packed_attention_splits_into_q_k_v_and_projections_transpose() {
        let hf = hf_shapes(&shapes(TEXT));
        for p in ["q_proj", "k_proj", "v_proj"] {
            let name = format!("text_model.encoder.layers.0.self_attn.{p}.weight");
            assert_eq!(hf[&name], vec![64, 64], "{name}");
        }
        assert_eq!(hf["text_projection.weight"], vec![16, 64]);
        assert!(matches!(hf_name("logit_scale", false), Renamed::Dropped));
        assert!(matches!(
            hf_name("visual.bn1.num_batches_tracked", false),
            Renamed::Dropped
        ));
        assert_eq!(
            hf_name("visual.layer1.0.conv1.weight", false),
            Renamed::As("visual.layer1.0.conv1.weight".into())
        );
    }
}
