//! Webhook deliveries end to end: a receiver on loopback verifies every
//! signature; retries, restarts, throttling and SSRF refusals are checked
//! against what it actually received and what the database recorded.

use crate::support::{assert_signed, open_store, Receiver};
use sqlx::SqlitePool;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use vqclip::queue::{Deliveries, JobStore, NewJob, PgStore, SqliteStore};
use vqclip::webhooks::{
    verify, DeliveryStatus, EventKind, OutgoingEvent, VerifyError, WebhookConfig, WebhookEngine,
    WebhookError, WebhookSpec,
};

const SECRET: &str = "whsec_c2VjcmV0LWZvci10aGUtd2ViaG9vay10ZXN0cw==";

/// The server's database: the job store's migrations include the webhook tables.
async fn open_pool(dir: &Path) -> SqlitePool {
    open_store(dir, 4).await.pool().clone()
}

/// The deliveries of the server's database, as an engine holds them.
fn deliveries(pool: &SqlitePool) -> Arc<dyn Deliveries> {
    Arc::new(SqliteStore::from_pool(pool.clone()))
}

/// A queued job (deliveries belong to jobs), with `webhook` in its spec.
async fn job(pool: &SqlitePool, webhook: Option<&WebhookSpec>) -> String {
    submit(&SqliteStore::from_pool(pool.clone()), webhook)
        .await
        .to_string()
}

fn config() -> WebhookConfig {
    WebhookConfig {
        secret: SECRET.into(),
        max_attempts: 4,
        initial_backoff_ms: Duration::from_millis(100),
        max_backoff_ms: Duration::from_secs(1),
        timeout_ms: Duration::from_secs(2),
        progress_interval_ms: Duration::from_millis(300),
        poll_interval_ms: Duration::from_millis(50),
        concurrency: 4,
        allow_private_targets: false,
        // Tests allow loopback explicitly; everything else private stays refused.
        allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
    }
}

fn spec(url: &str, events: &[EventKind]) -> WebhookSpec {
    WebhookSpec {
        url: url.to_owned(),
        events: events.to_vec(),
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn delivery_is_signed_and_retried_after_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = Receiver::start(&[500]).await;
    let pool = open_pool(dir.path()).await;
    let job1 = job(&pool, None).await;
    let engine = WebhookEngine::new(deliveries(&pool), config()).unwrap();
    let stop = CancellationToken::new();
    let sender = engine.spawn(stop.clone());

    let hook = spec(&url, &[EventKind::Completed]);
    engine.validate(&hook).await.unwrap();
    let id = engine
        .publish(
            &hook,
            OutgoingEvent::now(
                &*job1,
                EventKind::Completed,
                serde_json::json!({"state": "succeeded"}),
            ),
        )
        .await
        .unwrap()
        .expect("completed is subscribed");

    wait_until("the retry", || receiver.got().len() == 2).await;
    let got = receiver.got();
    for r in &got {
        assert_eq!(r.id, id, "a retry keeps the webhook-id");
        assert_signed(SECRET, r);
    }
    let body: serde_json::Value = serde_json::from_str(&got[1].body).unwrap();
    assert_eq!(body["type"], "job.completed");
    assert_eq!(body["data"]["job_id"], job1.as_str());
    assert_eq!(body["data"]["state"], "succeeded");

    // The history says what happened, attempt by attempt.
    let mut history = engine.history(&job1).await.unwrap();
    for _ in 0..50 {
        if history[0].status == DeliveryStatus::Delivered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        history = engine.history(&job1).await.unwrap();
    }
    assert_eq!(history.len(), 1);
    let d = &history[0];
    assert_eq!(d.status, DeliveryStatus::Delivered);
    let codes: Vec<_> = d.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, [Some(500), Some(200)]);
    assert_eq!(d.attempts[0].error.as_deref(), Some("HTTP 500"));
    // The retry waited at least half the first backoff step.
    assert!(d.attempts[1].at - d.attempts[0].at >= chrono::Duration::milliseconds(50));
    assert!(d.next_attempt_at.is_none());

    stop.cancel();
    sender.await.unwrap();
}

