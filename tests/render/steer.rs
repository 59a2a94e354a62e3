//! Steering and forking on the tiny fixtures (CPU): a revision applied live equals the
//! same revision replayed on resume, byte for byte; a fork from a saved frame continues
//! exactly as its source did.

use std::path::Path;

use candle_core::Device;
use vqclip::render::checkpoint::Checkpoint;
use vqclip::render::prompts::prompt_set;
use vqclip::render::{
    render, render_batch, BatchJob, CancelToken, ForkStart, JobSpec, NoProgress, ProgressEvent,
    RenderJob, RenderOutcome, Revision,
};

use crate::support::tiny_models as models;

fn spec(json: serde_json::Value) -> JobSpec {
    let mut value = serde_json::json!({
        "width": 16, "height": 16, "cutn": 8, "save_every": 0, "checkpoint_every": 0,
        "augments": ["Af", "Pe"], "seed": 3, "optimizer": "adam", "video": {"enabled": false}
    });
    for (k, v) in json.as_object().unwrap() {
        value[k] = v.clone();
    }
    serde_json::from_value(value).unwrap()
}

/// The base spec: 30 steps, a checkpoint every 10.
fn base() -> JobSpec {
    spec(serde_json::json!({"prompts": "a castle", "steps": 30, "checkpoint_every": 10}))
}

/// Revision 1: another prompt, a higher lr and fewer cutouts.
fn revision(step: Option<u32>) -> Revision {
    let mut revised = base();
    revised.prompts = serde_json::from_value(serde_json::json!("a green lighthouse")).unwrap();
    revised.lr = 0.2;
    revised.cutn = 6;
    Revision {
        number: 1,
        step,
        prompts: prompt_set(&revised.prompts).unwrap(),
        spec: revised,
        changes: serde_json::json!({"prompts": "a green lighthouse", "lr": 0.2, "cutn": 6}),
        inputs: Default::default(),
    }
}

