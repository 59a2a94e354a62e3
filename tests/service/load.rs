//! Load figures for the resolution note; ignored by default (they time, not check):
//! `cargo test --test service -- --ignored load:: --nocapture`
//!
//! Spawns the real binary, measures its idle memory, keeps its worker busy with a long
//! job, then measures submit latency (one client, sequential) and accepted
//! submissions per second (concurrent clients) on loopback.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test]
#[ignore = "measurement, not a check"]
async fn submit_latency_throughput_and_idle_memory() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_file(dir.path(), "[limits]\nmax_queued_jobs = 1000000\n");
    let ServerProcess {
        mut child,
        api: Api { base, .. },
    } = ServerProcess::spawn(&config, "warn");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(child.id());

    let client = reqwest::Client::new();
    let submit = |client: reqwest::Client, base: String| async move {
        let started = Instant::now();
        let r = client
            .post(format!("{base}/v1/jobs"))
            .json(&tiny_spec("load", 3))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.bytes().await.unwrap();
        started.elapsed()
    };
    // Keep the worker busy for the whole measurement.
    let mut busy = tiny_spec("busy", 2000);
    busy["priority"] = json!(100);
    let r = client
        .post(format!("{base}/v1/jobs"))
        .json(&busy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut latencies = vec![];
    for _ in 0..500 {
        latencies.push(submit(client.clone(), base.clone()).await);
    }
    latencies.sort();

    let clients = 16;
    let window = Duration::from_secs(10);
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..clients {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < window {
                submit(client.clone(), base.clone()).await;
                n += 1;
            }
            n
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    let rate = accepted as f64 / started.elapsed().as_secs_f64();
    let busy_rss = rss_kib(child.id());
    println!(
        "idle RSS {:.1} MiB; submit latency p50 {:.2} ms, p99 {:.2} ms (sequential, 500); \
         {rate:.0} submissions/s accepted with {clients} concurrent clients over {window:?} \
         while the worker renders; RSS then {:.1} MiB",
        idle as f64 / 1024.0,
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        busy_rss as f64 / 1024.0,
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Reads one Prometheus sample, e.g. `vqclip_jobs{state="succeeded"}`.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

const LOAD_JOBS: usize = 1000;
const LOAD_CLIENTS: usize = 50;

/// Issue 9: 1,000 tiny jobs (16–32 px, 1–2 steps, cutn 1) from 50 clients. No answer is
/// a 5xx, every accepted job succeeds exactly once, and the list walked by cursor
/// returns each job once. Prints accepted/s, submit p50/p99, errors and peak RSS.
async fn load(batch_size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_file(
        dir.path(),
        &format!(
            "[limits]\nmax_queued_jobs = 100000\n\
             [workers]\ncount = 1\nbatch_size = {batch_size}\nheartbeat_seconds = 1\npoll_interval_ms = 50\n"
        ),
    );
    let server = ServerProcess::spawn(&config, "warn");
    let pid = server.child.id();
    let base = server.base.clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(LOAD_CLIENTS)
        .build()
        .unwrap();

    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..LOAD_CLIENTS {
        let (client, base, next) = (client.clone(), base.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = vec![];
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= LOAD_JOBS {
                    return seen;
                }
                let side = if i % 2 == 0 { 16 } else { 32 };
                let spec = json!({
                    "prompts": format!("load {i}"),
                    "width": side,
                    "height": side,
                    "steps": 1 + i % 2,
                    "cutn": 1,
                    "save_every": 0,
                    "augments": [],
                    "video": { "enabled": false },
                    "seed": i,
                });
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/v1/jobs"))
                    .json(&spec)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                seen.push((
                    status,
                    t.elapsed(),
                    body["id"].as_str().map(str::to_owned),
                    body,
                ));
            }
        }));
    }
    let mut latencies = vec![];
    let mut accepted = std::collections::BTreeSet::new();
    let mut errors = std::collections::BTreeMap::<u16, usize>::new();
    for task in tasks {
        for (status, latency, id, body) in task.await.unwrap() {
            latencies.push(latency);
            assert!(status < 500, "a submit answered {status}: {body}");
            match (status, id) {
                (201, Some(id)) => assert!(accepted.insert(id), "an id given twice"),
                (other, _) => *errors.entry(other).or_default() += 1,
            }
        }
    }
    let submitted_in = started.elapsed();
    latencies.sort();

    // Wait for the queue to drain.
    let deadline = Instant::now() + Duration::from_secs(600);
    let metrics = loop {
        let metrics = server.metrics().await;
        let done = ["succeeded", "failed", "canceled"]
            .iter()
            .map(|s| sample(&metrics, &format!("vqclip_jobs{{state=\"{s}\"}}")).unwrap_or(0.0))
            .sum::<f64>();
        if done as usize >= accepted.len() {
            break metrics;
        }
        assert!(Instant::now() < deadline, "not drained: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drained_in = started.elapsed();
    assert_eq!(
        sample(&metrics, "vqclip_jobs{state=\"succeeded\"}"),
        Some(accepted.len() as f64),
        "{metrics}"
    );
    // Finished exactly once: one finish counted per job, on its first attempt.
    assert_eq!(
        sample(&metrics, "vqclip_jobs_finished_total{state=\"succeeded\"}"),
        Some(accepted.len() as f64),
        "{metrics}"
    );

    // The list walked by cursor returns each job once.
    let mut listed = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=100&cursor={c}"),
            None => "/v1/jobs?limit=100".to_owned(),
        };
        let page = server.get_json(&path).await;
        for job in page["jobs"].as_array().unwrap() {
            let id = job["id"].as_str().unwrap().to_owned();
            assert_eq!(job["state"], "succeeded", "{job}");
            assert_eq!(job["attempts"], 1, "ran more than once: {job}");
            assert!(listed.insert(id), "listed twice: {job}");
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed, accepted);

    let peak = peak_rss_kib(pid);
    println!(
        "load batch_size={batch_size}: {} of {LOAD_JOBS} accepted from {LOAD_CLIENTS} clients in {:.2} s \
         ({:.0} accepted/s); submit p50 {:.1} ms, p99 {:.1} ms; errors {errors:?} (no 5xx); \
         all {} finished once after {:.1} s; peak RSS {:.1} MiB",
        accepted.len(),
        submitted_in.as_secs_f64(),
        accepted.len() as f64 / submitted_in.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        accepted.len(),
        drained_in.as_secs_f64(),
        peak as f64 / 1024.0,
    );
    server.stop();
}

#[tokio::test]
#[ignore = "load test (about a minute); .ci/run runs it with --ignored"]
async fn load_1000_tiny_jobs_50_clients_batch_size_1() {
    load(1).await;
}

#[tokio::test]
#[ignore = "load test (about a minute); .ci/run runs it with --ignored"]
async fn load_1000_tiny_jobs_50_clients_batch_size_4() {
    load(4).await;
}
