//! The tables other rooms keep in the job store's database (auth's API keys, webhooks'
//! deliveries), the same on every backend: each backend's `tests` module runs every test
//! here ([`rooms_suite!`]) on a fresh store of its own.

use std::collections::HashSet;

use chrono::{TimeZone, Utc};

use super::suite::{new_job, submit};
use super::*;

fn key_row(id: &str, name: &str, hash: &str) -> KeyRow {
    KeyRow {
        id: id.into(),
        name: name.into(),
        key_hash: hash.into(),
        prefix: "vq_abcdefg".into(),
        admin: false,
        created_at: Utc.timestamp_millis_opt(1_000).unwrap(),
        limits: LimitOverrides::default(),
    }
}

pub async fn keys_are_created_found_and_revoked<S: JobStore + ApiKeys + Clone>(s: S) {
    assert!(!s.any_key().await.unwrap());
    let mut web = key_row("key_1", "web", "h1");
    web.admin = true;
    web.limits = LimitOverrides {
        requests_per_second: Some(2.5),
        burst: Some(4),
        max_queued: Some(7),
        max_running: None,
    };
    let created = s.insert_key(&web).await.unwrap().expect("a new name");
    assert_eq!(created.id, "key_1");
    assert!(created.admin && !created.is_revoked());
    assert_eq!(created.limits, web.limits);
    assert_eq!(created.created_at, web.created_at);
    // A taken name is refused, not overwritten.
    let same_name = key_row("key_2", "web", "h2");
    assert!(s.insert_key(&same_name).await.unwrap().is_none());
    let mut batch = key_row("key_3", "batch", "h3");
    batch.created_at = Utc.timestamp_millis_opt(2_000).unwrap();
    s.insert_key(&batch).await.unwrap().unwrap();
    assert!(s.any_key().await.unwrap());

    assert_eq!(s.key_by_hash("h1").await.unwrap(), Some(created.clone()));
    assert_eq!(s.key_by_id("key_3").await.unwrap().unwrap().name, "batch");
    assert!(s.key_by_hash("h2").await.unwrap().is_none());
    assert!(s.key_by_id("key_2").await.unwrap().is_none());
    let names: Vec<String> = s
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["web", "batch"]);

    let revoked = s.revoke_key("web").await.unwrap().unwrap();
    let at = revoked.revoked_at.expect("revoked");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // By id this time; the first revocation time stays.
    let again = s.revoke_key("key_1").await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(at));
    assert!(s.key_by_hash("h1").await.unwrap().unwrap().is_revoked());
    assert!(s.revoke_key("nobody").await.unwrap().is_none());
    // Revoked keys still count: revoking the last key must not open the server.
    assert!(s.any_key().await.unwrap());
}

fn delivery<'a>(
    id: &'a str,
    job: &'a str,
    event: &'a str,
    event_id: i64,
    at_ms: i64,
) -> NewDelivery<'a> {
    NewDelivery {
        id,
        job_id: job,
        event,
        event_id: Some(event_id),
        url: "http://127.0.0.1:9/hook",
        payload: "{}",
        at_ms,
    }
}

fn record(attempt: u32, at_ms: i64, next: DeliveryStatus) -> AttemptRecord<'static> {
    AttemptRecord {
        attempt,
        at_ms,
        status_code: Some(200),
        error: None,
        duration_ms: 3,
        next,
        next_attempt_at_ms: at_ms,
    }
}

pub async fn deliveries_are_leased_once_and_taken_over_when_expired<
    S: JobStore + Deliveries + Clone,
