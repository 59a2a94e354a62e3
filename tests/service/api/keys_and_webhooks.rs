//! API keys, per-key limits and webhooks through a real server on loopback,
//! rendering with the tiny fixture models.

use std::time::Duration;

use crate::support::{
    assert_signed, loopback_webhooks, problem_response, test_config, tiny_spec, InProcessServer,
    Receiver,
};
use axum::http::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use vqclip::auth::{KeyStore, LimitOverrides, NewKey};

const SECRET: &str = "whsec_aW50ZWdyYXRpb24tdGVzdC1zZWNyZXQ=";

struct Keys {
    store: KeyStore,
}

impl Keys {
    fn of(s: &InProcessServer) -> Keys {
        Keys {
            store: KeyStore::new(s.store.clone()),
        }
    }

    async fn create(&self, name: &str, admin: bool, limits: LimitOverrides) -> String {
        let new = NewKey {
            name: name.into(),
            admin,
            limits,
        };
        self.store.create(&new).await.unwrap().1
    }
}

/// Requests with a key (or none).
struct As<'a> {
    s: &'a InProcessServer,
    key: Option<&'a str>,
}

impl As<'_> {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.s.client.request(method, self.s.url(path));
        match self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }
    async fn get(&self, path: &str) -> reqwest::Response {
        self.req(reqwest::Method::GET, path).send().await.unwrap()
    }
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.req(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }
    async fn delete(&self, path: &str) -> reqwest::Response {
        self.req(reqwest::Method::DELETE, path)
            .send()
            .await
            .unwrap()
    }
    async fn submit(&self, spec: &Value) -> String {
        let r = self.post("/v1/jobs", spec).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
    async fn wait_terminal(&self, id: &str) -> Value {
        for _ in 0..600 {
            let job: Value = self
                .get(&format!("/v1/jobs/{id}"))
                .await
                .json()
                .await
                .unwrap();
            if ["succeeded", "failed", "canceled"].contains(&job["state"].as_str().unwrap_or("")) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {id} did not finish");
    }
}

async fn problem(r: reqwest::Response, status: StatusCode) -> (HeaderMap, Value) {
    problem_response(r, status.as_u16()).await
}

fn fast_keys(mut c: vqclip::config::Config) -> vqclip::config::Config {
    // Polling in these tests is faster than the default rate.
    c.auth.requests_per_second = 1000.0;
    c.auth.burst = 1000;
    c
}

#[tokio::test]
async fn keys_isolate_jobs_and_revoked_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(fast_keys(test_config(dir.path(), 1))).await;
    // Keys are off until the first one exists.
    let anon = As { s: &s, key: None };
    assert_eq!(anon.get("/v1/jobs").await.status(), StatusCode::OK);

    let keys = Keys::of(&s);
    let key_a = keys.create("a", false, LimitOverrides::default()).await;
    let key_b = keys.create("b", false, LimitOverrides::default()).await;
    let key_admin = keys.create("ops", true, LimitOverrides::default()).await;
    let (a, b, admin) = (
        As {
            s: &s,
            key: Some(&key_a),
        },
        As {
            s: &s,
            key: Some(&key_b),
        },
        As {
            s: &s,
            key: Some(&key_admin),
        },
    );

    // Now a key is needed, except for the probes and the spec.
    let (h, p) = problem(anon.get("/v1/jobs").await, StatusCode::UNAUTHORIZED).await;
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer"));
    let wrong = As {
        s: &s,
        key: Some("vq_not-a-key"),
    };
    problem(wrong.get("/v1/jobs").await, StatusCode::UNAUTHORIZED).await;
    for open in ["/healthz", "/openapi.yaml"] {
        assert_eq!(anon.get(open).await.status(), StatusCode::OK, "{open}");
    }
    assert_ne!(anon.get("/readyz").await.status(), StatusCode::UNAUTHORIZED);
    // /metrics: admin only, by default.
    problem(anon.get("/metrics").await, StatusCode::UNAUTHORIZED).await;
    problem(a.get("/metrics").await, StatusCode::FORBIDDEN).await;
    assert_eq!(admin.get("/metrics").await.status(), StatusCode::OK);

    let b_job = b.submit(&tiny_spec("b's apple", 4)).await;
    assert_eq!(b.wait_terminal(&b_job).await["state"], "succeeded");
    let a_job = a.submit(&tiny_spec("a's pear", 2)).await;
    a.wait_terminal(&a_job).await;

    // A sees nothing of B's job: every route answers 404, as for a job that
    // does not exist, so ids leak nothing.
    for path in [
        "",
        "/events",
        "/image.png",
        "/frames",
        "/frames/2.png",
        "/video.mp4",
        "/metadata.json",
        "/webhooks",
    ] {
        let path = format!("/v1/jobs/{b_job}{path}");
        problem(a.get(&path).await, StatusCode::NOT_FOUND).await;
        // B itself can read it.
        assert_eq!(b.get(&path).await.status(), StatusCode::OK, "{path}");
    }
    problem(
        a.post(&format!("/v1/jobs/{b_job}/cancel"), &json!({}))
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        a.delete(&format!("/v1/jobs/{b_job}")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let ids = |v: Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(a.get("/v1/jobs").await.json().await.unwrap()),
        std::slice::from_ref(&a_job)
    );
    assert_eq!(
        ids(b.get("/v1/jobs").await.json().await.unwrap()),
        std::slice::from_ref(&b_job)
    );
    // The admin sees both.
    let all = ids(admin.get("/v1/jobs").await.json().await.unwrap());
    assert!(all.contains(&a_job) && all.contains(&b_job), "{all:?}");
    assert_eq!(
        admin.get(&format!("/v1/jobs/{b_job}")).await.status(),
        StatusCode::OK
    );

    // B's job survived A's attempts; B deletes it itself.
    assert_eq!(
        b.delete(&format!("/v1/jobs/{b_job}")).await.status(),
        StatusCode::NO_CONTENT
    );

    // Revoked: 401 at once.
    keys.store.revoke("a").await.unwrap();
    let (_, p) = problem(a.get("/v1/jobs").await, StatusCode::UNAUTHORIZED).await;
    assert!(p["detail"].as_str().unwrap().contains("revoked"), "{p}");
    s.stop().await;
}

#[tokio::test]
async fn rate_and_queue_bounds_answer_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    // No workers: jobs stay queued.
    let s = InProcessServer::start(fast_keys(test_config(dir.path(), 0))).await;
    let keys = Keys::of(&s);
    let slow = keys
        .create(
            "slow",
            false,
            LimitOverrides {
                requests_per_second: Some(0.5),
                burst: Some(3),
                ..LimitOverrides::default()
            },
        )
        .await;
    let small = keys
        .create(
            "small",
            false,
            LimitOverrides {
                max_queued: Some(2),
                ..LimitOverrides::default()
            },
        )
        .await;
    let slow = As {
        s: &s,
        key: Some(&slow),
    };
    for _ in 0..3 {
        assert_eq!(slow.get("/v1/jobs").await.status(), StatusCode::OK);
    }
    let (h, p) = problem(slow.get("/v1/jobs").await, StatusCode::TOO_MANY_REQUESTS).await;
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    // One token comes back every 2 s.
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(p["detail"].as_str().unwrap().contains("per second"), "{p}");
    // Other keys are not slowed by it.
    let small = As {
        s: &s,
        key: Some(&small),
    };
    assert_eq!(small.get("/v1/jobs").await.status(), StatusCode::OK);

    small.submit(&tiny_spec("one", 2)).await;
    small.submit(&tiny_spec("two", 2)).await;
    let (h, p) = problem(
        small.post("/v1/jobs", &tiny_spec("three", 2)).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert!(h.contains_key("retry-after"));
    assert_eq!(p["type"], "urn:vqclip:problem:key-queue-full");
    // The refused job was not created.
    let listed: Value = small.get("/v1/jobs").await.json().await.unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 2);
    s.stop().await;
}

