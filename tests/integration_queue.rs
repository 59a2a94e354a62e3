//! Fair claiming across API keys, per-key bounds and retention, against the
//! real SQLite store (no render needed at this level).

mod service_support;

use std::time::Duration;

use service_support::open_store;
use vqclip::auth::{KeyStore, LimitOverrides, NewKey};
use vqclip::queue::retention::prune_once;
use vqclip::queue::{
    Finish, Job, JobState, JobStore, KeyBounds, NewJob, QueueError, Scope, SqliteStore, Submitted,
};
use vqclip::storage::ArtifactStore;

const LEASE: Duration = Duration::from_secs(30);

async fn store(bounds: KeyBounds) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), 4).await.with_key_bounds(bounds);
    (dir, store)
}

async fn key(s: &SqliteStore, name: &str, limits: LimitOverrides) -> String {
    let keys = KeyStore::new(s.pool().clone());
    let new = NewKey {
        name: name.into(),
        admin: false,
        limits,
    };
    keys.create(&new).await.unwrap().0.id
}

fn new_job(owner: Option<&str>, priority: i32, keep: bool) -> NewJob {
    NewJob {
        spec: serde_json::json!({ "prompts": "x" }),
        priority,
        keep,
        total_steps: 10,
        owner_key_id: owner.map(str::to_owned),
        idempotency_key: None,
        request_hash: "h".into(),
        max_attempts: 2,
        warnings: vec![],
        seed: Some(1),
    }
}

async fn submit(s: &SqliteStore, owner: Option<&str>, priority: i32) -> Job {
    match s
        .submit(new_job(owner, priority, false), 10_000)
        .await
        .unwrap()
    {
        Submitted::Created(j) => j,
        Submitted::Existing(_) => panic!("no idempotency key was given"),
    }
}

async fn claim(s: &SqliteStore) -> Option<Job> {
    s.claim("w1", "cpu", LEASE).await.unwrap()
}

