//! The queue's state machine against a real PostgreSQL server: the shared suite, and what only
//! several nodes on one database have (concurrent claimers, submitters and listeners). Each test
//! gets a database of its own, created on the server at `VQCLIP_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and dropped after. `VQCLIP_TEST_POSTGRES=skip`
//! skips them; without it, a server that cannot be reached fails them.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::queue::suite::{new_job, submit, LEASE};

use super::testdb::TestDb;

async fn store() -> Option<(TestDb, PgStore)> {
    let db = TestDb::create().await?;
    let store = PgStore::connect(&db.url, 16).await.unwrap();
    Some((db, store))
}

crate::queue::suite::queue_suite!(store);
crate::queue::rooms_suite::rooms_suite!(store);

#[tokio::test]
async fn workers_are_listed_by_heartbeat_and_dead_ones_forgotten() {
    let Some((_db, s)) = store().await else {
        return;
    };
    s.worker_heartbeat("alive", "cpu", None).await.unwrap();
    s.worker_heartbeat("killed", "cuda:0", None).await.unwrap();
    sqlx::query("UPDATE workers SET heartbeat_at = heartbeat_at - 7200000 WHERE id = 'killed'")
        .execute(s.pool())
        .await
        .unwrap();
    let live = s.live_workers(Duration::from_secs(60)).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, "alive");
    s.rescue_expired().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM workers")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

/// 8 claimers, 500 queued jobs: owner `a` queues a backlog of 200 first, then `b`, `c` and `d`
/// 100 each, all with mixed priorities. Each job is claimed exactly once; in the order the
/// claims committed, owners take turns (none is passed over while `a`'s backlog waits), and each
/// owner's jobs come by priority, then first in, first out (each claim takes one of the owner's
/// best jobs not taken by a claim in flight).
#[tokio::test]
async fn eight_claimers_take_500_jobs_each_once_in_fair_priority_order() {
    const CLAIMERS: usize = 8;
    let Some((_db, s)) = store().await else {
        return;
    };
    for i in 0..500usize {
        let owner = if i < 200 { "a" } else { ["b", "c", "d"][i % 3] };
        let mut new = new_job((i % 3) as i32);
        new.owner_key_id = Some(owner.into());
        s.submit(new, 1000).await.unwrap();
    }
    let mut tasks = vec![];
    for w in 0..CLAIMERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("w{w}");
            let mut got = vec![];
            while let Some(j) = s.claim(&id, "cpu", LEASE).await.unwrap() {
                got.push(j.id);
                s.finish(
                    j.id,
                    &id,
                    Finish::Succeeded {
                        data: serde_json::json!({}),
                    },
                )
                .await
                .unwrap();
            }
            got
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 500);
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), 500, "a job was claimed twice");
    // The claims in commit order: each claim's `running` event is written under the job's row
    // lock in the claim's transaction, and per owner claims commit one after another (the
    // owner's turn row), so event order is claim order.
    let rows: Vec<(Option<String>, i32, i64)> = sqlx::query_as(
        "SELECT j.owner_key_id, j.priority, j.seq FROM jobs j \
         JOIN job_events e ON e.job_id = j.id AND e.kind = 'state' AND e.data LIKE '%\"running\"%' \
         ORDER BY e.gid",
    )
    .fetch_all(s.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 500);
    let mut per_owner: HashMap<Option<String>, Vec<(i32, i64)>> = HashMap::new();
    for (owner, priority, seq) in &rows {
        per_owner
            .entry(owner.clone())
            .or_default()
            .push((*priority, *seq));
    }
    // Owners take turns: until the smaller owners run out (about claim 400), every owner has a
    // claim in every 40 consecutive ones, although `a`'s backlog was queued first (by priority
    // and FIFO alone, `a`'s 67 top-priority jobs would come first). The turn goes to the owner
    // served least recently; claims in flight at once may serve one owner several times in a
    // row (each takes the next job the others have not locked), so the window is wider than 4.
    for (i, window) in rows[..350].windows(40).enumerate() {
        let seen: HashSet<_> = window.iter().map(|r| r.0.clone()).collect();
        assert_eq!(
            seen.len(),
            4,
            "claims {i}..{}: an owner was passed over",
            i + 40
        );
    }
    for (owner, order) in &per_owner {
        let mut sorted = order.clone();
        sorted.sort_by_key(|&(p, seq)| (-p, seq));
        for (i, job) in order.iter().enumerate() {
            let rank = sorted.iter().position(|j| j == job).unwrap();
            // Every better job was claimed before (one of the i) or in flight at the pick.
            assert!(
                rank < i + CLAIMERS,
                "owner {owner:?}: claim {i} took the job ranked {rank} by priority and FIFO"
            );
        }
    }
}

