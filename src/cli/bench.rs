//! `vqclip bench`: times the render step on the real architectures with random weights
//! (or on real weights when given a path), so the numbers compare with the PyTorch
//! baseline in `bench/pytorch/` without any download.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;

use vqclip::models::architectures;
use vqclip::models::catalogue::{self, ModelCache};
use vqclip::models::{Clip, Vqgan};
use vqclip::render::{
    step_batch, JobSpec, ModelIdentities, ModelIdentity, ModelSet, RenderJob, RenderSession,
};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Image side in pixels (square; a multiple of 16).
    #[arg(long, default_value_t = 512)]
    size: u32,
    #[arg(long, default_value_t = 32)]
    cutn: u32,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 30)]
    steps: u32,
    /// Untimed steps first: the first use of each kernel module costs seconds on a GPU.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Jobs stepped together, as one batched forward and backward; reported as
    /// job-steps/s.
    #[arg(long, default_value_t = 1)]
    batch: u32,
    /// Step the --batch jobs one after another instead of as one batch, to compare.
    #[arg(long)]
    no_batch: bool,
    /// f32, or tf32 (CUDA matmuls in reduced precision). bf16 is not implemented yet.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Comma-separated augment codes (generate.py's), empty for none.
    #[arg(long, default_value = "Af,Pe,Ji,Er")]
    augments: String,
    /// cutout method: latest | original | updated | nrupdated | updatedpooling
    #[arg(long, default_value = "latest")]
    cut_method: String,
    /// A catalogue CLIP name (random weights of that architecture) or a model directory.
    #[arg(long, default_value = "ViT-B/32")]
    clip: String,
    /// A catalogue VQGAN name (random weights of that architecture) or a checkpoint path.
    #[arg(long, default_value = "vqgan_imagenet_f16_16384")]
    vqgan: String,
    /// cpu | cuda:N | auto
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads for every op (0: one per core, or RAYON_NUM_THREADS).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Precision {
    F32,
    Tf32,
    Bf16,
}

