//! Cross-job batching: several jobs of one size and one model set take their steps
//! together, as one batched forward and backward pass.
//!
//! Each job keeps its own z, optimiser, RNG, prompts and settings; only the tensors
//! travel together. Nothing in the loss couples two jobs (the decoder's GroupNorm and
//! attention, the quantiser and CLIP all work per sample), so the gradient a job's z
//! receives from the summed loss is the gradient of its own loss, and a job ends where
//! it would have ended alone, up to float rounding in batch-sized kernels.
//!
//! [`super::step_batch`] (in `engine.rs`, beside the session it steps) is the one
//! implementation of a step: [`RenderSession::step`] is a batch of one. [`render_batch`]
//! is the one driver: [`render`] is a batch of one.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::batch_key::BatchKey;
use super::checkpoint::Checkpoint;
use super::engine::{step_batch, RenderSession, StepStats};
use super::history::History;
use super::job::{Artifacts, RenderError, RenderJob, RenderOutcome};
use super::models::ModelSet;
use super::output;
use super::progress::{CancelToken, ProgressEvent, ProgressSink};
use super::steer::AppliedRevision;

/// Runs a job to the end (or until told to stop), writing everything under
/// `job.out_dir`: `image.png`, `frames/NNNNN.png`, `video.mp4`, `metadata.json` and,
/// every `checkpoint_every` steps, `checkpoint.safetensors`. A batch of one.
pub fn render(
    job: &RenderJob,
    models: &ModelSet,
    progress: &mut dyn ProgressSink,
    cancel: &CancelToken,
) -> Result<RenderOutcome, RenderError> {
    /// Lends the caller's sink to the batch for the length of the render.
    struct Lent<'a>(&'a mut dyn ProgressSink);
    impl ProgressSink for Lent<'_> {
        fn event(&mut self, ev: ProgressEvent) {
            self.0.event(ev)
        }
    }
    let entry = BatchJob::new(Cow::Borrowed(job), Lent(progress), cancel.clone());
    render_batch(vec![entry], models)
        .pop()
        .unwrap_or_else(|| Err(RenderError::Model("the render returned no outcome".into())))
}

/// One job of a batched render: what it is, where its progress goes, what stops it.
pub struct BatchJob<'a> {
    pub job: Cow<'a, RenderJob>,
    pub progress: Box<dyn ProgressSink + 'a>,
    /// Clones share their flags, so the caller keeps one to stop the job.
    pub cancel: CancelToken,
}

impl<'a> BatchJob<'a> {
    pub fn new(
        job: Cow<'a, RenderJob>,
        progress: impl ProgressSink + 'a,
        cancel: CancelToken,
    ) -> Self {
        Self {
            job,
            progress: Box::new(progress),
            cancel,
        }
    }
}

/// The side of a batched render that lives outside it: it may add jobs between
/// steps (a worker refilling its batch as jobs end) and hears each job's end.
pub trait BatchHost<'a> {
    /// Jobs to add to the batch before its next step. Ones whose [`BatchKey`] differs
    /// from the batch's are refused with [`RenderError::Incompatible`].
    fn admit(&mut self) -> Vec<BatchJob<'a>>;
    /// A job ended; `index` counts the jobs given first, then those admitted, in order.
    fn ended(&mut self, index: usize, outcome: Result<RenderOutcome, RenderError>);
}

/// Collects outcomes; admits nothing.
struct Outcomes(Vec<Option<Result<RenderOutcome, RenderError>>>);

impl BatchHost<'_> for Outcomes {
    fn admit(&mut self) -> Vec<BatchJob<'static>> {
        Vec::new()
    }

    fn ended(&mut self, index: usize, outcome: Result<RenderOutcome, RenderError>) {
        if let Some(slot) = self.0.get_mut(index) {
            *slot = Some(outcome);
        }
    }
}

/// One job's run inside [`render_batch`]: its session and its bookkeeping.
struct Run<'a, 'm> {
    job: Cow<'a, RenderJob>,
    progress: Box<dyn ProgressSink + 'a>,
    cancel: CancelToken,
    session: RenderSession<'m>,
    history: History,
    frames_dir: PathBuf,
    checkpoint_path: PathBuf,
    started: Instant,
    /// The job's log lines on the render thread; named by its output directory,
    /// which under the server is the job id.
    span: tracing::Span,
    /// The revisions taken so far, with their steps, for `metadata.json`.
    revisions: Vec<AppliedRevision>,
}

