//! The queue's state machine against a real SQLite file: the shared suite, and what only SQLite has.

use super::*;

use crate::queue::suite::{submit, LEASE};

async fn store() -> Option<(tempfile::TempDir, SqliteStore)> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/q/vqclip.db", dir.path().display());
    let store = SqliteStore::connect(&url, Duration::from_secs(5), 4)
        .await
        .unwrap();
    Some((dir, store))
}

crate::queue::suite::queue_suite!(store);
crate::queue::rooms_suite::rooms_suite!(store);

#[tokio::test]
async fn state_survives_reopening_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/vqclip.db", dir.path().display());
    let id = {
        let s = SqliteStore::connect(&url, Duration::from_secs(5), 2)
            .await
            .unwrap();
        let j = submit(&s, 0).await;
        s.pool().close().await;
        j.id
    };
    let s = SqliteStore::connect(&url, Duration::from_secs(5), 2)
        .await
        .unwrap();
    let j = s.claim("w", "cpu", LEASE).await.unwrap().unwrap();
    assert_eq!(j.id, id);
}

#[tokio::test]
async fn workers_are_listed_by_heartbeat_and_dead_ones_forgotten() {
    let (_d, s) = store().await.unwrap();
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
    s.worker_gone("alive").await.unwrap();
    assert!(s
        .live_workers(Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
}