#[tokio::test]
async fn a_wrong_signature_is_detectably_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = Receiver::start(&[]).await;
    let pool = open_pool(dir.path()).await;
    let job2 = job(&pool, None).await;
    let engine = WebhookEngine::new(deliveries(&pool), config()).unwrap();
    let hook = spec(&url, &[EventKind::Failed]);
    engine
        .publish(
            &hook,
            OutgoingEvent::now(&*job2, EventKind::Failed, serde_json::json!({"error": "x"})),
        )
        .await
        .unwrap();
    engine.deliver_due().await.unwrap();
    let r = receiver.got().pop().expect("one delivery");
    assert_signed(SECRET, &r);
    let now = chrono::Utc::now().timestamp();
    let check = |secret: &str, id: &str, ts: i64, body: &str, sig: &str| {
        verify(secret, id, ts, body.as_bytes(), sig, now, 300)
    };
    let other_secret = "whsec_b3RoZXItc2VjcmV0";
    assert_eq!(
        check(other_secret, &r.id, r.timestamp, &r.body, &r.signature),
        Err(VerifyError::NoMatch)
    );
    let tampered = r
        .body
        .replace(&job2, "00000000-0000-0000-0000-000000000000");
    assert_eq!(
        check(SECRET, &r.id, r.timestamp, &tampered, &r.signature),
        Err(VerifyError::NoMatch)
    );
    assert_eq!(
        check(SECRET, "msg_replayed", r.timestamp, &r.body, &r.signature),
        Err(VerifyError::NoMatch)
    );
    assert_eq!(
        check(SECRET, &r.id, r.timestamp + 1, &r.body, &r.signature),
        Err(VerifyError::NoMatch)
    );
    let mut flipped = r.signature.clone().into_bytes();
    let last = flipped.len() - 2;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    assert_eq!(
        check(SECRET, &r.id, r.timestamp, &r.body, &flipped),
        Err(VerifyError::NoMatch)
    );
}

#[tokio::test]
async fn a_pending_delivery_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = Receiver::start(&[503]).await;
    let hook = spec(&url, &[EventKind::Canceled]);

    // First life: one failed attempt, then the server stops before the retry.
    let first_pool = open_pool(dir.path()).await;
    let job3 = job(&first_pool, None).await;
    let engine = WebhookEngine::new(
        deliveries(&first_pool),
        WebhookConfig {
            initial_backoff_ms: Duration::from_millis(400),
            ..config()
        },
    )
    .unwrap();
    let stop = CancellationToken::new();
    let sender = engine.spawn(stop.clone());
    engine
        .publish(
            &hook,
            OutgoingEvent::now(&*job3, EventKind::Canceled, serde_json::json!({})),
        )
        .await
        .unwrap();
    wait_until("the first attempt", || receiver.got().len() == 1).await;
    stop.cancel();
    sender.await.unwrap();
    let before = engine.history(&job3).await.unwrap();
    drop(engine);
    first_pool.close().await;
    assert_eq!(before[0].status, DeliveryStatus::Pending);
    assert_eq!(before[0].attempts.len(), 1);
    // A delivery queued but never attempted before the stop survives too.
    let second_pool = open_pool(dir.path()).await;
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, job_id, event, url, payload, created_at, next_attempt_at, updated_at)
         VALUES ('msg_unsent', ?, 'state', ?, '{}', 0, 0, 0)",
    )
    .bind(&job3)
    .bind(&url)
    .execute(&second_pool)
    .await
    .unwrap();

    // Second life: a new engine on the same database finishes both.
    let engine = WebhookEngine::new(deliveries(&second_pool), config()).unwrap();
    let stop = CancellationToken::new();
    let sender = engine.spawn(stop.clone());
    wait_until("both deliveries after the restart", || {
        receiver.got().len() == 3
    })
    .await;
    let got = receiver.got();
    assert!(got[1..].iter().any(|r| r.id == got[0].id));
    assert!(got[1..].iter().any(|r| r.id == "msg_unsent"));
    got.iter().for_each(|r| assert_signed(SECRET, r));
    let mut settled = false;
    for _ in 0..50 {
        let h = engine.history(&job3).await.unwrap();
        if h.iter().all(|d| d.status == DeliveryStatus::Delivered) {
            let first = h.iter().find(|d| d.id == got[0].id).unwrap();
            let codes: Vec<_> = first.attempts.iter().map(|a| a.status_code).collect();
            assert_eq!(codes, [Some(503), Some(200)]);
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled, "deliveries were not all marked delivered");
    stop.cancel();
    sender.await.unwrap();
}

