//! `vqclip render`: one job from the command line, through the same engine the
//! service's workers run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use base64::Engine as _;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use vqclip::models::catalogue::ModelCache;
use vqclip::render::batch::fork_point;
use vqclip::render::checkpoint::Checkpoint;
use vqclip::render::prompts::parse_prompt;
use vqclip::render::video::{read_frame_dir, read_mp4, style_video};
use vqclip::render::{
    render, Augment, CancelToken, CutMethod, ForkStart, ImagePromptSpec, InitNoise,
    InitRegulariser, JobSpec, Limits, ModelSet, OptimizerKind, ProgressEvent, PromptsSpec,
    RenderJob, RenderOutcome, SourceVideo, VideoLimits, VideoStyleSpec, ZoomSpec,
};

#[derive(clap::Args)]
pub struct RenderArgs {
    /// Boxed: the flags are many, and `Command`'s variants should stay small.
    #[command(flatten)]
    flags: Box<RenderFlags>,
}

#[derive(clap::Args)]
struct RenderFlags {
    /// A job spec (the JSON body of POST /v1/jobs); flags below override its fields.
    #[arg(long, conflicts_with = "prompt")]
    spec: Option<PathBuf>,
    /// Text prompts in generate.py syntax: "text:weight:stop | text2:-0.5", `^` between story phrases.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// Image prompts in generate.py syntax: "path:weight:stop", `|` between several
    /// (repeatable).
    #[arg(long = "image-prompt", visible_alias = "image-prompts")]
    image_prompts: Vec<String>,
    /// Noise prompt seeds (generate.py's -nps), one weight each in --noise-prompt-weights.
    #[arg(long, num_args = 1..)]
    noise_prompt_seeds: Vec<u64>,
    /// Noise prompt weights (generate.py's -npw), as many as --noise-prompt-seeds.
    #[arg(long, num_args = 1.., allow_negative_numbers = true)]
    noise_prompt_weights: Vec<f32>,
    /// An image file whose encoding is the starting point.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// Start from an encoded noise image instead: pixels or gradient.
    #[arg(long)]
    init_noise: Option<String>,
    #[arg(long)]
    init_weight: Option<f32>,
    /// decay_zero (generate.py's) or mse_init (Crowson's notebook).
    #[arg(long)]
    init_regulariser: Option<String>,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    lr: Option<f32>,
    /// adam, adamw, adagrad, adamax, rmsprop, radam, diffgrad or adamp.
    #[arg(long)]
    optimizer: Option<String>,
    #[arg(long)]
    cutn: Option<u32>,
    #[arg(long)]
    cut_pow: Option<f32>,
    /// `original` (Crowson's random crops), `latest` (pooled cutouts + augments), or
    /// generate.py's `updated`, `nrupdated`, `updatedpooling`.
    #[arg(long)]
    cut_method: Option<String>,
    /// Comma-separated generate.py codes, e.g. Af,Pe,Ji,Er; empty for none.
    #[arg(long)]
    augments: Option<String>,
    /// Write a frame every N steps (0: only the final image).
    #[arg(long)]
    save_every: Option<u32>,
    /// Video frame rate.
    #[arg(long)]
    fps: Option<f32>,
    /// Skip the MP4.
    #[arg(long)]
    no_video: bool,
    /// Story mode: the next `^` phrase of --prompt every this many steps.
    #[arg(long)]
    change_prompt_every: Option<u32>,
    /// Zoom video (generate.py's -zvid) with default settings; any --zoom-* flag implies it.
    #[arg(long)]
    zoom: bool,
    /// First step that zooms (frames are still written before it).
    #[arg(long)]
    zoom_start: Option<u32>,
    /// Zoom (and write a zoom frame) every this many steps (generate.py's -zse).
    #[arg(long)]
    zoom_every: Option<u32>,
    /// Crop width/scale about the centre: below 1 zooms out, above 1 in (default 0.99).
    #[arg(long)]
    zoom_scale: Option<f32>,
    /// Pixels to shift right (negative: left) per zoom step, wrapping round.
    #[arg(long, allow_negative_numbers = true)]
    zoom_shift_x: Option<i32>,
    /// Pixels to shift down (negative: up) per zoom step, wrapping round.
    #[arg(long, allow_negative_numbers = true)]
    zoom_shift_y: Option<i32>,
    #[arg(long)]
    checkpoint_every: Option<u32>,
    /// CLIP model: catalogue name (ViT-B/32) or a HF CLIP directory; repeat for an ensemble.
    #[arg(long)]
    clip: Vec<String>,
    /// VQGAN model: catalogue name or a .ckpt/.safetensors (model.yaml beside it) or its directory.
    #[arg(long)]
    vqgan: Option<String>,
    /// Output directory: image.png, frames/, video.mp4, metadata.json.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Continue from a checkpoint written by an earlier run of the same job.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start from a saved frame of an earlier run: DIR:STEP reads DIR/frames/STEP.ckpt
    /// (z, optimiser, RNG; the step counter continues at STEP). The spec given here
    /// (prompts, lr, ...) applies from that step on; the size must be the same.
    #[arg(long, value_name = "DIR:STEP")]
    fork: Option<String>,
    /// With --fork: start the optimiser afresh instead of carrying its moments over.
    #[arg(long, requires = "fork")]
    reset_optimizer: bool,
    /// cpu, cuda:N, or auto (CUDA when built with it and present, else CPU).
    #[arg(long, default_value = "auto")]
    device: String,

