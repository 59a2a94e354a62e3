//! Retention: a background task asks the queue to prune the finished jobs (their events
//! and webhook deliveries go with them) older than `retention.max_age_hours`, then has
//! the artifact store delete theirs. It lives beside the workers, the room that already
//! holds both the queue and the storage, so that neither needs the other.
//! Jobs submitted with `"keep": true` are never pruned, and queued or running
//! jobs never are (only terminal states qualify).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::queue::{JobStore, QueueError};
use crate::storage::ArtifactStore;

/// Removes what finished more than `max_age` ago. Returns the pruned job ids.
/// Rows go first: a crash in between leaves an orphaned directory, never a
/// job whose artifacts are gone.
pub async fn prune_once(
    store: &dyn JobStore,
    artifacts: &ArtifactStore,
    max_age: Duration,
) -> Result<Vec<Uuid>, QueueError> {
    let age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    let cutoff = Utc::now()
        .checked_sub_signed(age)
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
    let pruned = store.prune_finished_before(cutoff).await?;
    for id in &pruned {
        if let Err(e) = artifacts.delete_job(*id).await {
            tracing::warn!(job = %id, error = %e, "pruned job's artifacts could not be removed");
        }
    }
    if !pruned.is_empty() {
        tracing::info!(count = pruned.len(), "pruned finished jobs past retention");
    }
    Ok(pruned)
}

/// Runs [`prune_once`] every `interval` until `shutdown`; `None` when
/// `max_age` is zero (keep forever).
pub fn spawn_pruner(
    store: Arc<dyn JobStore>,
    artifacts: ArtifactStore,
    max_age: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    if max_age.is_zero() {
        return None;
    }
    let interval = interval.max(Duration::from_secs(1));
    Some(tokio::spawn(async move {
        loop {
            if let Err(e) = prune_once(store.as_ref(), &artifacts, max_age).await {
                tracing::error!(error = %e, "retention pass failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }))
}