#[tokio::test]
async fn progress_is_throttled_per_job_and_unsubscribed_events_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = Receiver::start(&[]).await;
    let pool = open_pool(dir.path()).await;
    let (job_a, job_b) = (job(&pool, None).await, job(&pool, None).await);
    let engine = WebhookEngine::new(deliveries(&pool), config()).unwrap();
    let hook = spec(&url, &[EventKind::Progress, EventKind::Completed]);
    let interval = config().progress_interval_ms;

    let start = Instant::now();
    let mut queued_at = [Vec::new(), Vec::new()];
    for step in 0..30 {
        for (j, job) in [&job_a, &job_b].iter().enumerate() {
            let queued = engine
                .publish(
                    &hook,
                    OutgoingEvent::now(
                        *job,
                        EventKind::Progress,
                        serde_json::json!({"step": step}),
                    ),
                )
                .await
                .unwrap();
            if queued.is_some() {
                queued_at[j].push(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let elapsed = start.elapsed();
    let most = (elapsed.as_millis() / interval.as_millis()) as usize + 1;
    for (times, job) in queued_at.iter().zip([&job_a, &job_b]) {
        // About one per interval: never more, and not starved either.
        assert!(
            times.len() >= 3 && times.len() <= most,
            "{} progress deliveries in {elapsed:?}",
            times.len()
        );
        // The stored deliveries are the queued ones, a full interval apart in
        // event time.
        let stored: Vec<_> = engine
            .history(job)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.created_at)
            .collect();
        assert_eq!(stored.len(), times.len());
        for pair in stored.windows(2) {
            assert!(
                (pair[1] - pair[0]).to_std().unwrap() >= interval,
                "{stored:?}"
            );
        }
    }
    // Not subscribed: never queued.
    let frame = engine
        .publish(
            &hook,
            OutgoingEvent::now(&*job_a, EventKind::Frame, serde_json::json!({"step": 3})),
        )
        .await
        .unwrap();
    assert!(frame.is_none());
    // A terminal event always goes out, throttle or not.
    let done = engine
        .publish(
            &hook,
            OutgoingEvent::now(&*job_a, EventKind::Completed, serde_json::json!({})),
        )
        .await
        .unwrap();
    assert!(done.is_some());

    engine.deliver_due().await.unwrap();
    let got = receiver.got();
    assert_eq!(got.len(), queued_at[0].len() + queued_at[1].len() + 1);
    got.iter().for_each(|r| assert_signed(SECRET, r));
    let types: Vec<String> = got
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["type"].to_string())
        .collect();
    assert!(types
        .iter()
        .all(|t| t == "\"job.progress\"" || t == "\"job.completed\""));
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = Receiver::start(&[]).await;
    let pool = open_pool(dir.path()).await;
    let (job_lit, job_name) = (job(&pool, None).await, job(&pool, None).await);
    let strict = WebhookEngine::new(
        deliveries(&pool),
        WebhookConfig {
            allowed_networks: vec![],
            ..config()
        },
    )
    .unwrap();
    let port = url.rsplit(':').next().unwrap();
    let by_name = format!("http://localhost:{port}");
    for target in [
        url.as_str(),
        by_name.as_str(),
        "http://10.0.0.1/x",
        "http://[::1]/x",
    ] {
        let err = strict
            .validate(&spec(target, &[EventKind::Completed]))
            .await
            .unwrap_err();
        assert!(matches!(err, WebhookError::Target(_)), "{target}: {err}");
    }
    assert!(matches!(
        strict
            .validate(&spec("file:///etc/passwd", &[EventKind::Completed]))
            .await,
        Err(WebhookError::Target(_))
    ));

    // Even a delivery already in the database (accepted under a looser
    // config) is refused at send time, by IP literal and by name.
    for (job, target) in [
        (&job_lit, url.clone()),
        (&job_name, format!("{by_name}/hook")),
    ] {
        strict
            .publish(
                &spec(&target, &[EventKind::Completed]),
                OutgoingEvent::now(job, EventKind::Completed, serde_json::json!({})),
            )
            .await
            .unwrap();
    }
    strict.deliver_due().await.unwrap();
    assert!(receiver.got().is_empty(), "a refused target was contacted");
    for job in [&job_lit, &job_name] {
        let h = strict.history(job).await.unwrap();
        assert_eq!(h[0].status, DeliveryStatus::Failed, "{job}");
        assert_eq!(h[0].attempts.len(), 1, "refusals are not retried");
        let error = h[0].attempts[0].error.clone().unwrap();
        assert!(error.contains("loopback"), "{job}: {error}");
    }

    // The test config allows loopback explicitly, and then it works.
    let allowed = WebhookEngine::new(deliveries(&pool), config()).unwrap();
    allowed
        .validate(&spec(&url, &[EventKind::Completed]))
        .await
        .unwrap();

    // Without a secret nothing could be signed, so webhooks are refused up front.
    let unsigned = WebhookEngine::new(
        deliveries(&open_pool(dir.path()).await),
        WebhookConfig {
            secret: String::new(),
            ..config()
        },
    )
    .unwrap();
    assert!(matches!(
        unsigned
            .validate(&spec(&url, &[EventKind::Completed]))
            .await,
        Err(WebhookError::NoSecret)
    ));
}

#[tokio::test]
async fn gives_up_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = Receiver::start(&[500, 502, 500, 500, 500]).await;
    let pool = open_pool(dir.path()).await;
    let job4 = job(&pool, None).await;
    let engine = WebhookEngine::new(
        deliveries(&pool),
        WebhookConfig {
            max_attempts: 3,
            initial_backoff_ms: Duration::from_millis(20),
            ..config()
        },
    )
    .unwrap();
    let stop = CancellationToken::new();
    let sender = engine.spawn(stop.clone());
    engine
        .publish(
            &spec(&url, &[EventKind::Failed]),
            OutgoingEvent::now(&*job4, EventKind::Failed, serde_json::json!({})),
        )
        .await
        .unwrap();
    let mut last = Vec::new();
    for _ in 0..200 {
        last = engine.history(&job4).await.unwrap();
        if last[0].status != DeliveryStatus::Pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last[0].status, DeliveryStatus::Failed);
    assert_eq!(last[0].attempts.len(), 3);
    // Give a wrongly scheduled fourth attempt time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), 3);
    stop.cancel();
    sender.await.unwrap();
}