fn bytes(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

#[test]
fn a_run_steered_at_step_10_equals_one_resumed_at_20_with_the_same_revision() {
    // Live: the revision arrives while step 10 is reported, so it takes the boundary
    // after step 10.
    let live = tempfile::tempdir().unwrap();
    let job = RenderJob::new(base(), live.path());
    let steering = job.steering.clone();
    let mut events = Vec::new();
    let mut sink = |ev: ProgressEvent| {
        if let ProgressEvent::Step { step: 10, .. } = ev {
            steering.send(revision(None));
        }
        events.push(ev);
    };
    let outcome = render(&job, models(), &mut sink, &CancelToken::new()).unwrap();
    assert!(
        matches!(outcome, RenderOutcome::Completed(_)),
        "{outcome:?}"
    );
    let order: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Step { step, .. } if (10..=11).contains(step) => {
                Some(format!("step {step}"))
            }
            ProgressEvent::Steered { revision, step, .. } => {
                Some(format!("revision {revision} at {step}"))
            }
            _ => None,
        })
        .collect();
    assert_eq!(order, ["step 10", "revision 1 at 10", "step 11"]);

    // The new prompt's loss falls after the change.
    let prompt_loss: Vec<f32> = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Step { step, losses, .. } if *step > 10 => Some(losses[0]),
            _ => None,
        })
        .collect();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&prompt_loss[15..]) < mean(&prompt_loss[..5]),
        "{prompt_loss:?}"
    );

    // Replayed: the revision is recorded at step 10; the run is interrupted at its
    // checkpoint of step 20 and resumed from it.
    let replay = tempfile::tempdir().unwrap();
    let mut job = RenderJob::new(base(), replay.path());
    job.revisions = vec![revision(Some(10))];
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let mut sink = move |ev: ProgressEvent| {
        if let ProgressEvent::Checkpoint { step: 20, .. } = ev {
            token.interrupt();
        }
    };
    let outcome = render(&job, models(), &mut sink, &cancel).unwrap();
    let RenderOutcome::Interrupted {
        step: 20,
        checkpoint,
    } = outcome
    else {
        panic!("expected an interruption at step 20, got {outcome:?}");
    };
    // The checkpoint names the revision it was written under: without it, it is refused.
    let mut unsteered = RenderJob::new(base(), replay.path());
    unsteered.resume = Some(checkpoint.clone());
    let err = render(&unsteered, models(), &mut NoProgress, &CancelToken::new()).unwrap_err();
    assert!(
        err.to_string().contains("written under revision 1"),
        "{err}"
    );

    job.resume = Some(checkpoint);
    let outcome = render(&job, models(), &mut NoProgress, &CancelToken::new()).unwrap();
    assert!(
        matches!(outcome, RenderOutcome::Completed(_)),
        "{outcome:?}"
    );
    assert_eq!(
        bytes(live.path(), "image.png"),
        bytes(replay.path(), "image.png")
    );

    // Steered live, interrupted at 20 before the queue heard where the revision took
    // effect: the checkpoint names the revision in force, so the resume still matches.
    let lost = tempfile::tempdir().unwrap();
    let mut job = RenderJob::new(base(), lost.path());
    let steering = job.steering.clone();
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let mut sink = move |ev: ProgressEvent| match ev {
        ProgressEvent::Step { step: 10, .. } => steering.send(revision(None)),
        ProgressEvent::Checkpoint { step: 20, .. } => token.interrupt(),
        _ => {}
    };
    let outcome = render(&job, models(), &mut sink, &cancel).unwrap();
    let RenderOutcome::Interrupted { checkpoint, .. } = outcome else {
        panic!("expected an interruption, got {outcome:?}");
    };
    job.revisions = vec![revision(None)];
    job.resume = Some(checkpoint);
    render(&job, models(), &mut NoProgress, &CancelToken::new()).unwrap();
    assert_eq!(
        bytes(live.path(), "image.png"),
        bytes(lost.path(), "image.png")
    );

    for dir in [live.path(), replay.path()] {
        let meta: serde_json::Value = serde_json::from_slice(&bytes(dir, "metadata.json")).unwrap();
        assert_eq!(
            meta["revisions"],
            serde_json::json!([{"number": 1, "step": 10,
                                "changes": {"prompts": "a green lighthouse", "lr": 0.2, "cutn": 6}}])
        );
    }
}

#[test]
fn steering_the_steps_below_the_current_one_ends_the_job_there() {
    let dir = tempfile::tempdir().unwrap();
    let job = RenderJob::new(base(), dir.path());
    let steering = job.steering.clone();
    let mut last = 0;
    let mut sink = |ev: ProgressEvent| {
        if let ProgressEvent::Step { step, .. } = ev {
            last = step;
            if step == 4 {
                let mut r = revision(None);
                r.spec.steps = 5;
                steering.send(r);
            }
        }
    };
    let outcome = render(&job, models(), &mut sink, &CancelToken::new()).unwrap();
    assert!(
        matches!(outcome, RenderOutcome::Completed(_)),
        "{outcome:?}"
    );
    assert_eq!(last, 5);
}

#[test]
fn a_revision_may_not_change_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let job = RenderJob::new(base(), dir.path());
    let mut r = revision(None);
    r.spec.width = 32;
    job.steering.send(r);
    let err = render(&job, models(), &mut NoProgress, &CancelToken::new()).unwrap_err();
    assert!(err.to_string().contains("steerable"), "{err}");
}

