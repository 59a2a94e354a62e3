//! [`Revisions`] on SQLite: a job's numbered revisions and its fork links.

use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::{now_ms, parse_uuid, scoped_job_in, ts, SqliteStore};
use crate::queue::*;

const REVISION_COLUMNS: &str = "number, changes, spec, step, created_at";

fn revision_from_row(row: &SqliteRow) -> QueueResult<JobRevision> {
    let json = |col: &str| -> QueueResult<serde_json::Value> {
        let text: String = row.try_get(col)?;
        serde_json::from_str(&text).map_err(|e| QueueError::Corrupt(format!("revision {col}: {e}")))
    };
    Ok(JobRevision {
        number: row.try_get::<i64, _>("number")? as u32,
        changes: json("changes")?,
        spec: json("spec")?,
        step: row.try_get::<Option<i64>, _>("step")?.map(|s| s as u32),
        created_at: ts(row.try_get("created_at")?),
    })
}

fn link_from_row(row: &SqliteRow, job: &str) -> QueueResult<ForkLink> {
    Ok(ForkLink {
        job: parse_uuid(&row.try_get::<String, _>(job)?)?,
        step: row.try_get::<i64, _>("step")? as u32,
    })
}

impl Revisions for SqliteStore {
    fn steer<'a>(
        &'a self,
        id: Uuid,
        scope: &'a Scope,
        changes: serde_json::Value,
        spec: serde_json::Value,
    ) -> QueueFuture<'a, JobRevision> {
        Box::pin(async move {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let job = scoped_job_in(&mut tx, id, scope).await?;
            if job.state.is_terminal() {
                return Err(QueueError::Conflict {
                    id,
                    state: job.state,
                    detail: "only a queued or running job can be steered; fork it to go on from one of its frames",
                });
            }
            let sql = format!(
                "INSERT INTO job_revisions (job_id, number, changes, spec, created_at) \
                 VALUES (?1, (SELECT COALESCE(MAX(number), 0) + 1 FROM job_revisions WHERE job_id = ?1), ?2, ?3, ?4) \
                 RETURNING {REVISION_COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(id.to_string())
                .bind(changes.to_string())
                .bind(spec.to_string())
                .bind(now_ms())
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            let _ = self.steers.send(id);
            revision_from_row(&row)
        })
    }

    fn revisions(&self, id: Uuid) -> QueueFuture<'_, Vec<JobRevision>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {REVISION_COLUMNS} FROM job_revisions WHERE job_id = ? ORDER BY number"
            );
            let rows = sqlx::query(&sql)
                .bind(id.to_string())
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(revision_from_row).collect()
        })
    }

    fn revision_applied<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        number: u32,
        step: u32,
        data: serde_json::Value,
    ) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let leased: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND lease_owner = ?",
            )
            .bind(job.to_string())
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
            if leased.is_none() {
                return Err(QueueError::LeaseLost {
                    job,
                    worker: worker_id.to_owned(),
                });
            }
            let updated = sqlx::query(
                "UPDATE job_revisions SET step = ? WHERE job_id = ? AND number = ? AND step IS NULL",
            )
            .bind(i64::from(step))
            .bind(job.to_string())
            .bind(i64::from(number))
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() == 0 {
                return Ok(());
            }
            let event = Self::insert_event(&mut *tx, job, EventKind::Steered, &data).await?;
            tx.commit().await?;
            self.notify(&event);
            Ok(())
        })
    }

    fn fork(&self, job: NewJob, from: ForkLink, max_queued: u64) -> QueueFuture<'_, Submitted> {
        self.submit_linked(job, max_queued, Some(from))
    }

    fn steerings(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.steers.subscribe()
    }

    fn lineage(&self, id: Uuid) -> QueueFuture<'_, Lineage> {
        Box::pin(async move {
            let parent = sqlx::query("SELECT parent_id, step FROM job_forks WHERE child_id = ?")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?
                .map(|row| link_from_row(&row, "parent_id"))
                .transpose()?;
            let forks = sqlx::query(
                "SELECT f.child_id, f.step FROM job_forks f JOIN jobs j ON j.id = f.child_id \
                 WHERE f.parent_id = ? ORDER BY j.seq",
            )
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| link_from_row(row, "child_id"))
            .collect::<QueueResult<Vec<_>>>()?;
            Ok(Lineage { parent, forks })
        })
    }
}
