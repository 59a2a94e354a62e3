//! Fair claiming across API keys, per-key bounds and retention, against the
//! real SQLite store (no render needed at this level).

use std::time::Duration;

use crate::support::open_store;
use vqclip::auth::{KeyStore, LimitOverrides, NewKey};
use vqclip::queue::{
    Events, Finish, Job, JobState, Jobs, KeyBounds, Leases, NewJob, QueueError, Scope, SqliteStore,
    Submitted, Workers,
};
use vqclip::storage::ArtifactStore;
use vqclip::worker::retention::prune_once;

const LEASE: Duration = Duration::from_secs(30);

async fn store(bounds: KeyBounds) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), 4).await.with_key_bounds(bounds);
    (dir, store)
}

async fn key(s: &SqliteStore, name: &str, limits: LimitOverrides) -> String {
    let keys = KeyStore::new(std::sync::Arc::new(s.clone()));
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

/// Issue 9, defect 1: a write lock held past `busy_timeout` is saturation (503 with
/// Retry-After at the API), not a database fault (500).
#[tokio::test]
async fn a_locked_database_is_busy_not_broken() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = crate::support::database_url(dir.path());
    let s = SqliteStore::connect(&url, Duration::from_millis(100), 2)
        .await
        .unwrap();
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let err = s.submit(new_job(None, 0, false), 100).await.unwrap_err();
    assert!(matches!(err, QueueError::Busy(_)), "{err:?}");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    s.submit(new_job(None, 0, false), 100).await.unwrap();
}

/// Issue 9, defect 12: a page carries every queued job's position, read in the same
/// statement as its rows, numbered as the claim will take them.
#[tokio::test]
async fn a_page_lists_consistent_positions_in_one_query() {
    use vqclip::queue::ListQuery;
    let (_d, s) = store(KeyBounds::default()).await;
    let mut jobs = vec![];
    for i in 0..30 {
        jobs.push(submit(&s, None, [0, 5, -5][i % 3]).await);
    }
    let page = |s: &SqliteStore| {
        let s = s.clone();
        async move {
            let q = ListQuery {
                limit: 100,
                ..Default::default()
            };
            s.list(&q, &Scope::unrestricted()).await.unwrap()
        }
    };
    for claimed in [0usize, 7] {
        for _ in 0..claimed {
            claim(&s).await.unwrap();
        }
        let p = page(&s).await;
        assert_eq!(p.jobs.len(), p.positions.len());
        let mut queued: Vec<(&Job, u64)> = vec![];
        for (job, position) in p.jobs.iter().zip(&p.positions) {
            match job.state {
                JobState::Queued => {
                    queued.push((job, position.expect("a queued job has a position")))
                }
                _ => assert_eq!(*position, None, "{job:?}"),
            }
            // The single-job lookup agrees with the page.
            assert_eq!(s.position(job).await.unwrap(), *position);
        }
        queued.sort_by_key(|(j, _)| (-j.priority, j.seq));
        let positions: Vec<u64> = queued.iter().map(|(_, p)| *p).collect();
        let expected: Vec<u64> = (1..=queued.len() as u64).collect();
        assert_eq!(positions, expected);
        assert_eq!(queued.len(), 30 - claimed);
    }
}

/// Issue 9, defect 6: a transient failure requeues the job behind a backoff, within its
/// attempts; the last attempt's failure is final.
#[tokio::test]
async fn a_transient_failure_is_retried_after_a_backoff_within_the_attempts() {
    let (_d, s) = store(KeyBounds::default()).await;
    let job = submit(&s, None, 0).await;
    let first = claim(&s).await.unwrap();
    let after = Duration::from_millis(400);
    let requeued = s
        .finish(
            first.id,
            "w1",
            Finish::Retry {
                error: "no network".into(),
                after,
            },
        )
        .await
        .unwrap();
    assert_eq!(requeued.state, JobState::Queued);
    assert!(
        claim(&s).await.is_none(),
        "claimed before its backoff ran out"
    );
    tokio::time::sleep(after + Duration::from_millis(100)).await;
    let second = claim(&s).await.expect("claimable after the backoff");
    assert_eq!((second.id, second.attempts), (job.id, 2));
    let last = s
        .finish(
            second.id,
            "w1",
            Finish::Retry {
                error: "still no network".into(),
                after,
            },
        )
        .await
        .unwrap();
    assert_eq!(last.state, JobState::Failed, "max_attempts is 2");
    assert_eq!(last.error.as_deref(), Some("still no network"));
    let events = s.events_after(job.id, 0, 100).await.unwrap();
    assert!(events
        .iter()
        .any(|e| e.data["state"] == "queued" && e.data["retry_in_seconds"].is_number()));
    assert_eq!(events.last().unwrap().data["state"], "failed");
}

/// Issue 9, defect 9: the leases of a worker known to be dead expire at once.
#[tokio::test]
async fn a_dead_workers_jobs_are_requeued_without_waiting_for_the_lease() {
    let (_d, s) = store(KeyBounds::default()).await;
    let job = submit(&s, None, 0).await;
    claim(&s).await.unwrap();
    s.worker_heartbeat("w1", "cpu", Some(job.id)).await.unwrap();
    assert!(
        s.rescue_expired().await.unwrap().is_empty(),
        "the lease is 30 s"
    );
    assert_eq!(s.expire_worker("w1").await.unwrap(), 1);
    let rescued = s.rescue_expired().await.unwrap();
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].state, JobState::Queued);
    assert!(s.workers().await.unwrap().is_empty());
}

/// Issue 9, defect 8: a cancel request reaches this process's workers the moment it
/// commits, and other processes can read the flag cheaply.
#[tokio::test]
async fn a_running_jobs_cancel_is_announced_and_readable() {
    let (_d, s) = store(KeyBounds::default()).await;
    let job = submit(&s, None, 0).await;
    claim(&s).await.unwrap();
    let mut cancels = s.cancellations();
    assert!(!s.cancel_requested(job.id).await.unwrap());
    s.cancel(job.id, &Scope::unrestricted()).await.unwrap();
    assert_eq!(cancels.try_recv().unwrap(), job.id);
    assert!(s.cancel_requested(job.id).await.unwrap());
}