    // Video options and video styling (generate.py's --video_length,
    // --output_video_fps and --video_style_dir).
    /// Video length in seconds: the frame rate becomes clamp(frames / length, 10, 60).
    #[arg(long)]
    video_length: Option<f32>,
    /// Interpolate the video up to this frame rate from --fps (cross-fades).
    #[arg(long)]
    output_fps: Option<f32>,
    /// Style a video: a directory of .png/.jpg frames (file-name order, shown at
    /// --fps) or an .mp4 file. Each frame is the init image of its own render.
    #[arg(long)]
    style_video: Option<PathBuf>,
    /// Steps for each styled frame (default: --steps).
    #[arg(long)]
    steps_per_frame: Option<u32>,
    /// Style only the first N frames.
    #[arg(long)]
    max_frames: Option<u32>,
    /// Blend this much (0..1) of the previous styled frame into each source frame's init.
    #[arg(long)]
    carry: Option<f32>,
}

/// `DIR:STEP` of `--fork`: the state saved beside the frame of STEP in DIR's `frames/`.
fn fork_start(arg: &str, reset_optimizer: bool) -> anyhow::Result<ForkStart> {
    let (dir, step) = arg
        .rsplit_once(':')
        .context("--fork takes DIR:STEP, e.g. out/run1:50")?;
    let step: u32 = step
        .parse()
        .with_context(|| format!("--fork {arg}: {step:?} is not a step number"))?;
    let path = fork_point(&Path::new(dir).join("frames"), step);
    if !path.is_file() {
        let saved = saved_steps(&Path::new(dir).join("frames"));
        anyhow::bail!(
            "--fork {arg}: no saved state at step {step} ({} is missing); saved steps: {}",
            path.display(),
            if saved.is_empty() {
                "none".to_string()
            } else {
                saved.join(", ")
            }
        );
    }
    Ok(ForkStart {
        path,
        reset_optimizer,
    })
}

/// The steps a run directory's `frames/` holds fork points for.
fn saved_steps(frames: &Path) -> Vec<String> {
    let mut steps: Vec<u32> = std::fs::read_dir(frames)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_suffix(".ckpt")?.parse().ok()
        })
        .collect();
    steps.sort_unstable();
    steps.iter().map(u32::to_string).collect()
}

/// Set by SIGINT: finish the step, write a checkpoint, exit.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Sets [`INTERRUPTED`] on every SIGINT (Ctrl-C), from a small runtime on its own thread:
/// the render loop itself is synchronous. The handler is in place when this returns.
fn watch_sigint() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal watcher")?;
    let mut sigint = {
        let _context = runtime.enter();
        signal(SignalKind::interrupt()).context("watching for Ctrl-C")?
    };
    std::thread::Builder::new()
        .name("sigint".into())
        .spawn(move || {
            runtime.block_on(async move {
                while sigint.recv().await.is_some() {
                    INTERRUPTED.store(true, Ordering::SeqCst);
                }
            })
        })
        .context("starting the signal watcher")?;
    Ok(())
}

