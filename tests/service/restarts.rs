//! Restarts and crashes: queued jobs survive a restart, a graceful shutdown hands the
//! running job back with a checkpoint, and a SIGKILLed server's job is rescued after
//! its lease expires and completes from its last checkpoint.

use std::process::Command;

use crate::support::*;
use serde_json::json;
use vqclip::queue::{Jobs, Scope};

#[tokio::test]
async fn queued_jobs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 0)).await;
    let mut ids = vec![];
    for i in 0..3 {
        ids.push(
            s.submit(&tiny_spec(&format!("survivor {i}"), 3)).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    s.stop().await;
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    for id in &ids {
        assert_eq!(s.wait_terminal(id, LONG).await["state"], "succeeded");
    }
    s.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_checkpoints_requeues_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let mut spec = tiny_spec("interrupted", 24);
    spec["checkpoint_every"] = json!(4);
    let id = s.submit(&spec).await["id"].as_str().unwrap().to_owned();
    s.wait_step(&id, 6, LONG).await;
    let store = s.store.clone();
    s.stop().await;

    let uuid = id.parse().unwrap();
    let store2 = open_store(dir.path(), 2).await;
    drop(store);
    let job = store2.get(uuid, &Scope::unrestricted()).await.unwrap();
    assert_eq!(job.state, vqclip::queue::JobState::Queued);
    assert_eq!(job.attempts, 0, "a graceful hand-back spends no attempt");
    let stopped_at = job.checkpoint_step;
    assert_eq!(
        stopped_at, job.progress.step,
        "the hand-back checkpoints the last step"
    );
    assert!((6..24).contains(&stopped_at), "{stopped_at}");
    let checkpoint = job.checkpoint.clone().expect("a checkpoint was recorded");
    assert!(dir
        .path()
        .join("artifacts/jobs")
        .join(&id)
        .join(&checkpoint)
        .is_file());
    store2.pool().close().await;

    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let done = s.wait_terminal(&id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    let events = s.events(&id, None, 100_000).await;
    let running: Vec<&SseEvent> = events
        .iter()
        .filter(|e| e.data["state"] == "running")
        .collect();
    assert_eq!(running.len(), 2);
    assert_eq!(running[1].data["resumed_from"], stopped_at);
    // After the resume, progress continues from the checkpoint instead of step 1.
    let after: Vec<u64> = events
        .iter()
        .filter(|e| e.id > running[1].id && e.event == "progress")
        .map(|e| e.data["step"].as_u64().unwrap())
        .collect();
    assert_eq!(after.first().copied(), Some(stopped_at as u64 + 1));
    assert_eq!(after.last().copied(), Some(24));
    s.stop().await;
}

#[tokio::test]
async fn a_sigkilled_servers_job_is_rescued_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_file(
        dir.path(),
        "[workers]\ncount = 1\nlease_seconds = 2\nheartbeat_seconds = 1\npoll_interval_ms = 100\n",
    );
    let mut first = ServerProcess::spawn(&config, "warn");
    let mut spec = tiny_spec("crash test", 24);
    spec["checkpoint_every"] = json!(4);
    let job = first.submit(&spec).await;
    let id = job["id"].as_str().unwrap().to_owned();
    first.wait_step(&id, 9, LONG).await;
    // SIGKILL: no shutdown code runs; the job is left "running" with a lease.
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second = ServerProcess::spawn(&config, "warn");
    let done = second.wait_terminal(&id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);
    let events = second.events(&id, None, 100_000).await;
    let requeued = events
        .iter()
        .find(|e| e.data["state"] == "queued" && e.data["reason"] == "worker lost; requeued")
        .expect("a rescue event");
    let resumed = events
        .iter()
        .find(|e| e.id > requeued.id && e.data["state"] == "running")
        .unwrap();
    let from = resumed.data["resumed_from"]
        .as_u64()
        .expect("resumed from a checkpoint");
    // Checkpoints every 4 steps and at least 9 steps done: it resumed from step 8 or later.
    assert!(from >= 8 && from % 4 == 0, "{from}");
    let r = second.get(&format!("/v1/jobs/{id}/image.png")).await;
    assert_eq!(r.status(), 200);
    // SIGTERM: a graceful stop exits cleanly.
    second.stop();
}

#[tokio::test]
async fn separate_worker_process_and_migrate_command() {
    let dir = tempfile::tempdir().unwrap();
    let db = database_url(dir.path());
    let bin = env!("CARGO_BIN_EXE_vqclip");
    let migrated = Command::new(bin)
        .args(["migrate", "--database-url", &db])
        .env("VQCLIP_LOG", "warn")
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    assert!(dir.path().join("vqclip.db").is_file());

    let refused = Command::new(bin)
        .args(["worker", "--database-url", &db, "--device", "cuda:0"])
        .env("VQCLIP_LOG", "warn")
        .output()
        .unwrap();
    if !cfg!(feature = "cuda") {
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            err.contains("cuda:0") && err.contains("without CUDA"),
            "{err}"
        );
    }

    let config = write_config_file(
        dir.path(),
        "[workers]\ncount = 0\nheartbeat_seconds = 1\npoll_interval_ms = 100\n",
    );
    // The API alone is not ready: no worker anywhere.
    let mut api = ServerProcess::spawn(&config, "warn");
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let job = api.submit(&tiny_spec("in another process", 3)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let mut worker = Command::new(bin)
        .args(["worker", "--config"])
        .arg(&config)
        .args(["--workers", "1"])
        .env("VQCLIP_LOG", "warn")
        .spawn()
        .unwrap();
    // Events written by the other process reach this SSE stream through the database.
    let events = api.events(&id, None, 100_000).await;
    assert_eq!(events.last().unwrap().event, "completed");
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    sigterm(&worker);
    sigterm(&api.child);
    assert!(worker.wait().unwrap().success());
    assert!(api.child.wait().unwrap().success());
}

/// Issue 9, defect 9: a server restarted after a SIGKILL recognises the leases of its
/// own dead workers and requeues their jobs at once, not after a full lease, and
/// `/readyz` lists only the workers that are alive.
#[tokio::test]
async fn a_restarted_node_requeues_its_dead_workers_jobs_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_file(
        dir.path(),
        "[workers]\ncount = 1\nlease_seconds = 60\nheartbeat_seconds = 1\npoll_interval_ms = 100\n",
    );
    let mut first = ServerProcess::spawn(&config, "warn");
    let id = first.submit(&tiny_spec("node restart", 2000)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    first.wait_step(&id, 2, LONG).await;
    let old: Vec<String> = first.get_json("/readyz").await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(old.len(), 1);
    sigkill(&mut first.child);

    let killed = std::time::Instant::now();
    let second = ServerProcess::spawn(&config, "warn");
    loop {
        let job = second.job(&id).await;
        if job["attempts"] == 2 && job["state"] == "running" {
            break;
        }
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(20),
            "the dead worker's job waits for its 60 s lease: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ready = second.get_json("/readyz").await;
    let live: Vec<&str> = ready["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(live.len(), 1, "{ready}");
    assert!(!old.iter().any(|o| live.contains(&o.as_str())), "{ready}");
    let r = second.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(r.status(), 200);
    second.wait_terminal(&id, LONG).await;
    second.stop();
}

/// Removes ANSI colour sequences, so log lines read the same on any terminal setting.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Issue 9, defects 6 and 7: on a machine that cannot download, the first job retries
/// within its attempts, then fails naming every missing model, the real cause and the
/// next step without showing server paths; the log says why at WARN with the job id;
/// `/readyz` and the start-up log say the default models are missing.
#[tokio::test]
async fn a_first_run_without_network_explains_itself_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("model-cache");
    let config = dir.path().join("vqclip.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[database]\nurl = \"{db}\"\n\
             [storage]\nartifact_dir = \"{d}/artifacts\"\n\
             [models]\nvqgan = \"{v}\"\nclip = [\"ViT-B/32\", \"ViT-B/16\"]\ncache_dir = \"{c}\"\n\
             [workers]\ncount = 1\nmax_attempts = 2\nheartbeat_seconds = 1\npoll_interval_ms = 100\n",
            db = database_url(dir.path()),
            d = dir.path().display(),
            v = fixture("vqgan-tiny").display(),
            c = cache.display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    // Nothing listens on port 1: every download is refused at once.
    let server = ServerProcess::spawn_with(
        &config,
        "info",
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:1"),
            ("VQCLIP_OFFLINE", "0"),
        ],
        Some(&log),
    );
    let ready = server.get_json("/readyz").await;
    assert_eq!(ready["models_ready"], false, "{ready}");
    let clip = ready["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ViT-B/32")
        .unwrap_or_else(|| panic!("{ready}"));
    assert_eq!(clip["present"], false);
    assert!(!ready.to_string().contains(&cache.display().to_string()));

    let id = server.submit(&tiny_spec("first run", 2)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = server.wait_terminal(&id, LONG).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["attempts"], 2, "retried within its attempts: {done}");
    let error = done["error"].as_str().unwrap();
    for needle in [
        "ViT-B/32",
        "ViT-B/16",
        "vqclip models pull",
        "VQCLIP_OFFLINE",
    ] {
        assert!(error.contains(needle), "{needle:?} in {error}");
    }
    assert!(error.to_ascii_lowercase().contains("refused"), "{error}");
    let root = dir.path().display().to_string();
    assert!(!error.contains(&root), "no server paths: {error}");
    let events = server.events(&id, None, 1000).await;
    assert!(
        events
            .iter()
            .any(|e| e.data["state"] == "queued" && e.data["retry_in_seconds"].is_number()),
        "{events:?}"
    );
    assert!(
        !serde_json::to_string(&events.iter().map(|e| &e.data).collect::<Vec<_>>())
            .unwrap()
            .contains(&root),
        "no server paths in events"
    );
    server.stop();

    let log = plain(&std::fs::read_to_string(&log).unwrap());
    assert!(
        log.lines()
            .any(|l| l.contains("ViT-B/32") && l.contains("default model not in the model cache")),
        "{log}"
    );
    let failed = log
        .lines()
        .find(|l| l.contains("job failed") && l.contains(&id))
        .unwrap_or_else(|| panic!("no failure line for {id}: {log}"));
    assert!(
        failed.contains("WARN") || failed.contains("ERROR"),
        "{failed}"
    );
    assert!(failed.contains("refused"), "the reason is logged: {failed}");
}