async fn succeed(s: &SqliteStore, j: &Job) {
    s.finish(
        j.id,
        "w1",
        Finish::Succeeded {
            data: serde_json::json!({}),
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn another_keys_backlog_does_not_block_a_job() {
    let (_d, s) = store(KeyBounds::default()).await;
    let a = key(&s, "a", LimitOverrides::default()).await;
    let b = key(&s, "b", LimitOverrides::default()).await;
    // A has been using the server and has 50 jobs queued, some urgent.
    let first = submit(&s, Some(&a), 0).await;
    let served = claim(&s).await.unwrap();
    assert_eq!(served.id, first.id);
    for i in 0..50 {
        submit(&s, Some(&a), i % 3).await;
    }
    succeed(&s, &served).await;
    // B submits one job; it starts within the next two claims.
    let b_job = submit(&s, Some(&b), 0).await;
    let next_two = [claim(&s).await.unwrap(), claim(&s).await.unwrap()];
    assert!(
        next_two.iter().any(|j| j.id == b_job.id),
        "B's job waited behind A's backlog: {:?}",
        next_two.iter().map(|j| &j.owner_key_id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn keys_take_turns_and_keep_their_own_order() {
    let (_d, s) = store(KeyBounds::default()).await;
    let a = key(&s, "a", LimitOverrides::default()).await;
    let b = key(&s, "b", LimitOverrides::default()).await;
    let mut a_jobs = vec![];
    for p in [0, 9, 0, 9, 0] {
        a_jobs.push(submit(&s, Some(&a), p).await);
    }
    let mut b_jobs = vec![];
    for _ in 0..3 {
        b_jobs.push(submit(&s, Some(&b), 0).await);
    }
    // Positions are within one's own jobs, so they leak nothing of others'.
    assert_eq!(s.position(&a_jobs[1]).await.unwrap(), Some(1));
    assert_eq!(s.position(&a_jobs[0]).await.unwrap(), Some(3));
    assert_eq!(s.position(&b_jobs[0]).await.unwrap(), Some(1));
    // One worker, claiming and finishing: owners alternate while both wait,
    // and each owner's jobs come by priority, then first in, first out.
    let mut order = vec![];
    while let Some(j) = claim(&s).await {
        order.push(j.clone());
        succeed(&s, &j).await;
    }
    let owners: Vec<&str> = order
        .iter()
        .map(|j| {
            if j.owner_key_id.as_deref() == Some(a.as_str()) {
                "A"
            } else {
                "B"
            }
        })
        .collect();
    assert_eq!(owners, ["A", "B", "A", "B", "A", "B", "A", "A"]);
    let a_order: Vec<_> = order
        .iter()
        .filter(|j| j.owner_key_id.as_deref() == Some(a.as_str()))
        .map(|j| j.id)
        .collect();
    let expected: Vec<_> = [1, 3, 0, 2, 4].iter().map(|&i| a_jobs[i].id).collect();
    assert_eq!(a_order, expected);
}

#[tokio::test]
async fn running_jobs_count_against_a_key_and_bound_it() {
    let (_d, s) = store(KeyBounds {
        max_queued: 0,
        max_running: 2,
    })
    .await;
    let a = key(&s, "a", LimitOverrides::default()).await;
    let solo = key(
        &s,
        "solo",
        LimitOverrides {
            max_running: Some(1),
            ..LimitOverrides::default()
        },
    )
    .await;
    for _ in 0..4 {
        submit(&s, Some(&a), 0).await;
    }
    for _ in 0..2 {
        submit(&s, Some(&solo), 0).await;
    }
    // Many workers: the owner with fewer running jobs goes first, and no key
    // runs more than its bound (2 by default, 1 for `solo`).
    let mut running = vec![];
    while let Some(j) = claim(&s).await {
        running.push(j);
    }
    let count = |owner: &str| {
        running
            .iter()
            .filter(|j| j.owner_key_id.as_deref() == Some(owner))
            .count()
    };
    assert_eq!((count(&a), count(&solo)), (2, 1));
    // A finished job frees a slot for its own key.
    let solo_job = running
        .iter()
        .find(|j| j.owner_key_id.as_deref() == Some(solo.as_str()))
        .unwrap();
    succeed(&s, solo_job).await;
    let next = claim(&s).await.unwrap();
    assert_eq!(next.owner_key_id.as_deref(), Some(solo.as_str()));
    assert!(claim(&s).await.is_none());
}

#[tokio::test]
async fn queued_bound_is_per_key() {
    let (_d, s) = store(KeyBounds {
        max_queued: 3,
        max_running: 0,
    })
    .await;
    let a = key(
        &s,
        "a",
        LimitOverrides {
            max_queued: Some(2),
            ..LimitOverrides::default()
        },
    )
    .await;
    let b = key(&s, "b", LimitOverrides::default()).await;
    submit(&s, Some(&a), 0).await;
    submit(&s, Some(&a), 0).await;
    let err = s
        .submit(new_job(Some(&a), 0, false), 10_000)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::KeyQueueFull {
                queued: 2,
                limit: 2
            }
        ),
        "{err}"
    );
    // B has the default bound of 3, untouched by A.
    for _ in 0..3 {
        submit(&s, Some(&b), 0).await;
    }
    assert!(matches!(
        s.submit(new_job(Some(&b), 0, false), 10_000).await,
        Err(QueueError::KeyQueueFull { limit: 3, .. })
    ));
    // Jobs without a key (keys off) have only the global bound.
    for _ in 0..5 {
        submit(&s, None, 0).await;
    }
    // Once one of A's jobs starts, A may queue another.
    let mut started = claim(&s).await.unwrap();
    while started.owner_key_id.as_deref() != Some(a.as_str()) {
        started = claim(&s).await.unwrap();
    }
    submit(&s, Some(&a), 0).await;
}

#[tokio::test]
async fn retention_prunes_exactly_old_finished_unpinned_jobs() {
    let (dir, s) = store(KeyBounds::default()).await;
    let artifacts = ArtifactStore::open(dir.path().join("artifacts")).unwrap();
    let hours_ago = |h: i64| (chrono::Utc::now() - chrono::Duration::hours(h)).timestamp_millis();

    let mut jobs = std::collections::HashMap::new();
    // (name, keep, final state, finished hours ago)
    let cases: [(&str, bool, JobState, i64); 7] = [
        ("old-succeeded", false, JobState::Succeeded, 48),
        ("old-failed", false, JobState::Failed, 48),
        ("old-canceled", false, JobState::Canceled, 48),
        ("old-kept", true, JobState::Succeeded, 48),
        ("recent", false, JobState::Succeeded, 1),
        ("old-running", false, JobState::Running, 48),
        ("old-queued", false, JobState::Queued, 48),
    ];
    for (name, keep, state, _) in cases {
        let j = match s.submit(new_job(None, 0, keep), 10_000).await.unwrap() {
            Submitted::Created(j) => j,
            Submitted::Existing(_) => unreachable!(),
        };
        jobs.insert(name, j.id);
        std::fs::write(
            artifacts.create_job_dir(j.id).unwrap().join("image.png"),
            b"png",
        )
        .unwrap();
        match state {
            JobState::Queued => {}
            JobState::Canceled => {
                s.cancel(j.id, &Scope::unrestricted()).await.unwrap();
            }
            _ => {
                let c = claim(&s).await.unwrap();
                assert_eq!(c.id, j.id);
                let finish = match state {
                    JobState::Succeeded => Some(Finish::Succeeded {
                        data: serde_json::json!({}),
                    }),
                    JobState::Failed => Some(Finish::Failed { error: "x".into() }),
                    _ => None,
                };
                if let Some(f) = finish {
                    s.finish(j.id, "w1", f).await.unwrap();
                }
            }
        }
    }
    // Age everything as the case says; queued and running jobs get old
    // timestamps too, to show that state alone protects them.
    for (name, _, _, ago) in cases {
        sqlx::query("UPDATE jobs SET created_at = ?1, finished_at = CASE WHEN finished_at IS NULL THEN NULL ELSE ?1 END WHERE id = ?2")
            .bind(hours_ago(ago))
            .bind(jobs[name].to_string())
            .execute(s.pool())
            .await
            .unwrap();
    }
    sqlx::query("UPDATE jobs SET updated_at = ?1, started_at = ?1 WHERE id = ?2")
        .bind(hours_ago(48))
        .bind(jobs["old-running"].to_string())
        .execute(s.pool())
        .await
        .unwrap();

    let mut pruned = prune_once(&s, &artifacts, Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    pruned.sort();
    let mut expected: Vec<_> = ["old-succeeded", "old-failed", "old-canceled"]
        .iter()
        .map(|n| jobs[n])
        .collect();
    expected.sort();
    assert_eq!(pruned, expected);

    for (name, id) in &jobs {
        let gone = expected.contains(id);
        let row = s.get(*id, &Scope::unrestricted()).await;
        assert_eq!(row.is_err(), gone, "{name}: row");
        assert_eq!(!artifacts.job_dir(*id).exists(), gone, "{name}: artifacts");
        let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM job_events WHERE job_id = ?")
            .bind(id.to_string())
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert_eq!(events == 0, gone, "{name}: events");
    }
    // A second pass finds nothing more.
    assert!(prune_once(&s, &artifacts, Duration::from_secs(24 * 3600))
        .await
        .unwrap()
        .is_empty());
}
