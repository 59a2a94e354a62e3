//! Cross-job batching on the tiny fixtures, on the CPU: jobs stepped together end
//! where they would have ended alone, and jobs that cannot share a step are refused.
//!
//! Tolerance. A batched step runs the same per-sample arithmetic as a solo step; only
//! kernels whose work size grows with the batch (the convolutions' and matmuls' GEMMs,
//! the quantiser's distance matmul) may block their loops differently and so round
//! differently. Such differences are a few ulps of f32 per step (~1e-7 relative) and
//! compound slowly over a few Adam steps, so z and the losses must agree to 1e-4
//! (absolute, on values of order 1) and the final PNGs to one 8-bit level per channel.
//! On the CPU today they agree bit for bit; the margin is for GEMM libraries (cuBLAS)
//! that pick kernels by problem size.
//! A real bug (a mixed-up RNG, another job's gradient, a shared optimiser) moves them
//! by far more: see `a_job_stepped_with_another_seed_differs`, which checks that the
//! tolerance does separate different runs.

use std::borrow::Cow;
use std::path::Path;
use std::sync::OnceLock;

use crate::support::fixture;
use candle_core::Device;
use vqclip::render::{
    render, render_batch, render_batch_hosted, step_batch, BatchHost, BatchJob, CancelToken,
    JobSpec, ModelSet, NoProgress, ProgressEvent, RenderError, RenderJob, RenderOutcome,
    RenderSession,
};

/// Agreement of z and losses between a batched and a solo run (see the module doc).
const TOLERANCE: f32 = 1e-4;

/// A VQGAN and an ensemble of two CLIPs (the tiny fixture twice: its other format has
/// a 16-token text model), so each job's RNG feeds two cutout batches per step, in
/// CLIP order.
fn load_models() -> ModelSet {
    ModelSet::load_paths(
        &fixture("vqgan-tiny"),
        &[fixture("clip-tiny"), fixture("clip-tiny")],
        &Device::Cpu,
    )
    .expect("tiny fixtures load")
}

fn models() -> &'static ModelSet {
    static MODELS: OnceLock<ModelSet> = OnceLock::new();
    MODELS.get_or_init(load_models)
}

fn spec(json: serde_json::Value) -> JobSpec {
    let mut value = serde_json::json!({
        "width": 16, "height": 16, "cutn": 6, "save_every": 0, "checkpoint_every": 0,
        "augments": [], "video": {"enabled": false}
    });
    for (k, v) in json.as_object().unwrap() {
        value[k] = v.clone();
    }
    serde_json::from_value(value).unwrap()
}

/// Three jobs that differ in everything a job may differ in while sharing a step:
/// seed, prompts (text, image-free noise), optimiser, learning rate, cutn, cut method,
/// augmentations and regulariser.
fn three_specs() -> Vec<JobSpec> {
    vec![
        spec(serde_json::json!({
            "prompts": "a red cube | fog:-0.3", "seed": 11, "optimizer": "adam", "steps": 6,
            "augments": ["Af", "Pe", "Ji", "Er"]
        })),
        spec(serde_json::json!({
            "prompts": "a lighthouse at dusk", "seed": 22, "optimizer": "adamw", "lr": 0.2,
            "cutn": 4, "init_weight": 0.5, "steps": 6, "noise_prompts": [{"seed": 3, "weight": 0.2}]
        })),
        spec(serde_json::json!({
            "prompts": "moss:0.7", "seed": 33, "optimizer": "radam", "steps": 6,
            "cut_method": "original", "init_noise": "pixels"
        })),
    ]
}

fn jobs(specs: &[JobSpec], root: &Path) -> Vec<RenderJob> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| RenderJob::new(s.clone(), root.join(format!("job{i}"))))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn z_values(session: &RenderSession) -> Vec<f32> {
    session.z().flatten_all().unwrap().to_vec1().unwrap()
}

/// Per step, each job's losses and z after the step.
type Trace = Vec<Vec<(Vec<f32>, Vec<f32>)>>;

fn solo_trace(jobs: &[RenderJob], steps: usize) -> Trace {
    jobs.iter()
        .map(|job| {
            let mut session = RenderSession::new(job, models()).unwrap();
            (0..steps)
                .map(|_| {
                    let stats = session.step().unwrap();
                    (stats.losses, z_values(&session))
                })
                .collect()
        })
        .collect()
}

