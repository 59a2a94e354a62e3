//! Batch packing in the service: one worker with `workers.batch_size` > 1 claims
//! compatible queued jobs together and renders them as one batch, and every job ends
//! as it would have with no packing.

mod service_support;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use service_support::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vqclip::queue::{EventKind, Job, JobStore, Metrics, Scope};
use vqclip::storage::ArtifactStore;
use vqclip::worker::{WorkerContext, WorkerPool};

const LONG: Duration = Duration::from_secs(180);

/// Two compatible jobs that differ in seed, prompt and optimiser.
fn pair() -> [Value; 2] {
    let mut a = tiny_spec("a red cube", 6);
    a["seed"] = json!(7);
    let mut b = tiny_spec("a lighthouse at dusk", 6);
    b["seed"] = json!(8);
    b["optimizer"] = json!("adamw");
    [a, b]
}

struct Finished {
    job: Job,
    pixels: Vec<u8>,
    steps: Vec<u64>,
}

impl Finished {
    fn span(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.job.started_at.unwrap(), self.job.finished_at.unwrap())
    }
}

fn overlap(a: (DateTime<Utc>, DateTime<Utc>), b: (DateTime<Utc>, DateTime<Utc>)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Submits `specs` while no worker runs, then starts one worker with `batch_size`,
/// so that everything it may pack is queued when it first claims. `cancel_running`
/// names a job to cancel once it is running.
async fn run(specs: &[Value], batch_size: usize, cancel_running: Option<usize>) -> Vec<Finished> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 0);
    config.workers.batch_size = batch_size;
    let s = TestServer::start(config.clone()).await;
    let mut ids = Vec::new();
    for spec in specs {
        let job = s.submit(spec).await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }

    let ctx = WorkerContext::new(
        s.store.clone() as Arc<dyn JobStore>,
        ArtifactStore::open(&config.storage.artifact_dir).unwrap(),
        Arc::new(Metrics::default()),
        &config,
    );
    let shutdown = CancellationToken::new();
    let pool = WorkerPool::start(ctx, &["cpu".to_owned()], shutdown.clone())
        .await
        .unwrap();
    if let Some(i) = cancel_running {
        s.wait_state(&ids[i], "running", LONG).await;
        let r = s.post(&format!("/v1/jobs/{}/cancel", ids[i])).await;
        assert!(r.status().is_success(), "{}", r.status());
    }

    let mut finished = Vec::new();
    for id in &ids {
        let view = s.wait_terminal(id, LONG).await;
        let uuid: Uuid = id.parse().unwrap();
        let job = s.store.get(uuid, &Scope::unrestricted()).await.unwrap();
        let pixels = if view["state"] == "succeeded" {
            let bytes = s.get_bytes(view["links"]["image"].as_str().unwrap()).await;
            image::load_from_memory(&bytes)
                .unwrap()
                .to_rgb8()
                .into_raw()
        } else {
            Vec::new()
        };
        let steps = s
            .store
            .events_after(uuid, 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == EventKind::Progress)
            .map(|e| e.data["step"].as_u64().unwrap())
            .collect();
        finished.push(Finished { job, pixels, steps });
    }
    shutdown.cancel();
    pool.join().await;
    s.stop().await;
    finished
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_renders_compatible_jobs_together_as_they_would_render_alone() {
    let [a, b] = pair();
    // Another size: queued between the pair and a third compatible job, it must not
    // be packed with them.
    let mut other_size = tiny_spec("moss", 2);
    other_size["width"] = json!(48);
    let mut long = tiny_spec("fog", 400);
    long["seed"] = json!(9);
    let specs = [a.clone(), b.clone(), other_size, long];
    let batched = run(&specs, 3, Some(3)).await;
    let alone = run(&[a, b], 1, None).await;

    let states: Vec<_> = batched.iter().map(|f| f.job.state.as_str()).collect();
    assert_eq!(states, ["succeeded", "succeeded", "succeeded", "canceled"]);
    // The pair and the long job shared one worker at once; the other size waited.
    assert!(overlap(batched[0].span(), batched[1].span()));
    assert!(overlap(batched[0].span(), batched[3].span()));
    assert!(!overlap(batched[0].span(), batched[2].span()));
    assert!(batched[3].job.finished_at.unwrap() < batched[2].job.started_at.unwrap());
    // Without packing, one worker runs one job at a time.
    assert!(!overlap(alone[0].span(), alone[1].span()));

    for (j, (packed, solo)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(packed.steps, (1..=6).collect::<Vec<_>>(), "job {j}");
        assert_eq!(packed.job.attempts, 1);
        // On the CPU a batched step rounds exactly like a solo one (tests/render_batch.rs
        // allows one level for GPU kernels that block by batch size).
        let worst = packed
            .pixels
            .iter()
            .zip(&solo.pixels)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        assert_eq!(packed.pixels.len(), 32 * 32 * 3);
        assert!(
            worst <= 1,
            "job {j}: batched and solo PNGs differ by {worst} levels"
        );
    }
    assert_ne!(alone[0].pixels, alone[1].pixels);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_takes_the_place_of_one_that_ended() {
    let long = tiny_spec("a red cube", 20);
    let mut short = tiny_spec("fog", 2);
    short["seed"] = json!(8);
    let mut next = tiny_spec("moss", 2);
    next["seed"] = json!(9);
    let done = run(&[long, short, next], 2, None).await;

    let states: Vec<_> = done.iter().map(|f| f.job.state.as_str()).collect();
    assert_eq!(states, ["succeeded", "succeeded", "succeeded"]);
    // The batch held two: the third job waited for the second, then joined the first.
    assert!(done[1].job.finished_at.unwrap() <= done[2].job.started_at.unwrap());
    assert!(overlap(done[0].span(), done[2].span()));
    assert_eq!(done[2].steps, [1, 2]);
    assert!(!done[2].pixels.is_empty());
}