#[tokio::test]
async fn job_events_become_deliveries_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = Receiver::start(&[]).await;
    let pool = open_pool(dir.path()).await;
    let store = SqliteStore::from_pool(pool.clone());
    let engine = WebhookEngine::new(deliveries(&pool), config()).unwrap();
    let stop = CancellationToken::new();
    let sender = engine.spawn(stop.clone());

    let hook = spec(
        &url,
        &[EventKind::State, EventKind::Progress, EventKind::Completed],
    );
    let with_hook = job(&pool, Some(&hook)).await;
    let without = job(&pool, None).await;
    for id in [&with_hook, &without] {
        write_a_render(&store, id.parse().unwrap()).await;
    }
    let bodies = three_deliveries(&receiver, &with_hook).await;
    assert_eq!(bodies[0]["data"]["state"], "queued");
    assert_eq!(bodies[1]["data"]["step"], 1);

    // Reading the same events again (a second sender, a cursor moved back)
    // delivers nothing twice.
    stop.cancel();
    sender.await.unwrap();
    sqlx::query("UPDATE webhook_cursor SET last_event_id = 0")
        .execute(&pool)
        .await
        .unwrap();
    assert!(engine.pump_events().await.unwrap() >= 24);
    assert_eq!(engine.deliver_due().await.unwrap(), 0);
    assert_eq!(engine.history(&with_hook).await.unwrap().len(), 3);
    assert!(engine.history(&without).await.unwrap().is_empty());

    // Deleting the job deletes its delivery history with it.
    sqlx::query("DELETE FROM jobs WHERE id = ?")
        .bind(&with_hook)
        .execute(&pool)
        .await
        .unwrap();
    assert!(engine.history(&with_hook).await.unwrap().is_empty());
    let attempts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_attempts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0);
}