>(
    s: S,
) {
    let job = submit(&s, 0).await.id.to_string();
    let now = 10_000;
    assert!(s
        .insert_delivery(&delivery("msg_a", &job, "completed", 1, now), None, now)
        .await
        .unwrap());
    // The same event again (a second node, a restart) is not a second delivery.
    assert!(!s
        .insert_delivery(&delivery("msg_b", &job, "completed", 1, now), None, now)
        .await
        .unwrap());
    assert_eq!(s.next_delivery_due().await.unwrap(), Some(now));

    let a = s
        .claim_deliveries("node-a", now, now + 1_000, 10)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].id.as_str(), a[0].attempts), ("msg_a", 0));
    // Held: nobody else gets it, nor can record an attempt on it.
    assert!(s
        .claim_deliveries("node-b", now + 10, now + 1_010, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(!s
        .record_attempt(
            "msg_a",
            "node-b",
            &record(1, now + 10, DeliveryStatus::Delivered)
        )
        .await
        .unwrap());
    // The holder's lease is what the sender sleeps until.
    assert_eq!(s.next_delivery_due().await.unwrap(), Some(now + 1_000));

    // Node A died: once its lease runs out, node B takes the delivery over.
    let b = s
        .claim_deliveries("node-b", now + 1_000, now + 2_000, 10)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert!(!s
        .record_attempt(
            "msg_a",
            "node-a",
            &record(1, now + 1_100, DeliveryStatus::Delivered)
        )
        .await
        .unwrap());
    assert!(s
        .record_attempt(
            "msg_a",
            "node-b",
            &record(1, now + 1_100, DeliveryStatus::Delivered)
        )
        .await
        .unwrap());
    let history = s.deliveries_for_job(&job).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, DeliveryStatus::Delivered);
    assert_eq!(history[0].attempts.len(), 1);
    assert_eq!(history[0].attempts[0].status_code, Some(200));
    assert!(history[0].next_attempt_at.is_none());
    assert_eq!(s.next_delivery_due().await.unwrap(), None);
    assert!(s
        .claim_deliveries("node-a", now + 5_000, now + 6_000, 10)
        .await
        .unwrap()
        .is_empty());

    // A retry is due at its time, not before, and keeps its attempt count.
    assert!(s
        .insert_delivery(&delivery("msg_c", &job, "state", 2, now), None, now)
        .await
        .unwrap());
    s.claim_deliveries("node-a", now, now + 1_000, 10)
        .await
        .unwrap();
    let mut retry = record(1, now + 5, DeliveryStatus::Pending);
    retry.status_code = Some(500);
    retry.error = Some("HTTP 500");
    retry.next_attempt_at_ms = now + 500;
    assert!(s.record_attempt("msg_c", "node-a", &retry).await.unwrap());
    assert!(s
        .claim_deliveries("node-b", now + 499, now + 1_499, 10)
        .await
        .unwrap()
        .is_empty());
    let again = s
        .claim_deliveries("node-b", now + 500, now + 1_500, 10)
        .await
        .unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1));
    let h = s.deliveries_for_job(&job).await.unwrap();
    let c = h.iter().find(|d| d.id == "msg_c").unwrap();
    assert_eq!(c.attempts[0].error.as_deref(), Some("HTTP 500"));
}

pub async fn a_jobs_later_delivery_waits_while_an_earlier_one_is_held<
    S: JobStore + Deliveries + Clone,
>(
    s: S,
) {
    let job = submit(&s, 0).await.id.to_string();
    let now = 50_000;
    for (i, event) in ["state", "completed"].iter().enumerate() {
        let id = format!("msg_{i}");
        let d = delivery(&id, &job, event, i as i64 + 1, now + i as i64);
        assert!(s.insert_delivery(&d, None, now).await.unwrap());
    }
    let first = s
        .claim_deliveries("node-a", now + 10, now + 1_000, 1)
        .await
        .unwrap();
    assert_eq!(first[0].id, "msg_0");
    // `completed` must not overtake `running` on another node.
    assert!(s
        .claim_deliveries("node-b", now + 10, now + 1_000, 10)
        .await
        .unwrap()
        .is_empty());
    s.record_attempt(
        "msg_0",
        "node-a",
        &record(1, now + 20, DeliveryStatus::Delivered),
    )
    .await
    .unwrap();
    let second = s
        .claim_deliveries("node-b", now + 20, now + 1_000, 10)
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, "msg_1");
}

