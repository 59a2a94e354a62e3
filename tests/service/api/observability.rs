//! What operators and browsers get from a real `vqclip serve` process: request ids in
//! the answer, the problem+json and the log; text and JSON logs without colour codes
//! on a pipe; `vqclip healthcheck`; the page and `/docs` served from the binary.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// `vqclip serve` on a free port, API only, with stderr collected.
    fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_with_workers(dir, env, 0)
    }

    /// As [`Server::start`], with `workers` workers on the tiny fixture models.
    fn start_with_workers(dir: &Path, env: &[(&str, &str)], workers: usize) -> Server {
        let config = dir.join("config.toml");
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        std::fs::write(
            &config,
            format!(
                "[server]\nbind = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{d}/vqclip.db\"\n\
                 [storage]\nartifact_dir = \"{d}/artifacts\"\n[workers]\ncount = {workers}\n\
                 poll_interval_ms = 100\n[models]\nvqgan = \"{f}/vqgan-tiny\"\nclip = [\"{f}/clip-tiny\"]\n",
                d = dir.display(),
                f = fixtures.display(),
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vqclip"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("VQCLIP_CONFIG")
            .env("VQCLIP_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("vqclip listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}: {}", log.lock().unwrap()))
            .to_owned();
        Server { child, base, log }
    }

    /// The collected stderr once it holds `needle` (or after 60 s, for the assertion).
    fn log_containing(&self, needle: &str) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log.lock().unwrap().clone();
            if log.contains(needle) || Instant::now() > until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn refused_with_id(server: &Server, id: &str) -> Value {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/jobs/not-a-job-id", server.base))
        .header("x-request-id", id)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    assert_eq!(response.headers()["x-request-id"], id);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_client_request_id_is_echoed_logged_and_named_by_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let problem = refused_with_id(&server, "client-req-7f3a").await;
    assert_eq!(problem["instance"], "urn:vqclip:request:client-req-7f3a");
    let log = server.log_containing("client-req-7f3a");
    let line = log
        .lines()
        .find(|l| l.contains("client-req-7f3a"))
        .unwrap_or_else(|| panic!("no log line names the request id:\n{log}"));
    assert!(line.contains("status=4"), "{line}");
    // stderr is a pipe here: no colour codes.
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a piped log:\n{log}"
    );

    // Without one, the server makes one up and uses it alike.
    let response = reqwest::get(format!("{}/v1/jobs/nope", server.base))
        .await
        .unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["instance"], format!("urn:vqclip:request:{id}"));

    // An id that could forge log lines is replaced, not echoed.
    let response = reqwest::Client::new()
        .get(format!("{}/healthz", server.base))
        .header("x-request-id", "evil id\" level=error")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}

#[tokio::test]
async fn json_logs_carry_the_request_id_as_a_span_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("VQCLIP_LOGGING_FORMAT", "json")]);
    refused_with_id(&server, "json-req-1").await;
    let log = server.log_containing("json-req-1");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let refused = lines
        .iter()
        .find(|l| l["span"]["request_id"] == "json-req-1")
        .unwrap_or_else(|| panic!("no JSON line with the request span:\n{log}"));
    assert_eq!(refused["span"]["name"], "request");
    assert!(refused["fields"]["status"].as_u64().is_some(), "{refused}");
    assert!(!log.contains('\u{1b}'));

    // A job route's lines name the job as well.
    let job = "01936f3e-0000-7000-8000-000000000000";
    let response = reqwest::Client::new()
        .get(format!("{}/v1/jobs/{job}", server.base))
        .header("x-request-id", "json-req-2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let log = server.log_containing("json-req-2");
    let line: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["span"]["request_id"] == "json-req-2")
        .unwrap_or_else(|| panic!("no line for json-req-2:\n{log}"));
    assert_eq!(line["span"]["job_id"], job);
}

#[test]
fn an_unknown_log_format_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["migrate", "--database-url"])
        .arg(format!("sqlite://{}/x.db", dir.path().display()))
        .env_remove("VQCLIP_CONFIG")
        .env("VQCLIP_LOGGING_FORMAT", "xml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("xml"), "{stderr}");
}

