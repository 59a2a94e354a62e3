//! A real vqclip server on an ephemeral 127.0.0.1 port, with a temporary directory and
//! the tiny random-weight models in tests/fixtures. Shared by every service test.

/// The library's own per-test PostgreSQL database, the same file.
#[path = "../../../src/queue/postgres/testdb.rs"]
pub mod pg;
pub mod s3;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use vqclip::api::{self, AppState};
use vqclip::config::{Config, Overrides};
use vqclip::queue::{JobStore, Metrics, SqliteStore};
use vqclip::storage::ArtifactStore;
use vqclip::worker::{WorkerContext, WorkerPool};

/// A file or folder in tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Asserts the command succeeded and returns its stdout.
pub fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vqclip failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// How long a test waits for a tiny-model job to reach a state.
pub const LONG: Duration = Duration::from_secs(120);

/// The SQLite database a test keeps in `dir`.
pub fn database_url(dir: &Path) -> String {
    format!("sqlite://{}/vqclip.db", dir.display())
}

/// Opens (and migrates) the database in `dir`.
pub async fn open_store(dir: &Path, max_connections: u32) -> SqliteStore {
    SqliteStore::connect(&database_url(dir), Duration::from_secs(5), max_connections)
        .await
        .unwrap()
}

/// The defaults, pointed at `dir`, with short leases and heartbeats so tests are quick.
pub fn test_config(dir: &Path, workers: usize) -> Config {
    let mut c = Config::load_from(None, std::iter::empty(), &Overrides::default()).unwrap();
    c.server.bind = "127.0.0.1:0".parse().unwrap();
    c.server.sse_keep_alive_seconds = 1;
    c.server.retry_after_seconds = 3;
    c.database.url = database_url(dir);
    c.storage.artifact_dir = dir.join("artifacts");
    c.workers.count = workers;
    c.workers.devices = vec![];
    c.workers.lease_seconds = 3;
    c.workers.heartbeat_seconds = 1;
    c.workers.poll_interval_ms = 100;
    c.models.vqgan = fixture("vqgan-tiny").display().to_string();
    c.models.clip = vec![fixture("clip-tiny").display().to_string()];
    c
}

/// The API and its worker pool on the test's own runtime, against the real store and
/// artifact directory (`ServerProcess` is the built binary instead).
pub struct InProcessServer {
    pub api: Api,
    pub store: Arc<SqliteStore>,
    pub config: Config,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    pool: Option<WorkerPool>,
}