#[tokio::test]
async fn a_job_webhook_is_delivered_signed_and_listed() {
    let (hook_url, receiver) = Receiver::start(&[]).await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 1);
    let start_sender = loopback_webhooks(&mut config, SECRET);
    let s = InProcessServer::start(config).await;
    let (stop, sender) = start_sender(&s);
    let anon = As { s: &s, key: None };

    // Private targets are refused at submission.
    let mut spec = tiny_spec("hooked", 2);
    spec["webhook"] = json!({"url": "http://10.0.0.1/hook"});
    let (_, p) = problem(
        anon.post("/v1/jobs", &spec).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["field"], "webhook.url");
    assert!(p["detail"].as_str().unwrap().contains("private"), "{p}");

    spec["webhook"] = json!({"url": hook_url, "events": ["state", "completed"]});
    let id = anon.submit(&spec).await;
    assert_eq!(anon.wait_terminal(&id).await["state"], "succeeded");
    let mut types = vec![];
    for _ in 0..200 {
        types = receiver
            .got()
            .iter()
            .map(|r| {
                serde_json::from_str::<Value>(&r.body).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect::<Vec<_>>();
        if types.contains(&"job.completed".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // queued, running, then completed; the job's own state events in order.
    assert_eq!(types, ["job.state", "job.state", "job.completed"]);
    for r in &receiver.got() {
        assert_signed(SECRET, r);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["data"]["job_id"], id.as_str());
    }

    let mut history = Value::Null;
    for _ in 0..100 {
        history = anon
            .get(&format!("/v1/jobs/{id}/webhooks"))
            .await
            .json()
            .await
            .unwrap();
        if history["deliveries"]
            .as_array()
            .is_some_and(|d| d.len() == 3 && d.iter().all(|d| d["status"] == "delivered"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries = history["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 3, "{history}");
    for d in deliveries {
        assert_eq!(d["status"], "delivered", "{history}");
        assert_eq!(d["attempts"][0]["status_code"], 200);
        assert_eq!(d["url"], hook_url.as_str());
    }
    assert_eq!(history["webhook"]["url"], hook_url.as_str());
    stop.cancel();
    sender.await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn browsers_get_cors_answers_with_keys_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_keys(test_config(dir.path(), 0));
    config.server.cors_allowed_origins = vec!["https://app.example".into()];
    config.auth.metrics = vqclip::auth::MetricsAccess::Open;
    let s = InProcessServer::start(config).await;
    let key = Keys::of(&s)
        .create("web", false, LimitOverrides::default())
        .await;
    // A preflight carries no credentials; it is answered before the key check.
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/jobs"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    // A 401 still carries the CORS header, so the page can read why.
    let r = s.get_from_origin("/v1/jobs", "https://app.example").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let ok = s
        .client
        .get(s.url("/v1/jobs"))
        .header("origin", "https://app.example")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    // auth.metrics = "open": a scraper needs no key.
    assert_eq!(s.get("/metrics").await.status(), StatusCode::OK);
    s.stop().await;
}
