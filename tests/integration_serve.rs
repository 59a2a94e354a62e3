//! The real `vqclip serve` binary: a job's webhook is delivered by the server's
//! own sender, a delivery still pending when the server stops is retried by the
//! next start, and keys created with `vqclip keys` take effect on the server.

mod service_support;

use std::collections::VecDeque;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use service_support::{tiny_spec, write_config_file, ServerProcess};
use vqclip::webhooks::verify;

const SECRET: &str = "whsec_c2VydmUtdGVzdC1zZWNyZXQtYnl0ZXM=";

type Received = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A receiver on loopback answering `script` in order, then 200.
async fn receiver(script: &[u16]) -> (String, Received) {
    use axum::routing::post;
    let got: Received = Arc::default();
    let answers = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: String| {
            let (sink, answers) = (sink.clone(), answers.clone());
            async move {
                sink.lock().unwrap().push((headers, body));
                let code = answers.lock().unwrap().pop_front().unwrap_or(200);
                StatusCode::from_u16(code).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

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
    let (hook, got) = receiver(&[500]).await;
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
    let job: Value = client
        .post(format!("{}/v1/jobs", first.base))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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

    let got = got.lock().unwrap();
    assert_eq!(got.len(), 2);
    let now = chrono::Utc::now().timestamp();
    for (h, body) in got.iter() {
        let hv = |n: &str| h[n].to_str().unwrap().to_owned();
        assert_eq!(hv("webhook-id"), done["id"].as_str().unwrap());
        verify(
            SECRET,
            &hv("webhook-id"),
            hv("webhook-timestamp").parse().unwrap(),
            body.as_bytes(),
            &hv("webhook-signature"),
            now,
            300,
        )
        .unwrap();
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "job.completed");
        assert_eq!(v["data"]["job_id"], id.as_str());
    }
}