fn healthcheck(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["healthcheck", "--timeout-seconds", "3", "--url", url])
        .env_remove("VQCLIP_CONFIG")
        .output()
        .unwrap()
}

#[tokio::test]
async fn healthcheck_exits_zero_while_the_server_answers_and_non_zero_once_it_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let url = format!("{}/healthz", server.base);
    let up = healthcheck(&url);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // A server that answers, but not 2xx, is not healthy either.
    let wrong = healthcheck(&format!("{}/no-such-probe", server.base));
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("404"));

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let down = healthcheck(&url);
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("did not answer"));
}

#[tokio::test]
async fn the_page_and_the_docs_are_served_from_the_binary_with_nothing_external() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let get = |path: &str| reqwest::get(format!("{}{path}", server.base));
    let page = get("/").await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'self'"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/ui/app.js") && html.contains("/ui/app.css"));
    for asset in ["/ui/app.js", "/ui/app.css"] {
        let body = get(asset).await.unwrap().text().await.unwrap();
        assert!(body.len() > 1000, "{asset}");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{asset}"
        );
    }
    let config: Value = get("/ui/config.json").await.unwrap().json().await.unwrap();
    assert_eq!(config["keys"], false);
    assert!(config["models"]["clip"]
        .as_array()
        .unwrap()
        .contains(&"ViT-B/32".into()));

    let docs = get("/docs/").await.unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    let init = get("/docs/swagger-initializer.js")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.yaml"), "{init}");
    for text in [&html, &init] {
        assert!(
            !text.contains("https://") && !text.contains("http://"),
            "{text}"
        );
    }
    let js = get("/docs/swagger-ui-bundle.js").await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.bytes().await.unwrap().len() > 100_000);
    assert_eq!(get("/docs").await.unwrap().status(), 200);
    assert_eq!(get("/docs/nope.js").await.unwrap().status(), 404);
    drop(server);

    // With keys required, the page and docs still load (they hold no data); the API
    // behind them does not answer without a key, and the page is told to ask for one.
    let keyed = Server::start(dir.path(), &[("VQCLIP_AUTH_REQUIRED", "true")]);
    let get = |path: &str| reqwest::get(format!("{}{path}", keyed.base));
    for open in ["/", "/ui/app.js", "/docs/"] {
        assert_eq!(get(open).await.unwrap().status(), 200, "{open}");
    }
    let config: Value = get("/ui/config.json").await.unwrap().json().await.unwrap();
    assert_eq!(config["keys"], true);
    assert_eq!(get("/v1/jobs").await.unwrap().status(), 401);
}

#[tokio::test]
async fn a_job_logs_under_its_id_in_the_worker_and_the_render_sums_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_workers(dir.path(), &[("VQCLIP_LOGGING_FORMAT", "json")], 1);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/jobs", server.base))
        .json(&serde_json::json!({
            "prompts": "a lighthouse", "width": 32, "height": 32, "steps": 3, "cutn": 2,
            "save_every": 0, "seed": 1
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let job: Value = response.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let log = server.log_containing("render completed");
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let summary = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("render completed"))
        })
        .unwrap_or_else(|| panic!("no render summary:\n{log}"));
    assert_eq!(summary["span"]["job"], id.as_str(), "{summary}");
    assert_eq!(summary["fields"]["steps"], 3, "{summary}");
    assert_eq!(summary["fields"]["device"], "Cpu", "{summary}");
    assert!(summary["fields"]["seconds"].as_f64().unwrap() > 0.0);
    assert!(summary["fields"]["vqgan"]
        .as_str()
        .unwrap()
        .ends_with("vqgan-tiny"));
    let log = server.log_containing("job succeeded");
    let worker_end = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "job succeeded")
        .unwrap_or_else(|| panic!("no end of the job:\n{log}"));
    assert_eq!(worker_end["span"]["name"], "job");
    assert_eq!(worker_end["span"]["job_id"], id.as_str(), "{worker_end}");
}
