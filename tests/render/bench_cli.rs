//! `vqclip bench` through the built binary on the tiny fixtures: batched and one
//! after another, reported as JSON.

use std::process::Output;

use crate::support::{fixture, offline_vqclip};

use serde_json::Value;

fn bench(extra: &[&str]) -> Output {
    let (clip, vqgan) = (
        fixture("clip-tiny").display().to_string(),
        fixture("vqgan-tiny").display().to_string(),
    );
    let mut args = vec![
        "bench",
        "--clip",
        &clip,
        "--vqgan",
        &vqgan,
        "--size",
        "16",
        "--cutn",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--augments",
        "",
        "--device",
        "cpu",
        "--json",
    ];
    args.extend_from_slice(extra);
    offline_vqclip(&args)
}

fn report(extra: &[&str]) -> Value {
    let out = bench(extra);
    assert!(
        out.status.success(),
        "vqclip bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_reports_job_steps_batched_and_one_after_another() {
    for (flags, batched) in [
        (&["--batch", "3"][..], true),
        (&["--batch", "3", "--no-batch"][..], false),
    ] {
        let r = report(flags);
        assert_eq!(r["batch"], 3);
        assert_eq!(r["batched"], batched);
        let steps = r["steps_per_s"].as_f64().unwrap();
        let job_steps = r["job_steps_per_s"].as_f64().unwrap();
        assert!(steps > 0.0 && (job_steps - 3.0 * steps).abs() < 1e-9 * job_steps);
        assert!(
            r["median_ms_per_step"].as_f64().unwrap() >= r["min_ms_per_step"].as_f64().unwrap()
        );
    }
}

#[test]
fn bench_refuses_an_empty_batch() {
    let out = bench(&["--batch", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--batch must be at least 1"), "{err}");
}