#[derive(Serialize)]
struct BenchReport {
    implementation: &'static str,
    version: &'static str,
    device: String,
    size: u32,
    cutn: u32,
    batch: u32,
    /// Whether the jobs stepped as one batch (false: one after another).
    batched: bool,
    precision: Precision,
    augments: String,
    cut_method: String,
    clip: String,
    vqgan: String,
    steps: u32,
    warmup: u32,
    median_ms_per_step: f64,
    min_ms_per_step: f64,
    steps_per_s: f64,
    job_steps_per_s: f64,
    /// Peak resident memory of the process (CPU) or device memory in use (CUDA), bytes.
    peak_memory_bytes: Option<u64>,
    peak_memory_kind: &'static str,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.threads > 0 {
        // Before any other thread exists, so setting the environment is sound; candle
        // reads it for the split of each matmul.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
        if !vqclip::models::cpu::set_threads(args.threads) {
            bail!(
                "could not size the CPU thread pool to {} threads",
                args.threads
            );
        }
    }
    let device = catalogue::parse_device(&args.device)?;
    set_precision(args.precision, &device)?;
    let models = load_models(&args.clip, &args.vqgan, &device)?;
    let scratch = tempdir()?;
    let mut jobs = Vec::with_capacity(args.batch as usize);
    for b in 0..args.batch {
        let spec = bench_spec(&args, u64::from(b))?;
        jobs.push(RenderJob::new(spec, scratch.join(format!("job{b}"))));
    }
    let mut sessions = jobs
        .iter()
        .map(|job| RenderSession::new(job, &models))
        .collect::<Result<Vec<_>, _>>()?;

    let batched = !args.no_batch;
    let mut step_all = || -> Result<()> {
        if batched {
            let mut batch: Vec<&mut RenderSession> = sessions.iter_mut().collect();
            step_batch(&mut batch)?;
        } else {
            for session in sessions.iter_mut() {
                session.step()?;
            }
        }
        // A step is finished only once the device is idle again.
        device.synchronize()?;
        Ok(())
    };
    for _ in 0..args.warmup {
        step_all()?;
    }
    let mut times = Vec::with_capacity(args.steps as usize);
    for _ in 0..args.steps {
        let t0 = Instant::now();
        step_all()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if times.is_empty() {
        bail!("--steps must be at least 1");
    }
    times.sort_by(f64::total_cmp);
    let median = median_sorted(&times);
    let (peak, kind) = peak_memory(&device);
    let report = BenchReport {
        implementation: "vqclip",
        version: env!("CARGO_PKG_VERSION"),
        device: describe(&device),
        size: args.size,
        cutn: args.cutn,
        batch: args.batch,
        batched,
        precision: args.precision,
        augments: args.augments.clone(),
        cut_method: args.cut_method.clone(),
        clip: args.clip.clone(),
        vqgan: args.vqgan.clone(),
        steps: args.steps,
        warmup: args.warmup,
        median_ms_per_step: median,
        min_ms_per_step: times[0],
        steps_per_s: 1e3 / median,
        job_steps_per_s: 1e3 * f64::from(args.batch) / median,
        peak_memory_bytes: peak,
        peak_memory_kind: kind,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn median_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn bench_spec(args: &BenchArgs, seed: u64) -> Result<JobSpec> {
    let augments: Vec<&str> = args.augments.split(',').filter(|s| !s.is_empty()).collect();
    let spec = serde_json::json!({
        "prompts": "a wooden banana temple in an underwater kingdom | trending on artstation",
        "width": args.size,
        "height": args.size,
        "steps": args.warmup + args.steps,
        "seed": seed,
        "cutn": args.cutn,
        "cut_method": args.cut_method,
        "augments": augments,
        "models": { "vqgan": args.vqgan, "clip": [args.clip] },
    });
    serde_json::from_value(spec).context("building the bench job spec")
}

#[cfg(feature = "cuda")]
fn set_precision(p: Precision, device: &Device) -> Result<()> {
    match p {
        Precision::F32 => candle_core::cuda::set_gemm_reduced_precision_f32(false),
        Precision::Tf32 if device.is_cuda() => {
            candle_core::cuda::set_gemm_reduced_precision_f32(true)
        }
        Precision::Tf32 => bail!("--precision tf32 needs a CUDA device"),
        Precision::Bf16 => bail!("--precision bf16 is not implemented yet; use f32 or tf32"),
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn set_precision(p: Precision, _device: &Device) -> Result<()> {
    match p {
        Precision::F32 => Ok(()),
        Precision::Tf32 => bail!("--precision tf32 needs a CUDA build (--features cuda)"),
        Precision::Bf16 => bail!("--precision bf16 is not implemented yet; use f32"),
    }
}

/// Real weights for a path, random weights of the named architecture otherwise.
fn load_models(clip: &str, vqgan: &str, device: &Device) -> Result<ModelSet> {
    let (clip_model, clip_id) = if Path::new(clip).exists() {
        let cache = ModelCache::from_env();
        (
            catalogue::load_clip(clip, &cache, device)?,
            clip.to_string(),
        )
    } else {
        let cfg = architectures::clip_config(clip)?;
        let vb = architectures::random_weights(DType::F32, device);
        (Clip::new(vb, &cfg)?, format!("{clip} (random weights)"))
    };
    let (vqgan_model, vqgan_id) = if Path::new(vqgan).exists() {
        let cache = ModelCache::from_env();
        (
            catalogue::load_vqgan(vqgan, &cache, device)?,
            vqgan.to_string(),
        )
    } else {
        let cfg = architectures::vqgan_config(vqgan)?;
        (
            Vqgan::new(architectures::random_weights(DType::F32, device), &cfg)?,
            format!("{vqgan} (random weights)"),
        )
    };
    // Random weights have no file to hash; the bench reports only what it ran.
    let identity = |name: String| ModelIdentity {
        name,
        sha256: String::new(),
        path: PathBuf::new(),
    };
    Ok(ModelSet::from_loaded(
        vqgan_model,
        vec![clip_model],
        ModelIdentities {
            vqgan: identity(vqgan_id),
            clip: vec![identity(clip_id)],
        },
    ))
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vqclip-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// CPU: the process's peak resident set (VmHWM). CUDA: memory in use on the device
/// after the timed steps (candle keeps no allocator statistics).
fn peak_memory(device: &Device) -> (Option<u64>, &'static str) {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let used = dev
                .cuda_stream()
                .context()
                .mem_get_info()
                .ok()
                .map(|(free, total)| (total - free) as u64);
            (used, "device memory in use")
        }
        _ => (architectures::peak_rss_bytes(), "process peak RSS (VmHWM)"),
    }
}

fn print_table(r: &BenchReport) {
    println!("vqclip bench  {} on {}", r.version, r.device);
    let batch = if r.batched {
        format!("{} (batched)", r.batch)
    } else {
        format!("{} (one after another)", r.batch)
    };
    println!(
        "  models      {} + {}\n  size        {}x{}   cutn {}   batch {}   precision {:?}   augments {}   cutouts {}",
        r.vqgan, r.clip, r.size, r.size, r.cutn, batch, r.precision, r.augments, r.cut_method
    );
    println!("  steps       {} timed after {} warm-up", r.steps, r.warmup);
    println!(
        "  median      {:.1} ms/step   (min {:.1})",
        r.median_ms_per_step, r.min_ms_per_step
    );
    println!(
        "  throughput  {:.2} steps/s   {:.2} job-steps/s",
        r.steps_per_s, r.job_steps_per_s
    );
    match r.peak_memory_bytes {
        Some(b) => println!(
            "  memory      {:.2} GiB ({})",
            b as f64 / (1u64 << 30) as f64,
            r.peak_memory_kind
        ),
        None => println!("  memory      unknown"),
    }
}
