//! Load figures for the resolution note; ignored by default (they time, not check):
//! `cargo test --test service_load -- --ignored --nocapture`
//!
//! Spawns the real binary, measures its idle memory, keeps its worker busy with a long
//! job, then measures submit latency (one client, sequential) and accepted
//! submissions per second (concurrent clients) on loopback.

mod service_support;

use std::time::{Duration, Instant};

use serde_json::json;
use service_support::*;

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
