//! `vqclip models list | pull | convert`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vqclip::models::catalogue::{self, ModelCache, CATALOGUE};
use vqclip::models::{clip_openai, weights, VqganYaml};

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// List the catalogue: names, kind, source and whether each is cached.
    List,
    /// Download a catalogue model into the cache (VQCLIP_MODEL_CACHE, else ~/.cache/vqclip).
    Pull {
        /// A catalogue name, e.g. ViT-B/32 or vqgan_imagenet_f16_16384.
        name: String,
    },
    /// Turn a taming Lightning checkpoint into .safetensors without the
    /// discriminator and perceptual loss (`loss.*`), or only the first stage of a Net2Net
    /// checkpoint; or one of OpenAI's CLIP `.pt` files (TorchScript) into .safetensors.
    /// Weight names are kept.
    Convert {
        /// The taming `.ckpt` (its `model.yaml` beside it, or IN with a .yaml extension), or
        /// an OpenAI CLIP `.pt`.
        input: PathBuf,
        /// The `.safetensors` to write; `model.yaml` is copied beside it.
        output: PathBuf,
    },
}

pub fn run(command: ModelsCommand) -> anyhow::Result<()> {
    let cache = ModelCache::from_env();
    match command {
        ModelsCommand::List => list(&cache),
        ModelsCommand::Pull { name } => {
            let path = catalogue::pull(&name, &cache)?;
            println!("{name}: {}", path.display());
            Ok(())
        }
        ModelsCommand::Convert { input, output } => convert(&input, &output),
    }
}

fn list(cache: &ModelCache) -> anyhow::Result<()> {
    let rows: Vec<[String; 4]> = CATALOGUE
        .iter()
        .map(|e| {
            [
                e.name.to_owned(),
                e.kind.to_string(),
                e.source_summary(),
                cache.status(e).to_string(),
            ]
        })
        .collect();
    let header = ["NAME", "KIND", "SOURCE", "CACHED"].map(str::to_owned);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    println!(
        "\ncache: {}{}",
        cache.root().display(),
        if cache.is_offline() { " (offline)" } else { "" }
    );
    Ok(())
}

/// The taming config that belongs to a checkpoint: `model.yaml` beside it
/// (the layout of the original release) or `IN.yaml` (the layout of the
/// popular download scripts).
fn config_beside(ckpt: &Path) -> Option<PathBuf> {
    [
        ckpt.with_extension("yaml"),
        ckpt.with_file_name("model.yaml"),
        ckpt.parent()
            .and_then(Path::parent)
            .map(|p| p.join("configs").join("model.yaml"))
            .unwrap_or_default(),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

fn convert(input: &Path, output: &Path) -> anyhow::Result<()> {
    if !input.is_file() {
        bail!("no such checkpoint: {}", input.display());
    }
    if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "the output must end in .safetensors (got {})",
            output.display()
        );
    }
    let tensors = weights::read_state_dict(input, &|_| true).with_context(|| {
        format!(
            "reading {} as a PyTorch checkpoint (a Lightning .ckpt with a state_dict, or a \
             TorchScript .pt)",
            input.display()
        )
    })?;
    if clip_openai::is_openai_state_dict(tensors.keys().map(String::as_str)) {
        return convert_openai_clip(input, output, tensors);
    }
    let total = tensors.len();
    // A Net2Net checkpoint holds the whole transformer; generate.py uses its first stage.
    let net2net = config_beside(input)
        .and_then(|yaml| VqganYaml::from_yaml_file(&yaml).ok())
        .and_then(|yaml| yaml.weights_prefix);
    let kept: HashMap<String, candle_core::Tensor> = match net2net {
        Some(prefix) => tensors
            .into_iter()
            .filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n.to_owned(), t)))
            .collect(),
        None => tensors
            .into_iter()
            .filter(|(name, _)| !name.starts_with("loss."))
            .collect(),
    };
    if kept.is_empty() {
        bail!(
            "{} holds no model weights outside `loss.*`; is it a taming VQGAN checkpoint?",
            input.display()
        );
    }
    if !kept.contains_key("quantize.embedding.weight")
        && !kept.contains_key("quantize.embed.weight")
    {
        eprintln!(
            "warning: no quantize.embedding.weight (or GumbelVQ's quantize.embed.weight) in the \
             checkpoint; it may not be a taming VQGAN"
        );
    }
    save_safetensors(&kept, output)?;
    println!(
        "wrote {} ({} tensors; dropped {} {})",
        output.display(),
        kept.len(),
        total - kept.len(),
        if net2net.is_some() {
            "outside the first stage"
        } else {
            "under loss.*"
        }
    );
    match config_beside(input) {
        Some(yaml) if net2net.is_some() => {
            let dest = output.with_file_name("model.yaml");
            write_first_stage_yaml(&yaml, &dest)?;
            println!(
                "wrote the first stage of {} to {}",
                yaml.display(),
                dest.display()
            );
        }
        Some(yaml) => {
            let dest = output.with_file_name("model.yaml");
            if yaml.canonicalize().ok() != dest.canonicalize().ok() {
                std::fs::copy(&yaml, &dest)
                    .with_context(|| format!("copying {} to {}", yaml.display(), dest.display()))?;
            }
            println!("copied {} to {}", yaml.display(), dest.display());
        }
        None => eprintln!(
            "warning: no model.yaml found beside {}; put the taming config at {} before loading",
            input.display(),
            output.with_file_name("model.yaml").display()
        ),
    }
    Ok(())
}

/// An OpenAI CLIP file (TorchScript or state dict) as safetensors under the same names, which
/// `Clip::load` reads like the original; dtypes are kept (OpenAI ships float16).
fn convert_openai_clip(
    input: &Path,
    output: &Path,
    tensors: HashMap<String, candle_core::Tensor>,
) -> anyhow::Result<()> {
    let total = tensors.len();
    let kept: HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(name, _)| clip_openai::is_openai_model_tensor(name))
        .collect();
    // Check that it builds before writing anything.
    clip_openai::config_from_state_dict(&clip_openai::shapes(&kept))
        .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    save_safetensors(&kept, output)?;
    println!(
        "wrote {} (OpenAI CLIP, {} tensors; dropped {} scalars)",
        output.display(),
        kept.len(),
        total - kept.len()
    );
    Ok(())
}

/// `model.params.first_stage_config` of a Net2Net yaml, written as a VQGAN's `model.yaml`.
fn write_first_stage_yaml(net2net: &Path, dest: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(net2net)
        .with_context(|| format!("reading {}", net2net.display()))?;
    let root: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", net2net.display()))?;
    let first = root
        .get("model")
        .and_then(|m| m.get("params"))
        .and_then(|p| p.get("first_stage_config"))
        .cloned()
        .with_context(|| {
            format!(
                "{} has no model.params.first_stage_config",
                net2net.display()
            )
        })?;
    let mut doc = serde_yaml_ng::Mapping::new();
    doc.insert("model".into(), first);
    let out = serde_yaml_ng::to_string(&doc)?;
    std::fs::write(dest, out).with_context(|| format!("writing {}", dest.display()))
}

/// Writes `tensors` beside `output` and renames, so a failed write never leaves a
/// truncated file where a loader would pick it up.
fn save_safetensors(
    tensors: &HashMap<String, candle_core::Tensor>,
    output: &Path,
) -> anyhow::Result<()> {
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = output.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))
}