pub async fn concurrent_senders_claim_each_delivery_once<S: JobStore + Deliveries + Clone>(s: S) {
    let now = 100_000;
    let mut all = HashSet::new();
    for i in 0..40 {
        let job = submit(&s, 0).await.id.to_string();
        let id = format!("msg_{i}");
        // Distinct event ids: SQLite's are global, PostgreSQL's per job.
        s.insert_delivery(&delivery(&id, &job, "completed", i, now), None, now)
            .await
            .unwrap();
        all.insert(id);
    }
    let senders: Vec<_> = (0..4)
        .map(|n| {
            let s = s.clone();
            tokio::spawn(async move {
                let name = format!("node-{n}");
                let mut got = Vec::new();
                loop {
                    let batch = s
                        .claim_deliveries(&name, now, now + 60_000, 3)
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch.into_iter().map(|c| c.id));
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in senders {
        seen.extend(t.await.unwrap());
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), unique.len(), "a delivery was claimed twice");
    assert_eq!(unique, all);
}

pub async fn progress_deliveries_are_throttled_per_job<S: JobStore + Deliveries + Clone>(s: S) {
    let (a, b) = (
        submit(&s, 0).await.id.to_string(),
        submit(&s, 0).await.id.to_string(),
    );
    let t = 200_000;
    let throttle = Some(300);
    let ok = |r: QueueResult<bool>| r.unwrap();
    assert!(ok(s
        .insert_delivery(&delivery("p1", &a, "progress", 1, t), throttle, t)
        .await));
    // Inside the interval: dropped; another job is not held back.
    assert!(!ok(s
        .insert_delivery(&delivery("p2", &a, "progress", 2, t + 100), throttle, t)
        .await));
    assert!(ok(s
        .insert_delivery(&delivery("p3", &b, "progress", 10, t + 100), throttle, t)
        .await));
    assert!(ok(s
        .insert_delivery(&delivery("p4", &a, "progress", 3, t + 301), throttle, t)
        .await));
    // Unthrottled kinds always go in.
    assert!(ok(s
        .insert_delivery(&delivery("c1", &a, "completed", 4, t + 302), None, t)
        .await));
    let events: Vec<String> = s
        .deliveries_for_job(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(events, ["p1", "p4", "c1"]);
}

pub async fn job_events_are_bridged_once_by_two_readers<S: JobStore + Deliveries + Clone>(s: S) {
    let mut with = new_job(0);
    with.spec = serde_json::json!({
        "prompts": "x",
        "webhook": {"url": "http://127.0.0.1:9/hook", "events": ["progress", "completed"]},
    });
    let hooked = s.submit(with, 100).await.unwrap().job().id;
    let plain = submit(&s, 0).await.id;
    for id in [hooked, plain] {
        for step in 1..=3 {
            s.append_event(id, EventKind::Progress, serde_json::json!({ "step": step }))
                .await
                .unwrap();
        }
    }
    // Two nodes read the same events before either marks them.
    let one = s.unbridged_events(100).await.unwrap();
    let two = s.unbridged_events(100).await.unwrap();
    let hooked_s = hooked.to_string();
    for read in [&one, &two] {
        assert!(read.events.iter().all(|e| e.job_id == hooked_s), "{read:?}");
        // The submission's `state` event and three progress events, in order.
        let kinds: Vec<&str> = read.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["state", "progress", "progress", "progress"]);
        let ids: Vec<i64> = read.events.iter().map(|e| e.event_id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let hook: serde_json::Value =
            serde_json::from_str(read.events[0].webhook.as_deref().unwrap()).unwrap();
        assert_eq!(hook["url"], "http://127.0.0.1:9/hook");
        assert_eq!(read.events[1].data, r#"{"step":1}"#);
    }
    // Both turn them into deliveries: each event's delivery exists once.
    for (n, read) in [&one, &two].iter().enumerate() {
        for e in &read.events {
            let id = format!("msg_{n}_{}", e.event_id);
            let d = NewDelivery {
                id: &id,
                job_id: &e.job_id,
                event: &e.kind,
                event_id: Some(e.event_id),
                url: "http://127.0.0.1:9/hook",
                payload: "{}",
                at_ms: e.created_at_ms,
            };
            s.insert_delivery(&d, None, e.created_at_ms).await.unwrap();
        }
        s.bridged(read).await.unwrap();
    }
    assert_eq!(s.deliveries_for_job(&hooked_s).await.unwrap().len(), 4);
    let after = s.unbridged_events(100).await.unwrap();
    assert!(after.events.is_empty() && after.read == 0, "{after:?}");
    // A later event is read, once.
    s.append_event(hooked, EventKind::Completed, serde_json::json!({}))
        .await
        .unwrap();
    let last = s.unbridged_events(100).await.unwrap();
    assert_eq!(last.events.len(), 1);
    assert_eq!(last.events[0].kind, "completed");
    s.bridged(&last).await.unwrap();
    assert_eq!(s.unbridged_events(100).await.unwrap().read, 0);
}

macro_rules! rooms_suite {
    ($make:ident) => {
        $crate::queue::rooms_suite::rooms_suite!(@ $make; keys_are_created_found_and_revoked, deliveries_are_leased_once_and_taken_over_when_expired, a_jobs_later_delivery_waits_while_an_earlier_one_is_held, concurrent_senders_claim_each_delivery_once, progress_deliveries_are_throttled_per_job, job_events_are_bridged_once_by_two_readers);
    };
    (@ $make:ident; $($name:ident),*) => {
        mod rooms {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some((_guard, s)) = $make().await else {
                        return;
                    };
                    $crate::queue::rooms_suite::$name(s).await;
                }
            )*
        }
    };
}
pub(crate) use rooms_suite;