/// A step this many times slower than the job's mean so far is logged as a warning
/// (the device is contended, swapping, or a batch grew).
const SLOW_STEP_FACTOR: f64 = 4.0;
/// Steps before the slow-step check starts: the first steps include warm-up.
const SLOW_STEP_AFTER: usize = 3;

/// The mean of the earlier steps when a step of `dt` seconds is slow against them.
fn slow_step(earlier: &[f64], dt: f64) -> Option<f64> {
    if earlier.len() < SLOW_STEP_AFTER {
        return None;
    }
    let mean = earlier.iter().sum::<f64>() / earlier.len() as f64;
    (dt > SLOW_STEP_FACTOR * mean).then_some(mean)
}

/// Runs jobs that share one model set to the end, stepping those still running
/// together. Each job keeps everything it would have alone: its progress events,
/// frames, checkpoints, cancellation (a canceled job leaves the batch; the others go
/// on) and outputs under its own `out_dir`. Returns each job's outcome, in order.
///
/// Jobs whose [`BatchKey`] differs from the first's are refused with
/// [`RenderError::Incompatible`]; give them to a separate call.
pub fn render_batch(
    jobs: Vec<BatchJob<'_>>,
    models: &ModelSet,
) -> Vec<Result<RenderOutcome, RenderError>> {
    let mut outcomes = Outcomes(jobs.iter().map(|_| None).collect());
    render_batch_hosted(jobs, models, &mut outcomes);
    outcomes
        .0
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Err(RenderError::Model(
                    "the job ended without an outcome".into(),
                ))
            })
        })
        .collect()
}

/// As [`render_batch`], with a host that may add jobs between steps and hears each
/// job's outcome the moment that job ends, while the others may still be rendering.
pub fn render_batch_hosted<'a, 'm>(
    jobs: Vec<BatchJob<'a>>,
    models: &'m ModelSet,
    host: &mut dyn BatchHost<'a>,
) {
    let mut runs: Vec<Option<Run<'a, 'm>>> = Vec::with_capacity(jobs.len());
    let mut key: Option<BatchKey> = None;
    let mut admit = |jobs: Vec<BatchJob<'a>>,
                     runs: &mut Vec<Option<Run<'a, 'm>>>,
                     host: &mut dyn BatchHost<'a>| {
        for entry in jobs {
            let index = runs.len();
            let run = Run::start(entry, models).and_then(|r| {
                let joining = BatchKey::of(&r.job.spec);
                match key.as_ref().and_then(|k| k.mismatch(&joining)) {
                    Some(why) => Err(RenderError::Incompatible(format!(
                        "{why}; render it in a batch of its own"
                    ))),
                    None => {
                        key.get_or_insert(joining);
                        Ok(r)
                    }
                }
            });
            match run {
                Ok(run) => runs.push(Some(run)),
                Err(e) => {
                    runs.push(None);
                    host.ended(index, Err(e));
                }
            }
        }
    };
    admit(jobs, &mut runs, host);

    loop {
        let joining = host.admit();
        admit(joining, &mut runs, host);
        for (i, run) in runs.iter_mut().enumerate() {
            // Revisions take effect here, between steps, before the end is decided
            // (fewer steps may end the job now).
            let steered = run.as_mut().map_or(Ok(()), Run::steer);
            let end = match steered {
                Ok(()) => run.as_mut().and_then(Run::end_before_step),
                Err(e) => Some(Err(e)),
            };
            if let Some(end) = end {
                *run = None;
                host.ended(i, end);
            }
        }
        let mut active: Vec<(usize, &mut Run)> = runs
            .iter_mut()
            .enumerate()
            .filter_map(|(i, r)| r.as_mut().map(|r| (i, r)))
            .collect();
        if active.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let stepped = {
            let mut sessions: Vec<&mut RenderSession> =
                active.iter_mut().map(|(_, r)| &mut r.session).collect();
            step_batch(&mut sessions)
        };
        let dt = t0.elapsed().as_secs_f64();
        let mut ended = Vec::new();
        match stepped {
            Ok(stats) => {
                for ((i, run), stats) in active.iter_mut().zip(stats) {
                    if let Err(e) = run.after_step(stats, dt) {
                        ended.push((*i, Err(e)));
                    }
                }
            }
            Err(e) if active.len() == 1 => ended.push((active[0].0, Err(e))),
            Err(e) => {
                let reason = e.to_string();
                ended.extend(
                    active
                        .iter()
                        .map(|(i, _)| (*i, Err(RenderError::SharedStep(reason.clone())))),
                );
            }
        }
        for (i, end) in ended {
            runs[i] = None;
            host.ended(i, end);
        }
    }
}

