//! `vqclip tokenize | embed | score | reconstruct`: the CLIP and VQGAN tools.
//! Results go to stdout (plain text, or JSON with `--json`); notes go to stderr.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use vqclip::models::catalogue::{self, ModelCache};
use vqclip::models::preprocess;
use vqclip::models::{Clip, ClipTokenizer};

const DEFAULT_CLIP: &str = "ViT-B/32";
const DEFAULT_VQGAN: &str = "vqgan_imagenet_f16_16384";

#[derive(clap::Args)]
pub struct ClipChoice {
    /// CLIP model: a catalogue name (`vqclip models list`), a HF CLIP directory or a file in one.
    #[arg(long, default_value = DEFAULT_CLIP)]
    clip: String,
    /// Where to run: cpu, cuda:N or auto (the first GPU when built with CUDA, else the CPU).
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// The text to tokenize.
    text: String,
    /// Print the 77 ids as a JSON list.
    #[arg(long)]
    json: bool,
    /// Use this CLIP model's tokenizer.json (name, directory or file); without it the
    /// bundled OpenAI BPE is used and nothing is downloaded.
    #[arg(long)]
    clip: Option<String>,
}

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// A text to embed (repeatable).
    #[arg(long = "text", value_name = "TEXT")]
    texts: Vec<String>,
    /// An image to embed (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// Print `{"text": [[...]], "image": [[...]]}` at full precision.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ClipChoice,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The image to score.
    image: PathBuf,
    /// One or more prompts.
    #[arg(required = true)]
    prompts: Vec<String>,
    /// Print `{"prompts": [...], "cosine": [...]}`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ClipChoice,
}

#[derive(clap::Args)]
pub struct ReconstructArgs {
    /// The input image.
    input: PathBuf,
    /// Where to write the reconstruction (PNG).
    output: PathBuf,
    /// Print the codebook indices as `{"indices": [...]}`, row-major.
    #[arg(long)]
    json: bool,
    /// VQGAN model: a catalogue name, a .ckpt/.safetensors with model.yaml beside it, or a
    /// directory holding both.
    #[arg(long, default_value = DEFAULT_VQGAN)]
    vqgan: String,
    /// Where to run: cpu, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = match &args.clip {
        None => ClipTokenizer::bundled()?,
        Some(spec) => {
            let path = catalogue::resolve_clip(spec, &ModelCache::from_env())?;
            let dir = if path.is_dir() {
                path
            } else {
                path.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            ClipTokenizer::from_dir(&dir)?
        }
    };
    let tokens = tokenizer.encode(&args.text)?;
    if tokens.truncated {
        eprintln!(
            "note: the text is longer than CLIP's 77-token context and was truncated; \
             the model sees only its first 75 tokens"
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&tokens.ids)?);
        return Ok(());
    }
    let end = tokenizer.end_of_text_id();
    let used = tokens
        .ids
        .iter()
        .position(|&id| id == end)
        .map_or(tokens.ids.len(), |i| i + 1);
    let ids: Vec<String> = tokens.ids[..used].iter().map(u32::to_string).collect();
    println!(
        "{used} of {} tokens (start and end markers included; the rest is padding with {end}):",
        tokens.ids.len()
    );
    println!("{}", ids.join(" "));
    Ok(())
}

/// Rows scaled to unit L2 norm.
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

fn rows(x: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec2()?)
}

struct LoadedClip {
    clip: Clip,
    device: Device,
}

fn load_clip(choice: &ClipChoice) -> anyhow::Result<LoadedClip> {
    let device = catalogue::parse_device(&choice.device)?;
    let clip = catalogue::load_clip(&choice.clip, &ModelCache::from_env(), &device)
        .with_context(|| format!("loading CLIP {:?}", choice.clip))?;
    Ok(LoadedClip { clip, device })
}

