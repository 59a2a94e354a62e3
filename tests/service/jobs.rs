//! End to end on a real server with real renders of the tiny models: the happy path,
//! artifacts, ordering, cancel and SSE resume.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

#[tokio::test]
async fn happy_path_submit_follow_sse_fetch_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let mut spec = tiny_spec("a wooden banana temple", 6);
    spec["width"] = json!(48);
    spec["height"] = json!(32);
    let job = s.submit(&spec).await;
    let id = job["id"].as_str().unwrap().to_owned();

    let events = s.events(&id, None, 1000).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"state"));
    assert_eq!(events[0].data["state"], "queued");
    assert_eq!(events[1].data["state"], "running");
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| e.data["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    let frames: Vec<&SseEvent> = events.iter().filter(|e| e.event == "frame").collect();
    assert!(!frames.is_empty(), "{kinds:?}");

    let done = s.job(&id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"]["step"], 6);
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["device"], "cpu");

    let r = s.get(done["links"]["image"].as_str().unwrap()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((png.width(), png.height()), (48, 32));

    let meta = s
        .get_json(done["links"]["metadata"].as_str().unwrap())
        .await;
    assert_eq!(meta["seed"], 7, "{meta}");

    let listed = s.get_json(&format!("/v1/jobs/{id}/frames")).await;
    let listed = listed["frames"].as_array().unwrap().clone();
    assert_eq!(listed.len(), frames.len());
    for f in &frames {
        let url = f.data["url"].as_str().unwrap();
        let r = s.get(url).await;
        assert_eq!(r.status(), 200, "{url}");
        assert_eq!(r.headers()["content-type"], "image/png");
        let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (48, 32));
    }

    // The video: content type, ETag, ranges.
    let video_url = s.url(done["links"]["video"].as_str().unwrap());
    let r = s.client.get(&video_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "video/mp4");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let full = r.bytes().await.unwrap();
    assert!(full.len() > 16);
    let r = s
        .client
        .get(&video_url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = s
        .client
        .get(&video_url)
        .header("range", "bytes=4-11")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 4-11/{}", full.len()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), full[4..12]);
    let r = s
        .client
        .get(&video_url)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), full[full.len() - 5..]);
    let r = s
        .client
        .get(&video_url)
        .header("range", format!("bytes={}-", full.len() + 10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", full.len()).as_str()
    );

    let metrics = s.metrics().await;
    assert!(
        metrics.contains("vqclip_step_duration_seconds_count 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vqclip_job_duration_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vqclip_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    let ready = s.get("/readyz").await;
    assert_eq!(ready.status(), 200);

    // Deleting removes the job and its files.
    let r = s.delete(&format!("/v1/jobs/{id}")).await;
    assert_eq!(r.status(), 204);
    assert!(!dir.path().join("artifacts/jobs").join(&id).exists());
    assert_eq!(s.client.get(&video_url).send().await.unwrap().status(), 404);
    s.stop().await;
}

#[tokio::test]
async fn sse_resume_has_no_gaps_and_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let job = s.submit(&tiny_spec("resume me", 8)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let mut seen = s.events(&id, None, 4).await;
    assert_eq!(seen.len(), 4);
    // Reconnect twice more from where we stopped, the last time to the end.
    let more = s.events(&id, Some(seen.last().unwrap().id), 3).await;
    seen.extend(more);
    let rest = s.events(&id, Some(seen.last().unwrap().id), 1000).await;
    seen.extend(rest);
    let full = s.events(&id, None, 1000).await;
    assert_eq!(seen, full);
    assert_eq!(full.last().unwrap().event, "completed");
    s.stop().await;
}

#[tokio::test]
async fn two_workers_serve_by_priority_then_fifo() {
    let dir = tempfile::tempdir().unwrap();
    // Queue everything before any worker runs, then start two workers on the same database.
    let s = InProcessServer::start(test_config(dir.path(), 0)).await;
    let mut ids = vec![];
    for (i, priority) in [0, 5, 0, 9, 5, 0].into_iter().enumerate() {
        let mut spec = tiny_spec(&format!("job {i}"), 3);
        spec["priority"] = json!(priority);
        ids.push((
            priority,
            s.submit(&spec).await["id"].as_str().unwrap().to_owned(),
        ));
    }
    let mut expected: Vec<(i32, usize)> =
        ids.iter().enumerate().map(|(i, (p, _))| (*p, i)).collect();
    expected.sort_by_key(|(p, i)| (-p, *i));
    for (position, (_, i)) in expected.iter().enumerate() {
        assert_eq!(s.job(&ids[*i].1).await["position"], position as u64 + 1);
    }
    s.stop().await;

    let s = InProcessServer::start(test_config(dir.path(), 2)).await;
    for (_, id) in &ids {
        assert_eq!(s.wait_terminal(id, LONG).await["state"], "succeeded");
    }
    // The claim order is the order of the jobs' "running" events (one global sequence).
    let mut started = vec![];
    for (i, (_, id)) in ids.iter().enumerate() {
        let events = s.events(id, None, 1000).await;
        let running = events
            .iter()
            .find(|e| e.data["state"] == "running")
            .unwrap();
        started.push((running.id, i));
    }
    started.sort();
    let order: Vec<usize> = started.iter().map(|(_, i)| *i).collect();
    let want: Vec<usize> = expected.iter().map(|(_, i)| *i).collect();
    assert_eq!(order, want);
    let devices: std::collections::HashSet<String> = s
        .store
        .live_workers(Duration::from_secs(10))
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(devices.len(), 2);
    s.stop().await;
}

use vqclip::queue::Workers as _;

#[tokio::test]
async fn cancel_a_queued_and_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let running = s.submit(&tiny_spec("long", 2000)).await;
    let queued = s.submit(&tiny_spec("waiting", 4)).await;
    let running_id = running["id"].as_str().unwrap();
    let queued_id = queued["id"].as_str().unwrap();
    let cancel = |id: &str| {
        s.client
            .post(s.url(&format!("/v1/jobs/{id}/cancel")))
            .send()
    };

    let r = cancel(queued_id).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "canceled");

    // Wait until the long job is rendering, then cancel it.
    let deadline = tokio::time::Instant::now() + LONG;
    while s.job(running_id).await["progress"]["step"]
        .as_u64()
        .unwrap()
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = cancel(running_id).await.unwrap();
    assert_eq!(r.status(), 200);
    let asked: Value = r.json().await.unwrap();
    assert!(asked["cancel_requested"].as_bool().unwrap(), "{asked}");
    let done = s.wait_terminal(running_id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "canceled");
    assert!(done["progress"]["step"].as_u64().unwrap() < 2000);
    let events = s.events(running_id, None, 10_000).await;
    assert_eq!(events.last().unwrap().event, "canceled");
    // The canceled one never ran.
    assert_eq!(s.job(queued_id).await["attempts"], 0);
    s.stop().await;
}

