//! Many machines, as processes: `vqclip serve` nodes without workers and `vqclip worker`
//! processes on one PostgreSQL database (a fresh one per test) and, for artifacts, one
//! bucket on a real S3 server (moto). Each process has a scratch directory of its own, as
//! separate machines would.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::json;
use vqclip::queue::{Events, Jobs, PgStore, Scope, Workers};

use crate::support::pg::TestDb;
use crate::support::s3::{s3_skipped, MotoServer};
use crate::support::*;

/// Renders slowly enough, on the tiny models, for a worker to be killed in the middle.
const VICTIM_STEPS: u32 = 80;

/// A node's settings: the shared database, the tiny models, short leases so a dead worker's
/// job is rescued within seconds, and `extra` (whole TOML tables not written here).
fn node_config(dir: &Path, name: &str, db_url: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n\
             [database]\nurl = \"{db_url}\"\nmax_connections = 8\n\
             [models]\nvqgan = \"{v}\"\nclip = [\"{c}\"]\n\
             [workers]\ncount = 0\nlease_seconds = 2\nheartbeat_seconds = 1\npoll_interval_ms = 100\n\
             {extra}",
            v = fixture("vqgan-tiny").display(),
            c = fixture("clip-tiny").display(),
        ),
    )
    .unwrap();
    path
}