impl LoadedClip {
    fn embed_texts(&self, texts: &[String]) -> anyhow::Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let prompts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (features, truncated) = self.clip.encode_prompts(&prompts)?;
        for (text, cut) in texts.iter().zip(truncated) {
            if cut {
                eprintln!("note: {text:?} is longer than 77 tokens and was truncated");
            }
        }
        rows(&l2_normalize(&features)?)
    }

    fn embed_images(&self, paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<f32>>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let size = self.clip.image_size();
        let pixels = paths
            .iter()
            .map(|p| {
                let img = preprocess::open_image(p)?;
                preprocess::clip_pixels(&img, size, &self.device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pixels = Tensor::cat(&pixels, 0)?;
        let features = self
            .clip
            .encode_image(&self.clip.normalize_pixels(&pixels)?)?;
        rows(&l2_normalize(&features)?)
    }
}

pub fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    if args.texts.is_empty() && args.images.is_empty() {
        bail!("nothing to embed: give at least one --text TEXT or --image PATH");
    }
    let model = load_clip(&args.model)?;
    let text = model.embed_texts(&args.texts)?;
    let image = model.embed_images(&args.images)?;
    if args.json {
        println!("{}", serde_json::json!({ "text": text, "image": image }));
        return Ok(());
    }
    let labelled = args
        .texts
        .iter()
        .map(|t| format!("text  {t:?}"))
        .zip(&text)
        .chain(
            args.images
                .iter()
                .map(|p| format!("image {}", p.display()))
                .zip(&image),
        );
    for (label, v) in labelled {
        println!("{label}");
        println!("  {} dims, L2-normalised: {}", v.len(), preview(v));
    }
    Ok(())
}

/// The first and last few values of a long vector.
fn preview(v: &[f32]) -> String {
    let fmt = |s: &[f32]| {
        s.iter()
            .map(|x| format!("{x:+.5}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if v.len() <= 8 {
        format!("[{}]", fmt(v))
    } else {
        format!("[{} ... {}]", fmt(&v[..4]), fmt(&v[v.len() - 4..]))
    }
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let model = load_clip(&args.model)?;
    let image = model.embed_images(std::slice::from_ref(&args.image))?;
    let text = model.embed_texts(&args.prompts)?;
    let cosines: Vec<f32> = text
        .iter()
        .map(|t| t.iter().zip(&image[0]).map(|(a, b)| a * b).sum())
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "prompts": args.prompts, "cosine": cosines })
        );
        return Ok(());
    }
    println!("image: {}", args.image.display());
    println!("{:>8}  prompt", "cosine");
    for (prompt, cosine) in args.prompts.iter().zip(&cosines) {
        println!("{cosine:>8.4}  {prompt}");
    }
    Ok(())
}

pub fn reconstruct(args: ReconstructArgs) -> anyhow::Result<()> {
    let device = catalogue::parse_device(&args.device)?;
    let vqgan = catalogue::load_vqgan(&args.vqgan, &ModelCache::from_env(), &device)
        .with_context(|| format!("loading VQGAN {:?}", args.vqgan))?;
    let img = preprocess::open_image(&args.input)?.to_rgb8();
    let f = vqgan.downsample_factor() as u32;
    let (w, h) = (img.width(), img.height());
    let fit = |x: u32| (((x + f / 2) / f) * f).max(f);
    let (w2, h2) = (fit(w), fit(h));
    let img = if (w2, h2) != (w, h) {
        eprintln!(
            "note: resized {w}x{h} to {w2}x{h2}, a multiple of the VQGAN's downsampling factor {f}"
        );
        preprocess::resize_bicubic(&img, w2, h2)
    } else {
        img
    };
    let x = preprocess::to_unit_tensor(&img, &device)?.affine(2.0, -1.0)?;
    let z = vqgan.encode(&x)?;
    let (z_q, indices) = vqgan.quantize(&z)?;
    let out = vqgan.decode(&z_q)?;
    write_png(&out, &args.output)?;

    let (_, gh, gw) = indices.dims3()?;
    let indices: Vec<u32> = indices.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    if args.json {
        println!("{}", serde_json::json!({ "indices": indices }));
        return Ok(());
    }
    let mut distinct = indices.clone();
    distinct.sort_unstable();
    distinct.dedup();
    println!(
        "encoded {w2}x{h2} to a {gw}x{gh} grid of codes ({} distinct of {}); wrote {}",
        distinct.len(),
        vqgan.n_embed(),
        args.output.display()
    );
    Ok(())
}

/// A (1, 3, H, W) image in [-1, 1] to an 8-bit PNG.
fn write_png(image: &Tensor, path: &Path) -> anyhow::Result<()> {
    let (_, _, h, w) = image.dims4()?;
    let pixels = ((image.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = pixels.iter().map(|&v| v as u8).collect();
    let png = image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .context("decoder output has an unexpected shape")?;
    png.save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
