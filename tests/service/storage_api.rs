//! Artifacts through the API and the workers, on both backends: downloads with ETag, 304
//! and ranges; a job resumed on a machine whose disk never saw it, from the checkpoint
//! that only the bucket holds; and a worker process whose artifacts an API process
//! serves from the bucket, scraped on its own metrics address.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::s3::{backends, s3_settings, storage_config, Backend, MotoServer};
use crate::support::*;
use serde_json::json;
use vqclip::queue::{JobState, Jobs, Scope};
use vqclip::storage::ArtifactStore;

async fn get_with(api: &Api, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = api.client.get(api.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Polls `check` for up to ten seconds; whether it came true.
async fn eventually<F, Fut>(check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn downloads_answer_etags_and_ranges_on_both_backends() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, _moto) = storage_config(backend, dir.path()).await;
        let mut config = test_config(dir.path(), 1);
        config.storage = storage.clone();
        let s = InProcessServer::start(config).await;
        let id = s.submit(&tiny_spec("streamed", 4)).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let done = s.wait_terminal(&id, LONG).await;
        assert_eq!(done["state"], "succeeded", "{backend:?}: {done}");
        if backend == Backend::S3 {
            // Everything was stored before success was reported; the scratch copy is gone.
            let uuid: uuid::Uuid = id.parse().unwrap();
            let scratch = ArtifactStore::from_config(&storage).unwrap().job_dir(uuid);
            // The worker frees it just after recording the success.
            let freed = eventually(|| async { !scratch.exists() }).await;
            assert!(freed, "{}", scratch.display());
            assert!(!dir.path().join("artifacts/jobs").join(&id).exists());
        }

        let video_path = format!("/v1/jobs/{id}/video.mp4");
        let full = get_with(&s, &video_path, &[]).await;
        assert_eq!(full.status(), 200, "{backend:?}");
        let etag = header(&full, "etag").to_owned();
        assert!(etag.starts_with('"') && etag.len() > 2, "{etag}");
        assert_eq!(header(&full, "accept-ranges"), "bytes");
        assert_eq!(header(&full, "content-type"), "video/mp4");
        let body = full.bytes().await.unwrap();
        assert!(body.len() > 100, "{}", body.len());
        let len = body.len();

        let same = get_with(&s, &video_path, &[("if-none-match", &etag)]).await;
        assert_eq!(same.status(), 304, "{backend:?}");
        assert_eq!(header(&same, "etag"), etag);
        assert!(same.bytes().await.unwrap().is_empty());
        let weak = format!("\"stale\", W/{etag}");
        let same = get_with(&s, &video_path, &[("if-none-match", &weak)]).await;
        assert_eq!(same.status(), 304);
        let other = get_with(&s, &video_path, &[("if-none-match", "\"stale\"")]).await;
        assert_eq!(other.status(), 200);

        let part = get_with(&s, &video_path, &[("range", "bytes=10-49")]).await;
        assert_eq!(part.status(), 206, "{backend:?}");
        assert_eq!(header(&part, "content-range"), format!("bytes 10-49/{len}"));
        assert_eq!(header(&part, "content-length"), "40");
        assert_eq!(part.bytes().await.unwrap(), body[10..50]);
        let tail = get_with(&s, &video_path, &[("range", "bytes=-16")]).await;
        assert_eq!(tail.status(), 206);
        assert_eq!(tail.bytes().await.unwrap(), body[len - 16..]);
        let open = get_with(
            &s,
            &video_path,
            &[("range", &format!("bytes={}-", len - 3))],
        )
        .await;
        assert_eq!(open.status(), 206);
        assert_eq!(open.bytes().await.unwrap(), body[len - 3..]);
        // A stale If-Range gets the whole file.
        let stale = get_with(
            &s,
            &video_path,
            &[("range", "bytes=0-9"), ("if-range", "\"stale\"")],
        )
        .await;
        assert_eq!(stale.status(), 200);
        let past = get_with(&s, &video_path, &[("range", &format!("bytes={len}-"))]).await;
        assert_eq!(past.status(), 416, "{backend:?}");
        assert_eq!(header(&past, "content-range"), format!("bytes */{len}"));
        assert_eq!(
            header(&past, "content-type"),
            "application/problem+json",
            "{backend:?}"
        );

        let frames = s.get_json(&format!("/v1/jobs/{id}/frames")).await;
        let steps: Vec<u64> = frames["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["step"].as_u64().unwrap())
            .collect();
        // The starting image is frame 0.
        assert_eq!(steps, vec![0, 2, 4], "{backend:?}");
        let frame = get_with(&s, &format!("/v1/jobs/{id}/frames/4.png"), &[]).await;
        assert_eq!(frame.status(), 200);
        assert_eq!(header(&frame, "content-type"), "image/png");
        assert!(frame.bytes().await.unwrap().starts_with(b"\x89PNG"));
        let missing = get_with(&s, &format!("/v1/jobs/{id}/frames/3.png"), &[]).await;
        assert_eq!(missing.status(), 404);
        let image = get_with(&s, &format!("/v1/jobs/{id}/image.png"), &[]).await;
        assert_eq!(image.status(), 200);
        let metadata = s.get_json(&format!("/v1/jobs/{id}/metadata.json")).await;
        assert!(metadata.is_object(), "{metadata}");

        // Deleting the job deletes its artifacts from the store.
        assert_eq!(s.delete(&format!("/v1/jobs/{id}")).await.status(), 204);
        let store = ArtifactStore::from_config(&storage).unwrap();
        let uuid = id.parse().unwrap();
        assert!(store.frames(uuid).await.unwrap().is_empty(), "{backend:?}");
        assert!(store.artifact(uuid, "video.mp4").await.is_err());
        s.stop().await;
    }
}

/// The first machine stops mid-job; the second has a fresh disk and the same database
/// and bucket, and continues from the checkpoint the bucket holds.
#[tokio::test]
async fn a_job_resumes_from_a_checkpoint_only_the_bucket_holds() {
    if crate::support::s3::s3_skipped() {
        eprintln!("VQCLIP_TEST_S3=skip: not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let moto = MotoServer::start().await;
    moto.create_bucket("vqclip-test").await;
    let machine = |name: &str| {
        let mut c = test_config(dir.path(), 1);
        s3_settings(&mut c.storage, &moto.endpoint, &dir.path().join(name));
        c
    };
    let first = machine("first-disk");
    let s = InProcessServer::start(first.clone()).await;
    let mut spec = tiny_spec("moved", 24);
    spec["checkpoint_every"] = json!(4);
    let id = s.submit(&spec).await["id"].as_str().unwrap().to_owned();
    let uuid: uuid::Uuid = id.parse().unwrap();
    s.wait_step(&id, 6, LONG).await;
    // The queue points at a checkpoint only once the bucket holds it.
    let bucket = ArtifactStore::from_config(&first.storage).unwrap();
    let job = s.store.get(uuid, &Scope::unrestricted()).await.unwrap();
    let name = job.checkpoint.expect("a periodic checkpoint was recorded");
    assert!(bucket.artifact(uuid, &name).await.is_ok());
    s.stop().await;

    let store = open_store(dir.path(), 2).await;
    let job = store.get(uuid, &Scope::unrestricted()).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    let stopped_at = job.checkpoint_step;
    assert!((6..24).contains(&stopped_at), "{stopped_at}");
    let checkpoint = job.checkpoint.clone().unwrap();
    store.pool().close().await;
    let stored = bucket.artifact(uuid, &checkpoint).await.unwrap();
    assert!(stored.size > 0);
    std::fs::remove_dir_all(dir.path().join("first-disk")).unwrap();

    let s = InProcessServer::start(machine("second-disk")).await;
    let done = s.wait_terminal(&id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let events = s.events(&id, None, 100_000).await;
    let running: Vec<&SseEvent> = events
        .iter()
        .filter(|e| e.data["state"] == "running")
        .collect();
    assert_eq!(running.len(), 2);
    assert_eq!(running[1].data["resumed_from"], stopped_at);
    let after: Vec<u64> = events
        .iter()
        .filter(|e| e.id > running[1].id && e.event == "progress")
        .map(|e| e.data["step"].as_u64().unwrap())
        .collect();
    assert_eq!(after.first().copied(), Some(stopped_at as u64 + 1));
    // The frames from before the move are in the bucket too, and the checkpoint is gone.
    let steps: Vec<u32> = bucket
        .frames(uuid)
        .await
        .unwrap()
        .iter()
        .map(|f| f.step)
        .collect();
    assert_eq!(steps, (0..=12).map(|i| i * 2).collect::<Vec<u32>>());
    assert!(bucket.artifact(uuid, &checkpoint).await.is_err());
    s.stop().await;
}

/// `vqclip worker` renders in its own process and serves `/metrics` and `/healthz` on
/// `workers.metrics_bind`; the API process serves what it stored (from the bucket when
/// S3 is tested: the two processes share no directory).
#[tokio::test]
async fn a_worker_process_serves_metrics_and_its_artifacts_reach_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let backend = *backends().last().unwrap();
    let moto = match backend {
        Backend::S3 => {
            let moto = MotoServer::start().await;
            moto.create_bucket("vqclip-test").await;
            Some(moto)
        }
        Backend::Local => None,
    };
    let config = write_config_file(
        dir.path(),
        "[workers]\ncount = 0\nheartbeat_seconds = 1\npoll_interval_ms = 100\n",
    );
    let storage_env = |scratch: &str| -> Vec<(String, String)> {
        let Some(moto) = &moto else { return vec![] };
        [
            ("VQCLIP_STORAGE_URL", "s3://vqclip-test/some/prefix"),
            ("VQCLIP_STORAGE_S3_ENDPOINT", moto.endpoint.as_str()),
            ("VQCLIP_STORAGE_S3_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(
            "VQCLIP_STORAGE_SCRATCH_DIR".to_string(),
            dir.path().join(scratch).display().to_string(),
        )])
        .collect()
    };
    let api_env = storage_env("api-disk");
    let api_env: Vec<(&str, &str)> = api_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let api = ServerProcess::spawn_with(&config, "warn", &api_env, None);
    let mut worker = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["worker", "--workers", "1", "--config"])
        .arg(&config)
        .env("VQCLIP_LOG", "warn")
        .env("VQCLIP_WORKERS_METRICS_BIND", "127.0.0.1:0")
        .envs(storage_env("worker-disk"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(worker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let metrics_url = line
        .trim()
        .strip_prefix("vqclip worker metrics on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let client = reqwest::Client::new();
    let health = client
        .get(metrics_url.replace("/metrics", "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let id = api.submit(&tiny_spec("elsewhere", 4)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = api.events(&id, None, 100_000).await;
    assert_eq!(events.last().unwrap().event, "completed", "{events:?}");
    let image = get_with(&api, &format!("/v1/jobs/{id}/image.png"), &[]).await;
    assert_eq!(image.status(), 200, "{backend:?}");
    assert!(image.bytes().await.unwrap().starts_with(b"\x89PNG"));
    if backend == Backend::S3 {
        assert!(!dir.path().join("artifacts/jobs").join(&id).exists());
    }

    let scrape = || async {
        let r = client.get(&metrics_url).send().await.unwrap();
        r.text().await.unwrap()
    };
    // The worker counts the job just after recording its success.
    let succeeded = "vqclip_jobs_finished_total{state=\"succeeded\"} 1";
    eventually(|| async { scrape().await.contains(succeeded) }).await;
    let scraped = scrape().await;
    assert!(scraped.contains(succeeded), "{scraped}");
    let steps_timed = scraped
        .lines()
        .find_map(|l| l.strip_prefix("vqclip_step_duration_seconds_count "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(steps_timed.is_some_and(|n| n >= 1), "{scraped}");
    sigterm(&worker);
    assert!(worker.wait().unwrap().success());
    api.stop();
}