pub fn run(args: RenderArgs) -> anyhow::Result<()> {
    let args = *args.flags;
    let spec = build_spec(&args)?;
    // The command line is its own deployment: only CLIP's context bounds it.
    let validated = spec.validate(&Limits::unbounded()).context("invalid job")?;
    let device = parse_device(&args.device)?;
    let cache = ModelCache::from_env();
    eprintln!(
        "loading models: vqgan {}, clip {}",
        spec.models.vqgan,
        spec.models.clip.join(", ")
    );
    let models = ModelSet::load(&spec.models, &cache, &device)?;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let fork = args
        .fork
        .as_deref()
        .map(|f| fork_start(f, args.reset_optimizer))
        .transpose()?;
    // A fork keeps its source's seed unless told otherwise: image prompts then embed
    // through the same cutouts, and a fork without changes continues as its source did.
    let fork_seed = match &fork {
        Some(f) => Some(
            Checkpoint::read(&f.path, &Device::Cpu)
                .with_context(|| format!("reading the fork point {}", f.path.display()))?
                .seed,
        ),
        None => None,
    };
    let seed = spec.seed.or(fork_seed).unwrap_or_else(rand::random);
    let mut job = RenderJob::validated(spec, validated, seed, &args.out);
    job.resume = args.resume.clone();
    job.fork = fork;
    eprintln!("seed {}", job.seed);
    let source = match &job.spec.video_style {
        Some(style) => Some(read_style_source(&style.video, &job.spec)?),
        None => None,
    };
    let total_steps = match (&job.spec.video_style, &source) {
        (Some(style), Some(source)) => {
            let frames = source
                .frames
                .len()
                .min(style.max_frames.map_or(usize::MAX, |m| m as usize));
            eprintln!("styling {frames} frames at {} fps", source.fps);
            frames as u64 * u64::from(style.steps_per_frame(job.spec.steps))
        }
        _ => u64::from(job.spec.steps),
    };

    watch_sigint()?;
    let cancel = CancelToken::new();
    let bar = ProgressBar::new(total_steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let token = cancel.clone();
    let progress_bar = bar.clone();
    let mut sink = move |ev: ProgressEvent| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            token.interrupt();
        }
        match ev {
            ProgressEvent::Step { step, loss, .. } => {
                progress_bar.set_position(u64::from(step));
                progress_bar.set_message(format!("loss {loss:.4}"));
            }
            ProgressEvent::Frame { path, .. } => {
                progress_bar.println(format!("frame {}", path.display()))
            }
            ProgressEvent::Checkpoint { .. } | ProgressEvent::Steered { .. } => {}
        }
    };
    let outcome = match &source {
        Some(source) => style_video(&job, source, &models, &mut sink, &cancel)?,
        None => render(&job, &models, &mut sink, &cancel)?,
    };
    bar.finish_and_clear();
    match outcome {
        RenderOutcome::Completed(art) => {
            println!("image    {}", art.image.display());
            println!(
                "frames   {} ({} files)",
                args.out.join("frames").display(),
                art.frames.len()
            );
            match &art.video {
                Some(v) => println!("video    {}", v.display()),
                None => println!("video    (none: disabled or fewer than two frames)"),
            }
            println!("metadata {}", art.metadata.display());
        }
        RenderOutcome::Interrupted { step, checkpoint } => {
            println!(
                "interrupted after step {step}; checkpoint {}",
                checkpoint.display()
            );
            println!(
                "resume with the same flags plus --seed {} --resume {}",
                job.seed,
                checkpoint.display()
            );
        }
        RenderOutcome::Canceled { step } => println!("canceled after step {step}"),
    }
    Ok(())
}

/// The frames to style: a local frame directory or MP4 file (the service takes an
/// uploaded MP4 instead).
fn read_style_source(reference: &str, spec: &JobSpec) -> anyhow::Result<SourceVideo> {
    let path = Path::new(reference);
    if !path.exists() {
        bail!(
            "video_style.video {reference:?} is not a local frame directory or MP4 file; \
             `vqclip render` styles local files (--style-video PATH)"
        );
    }
    let take = spec
        .video_style
        .as_ref()
        .and_then(|s| s.max_frames)
        .map(|m| m as usize);
    let size = (spec.width, spec.height);
    let source = if path.is_dir() {
        read_frame_dir(path, take, size, spec.video.fps)?
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        read_mp4(&bytes, &VideoLimits::UNLIMITED, take, size)
            .with_context(|| format!("reading {}", path.display()))?
    };
    Ok(source)
}

fn parse_device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        other => {
            let Some(index) = other.strip_prefix("cuda:") else {
                bail!("unknown device {other:?}: use cpu, cuda:N or auto");
            };
            let index: usize = index
                .parse()
                .with_context(|| format!("bad CUDA index in {other:?}"))?;
            Device::new_cuda(index).with_context(|| {
                format!("{other} is unavailable (is this build made with `--features cuda`?)")
            })
        }
    }
}