impl InProcessServer {
    pub async fn start(config: Config) -> InProcessServer {
        let store = Arc::new(
            SqliteStore::connect(&config.database.url, Duration::from_secs(5), 8)
                .await
                .unwrap(),
        );
        let artifacts = ArtifactStore::from_config(&config.storage).unwrap();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let devices = config.workers.worker_devices();
        let pool = if devices.is_empty() {
            None
        } else {
            let ctx = WorkerContext::new(
                store.clone(),
                artifacts.clone(),
                metrics.clone(),
                vqclip::worker::ArtifactUrls {
                    artifact: api::links::artifact,
                    frame: api::links::frame,
                },
                &config,
            );
            Some(
                WorkerPool::start(ctx, &devices, shutdown.clone())
                    .await
                    .unwrap(),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let auth = Arc::new(vqclip::auth::Authenticator::new(
            store.clone(),
            config.auth.clone(),
        ));
        let webhooks =
            vqclip::webhooks::WebhookEngine::new(store.clone(), config.webhooks.clone()).unwrap();
        let state = AppState {
            store: store.clone() as Arc<dyn JobStore>,
            artifacts,
            config: Arc::new(config.clone()),
            metrics,
            http_metrics: Arc::default(),
            auth,
            webhooks,
            shutdown: shutdown.clone(),
        };
        let server = tokio::spawn(api::serve(listener, state));
        InProcessServer {
            api: Api {
                base,
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .unwrap(),
            },
            store,
            config,
            shutdown,
            server,
            pool,
        }
    }

    /// Graceful stop: the HTTP server ends, running jobs checkpoint and requeue.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
        if let Some(pool) = self.pool {
            pool.join().await;
        }
        self.store.pool().close().await;
    }
}

impl std::ops::Deref for InProcessServer {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// A client of one running server's HTTP API.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn submit(&self, spec: &Value) -> Value {
        let r = self
            .client
            .post(self.url("/v1/jobs"))
            .json(spec)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "{body}");
        body
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    /// Polls until the job is in a terminal state.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            let state = job["state"].as_str().unwrap_or("").to_owned();
            if ["succeeded", "failed", "canceled"].contains(&state.as_str()) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} still {state} after {timeout:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state(&self, id: &str, want: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if job["state"] == want {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} never became {want}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the job has rendered at least `at_least` steps.
    pub async fn wait_step(&self, id: &str, at_least: u64, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if job["progress"]["step"].as_u64().unwrap_or(0) >= at_least {
                return job;
            }
            assert!(tokio::time::Instant::now() < deadline, "{job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The job's SSE stream, resumed after `last_event_id` if given, until it ends
    /// or `max` events arrived.
    pub async fn events(&self, id: &str, last_event_id: Option<i64>, max: usize) -> Vec<SseEvent> {
        let mut req = self.client.get(self.url(&format!("/v1/jobs/{id}/events")));
        if let Some(last) = last_event_id {
            req = req.header("last-event-id", last.to_string());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::timeout(LONG, read_events(r, max))
            .await
            .expect("the event stream ends after the terminal event")
    }

    /// The `/metrics` exposition text.
    pub async fn metrics(&self) -> String {
        self.get_text("/metrics").await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// A GET as a browser page on `origin` sends it.
    pub async fn get_from_origin(&self, path: &str, origin: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header("origin", origin)
            .send()
            .await
            .unwrap()
    }

    /// POST without a body.
    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.client.post(self.url(path)).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.unwrap()
    }

    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.unwrap()
    }

    pub async fn get_bytes(&self, path: &str) -> bytes::Bytes {
        self.get(path).await.bytes().await.unwrap()
    }
}

/// A job small enough to render in well under a second on the tiny models.
pub fn tiny_spec(prompt: &str, steps: u32) -> Value {
    json!({
        "prompts": prompt,
        "width": 32,
        "height": 32,
        "steps": steps,
        "cutn": 2,
        "save_every": 2,
        "seed": 7,
        // Augmentations are the render's business; they only slow these tests down.
        "augments": [],
    })
}

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: i64,
    pub event: String,
    pub data: Value,
}

/// Reads SSE events until the stream ends or `max` events arrived.
pub async fn read_events(response: reqwest::Response, max: usize) -> Vec<SseEvent> {
    use futures::StreamExt;
    let mut stream = response.bytes_stream();
    let mut buf = String::new();
    let mut events = vec![];
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut ev = SseEvent {
                id: -1,
                event: String::new(),
                data: Value::Null,
            };
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().parse().unwrap();
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if ev.id >= 0 {
                ev.data = serde_json::from_str(&data).unwrap();
                events.push(ev);
                if events.len() >= max {
                    return events;
                }
            }
        }
    }
    events
}

/// Writes `dir/vqclip.toml` for the real binary: loopback on an ephemeral port, the
/// database and artifacts under `dir`, the tiny fixture models, then `sections`
/// (whole TOML tables such as `[workers]`, which must not repeat the ones written here).
pub fn write_config_file(dir: &Path, sections: &str) -> PathBuf {
    let path = dir.join("vqclip.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[database]\nurl = \"{db}\"\n\
             [storage]\nartifact_dir = \"{d}/artifacts\"\n\
             [models]\nvqgan = \"{v}\"\nclip = [\"{c}\"]\n{sections}",
            db = database_url(dir),
            d = dir.display(),
            v = fixture("vqgan-tiny").display(),
            c = fixture("clip-tiny").display(),
        ),
    )
    .unwrap();
    path
}

/// The real `vqclip serve` binary in its own process.
pub struct ServerProcess {
    pub child: Child,
    pub api: Api,
}

impl std::ops::Deref for ServerProcess {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl ServerProcess {
    /// Starts `vqclip serve --config config` with `VQCLIP_LOG=log` and waits for the
    /// "listening" line, whose address becomes `base`.
    pub fn spawn(config: &Path, log: &str) -> ServerProcess {
        ServerProcess::spawn_with(config, log, &[], None)
    }

