//! The real `vqclip serve` binary: a job's webhook is delivered by the server's
//! own sender, a delivery still pending when the server stops is retried by the
//! next start, and keys created with `vqclip keys` take effect on the server.

use std::process::Command;
use std::time::Duration;

use crate::support::{assert_signed, tiny_spec, write_config_file, Receiver, ServerProcess};
use axum::http::StatusCode;
use serde_json::{json, Value};

const SECRET: &str = "whsec_c2VydmUtdGVzdC1zZWNyZXQtYnl0ZXM=";

async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..600 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_server_delivers_and_a_pending_retry_survives_its_restart() {
    let (hook, receiver) = Receiver::start(&[500]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_file(
        dir.path(),
        &format!(
            r#"
[workers]
count = 1
poll_interval_ms = 100
[webhooks]
secret = "{SECRET}"
allowed_networks = ["127.0.0.0/8"]
# Long enough that the retry is still pending when the server stops.
initial_backoff_ms = 3000
poll_interval_ms = 100
"#
        ),
    );
    let client = reqwest::Client::new();

    let first = ServerProcess::spawn(&config, "error");
    let mut spec = tiny_spec("delivered later", 2);
    spec["webhook"] = json!({ "url": hook });
    let job = first.submit(&spec).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let history_url = |base: &str| format!("{base}/v1/jobs/{id}/webhooks");
    // The first attempt fails with a 500; the retry is scheduled seconds away.
    let pending = poll("the first attempt", async || {
        let h: Value = client
            .get(history_url(&first.base))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let d = h["deliveries"].get(0)?.clone();
        (d["attempts"].as_array()?.len() == 1).then_some(d)
    })
    .await;
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["event"], "completed");
    assert_eq!(pending["attempts"][0]["status_code"], 500);
    first.stop();

    // Between the two lives, an admin key is created: keys are now on.
    let out = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["keys", "create", "--name", "ops", "--admin", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let second = ServerProcess::spawn(&config, "error");
    let r = client.get(history_url(&second.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let done = poll("the retry after the restart", async || {
        let h: Value = client
            .get(history_url(&second.base))
            .bearer_auth(&key)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let d = h["deliveries"].get(0)?.clone();
        (d["status"] == "delivered").then_some(d)
    })
    .await;
    let codes: Vec<&Value> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status_code"])
        .collect();
    assert_eq!(codes, [&json!(500), &json!(200)]);
    second.stop();

    let got = receiver.got();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.id, done["id"].as_str().unwrap());
        assert_signed(SECRET, r);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["type"], "job.completed");
        assert_eq!(v["data"]["job_id"], id.as_str());
    }
}