/// The same on PostgreSQL, across nodes: events written through one node's store reach the
/// sender of another node (through the outbox), once, and a sender on the first node that
/// reads them later sends nothing again.
#[tokio::test]
async fn on_postgresql_events_written_on_one_node_are_delivered_once_by_another() {
    let Some(db) = crate::support::pg::TestDb::create().await else {
        return;
    };
    let (url, receiver) = Receiver::start(&[]).await;
    let node_a = Arc::new(PgStore::connect(&db.url, 4).await.unwrap());
    let node_b = Arc::new(PgStore::connect(&db.url, 4).await.unwrap());
    let engine_b = WebhookEngine::new(node_b.clone(), config()).unwrap();
    let stop = CancellationToken::new();
    let sender = engine_b.spawn(stop.clone());

    let hook = spec(
        &url,
        &[EventKind::State, EventKind::Progress, EventKind::Completed],
    );
    let with_hook = submit(&*node_a, Some(&hook)).await;
    let without = submit(&*node_a, None).await;
    for id in [with_hook, without] {
        write_a_render(&*node_a, id).await;
    }
    // Node B polls every 50 ms: no wake-up from node A is needed.
    three_deliveries(&receiver, &with_hook.to_string()).await;
    stop.cancel();
    sender.await.unwrap();

    let engine_a = WebhookEngine::new(node_a.clone(), config()).unwrap();
    assert_eq!(engine_a.pump_events().await.unwrap(), 0, "bridged already");
    assert_eq!(engine_a.deliver_due().await.unwrap(), 0);
    assert_eq!(
        engine_a
            .history(&with_hook.to_string())
            .await
            .unwrap()
            .len(),
        3
    );
    let statuses: Vec<DeliveryStatus> = engine_a
        .history(&with_hook.to_string())
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.status)
        .collect();
    assert_eq!(statuses, [DeliveryStatus::Delivered; 3]);
}

/// A queued job on any store, with `webhook` in its spec.
async fn submit(store: &dyn JobStore, webhook: Option<&WebhookSpec>) -> uuid::Uuid {
    let new = NewJob {
        spec: serde_json::json!({ "prompts": "x", "webhook": webhook }),
        priority: 0,
        keep: false,
        total_steps: 10,
        owner_key_id: None,
        idempotency_key: None,
        request_hash: "h".into(),
        max_attempts: 2,
        warnings: vec![],
        seed: Some(1),
    };
    store.submit(new, 1000).await.unwrap().job().id
}

/// The events of a short render: ten progress steps, then `completed`.
async fn write_a_render(store: &dyn JobStore, id: uuid::Uuid) {
    for step in 1..=10 {
        store
            .append_event(
                id,
                EventKind::Progress,
                serde_json::json!({ "step": step, "total": 10 }),
            )
            .await
            .unwrap();
    }
    store
        .append_event(
            id,
            EventKind::Completed,
            serde_json::json!({ "state": "succeeded" }),
        )
        .await
        .unwrap();
}

/// Waits for what [`write_a_render`] on a job subscribed to state, progress and completed
/// sends: queued (state), one progress (the rest fall inside the interval), completed, all
/// signed and of `job`, and nothing more; returns the bodies.
async fn three_deliveries(receiver: &Receiver, job: &str) -> Vec<serde_json::Value> {
    wait_until("three deliveries", || receiver.got().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = receiver.got();
    assert_eq!(got.len(), 3, "the job without a webhook sent nothing");
    got.iter().for_each(|r| assert_signed(SECRET, r));
    let bodies: Vec<serde_json::Value> = got
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    let types: Vec<&str> = bodies.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["job.state", "job.progress", "job.completed"]);
    assert!(bodies.iter().all(|b| b["data"]["job_id"] == job));
    bodies
}
