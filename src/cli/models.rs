//! `vqclip models list | pull | convert`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vqclip::models::catalogue::{self, ModelCache, CATALOGUE};

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
    /// discriminator and perceptual loss (`loss.*`); weight names are kept.
    Convert {
        /// The taming `.ckpt` (its `model.yaml` beside it, or IN with a .yaml extension).
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
    let tensors = candle_core::pickle::read_all_with_key(input, Some("state_dict"))
        .or_else(|_| candle_core::pickle::read_all(input))
        .with_context(|| {
            format!(
                "reading {} as a PyTorch checkpoint (a Lightning .ckpt with a state_dict)",
                input.display()
            )
        })?;
    let total = tensors.len();
    let kept: HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(name, _)| !name.starts_with("loss."))
        .collect();
    if kept.is_empty() {
        bail!(
            "{} holds no model weights outside `loss.*`; is it a taming VQGAN checkpoint?",
            input.display()
        );
    }
    if !kept.contains_key("quantize.embedding.weight") {
        eprintln!(
            "warning: no quantize.embedding.weight in the checkpoint; it may not be a taming VQGAN"
        );
    }
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Write beside the target and rename, so a failed write never leaves a
    // truncated file where a loader would pick it up.
    let tmp = output.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&kept, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "wrote {} ({} tensors; dropped {} under loss.*)",
        output.display(),
        kept.len(),
        total - kept.len()
    );
    match config_beside(input) {
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