#[test]
fn a_fork_from_step_10_without_changes_reaches_the_parents_z_at_step_20() {
    let s =
        spec(serde_json::json!({"prompts": "a castle|fog:-0.3", "steps": 20, "save_every": 10}));
    let parent = tempfile::tempdir().unwrap();
    render(
        &RenderJob::new(s.clone(), parent.path()),
        models(),
        &mut NoProgress,
        &CancelToken::new(),
    )
    .unwrap();
    for step in [0, 10, 20] {
        assert!(parent
            .path()
            .join(format!("frames/{step:05}.ckpt"))
            .is_file());
    }
    let fork = |reset_optimizer: bool| {
        let child = tempfile::tempdir().unwrap();
        let mut job = RenderJob::new(s.clone(), child.path());
        job.fork = Some(ForkStart {
            path: parent.path().join("frames/00010.ckpt"),
            reset_optimizer,
        });
        let mut first = None;
        let mut sink = |ev: ProgressEvent| {
            if let ProgressEvent::Step { step, .. } = ev {
                first.get_or_insert(step);
            }
        };
        render(&job, models(), &mut sink, &CancelToken::new()).unwrap();
        // The step counter goes on from the fork point.
        assert_eq!(first, Some(11));
        child
    };
    let z = |dir: &Path| -> Vec<f32> {
        Checkpoint::read(&dir.join("frames/00020.ckpt"), &Device::Cpu)
            .unwrap()
            .z
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let same = fork(false);
    assert_eq!(z(parent.path()), z(same.path()));
    assert_eq!(
        bytes(parent.path(), "image.png"),
        bytes(same.path(), "image.png")
    );
    // Starting the optimiser afresh is a different continuation.
    let reset = fork(true);
    assert_ne!(z(parent.path()), z(reset.path()));
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path.join("image.png"))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

/// Steers `job` with revision 1 once step 3 is reported.
fn steer_at_3(job: &RenderJob) -> impl FnMut(ProgressEvent) + Send + 'static {
    let steering = job.steering.clone();
    move |ev: ProgressEvent| {
        if let ProgressEvent::Step { step: 3, .. } = ev {
            steering.send(revision(None));
        }
    }
}

#[test]
fn a_job_steered_inside_a_batch_stays_in_it_and_renders_as_it_would_alone() {
    let short = |prompt: &str| {
        let mut s = base();
        s.prompts = serde_json::from_value(serde_json::json!(prompt)).unwrap();
        s.steps = 8;
        s
    };
    let (a_spec, b_spec) = (short("a castle"), short("a meadow"));
    let solo = |spec: &JobSpec, steered: bool| {
        let dir = tempfile::tempdir().unwrap();
        let job = RenderJob::new(spec.clone(), dir.path());
        let mut sink = steer_at_3(&job);
        let mut quiet = |_: ProgressEvent| {};
        let sink: &mut dyn vqclip::render::ProgressSink =
            if steered { &mut sink } else { &mut quiet };
        render(&job, models(), sink, &CancelToken::new()).unwrap();
        dir
    };
    let (a_alone, b_alone) = (solo(&a_spec, true), solo(&b_spec, false));

    let root = tempfile::tempdir().unwrap();
    let a = RenderJob::new(a_spec, root.path().join("a"));
    let b = RenderJob::new(b_spec, root.path().join("b"));
    let a_sink = steer_at_3(&a);
    let outcomes = render_batch(
        vec![
            BatchJob::new(std::borrow::Cow::Owned(a), a_sink, CancelToken::new()),
            BatchJob::new(std::borrow::Cow::Owned(b), NoProgress, CancelToken::new()),
        ],
        models(),
    );
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Ok(RenderOutcome::Completed(_))),
            "{outcome:?}"
        );
    }
    // Batched equals solo up to float rounding in batch-sized kernels: a level at most.
    let worst =
        |x: Vec<u8>, y: Vec<u8>| x.iter().zip(&y).map(|(p, q)| p.abs_diff(*q)).max().unwrap();
    assert!(worst(pixels(&root.path().join("a")), pixels(a_alone.path())) <= 1);
    assert!(worst(pixels(&root.path().join("b")), pixels(b_alone.path())) <= 1);
    let meta: serde_json::Value =
        serde_json::from_slice(&bytes(&root.path().join("a"), "metadata.json")).unwrap();
    assert_eq!(meta["revisions"][0]["step"], 3);
}