fn batched_trace(jobs: &[RenderJob], steps: usize) -> Trace {
    let mut sessions: Vec<RenderSession> = jobs
        .iter()
        .map(|job| RenderSession::new(job, models()).unwrap())
        .collect();
    let mut trace: Trace = vec![Vec::new(); jobs.len()];
    for _ in 0..steps {
        let mut batch: Vec<&mut RenderSession> = sessions.iter_mut().collect();
        let stats = step_batch(&mut batch).unwrap();
        for (j, (stats, session)) in stats.into_iter().zip(&sessions).enumerate() {
            assert_eq!(stats.step as usize, trace[j].len() + 1);
            trace[j].push((stats.losses, z_values(session)));
        }
    }
    trace
}

fn trace_distance(a: &Trace, b: &Trace) -> f32 {
    let mut worst = 0.0f32;
    for (ja, jb) in a.iter().zip(b) {
        for ((la, za), (lb, zb)) in ja.iter().zip(jb) {
            worst = worst.max(max_abs_diff(la, lb)).max(max_abs_diff(za, zb));
        }
    }
    worst
}

#[test]
fn batched_steps_equal_each_job_stepped_alone() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs(&three_specs(), dir.path());
    let solo = solo_trace(&jobs, 5);
    let batched = batched_trace(&jobs, 5);
    let worst = trace_distance(&solo, &batched);
    assert!(
        worst <= TOLERANCE,
        "batched and solo runs differ by {worst} (tolerance {TOLERANCE})"
    );
    // The losses are real and differ between jobs, so the comparison has teeth.
    assert!(solo[0][0].0 != solo[1][0].0 && solo[0][4].1 != solo[0][0].1);
}

#[test]
fn a_job_stepped_with_another_seed_differs() {
    let dir = tempfile::tempdir().unwrap();
    let specs = three_specs();
    let mut reseeded = specs.clone();
    reseeded[0].seed = Some(12);
    let a = batched_trace(&jobs(&specs, dir.path()), 2);
    let b = batched_trace(&jobs(&reseeded, dir.path()), 2);
    assert!(
        trace_distance(&a[..1].to_vec(), &b[..1].to_vec()) > 100.0 * TOLERANCE,
        "another seed must move the job well beyond the tolerance"
    );
    // The other jobs of the batch do not notice.
    assert!(trace_distance(&a[1..].to_vec(), &b[1..].to_vec()) <= TOLERANCE);
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

#[test]
fn batched_render_writes_what_solo_renders_write_and_a_canceled_job_leaves() {
    let mut specs = three_specs();
    for s in &mut specs {
        s.save_every = 3;
        s.checkpoint_every = 4;
    }
    // The third job stops at step 2; the others finish in the smaller batch.
    specs[2].steps = 50;
    let solo_dir = tempfile::tempdir().unwrap();
    let batch_dir = tempfile::tempdir().unwrap();
    let solo_jobs = jobs(&specs[..2], solo_dir.path());
    for job in &solo_jobs {
        let outcome = render(job, models(), &mut NoProgress, &CancelToken::new()).unwrap();
        assert!(
            matches!(outcome, RenderOutcome::Completed(_)),
            "{outcome:?}"
        );
    }

    let batch_jobs = jobs(&specs, batch_dir.path());
    let cancels: Vec<CancelToken> = (0..3).map(|_| CancelToken::new()).collect();
    let mut events: Vec<Vec<ProgressEvent>> = vec![Vec::new(); 3];
    let outcomes = {
        let third = cancels[2].clone();
        let mut sinks: Vec<Box<dyn FnMut(ProgressEvent) + Send + '_>> = Vec::new();
        for (i, log) in events.iter_mut().enumerate() {
            let third = third.clone();
            sinks.push(Box::new(move |ev: ProgressEvent| {
                if i == 2 && matches!(ev, ProgressEvent::Step { step: 2, .. }) {
                    third.cancel();
                }
                log.push(ev);
            }));
        }
        let entries: Vec<BatchJob> = batch_jobs
            .iter()
            .zip(sinks.iter_mut())
            .zip(&cancels)
            .map(|((job, sink), cancel)| BatchJob::new(Cow::Borrowed(job), sink, cancel.clone()))
            .collect();
        render_batch(entries, models())
    };
    let outcomes: Vec<RenderOutcome> = outcomes.into_iter().map(Result::unwrap).collect();
    assert_eq!(outcomes[2], RenderOutcome::Canceled { step: 2 });
    assert!(!batch_jobs[2].out_dir.join("image.png").exists());

    for (j, outcome) in outcomes[..2].iter().enumerate() {
        let RenderOutcome::Completed(art) = outcome else {
            panic!("job {j}: {outcome:?}")
        };
        // Each job reported its own steps, frames and checkpoint.
        let steps: Vec<u32> = events[j]
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::Step { step, total, .. } => {
                    assert_eq!(*total, 6);
                    Some(*step)
                }
                _ => None,
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
        let frames = events[j]
            .iter()
            .filter(|e| matches!(e, ProgressEvent::Frame { .. }))
            .count();
        assert_eq!(frames, 3, "frames at 0, 3 and 6");
        assert!(events[j]
            .iter()
            .any(|e| matches!(e, ProgressEvent::Checkpoint { step: 4, path } if path.starts_with(&batch_jobs[j].out_dir))));

        let solo_out = &solo_jobs[j].out_dir;
        let (a, b) = (pixels(&art.image), pixels(&solo_out.join("image.png")));
        let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(worst <= 1, "job {j}: PNG pixels differ by {worst} levels");
        for frame in &art.frames {
            let solo_frame = solo_out.join("frames").join(frame.file_name().unwrap());
            let d = pixels(frame)
                .iter()
                .zip(&pixels(&solo_frame))
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap();
            assert!(d <= 1, "job {j}: frame {frame:?} differs by {d} levels");
        }
        let losses = |p: &Path| -> Vec<Vec<f32>> {
            let meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(p.join("metadata.json")).unwrap()).unwrap();
            serde_json::from_value(meta["losses"].clone()).unwrap()
        };
        let (lb, ls) = (losses(&batch_jobs[j].out_dir), losses(solo_out));
        assert_eq!(lb.len(), 6);
        for (x, y) in lb.iter().zip(&ls) {
            assert!(
                max_abs_diff(x, y) <= TOLERANCE,
                "job {j}: losses {x:?} vs {y:?}"
            );
        }
        assert!(!batch_jobs[j]
            .out_dir
            .join("checkpoint.safetensors")
            .exists());
    }
}