/// The per-key running bound holds with many claimers racing for one owner's last slot.
#[tokio::test]
async fn concurrent_claims_never_overshoot_a_keys_running_bound() {
    let Some((_db, s)) = store().await else {
        return;
    };
    let s = s.with_key_bounds(KeyBounds {
        max_queued: 0,
        max_running: 2,
    });
    for _ in 0..20 {
        let mut new = new_job(0);
        new.owner_key_id = Some("k".into());
        s.submit(new, 100).await.unwrap();
    }
    let mut tasks = vec![];
    for w in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.claim(&format!("w{w}"), "cpu", LEASE).await.unwrap()
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap().is_some() as usize;
    }
    assert_eq!(claimed, 2);
}

/// Submissions racing on several "nodes" (stores with pools of their own) never overshoot the
/// queue bound or a key's queued bound.
#[tokio::test]
async fn concurrent_submits_on_two_nodes_respect_the_bounds() {
    let Some((db, a)) = store().await else {
        return;
    };
    let b = PgStore::connect(&db.url, 16)
        .await
        .unwrap()
        .with_key_bounds(KeyBounds {
            max_queued: 5,
            max_running: 0,
        });
    let a = a.with_key_bounds(KeyBounds {
        max_queued: 5,
        max_running: 0,
    });
    let mut tasks = vec![];
    for i in 0..32 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut new = new_job(0);
            new.owner_key_id = Some(if i % 4 < 2 { "k" } else { "m" }.into());
            s.submit(new, 8).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(QueueError::QueueFull { .. } | QueueError::KeyQueueFull { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 8);
    let counts: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT owner_key_id, COUNT(*) FROM jobs GROUP BY 1 ORDER BY 1")
            .fetch_all(a.pool())
            .await
            .unwrap();
    assert!(counts.iter().all(|(_, n)| *n <= 5), "{counts:?}");
}

/// An event written through one node wakes a subscriber on another node by NOTIFY, with no
/// polling, and a job queued on one node wakes an idle worker on the other.
#[tokio::test]
async fn notify_wakes_subscribers_and_idle_workers_on_another_node() {
    let Some((db, a)) = store().await else {
        return;
    };
    let b = PgStore::connect(&db.url, 4).await.unwrap();
    let mut rx = b.subscribe();
    let queued = b.job_queued();
    let woken = queued.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let job = submit(&a, 0).await;
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("no wake-up on the other node for a queued job");
    let notice = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no event notice on the other node")
        .unwrap();
    assert_eq!((notice.job_id, notice.event_id), (job.id, 1));
    // A cancel request on node A reaches node B's workers at once.
    let mut cancels = b.cancellations();
    a.claim("w", "cpu", LEASE).await.unwrap().unwrap();
    a.cancel(job.id, &Scope::unrestricted()).await.unwrap();
    let id = tokio::time::timeout(Duration::from_secs(5), cancels.recv())
        .await
        .expect("no cancel notice on the other node")
        .unwrap();
    assert_eq!(id, job.id);
}

/// A revision made on node A reaches node B's workers by NOTIFY, without their poll.
#[tokio::test]
async fn a_revision_on_one_node_wakes_workers_on_another() {
    let Some((db, a)) = store().await else {
        return;
    };
    let b = PgStore::connect(&db.url, 4).await.unwrap();
    let mut steered = b.steerings();
    let job = submit(&a, 0).await;
    a.steer(
        job.id,
        &Scope::unrestricted(),
        serde_json::json!({ "lr": 0.2 }),
        serde_json::json!({ "prompts": "x", "lr": 0.2 }),
    )
    .await
    .unwrap();
    let id = tokio::time::timeout(Duration::from_secs(5), steered.recv())
        .await
        .expect("no revision notice on the other node")
        .unwrap();
    assert_eq!(id, job.id);
}

/// Event ids of a job grow in commit order even with writers racing on it, so a reader that
/// resumes after id n never skips an event that committed later with a smaller id.
#[tokio::test]
async fn event_ids_grow_in_commit_order_under_concurrent_writers() {
    let Some((_db, s)) = store().await else {
        return;
    };
    let job = submit(&s, 0).await;
    let mut tasks = vec![];
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..10 {
                s.append_event(
                    job.id,
                    EventKind::Frame,
                    serde_json::json!({ "w": i, "k": k }),
                )
                .await
                .unwrap();
            }
        }));
    }
    // A reader resuming from the last id it saw, while the writers race.
    let mut seen = vec![];
    let mut last = 0;
    while seen.len() < 161 {
        for e in s.events_after(job.id, last, 1000).await.unwrap() {
            last = e.id;
            seen.push(e.id);
        }
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(seen, (1..=161).collect::<Vec<i64>>());
}