impl<'a, 'm> Run<'a, 'm> {
    fn start(entry: BatchJob<'a>, models: &'m ModelSet) -> Result<Self, RenderError> {
        let BatchJob {
            job,
            progress,
            cancel,
        } = entry;
        let frames_dir = job.out_dir.join("frames");
        std::fs::create_dir_all(&frames_dir).map_err(|e| RenderError::io(&frames_dir, e))?;
        let started = Instant::now();
        let session = RenderSession::new(&job, models)?;
        let history = match &job.resume {
            Some(path) => Checkpoint::read_history(path)?,
            None => History::default(),
        };
        let checkpoint_path = job.out_dir.join("checkpoint.safetensors");
        let name = job
            .out_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let span = tracing::info_span!("render", job = %name);
        let step = session.step_count();
        let revisions = job
            .revisions
            .iter()
            .filter_map(|r| r.step.filter(|s| *s <= step).map(|s| r.applied(s)))
            .collect();
        let mut run = Run {
            job,
            progress,
            cancel,
            session,
            history,
            checkpoint_path,
            frames_dir,
            started,
            span,
            revisions,
        };
        if run.session.step_count() == 0
            && (run.job.spec.save_every > 0 || run.session.zoom_frame_due())
        {
            run.write_frame()?;
        }
        Ok(run)
    }

    /// Takes the revisions due at this boundary: those recorded for this step (a resume
    /// replaying them), then those that arrived since the last step, which are
    /// reported with the step they took effect at.
    fn steer(&mut self) -> Result<(), RenderError> {
        let step = self.session.step_count();
        let job = &*self.job;
        let replayed = job.revisions.iter().filter(|r| r.step == Some(step));
        let arrived = job.steering.take();
        for (revision, new) in replayed
            .map(|r| (r, false))
            .chain(arrived.iter().map(|r| (r, true)))
        {
            if revision.number <= self.session.revision() {
                continue;
            }
            self.session.apply_revision(job, revision)?;
            tracing::info!(parent: &self.span, revision = revision.number, step, "revision applied");
            self.revisions.push(revision.applied(step));
            if new {
                self.progress.event(ProgressEvent::Steered {
                    revision: revision.number,
                    step,
                    changes: revision.changes.clone(),
                });
            }
        }
        Ok(())
    }

    /// The job's end if it ends before its next step: finished, canceled or interrupted.
    fn end_before_step(&mut self) -> Option<Result<RenderOutcome, RenderError>> {
        if self.session.step_count() >= self.session.spec().steps {
            return Some(self.complete());
        }
        if self.cancel.is_canceled() {
            self.summary("canceled");
            return Some(Ok(RenderOutcome::Canceled {
                step: self.session.step_count(),
            }));
        }
        if self.cancel.is_interrupted() {
            return Some(
                self.session
                    .checkpoint()
                    .write(&self.checkpoint_path, &self.history)
                    .map(|()| RenderOutcome::Interrupted {
                        step: self.session.step_count(),
                        checkpoint: self.checkpoint_path.clone(),
                    }),
            );
        }
        None
    }

    /// Records a step: history, progress, and the frame and checkpoint when due.
    fn after_step(&mut self, stats: StepStats, dt: f64) -> Result<(), RenderError> {
        let total = self.session.spec().steps;
        self.history.losses.push(stats.losses.clone());
        if let Some(mean_before) = slow_step(&self.history.step_seconds, dt) {
            tracing::warn!(
                parent: &self.span,
                step = stats.step,
                seconds = dt,
                mean_seconds = mean_before,
                "slow step: {dt:.3} s, {:.1}x the job's mean",
                dt / mean_before
            );
        }
        self.history.step_seconds.push(dt);
        let done_here = self.history.step_seconds.len().max(1) as f64;
        let mean = self.history.step_seconds.iter().sum::<f64>() / done_here;
        self.progress.event(ProgressEvent::Step {
            step: stats.step,
            total,
            loss: stats.loss,
            losses: stats.losses,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            eta_s: mean * f64::from(total.saturating_sub(stats.step)),
        });
        let save_every = self.job.spec.save_every;
        // A zoom render also gets generate.py's zoom-video frame before every zoom step.
        if (save_every > 0 && stats.step.is_multiple_of(save_every))
            || self.session.zoom_frame_due()
        {
            self.write_frame()?;
        }
        let every = self.job.spec.checkpoint_every;
        if every > 0 && stats.step.is_multiple_of(every) && stats.step < total {
            self.session
                .checkpoint()
                .write(&self.checkpoint_path, &self.history)?;
            self.progress.event(ProgressEvent::Checkpoint {
                step: stats.step,
                path: self.checkpoint_path.clone(),
            });
        }
        Ok(())
    }