#[test]
fn jobs_of_another_size_or_other_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let small = RenderJob::new(three_specs().remove(0), dir.path().join("a"));
    let mut wide_spec = three_specs().remove(1);
    wide_spec.width = 32;
    let wide = RenderJob::new(wide_spec, dir.path().join("b"));

    let mut a = RenderSession::new(&small, models()).unwrap();
    let mut b = RenderSession::new(&wide, models()).unwrap();
    let err = step_batch(&mut [&mut a, &mut b]).unwrap_err();
    assert!(matches!(err, RenderError::Incompatible(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("32x16") && msg.contains("one size"), "{msg}");
    // A refused batch leaves the jobs untouched.
    assert_eq!((a.step_count(), b.step_count()), (0, 0));

    let other_models = load_models();
    let mut c = RenderSession::new(&small, &other_models).unwrap();
    let err = step_batch(&mut [&mut a, &mut c]).unwrap_err();
    assert!(matches!(err, RenderError::Incompatible(_)), "{err:?}");
    assert!(err.to_string().contains("model set"), "{err}");

    // The driver refuses the odd job out before any step and renders the rest.
    let mut quick = small.clone();
    quick.spec.steps = 1;
    let mut wide_quick = wide.clone();
    wide_quick.spec.steps = 1;
    let (t1, t2) = (CancelToken::new(), CancelToken::new());
    let outcomes = render_batch(
        vec![
            BatchJob::new(Cow::Borrowed(&quick), NoProgress, t1),
            BatchJob::new(Cow::Borrowed(&wide_quick), NoProgress, t2),
        ],
        models(),
    );
    assert!(matches!(outcomes[0], Ok(RenderOutcome::Completed(_))));
    assert!(matches!(outcomes[1], Err(RenderError::Incompatible(_))));
}

/// Runs `jobs` as one batch with silent sinks and their own tokens.
fn render_together(jobs: &[RenderJob], cancels: &[CancelToken]) -> Vec<RenderOutcome> {
    let entries = jobs
        .iter()
        .zip(cancels)
        .map(|(job, cancel)| BatchJob::new(Cow::Borrowed(job), NoProgress, cancel.clone()))
        .collect();
    render_batch(entries, models())
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn an_interrupted_batch_resumes_from_each_jobs_checkpoint() {
    let mut specs = three_specs();
    specs.truncate(2);
    for s in &mut specs {
        s.steps = 5;
    }
    let solo_dir = tempfile::tempdir().unwrap();
    let solo = jobs(&specs, solo_dir.path());
    for job in &solo {
        render(job, models(), &mut NoProgress, &CancelToken::new()).unwrap();
    }

    // A graceful shutdown interrupts every job of the batch between two steps.
    let dir = tempfile::tempdir().unwrap();
    let batch = jobs(&specs, dir.path());
    let shutdown = CancelToken::new();
    let mut sinks: Vec<Box<dyn FnMut(ProgressEvent) + Send>> = (0..2)
        .map(|_| {
            let shutdown = shutdown.clone();
            Box::new(move |ev: ProgressEvent| {
                if matches!(ev, ProgressEvent::Step { step: 2, .. }) {
                    shutdown.interrupt();
                }
            }) as Box<dyn FnMut(ProgressEvent) + Send>
        })
        .collect();
    let entries = batch
        .iter()
        .zip(sinks.iter_mut())
        .map(|(job, progress)| BatchJob::new(Cow::Borrowed(job), progress, shutdown.clone()))
        .collect();
    let mut resumed = batch.clone();
    for (job, outcome) in resumed.iter_mut().zip(render_batch(entries, models())) {
        let RenderOutcome::Interrupted { step, checkpoint } = outcome.unwrap() else {
            panic!("expected an interruption");
        };
        assert_eq!(step, 2);
        assert!(checkpoint.starts_with(&job.out_dir));
        job.resume = Some(checkpoint);
    }
    let cancels = [CancelToken::new(), CancelToken::new()];
    for (j, outcome) in render_together(&resumed, &cancels).iter().enumerate() {
        assert!(
            matches!(outcome, RenderOutcome::Completed(_)),
            "{outcome:?}"
        );
        let (a, b) = (
            pixels(&resumed[j].out_dir.join("image.png")),
            pixels(&solo[j].out_dir.join("image.png")),
        );
        let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(
            worst <= 1,
            "job {j}: resumed batch and solo PNGs differ by {worst} levels"
        );
    }
}

/// Lets `joining` in before the batch's `at`-th step; records every outcome.
struct Refill<'a> {
    joining: Vec<BatchJob<'a>>,
    at: usize,
    calls: usize,
    outcomes: Vec<(usize, Result<RenderOutcome, RenderError>)>,
}

impl<'a> BatchHost<'a> for Refill<'a> {
    fn admit(&mut self) -> Vec<BatchJob<'a>> {
        self.calls += 1;
        if self.calls == self.at {
            std::mem::take(&mut self.joining)
        } else {
            Vec::new()
        }
    }

    fn ended(&mut self, index: usize, outcome: Result<RenderOutcome, RenderError>) {
        self.outcomes.push((index, outcome));
    }
}