/// The figures in BENCHMARKS.md, SQLite against PostgreSQL on this machine:
/// `cargo test --lib queue::postgres::tests::bench_ -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark; run by hand"]
async fn bench_sqlite_vs_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}/bench.db", dir.path().display());
    let Some(db) = TestDb::create().await else {
        return;
    };
    let pg = |n| {
        let url = db.url.clone();
        async move { PgStore::connect(&url, n).await.unwrap() }
    };
    let lite = |n| {
        let url = sqlite_url.clone();
        async move {
            crate::queue::SqliteStore::connect(&url, Duration::from_secs(5), n)
                .await
                .unwrap()
        }
    };
    println!("| measure | SQLite | PostgreSQL |");
    println!("|---|---|---|");
    for claimers in [1, 4, 8] {
        let a = claims_per_second(lite(16).await, claimers).await;
        let b = claims_per_second(pg(16).await, claimers).await;
        println!("| claims/s, {claimers} claimer(s) | {a:.0} | {b:.0} |");
    }
    let a = submits_per_second(lite(16).await, 16).await;
    let b = submits_per_second(pg(16).await, 16).await;
    println!("| submits/s, 16 clients | {a:.0} | {b:.0} |");
    let a = wake_latency(lite(4).await, lite(4).await).await;
    let b = wake_latency(pg(4).await, pg(4).await).await;
    println!(
        "| event → reader on another node, median / p99 (ms) | {:.1} / {:.1} | {:.1} / {:.1} |",
        a.0, a.1, b.0, b.1
    );
}

/// Claims per second of `claimers` workers draining 400 queued jobs (claim + finish each).
async fn claims_per_second<S: JobStore + Clone>(s: S, claimers: usize) -> f64 {
    const JOBS: usize = 400;
    for i in 0..JOBS {
        let mut new = new_job((i % 3) as i32);
        new.owner_key_id = Some(format!("k{}", i % 4));
        s.submit(new, 100_000).await.unwrap();
    }
    let start = std::time::Instant::now();
    let mut tasks = vec![];
    for w in 0..claimers {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("bench{w}");
            let mut n = 0;
            while let Some(j) = s.claim(&id, "cpu", LEASE).await.unwrap() {
                s.finish(
                    j.id,
                    &id,
                    Finish::Succeeded {
                        data: serde_json::json!({}),
                    },
                )
                .await
                .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, JOBS);
    JOBS as f64 / start.elapsed().as_secs_f64()
}

/// Submissions per second from `clients` concurrent clients, 50 each.
async fn submits_per_second<S: JobStore + Clone>(s: S, clients: usize) -> f64 {
    const EACH: usize = 50;
    let start = std::time::Instant::now();
    let mut tasks = vec![];
    for c in 0..clients {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                let mut new = new_job(0);
                new.owner_key_id = Some(format!("c{c}"));
                loop {
                    match s.submit(new.clone(), 1_000_000).await {
                        Ok(_) => break,
                        // SQLite's writers queue on one lock; a busy answer is retried as
                        // a client would.
                        Err(QueueError::Busy(_)) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (clients * EACH) as f64 / start.elapsed().as_secs_f64()
}

/// From an event committed through node `a` to a reader on node `b` that runs as the SSE
/// stream does (it waits for a notice, else its 500 ms poll, then reads the events after its
/// cursor): median and p99 over 100 events, in milliseconds.
async fn wake_latency<S: JobStore + Clone>(a: S, b: S) -> (f64, f64) {
    const POLL: Duration = Duration::from_millis(500);
    const EVENTS: usize = 100;
    // The earlier measures left their jobs queued: no queue bound here.
    let job = a.submit(new_job(0), u64::MAX).await.unwrap().job().clone();
    let mut notices = b.subscribe();
    let first = b.events_after(job.id, 0, 1000).await.unwrap();
    let mut last = first.last().unwrap().id;
    // The reader runs on its own, as a stream does: its poll phase is independent of the writes.
    let reader = tokio::spawn(async move {
        let mut seen = Vec::with_capacity(EVENTS);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while seen.len() < EVENTS {
            for e in b.events_after(job.id, last, 1000).await.unwrap() {
                last = e.id;
                seen.push(std::time::Instant::now());
            }
            tokio::select! {
                _ = notices.recv() => {}
                _ = poll.tick() => {}
            }
        }
        seen
    });
    let mut started = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        // Spread over the poll period, as real events are.
        tokio::time::sleep(Duration::from_millis(37 + (i as u64 * 53) % 250)).await;
        started.push(std::time::Instant::now());
        a.append_event(job.id, EventKind::Frame, serde_json::json!({ "i": i }))
            .await
            .unwrap();
    }
    let seen = reader.await.unwrap();
    let mut samples: Vec<f64> = seen
        .iter()
        .zip(&started)
        .map(|(s, t)| s.duration_since(*t).as_secs_f64() * 1000.0)
        .collect();
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    (samples[EVENTS / 2 - 1], samples[EVENTS * 99 / 100 - 1])
}