/// The bucket settings, as environment variables, with a scratch disk of the node's own.
fn s3_env(moto: &MotoServer, scratch: &Path) -> Vec<(String, String)> {
    [
        ("VQCLIP_STORAGE_URL", "s3://vqclip-test/multinode"),
        ("VQCLIP_STORAGE_S3_ENDPOINT", moto.endpoint.as_str()),
        ("VQCLIP_STORAGE_S3_ALLOW_HTTP", "true"),
        ("VQCLIP_STORAGE_S3_REGION", "us-east-1"),
        ("VQCLIP_STORAGE_S3_ACCESS_KEY_ID", "testing"),
        ("VQCLIP_STORAGE_S3_SECRET_ACCESS_KEY", "testing"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([(
        "VQCLIP_STORAGE_SCRATCH_DIR".to_string(),
        scratch.display().to_string(),
    )])
    .collect()
}

/// A `vqclip serve` node, killed if the test fails before stopping it.
struct ApiNode(ServerProcess);

impl std::ops::Deref for ApiNode {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl ApiNode {
    /// SIGTERM, then asserts the graceful exit succeeded.
    fn stop(mut self) {
        sigterm(&self.0.child);
        let status = self.0.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for ApiNode {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

fn spawn_api(config: &Path, env: &[(String, String)]) -> ApiNode {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ApiNode(ServerProcess::spawn_with(config, "warn", &env, None))
}

/// A `vqclip worker` process, killed if the test fails before stopping it.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(config: &Path, env: &[(String, String)]) -> Worker {
    let child = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["worker", "--workers", "1", "--config"])
        .arg(config)
        .env("VQCLIP_LOG", "warn")
        .envs(env.iter().cloned())
        .spawn()
        .unwrap();
    Worker(child)
}

fn migrate(db_url: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["migrate", "--database-url", db_url])
        .env("VQCLIP_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Asserts the events are one job's whole stream: ids 1, 2, 3, ... with no gap or repeat,
/// ending in exactly one `completed`.
fn assert_whole_stream(id: &str, events: &[SseEvent]) {
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    let want: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(ids, want, "job {id}: gap or duplicate in {events:?}");
    let completed = events.iter().filter(|e| e.event == "completed").count();
    assert_eq!(completed, 1, "job {id}: {events:?}");
    assert_eq!(events.last().unwrap().event, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_nodes_and_three_workers_share_one_database_and_bucket() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    if s3_skipped() {
        eprintln!("VQCLIP_TEST_S3=skip: the multi-node test needs the S3 backend");
        return;
    }
    let moto = MotoServer::start().await;
    moto.create_bucket("vqclip-test").await;
    let dir = tempfile::tempdir().unwrap();
    migrate(&db.url);
    let api_config = node_config(dir.path(), "api", &db.url, "");
    let worker_config = node_config(dir.path(), "worker", &db.url, "");
    let a = spawn_api(&api_config, &s3_env(&moto, &dir.path().join("a")));
    let b = spawn_api(&api_config, &s3_env(&moto, &dir.path().join("b")));
    let mut workers: Vec<Worker> = (0..3)
        .map(|i| {
            spawn_worker(
                &worker_config,
                &s3_env(&moto, &dir.path().join(format!("w{i}"))),
            )
        })
        .collect();

    // The job to interrupt goes first, so a worker is on it while the others queue.
    let mut victim_spec = tiny_spec("rendered by two workers", VICTIM_STEPS);
    victim_spec["checkpoint_every"] = json!(4);
    let victim = a.submit(&victim_spec).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Node A's SSE client follows it from the start, whichever worker renders it.
    let follower = {
        let api = Api {
            base: a.base.clone(),
            client: reqwest::Client::new(),
        };
        let id = victim.clone();
        tokio::spawn(async move { api.events(&id, None, 100_000).await })
    };
    let mut ids = vec![victim.clone()];
    for i in 1..30 {
        let node = if i % 2 == 0 { &a } else { &b };
        let id = node.submit(&tiny_spec(&format!("job {i}"), 2)).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        ids.push(id);
    }

    // Kill the victim's worker once it has checkpointed (every 4 steps, so at step 8).
    let started = a.wait_step(&victim, 9, LONG).await;
    assert_eq!(started["state"], "running", "{started}");
    // Its lease names the worker; the worker registry names that worker's process.
    let store = PgStore::connect(&db.url, 2).await.unwrap();
    let uuid: uuid::Uuid = victim.parse().unwrap();
    let owner = store
        .get(uuid, &Scope::unrestricted())
        .await
        .unwrap()
        .lease_owner
        .expect("a running job has a lease");
    let pid = store
        .workers()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.id == owner)
        .expect("the lease holder is registered")
        .pid;
    let killed = workers
        .iter()
        .position(|w| w.0.id() == pid)
        .expect("the victim's worker is one of ours");
    let mut dead = workers.remove(killed);
    sigkill(&mut dead.0);

    // Every job succeeds exactly once; the victim on a second attempt.
    for id in &ids {
        let done = a.wait_terminal(id, LONG).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        let attempts = if *id == victim { 2 } else { 1 };
        assert_eq!(done["attempts"], attempts, "{done}");
    }
    // Node A's client saw the victim's whole stream, across both workers, with no gap or
    // duplicate, and the same as a replay from node B.
    let followed = tokio::time::timeout(LONG, follower).await.unwrap().unwrap();
    assert_whole_stream(&victim, &followed);
    let replayed = b.events(&victim, None, 100_000).await;
    assert_eq!(followed, replayed);
    // It resumed from its checkpoint on another worker rather than starting over.
    let running: Vec<&SseEvent> = followed
        .iter()
        .filter(|e| e.data["state"] == "running")
        .collect();
    assert_eq!(running.len(), 2, "{followed:?}");
    let from = running[1].data["resumed_from"]
        .as_u64()
        .expect("resumed from a checkpoint");
    assert!(from >= 8 && from.is_multiple_of(4), "{from}");
    let after: Vec<u64> = followed
        .iter()
        .filter(|e| e.id > running[1].id && e.event == "progress")
        .map(|e| e.data["step"].as_u64().unwrap())
        .collect();
    assert_eq!(after.first().copied(), Some(from + 1), "{after:?}");

    // Node B serves every job's image from the bucket, and every stream is whole.
    for id in &ids {
        let image = b.get(&format!("/v1/jobs/{id}/image.png")).await;
        assert_eq!(image.status(), 200, "{id}");
        assert!(image.bytes().await.unwrap().starts_with(b"\x89PNG"));
        assert_whole_stream(id, &a.events(id, None, 100_000).await);
    }

    for w in &workers {
        sigterm(&w.0);
    }
    for mut w in workers {
        assert!(w.0.wait().unwrap().success());
    }
    a.stop();
    b.stop();
    store.pool().close().await;
}

/// Two serve nodes each run the webhook sender over the same deliveries; one receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_api_nodes_each_webhook_event_is_delivered_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrate(&db.url);
    const SECRET: &str = "whsec_dHdvLW5vZGVzLW9uZS1yZWNlaXZlcg==";
    let extra = format!(
        "[storage]\nartifact_dir = \"{}/artifacts\"\n\
         [webhooks]\nsecret = \"{SECRET}\"\nallowed_networks = [\"127.0.0.0/8\"]\n\
         poll_interval_ms = 50\ninitial_backoff_ms = 100\n",
        dir.path().display()
    );
    let config = node_config(dir.path(), "node", &db.url, &extra);
    let a = spawn_api(&config, &[]);
    let b = spawn_api(&config, &[]);
    let mut worker = spawn_worker(&config, &[]);
    // The receiver fails a few first attempts, so retries cross nodes too.
    let (url, receiver) = Receiver::start(&[500, 503, 500]).await;
    let subscribed = ["state", "frame", "completed"];

    let mut ids = vec![];
    for i in 0..6 {
        let node = if i % 2 == 0 { &a } else { &b };
        let mut spec = tiny_spec(&format!("hooked {i}"), 4);
        spec["webhook"] = json!({ "url": url, "events": subscribed });
        ids.push(node.submit(&spec).await["id"].as_str().unwrap().to_owned());
    }
    // What each job's deliveries must be: one per subscribed event of its stream.
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    for id in &ids {
        let events = a.events(id, None, 100_000).await;
        assert_eq!(events.last().unwrap().event, "completed");
        let mut kinds: Vec<String> = events
            .iter()
            .filter(|e| subscribed.contains(&e.event.as_str()))
            .map(|e| format!("job.{}", e.event))
            .collect();
        kinds.sort();
        want.insert(id.clone(), kinds);
    }
    let expected: usize = want.values().map(Vec::len).sum();
    // Three attempts were refused (and retried under the same webhook-id): every other
    // request must be a distinct delivery.
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.got().len() < expected + 3 {
        assert!(
            Instant::now() < deadline,
            "{} of {} requests",
            receiver.got().len(),
            expected + 3
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Time for a duplicate from the other node to show up, if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.got();
    assert_eq!(got.len(), expected + 3, "a delivery went out twice");
    let mut per_job: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = HashSet::new();
    for r in &got {
        assert_signed(SECRET, r);
        if !seen.insert(r.id.clone()) {
            continue;
        }
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        per_job
            .entry(body["data"]["job_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), expected);
    for kinds in per_job.values_mut() {
        kinds.sort();
    }
    assert_eq!(per_job, want);

    sigterm(&worker.0);
    assert!(worker.0.wait().unwrap().success());
    a.stop();
    b.stop();
}

/// `vqclip keys` writes to the shared database: a key created (or revoked) there counts on
/// every API node at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_on_the_command_line_works_on_every_api_node() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrate(&db.url);
    let keys = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vqclip"))
            .arg("keys")
            .args(args)
            .args(["--database-url", &db.url])
            .env_remove("VQCLIP_CONFIG")
            .env("VQCLIP_LOG", "warn")
            .output()
            .unwrap()
    };
    let extra = format!(
        "[storage]\nartifact_dir = \"{}/artifacts\"\n",
        dir.path().display()
    );
    let config = node_config(dir.path(), "node", &db.url, &extra);
    let nodes = [spawn_api(&config, &[]), spawn_api(&config, &[])];
    // No key yet: keys are off everywhere.
    for node in &nodes {
        assert_eq!(node.get("/v1/jobs").await.status(), 200);
    }
    let key = succeeded(&keys(&["create", "--name", "app"]))
        .trim()
        .to_owned();
    assert!(key.starts_with("vq_"), "{key}");
    assert!(!keys(&["create", "--name", "app"]).status.success());
    let with_key = |node: &ApiNode, key: &str| {
        node.client
            .get(node.url("/v1/jobs"))
            .bearer_auth(key)
            .send()
    };
    for node in &nodes {
        // Keys are on now: a request without one is refused, with it accepted.
        problem(node.get("/v1/jobs").await, 401).await;
        assert_eq!(with_key(node, &key).await.unwrap().status(), 200);
    }
    let listed: serde_json::Value =
        serde_json::from_str(&succeeded(&keys(&["list", "--json"]))).unwrap();
    assert_eq!(listed[0]["name"], "app");
    succeeded(&keys(&["revoke", "app"]));
    for node in &nodes {
        problem(with_key(node, &key).await.unwrap(), 401).await;
    }
    let [a, b] = nodes;
    a.stop();
    b.stop();
}

/// The SSE wake-up through real nodes: a `vqclip worker` writes events, an SSE client on an
/// API node that did not write them receives them. On SQLite (one file, three processes) the
/// node learns of them from its poll; on PostgreSQL from `NOTIFY`. Run with
/// `cargo test --test service -- --ignored multinode::bench_ --nocapture --test-threads 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for BENCHMARKS.md"]
async fn bench_sse_wake_up_from_a_worker_to_another_node() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = database_url(dir.path());
    for (backend, url) in [("SQLite", sqlite.as_str()), ("PostgreSQL", db.url.as_str())] {
        let (median, p99, n) = wake_up_latency(dir.path(), url).await;
        println!("{backend}: worker event -> SSE client on an API node: median {median:.1} ms, p99 {p99:.1} ms ({n} events)");
    }
}

/// Latencies (median, p99, count) in ms from each event's commit time to its arrival on node
/// A's stream, for jobs submitted to node B and rendered by a worker process.
async fn wake_up_latency(dir: &Path, db_url: &str) -> (f64, f64, usize) {
    migrate(db_url);
    let extra = format!(
        "[storage]\nartifact_dir = \"{}/artifacts\"\n",
        dir.display()
    );
    let config = node_config(dir, "bench", db_url, &extra);
    let a = spawn_api(&config, &[]);
    let b = spawn_api(&config, &[]);
    let mut worker = spawn_worker(&config, &[]);
    let now_ms = || chrono::Utc::now().timestamp_micros() as f64 / 1000.0;
    let mut latencies = vec![];
    for i in 0..8 {
        let id = b.submit(&tiny_spec(&format!("wake {i}"), 24)).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let response = a
            .client
            .get(a.url(&format!("/v1/jobs/{id}/events")))
            .send()
            .await
            .unwrap();
        let connected = now_ms();
        // Arrival times as the stream delivers them, read event by event.
        let mut arrivals = HashMap::new();
        let mut stream = response;
        let mut buf = String::new();
        while let Some(chunk) = stream.chunk().await.unwrap() {
            let at = now_ms();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if let Some(line) = block.lines().find(|l| l.starts_with("id:")) {
                    let event: i64 = line[3..].trim().parse().unwrap();
                    arrivals.insert(event, at);
                }
            }
        }
        let store_events = events_with_times(db_url, &id).await;
        for (event, created_ms) in store_events {
            // Events written before the stream connected are a replay, not a wake-up.
            if let Some(at) = arrivals.get(&event).filter(|_| created_ms > connected) {
                latencies.push(at - created_ms);
            }
        }
    }
    sigterm(&worker.0);
    assert!(worker.0.wait().unwrap().success());
    a.stop();
    b.stop();
    latencies.sort_by(f64::total_cmp);
    let n = latencies.len();
    assert!(n > 50, "{n} events measured");
    (latencies[n / 2], latencies[n * 99 / 100], n)
}

/// A job's event ids and commit times (ms), read from the store the nodes share.
async fn events_with_times(db_url: &str, job: &str) -> Vec<(i64, f64)> {
    let job = job.parse().unwrap();
    let events = if db_url.starts_with("postgres") {
        let store = PgStore::connect(db_url, 2).await.unwrap();
        let e = store.events_after(job, 0, 100_000).await.unwrap();
        store.pool().close().await;
        e
    } else {
        let store = vqclip::queue::SqliteStore::connect(db_url, Duration::from_secs(5), 2)
            .await
            .unwrap();
        let e = store.events_after(job, 0, 100_000).await.unwrap();
        store.pool().close().await;
        e
    };
    events
        .into_iter()
        .map(|e| (e.id, e.created_at.timestamp_millis() as f64))
        .collect()
}