    /// One line per job: what ran, where, and how long it took.
    fn summary(&self, outcome: &str) {
        let models = &self.session.models().identities;
        let clip: Vec<&str> = models.clip.iter().map(|m| m.name.as_str()).collect();
        let timed = self.history.step_seconds.len();
        let seconds = self.started.elapsed().as_secs_f64();
        tracing::info!(
            parent: &self.span,
            steps = self.session.step_count(),
            seconds,
            step_seconds = self.history.step_seconds.iter().sum::<f64>() / timed.max(1) as f64,
            device = ?self.session.z().device().location(),
            vqgan = %models.vqgan.name,
            clip = %clip.join(","),
            "render {outcome}: {} steps in {seconds:.1} s",
            self.session.step_count()
        );
    }

    /// A frame, and beside it the state it was decoded from (`NNNNN.ckpt`), so that a
    /// new job can fork from it.
    fn write_frame(&mut self) -> Result<PathBuf, RenderError> {
        // A fork starts its own history, so the state leaves this one's out: otherwise
        // every frame would carry all the steps before it.
        let state = fork_point(&self.frames_dir, self.session.step_count());
        self.session
            .checkpoint()
            .write(&state, &History::default())?;
        write_frame(&self.session, &self.frames_dir, self.progress.as_mut())
    }

    /// The final outputs: image, video, metadata; the checkpoint is no longer needed.
    fn complete(&mut self) -> Result<RenderOutcome, RenderError> {
        let (job, models, out) = (&*self.job, self.session.models(), &self.job.out_dir);
        let final_image = output::tensor_to_image(&self.session.image()?)?;
        let image_path = out.join("image.png");
        output::write_png(
            &image_path,
            &final_image,
            &output::png_text(job, &models.identities),
        )?;
        let frames = output::list_frames(&self.frames_dir)?;
        let video = if job.spec.video.enabled && frames.len() >= 2 {
            let path = out.join("video.mp4");
            output::write_job_mp4(&path, &frames, job)?;
            Some(path)
        } else {
            None
        };
        let similarities = self.session.similarities()?;
        let metadata = out.join("metadata.json");
        output::write_metadata(
            &metadata,
            job,
            models,
            &self.history,
            &similarities,
            &self.revisions,
        )?;
        let checkpoint = &self.checkpoint_path;
        if checkpoint.exists() {
            std::fs::remove_file(checkpoint).map_err(|e| RenderError::io(checkpoint, e))?;
        }
        self.summary("completed");
        Ok(RenderOutcome::Completed(Artifacts {
            image: image_path,
            frames,
            video,
            metadata,
        }))
    }
}

/// The saved state beside the frame of `step`: `frames/NNNNN.ckpt`.
pub fn fork_point(frames_dir: &Path, step: u32) -> PathBuf {
    frames_dir.join(format!("{step:05}.ckpt"))
}

fn write_frame(
    session: &RenderSession,
    dir: &Path,
    progress: &mut dyn ProgressSink,
) -> Result<PathBuf, RenderError> {
    let step = session.step_count();
    let path = dir.join(format!("{step:05}.png"));
    let img = output::tensor_to_image(&session.image()?)?;
    output::write_png(&path, &img, &[])?;
    progress.event(ProgressEvent::Frame {
        step,
        path: path.clone(),
    });
    Ok(path)
}

#[cfg(test)]
mod slow_step_tests {
    use super::slow_step;

    #[test]
    fn a_step_is_slow_only_after_warm_up_and_well_above_the_mean() {
        assert_eq!(slow_step(&[0.1, 0.1], 10.0), None, "warm-up");
        assert_eq!(slow_step(&[0.1, 0.1, 0.1], 0.39), None);
        let mean = slow_step(&[0.1, 0.1, 0.1], 0.41).unwrap();
        assert!((mean - 0.1).abs() < 1e-12);
    }
}