#[test]
fn a_job_joining_a_running_batch_renders_as_it_would_alone() {
    let mut specs = three_specs();
    specs[0].steps = 6;
    specs[1].steps = 2;
    specs[2].steps = 4;
    let mut wide = specs[2].clone();
    wide.width = 32;
    let solo_dir = tempfile::tempdir().unwrap();
    let solo = jobs(&specs, solo_dir.path());
    for job in [&solo[0], &solo[2]] {
        render(job, models(), &mut NoProgress, &CancelToken::new()).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let batch = jobs(&specs, dir.path());
    let wide = RenderJob::new(wide, dir.path().join("wide"));
    let entry =
        |job: &RenderJob| BatchJob::new(Cow::Owned(job.clone()), NoProgress, CancelToken::new());
    // The third job and one of another size come in once the second has ended.
    let mut host = Refill {
        joining: vec![entry(&batch[2]), entry(&wide)],
        at: 4,
        calls: 0,
        outcomes: Vec::new(),
    };
    render_batch_hosted(
        vec![entry(&batch[0]), entry(&batch[1])],
        models(),
        &mut host,
    );

    let order: Vec<usize> = host.outcomes.iter().map(|(i, _)| *i).collect();
    // The second ends first; the odd size is refused on arrival; then the others.
    assert_eq!(order, [1, 3, 0, 2]);
    let outcome = |i: usize| &host.outcomes.iter().find(|(j, _)| *j == i).unwrap().1;
    assert!(
        matches!(outcome(3), Err(RenderError::Incompatible(_))),
        "{:?}",
        outcome(3)
    );
    for (index, j) in [(0, 0), (2, 2)] {
        assert!(matches!(outcome(index), Ok(RenderOutcome::Completed(_))));
        let (a, b) = (
            pixels(&batch[j].out_dir.join("image.png")),
            pixels(&solo[j].out_dir.join("image.png")),
        );
        let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(worst <= 1, "job {j}: PNG pixels differ by {worst} levels");
    }
}