/// A job whose steps are slow next to a database write, so that "within one step" can
/// be told apart from "two steps later".
fn slow_steps_spec(prompt: &str) -> Value {
    let mut spec = tiny_spec(prompt, 2000);
    spec["width"] = json!(64);
    spec["height"] = json!(64);
    spec["cutn"] = json!(32);
    spec["save_every"] = json!(0);
    spec["checkpoint_every"] = json!(1);
    spec
}

/// The step the job was canceled at (its `canceled` event).
async fn canceled_step(s: &InProcessServer, id: &str) -> u64 {
    let done = s.wait_terminal(id, LONG).await;
    assert_eq!(done["state"], "canceled", "{done}");
    let events = s.events(id, None, 100_000).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "canceled");
    last.data["step"].as_u64().unwrap()
}

/// Issue 9, defects 8 and 13: a running job stops within one step of a cancel made in
/// this process or in another one, and leaves no checkpoint behind.
#[tokio::test]
async fn cancel_stops_a_running_job_within_one_step_and_drops_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let artifacts = vqclip::storage::ArtifactStore::open(&s.config.storage.artifact_dir).unwrap();

    // Through the API of the process that runs the worker.
    let id = s.submit(&slow_steps_spec("cancel here")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let seen = s.wait_step(&id, 3, LONG).await["progress"]["step"]
        .as_u64()
        .unwrap();
    let r = s.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(r.status(), 200);
    let step = canceled_step(&s, &id).await;
    assert!(
        step <= seen + 1,
        "canceled at step {step}, asked at step {seen}"
    );
    let job_dir = artifacts.job_dir(id.parse().unwrap());
    assert!(
        !job_dir.join("checkpoint.safetensors").exists(),
        "a canceled job keeps no checkpoint"
    );

    // Through another process's store: no in-process signal, only the database.
    let other = open_store(dir.path(), 2).await;
    let id = s.submit(&slow_steps_spec("cancel there")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let seen = s.wait_step(&id, 3, LONG).await["progress"]["step"]
        .as_u64()
        .unwrap();
    use vqclip::queue::{Jobs, Scope};
    other
        .cancel(id.parse().unwrap(), &Scope::unrestricted())
        .await
        .unwrap();
    let step = canceled_step(&s, &id).await;
    assert!(
        step <= seen + 1,
        "canceled at step {step}, asked at step {seen}"
    );
    other.pool().close().await;
    s.stop().await;
}

/// Issue 9, defect 1: while another connection holds the write lock past the busy
/// timeout, a submit answers 503 with Retry-After, never 500.
#[tokio::test]
async fn a_saturated_database_answers_503_with_retry_after() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 0)).await;
    let mut other = sqlx::SqliteConnection::connect(&database_url(dir.path()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let r = s
        .client
        .post(s.url("/v1/jobs"))
        .json(&tiny_spec("blocked", 2))
        .send()
        .await
        .unwrap();
    let (headers, p) = problem_response(r, 503).await;
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    assert_eq!(p["type"], "urn:vqclip:problem:database-busy");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    s.submit(&tiny_spec("unblocked", 2)).await;
    s.stop().await;
}

/// Issue 9, defect 12: while a worker takes jobs, every queued job on a page has a
/// position, and the page's positions are one consistent numbering.
#[tokio::test]
async fn listed_positions_stay_consistent_while_jobs_are_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 0)).await;
    for i in 0..80 {
        let mut spec = tiny_spec(&format!("queued {i}"), 1);
        spec["priority"] = json!([0, 3, -3][i % 3]);
        s.submit(&spec).await;
    }
    let store = s.store.clone();
    let claimer = tokio::spawn(async move {
        use vqclip::queue::Leases;
        while store
            .claim("claimer", "cpu", Duration::from_secs(60))
            .await
            .unwrap()
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut pages = 0;
    while !claimer.is_finished() {
        let page = s.get_json("/v1/jobs?limit=100").await;
        let mut positions: Vec<u64> = vec![];
        for job in page["jobs"].as_array().unwrap() {
            if job["state"] == "queued" {
                let position = job["position"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("a queued job without a position: {job}"));
                positions.push(position);
            } else {
                assert!(job["position"].is_null(), "{job}");
            }
        }
        positions.sort_unstable();
        let expected: Vec<u64> = (1..=positions.len() as u64).collect();
        assert_eq!(positions, expected, "one numbering per page");
        pages += 1;
    }
    claimer.await.unwrap();
    assert!(pages > 0);
    s.stop().await;
}