    /// SIGTERM, then asserts the graceful exit succeeded.
    pub fn stop(mut self) {
        sigterm(&self.child);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

/// Asks a child process to shut down gracefully.
pub fn sigterm(child: &Child) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// The webhook sender beside an in-process server, as `vqclip serve` runs it; `config`
/// is first set to sign with `secret` and to deliver to loopback receivers quickly.
/// Cancel the token and await the handle to stop it.
pub fn loopback_webhooks(
    config: &mut Config,
    secret: &str,
) -> impl FnOnce(&InProcessServer) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    config.webhooks.secret = secret.into();
    config.webhooks.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
    config.webhooks.poll_interval_ms = Duration::from_millis(50);
    let webhooks = config.webhooks.clone();
    move |server| {
        let engine = vqclip::webhooks::WebhookEngine::new(server.store.clone(), webhooks).unwrap();
        let stop = CancellationToken::new();
        let sender = engine.spawn(stop.clone());
        (stop, sender)
    }
}

/// One webhook request as a receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub timestamp: i64,
    pub signature: String,
    pub body: String,
}

/// A webhook target on 127.0.0.1 that records every request.
#[derive(Clone, Default)]
pub struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Status codes to answer with, in order; 200 once they run out.
    script: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    /// Starts a receiver answering `script` in order, then 200; returns its hook URL.
    pub async fn start(script: &[u16]) -> (String, Receiver) {
        let r = Receiver::default();
        r.script.lock().unwrap().extend(script);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://127.0.0.1:{port}/hook"), r)
    }

    pub fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::http::StatusCode {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    r.got.lock().unwrap().push(Received {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp").parse().unwrap_or(0),
        signature: h("webhook-signature"),
        body,
    });
    let code = r.script.lock().unwrap().pop_front().unwrap_or(200);
    axum::http::StatusCode::from_u16(code).unwrap()
}

/// Asserts the delivery carries a valid, current signature made with `secret`.
pub fn assert_signed(secret: &str, r: &Received) {
    let now = chrono::Utc::now().timestamp();
    vqclip::webhooks::verify(
        secret,
        &r.id,
        r.timestamp,
        r.body.as_bytes(),
        &r.signature,
        now,
        300,
    )
    .unwrap_or_else(|e| panic!("delivery {} failed verification: {e}", r.id));
}

/// Asserts a problem+json answer with `status`; returns its headers and the problem.
pub async fn problem_response(
    r: reqwest::Response,
    status: u16,
) -> (reqwest::header::HeaderMap, Value) {
    let url = r.url().clone();
    let got = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await.unwrap();
    assert_eq!(got, status, "{url}: {body}");
    let ct = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(ct, "application/problem+json", "{url}: {body}");
    (headers, serde_json::from_str(&body).unwrap())
}

/// Asserts a complete problem+json answer with `status` (its own status, a vqclip
/// problem type, a title and a detail), returning the problem.
pub async fn problem(r: reqwest::Response, status: u16) -> Value {
    let (_, p) = problem_response(r, status).await;
    assert_eq!(p["status"], status);
    assert!(p["type"]
        .as_str()
        .unwrap()
        .starts_with("urn:vqclip:problem:"));
    assert!(!p["title"].as_str().unwrap().is_empty());
    assert!(!p["detail"].as_str().unwrap().is_empty());
    p
}

impl ServerProcess {
    /// As [`ServerProcess::spawn`], with extra environment variables and, when
    /// `stderr_to` is given, the server's log written to that file.
    pub fn spawn_with(
        config: &Path,
        log: &str,
        env: &[(&str, &str)],
        stderr_to: Option<&Path>,
    ) -> ServerProcess {
        let stderr = match stderr_to {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::inherit(),
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_vqclip"));
        command
            .args(["serve", "--config"])
            .arg(config)
            .env("VQCLIP_LOG", log)
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("vqclip listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        ServerProcess {
            child,
            api: Api {
                base,
                client: reqwest::Client::new(),
            },
        }
    }
}

/// SIGKILL: the process gets no chance to clean up (a crash, an OOM kill).
pub fn sigkill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}
