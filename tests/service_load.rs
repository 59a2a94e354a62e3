//! Load figures for the resolution note; ignored by default (they time, not check):
//! `cargo test --test service_load -- --ignored --nocapture`
//!
//! Spawns the real binary, measures its idle memory, keeps its worker busy with a long
//! job, then measures submit latency (one client, sequential) and accepted
//! submissions per second (concurrent clients) on loopback.

mod service_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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
    let config = dir.path().join("vqclip.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{d}/vqclip.db\"\n\
             [storage]\nartifact_dir = \"{d}/artifacts\"\n[limits]\nmax_queued_jobs = 1000000\n\
             [models]\nvqgan = \"{v}\"\nclip = [\"{c}\"]\n",
            d = dir.path().display(),
            v = fixture("vqgan-tiny").display(),
            c = fixture("clip-tiny").display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("VQCLIP_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("vqclip listening on ")
        .unwrap()
        .to_owned();
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