/// A local image file as an inline `data:` reference.
fn data_url(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let format = image::guess_format(&bytes)
        .with_context(|| format!("{} is not an image vqclip can read", path.display()))?;
    let media_type = format.to_mime_type();
    Ok(format!(
        "data:{media_type};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// The spec's zoom defaults (generate.py's), from the one place they are written.
fn default_zoom() -> ZoomSpec {
    serde_json::from_str("{}").expect("an empty zoom object deserialises")
}

/// generate.py's `-ip` value: `|`-separated `path:weight:stop`, each file read into an
/// inline image. Only numeric fields are peeled from the right, so `C:\x.png` stays a path.
fn image_prompts(value: &str) -> anyhow::Result<Vec<ImagePromptSpec>> {
    value
        .split('|')
        .map(|part| {
            let prompt = parse_prompt(part).map_err(|(rule, detail)| {
                anyhow::anyhow!("--image-prompt {part:?}: {rule}; {detail}")
            })?;
            Ok(ImagePromptSpec {
                image: data_url(Path::new(&prompt.text))?,
                weight: prompt.weight,
                stop: prompt.stop,
            })
        })
        .collect()
}

fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, value: &str) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .with_context(|| format!("unknown {what} {value:?}"))
}

fn build_spec(args: &RenderFlags) -> anyhow::Result<JobSpec> {
    let mut spec = match &args.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid job spec", path.display()))?
        }
        None => JobSpec::default(),
    };
    if let Some(p) = &args.prompt {
        spec.prompts = PromptsSpec::Syntax(p.clone());
    }
    for value in &args.image_prompts {
        spec.image_prompts.extend(image_prompts(value)?);
    }
    if !args.noise_prompt_seeds.is_empty() || !args.noise_prompt_weights.is_empty() {
        // Paired and count-checked by the spec's validation, which names the flag's field.
        spec.noise_prompt_seeds = args.noise_prompt_seeds.clone();
        spec.noise_prompt_weights = args.noise_prompt_weights.clone();
    }
    if let Some(path) = &args.init_image {
        spec.init_image = Some(data_url(path)?);
    }
    if let Some(n) = &args.init_noise {
        spec.init_noise = Some(parse_enum::<InitNoise>("init noise", &n.to_lowercase())?);
    }
    if let Some(r) = &args.init_regulariser {
        spec.init_regulariser = parse_enum::<InitRegulariser>("init regulariser", r)?;
    }
    let zoom_flags = args.zoom_start.is_some()
        || args.zoom_every.is_some()
        || args.zoom_scale.is_some()
        || args.zoom_shift_x.is_some()
        || args.zoom_shift_y.is_some();
    if args.zoom || zoom_flags {
        let mut zoom = spec.zoom.take().unwrap_or_else(default_zoom);
        if let Some(v) = args.zoom_start {
            zoom.start = v;
        }
        if let Some(v) = args.zoom_every {
            zoom.every = v;
        }
        if let Some(v) = args.zoom_scale {
            zoom.scale = v;
        }
        if let Some(v) = args.zoom_shift_x {
            zoom.shift_x = v;
        }
        if let Some(v) = args.zoom_shift_y {
            zoom.shift_y = v;
        }
        spec.zoom = Some(zoom);
    }
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = args.$field { spec.$field = v; } )* };
    }
    set!(
        init_weight,
        width,
        height,
        steps,
        lr,
        cutn,
        cut_pow,
        save_every,
        checkpoint_every,
        change_prompt_every
    );
    if args.seed.is_some() {
        spec.seed = args.seed;
    }
    if let Some(o) = &args.optimizer {
        spec.optimizer = parse_enum::<OptimizerKind>("optimizer", &o.to_lowercase())?;
    }
    if let Some(c) = &args.cut_method {
        spec.cut_method = parse_enum::<CutMethod>("cut method", c)?;
    }
    if let Some(a) = &args.augments {
        spec.augments = a
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| parse_enum::<Augment>("augment", s))
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(fps) = args.fps {
        spec.video.fps = fps;
    }
    if args.no_video {
        spec.video.enabled = false;
    }
    if args.video_length.is_some() {
        spec.video.length_seconds = args.video_length;
    }
    if args.output_fps.is_some() {
        spec.video.output_fps = args.output_fps;
    }
    if let Some(path) = &args.style_video {
        spec.video_style = Some(VideoStyleSpec {
            video: path.display().to_string(),
            steps_per_frame: None,
            max_frames: None,
            carry: 0.0,
        });
    }
    if let Some(style) = &mut spec.video_style {
        if args.steps_per_frame.is_some() {
            style.steps_per_frame = args.steps_per_frame;
        }
        if args.max_frames.is_some() {
            style.max_frames = args.max_frames;
        }
        if let Some(carry) = args.carry {
            style.carry = carry;
        }
    } else if args.steps_per_frame.is_some() || args.max_frames.is_some() || args.carry.is_some() {
        bail!("--steps-per-frame, --max-frames and --carry need --style-video");
    }
    if !args.clip.is_empty() {
        spec.models.clip = args.clip.clone();
    }
    if let Some(v) = &args.vqgan {
        spec.models.vqgan = v.clone();
    }
    Ok(spec)
}
