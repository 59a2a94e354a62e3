//! SQL over `webhook_deliveries` and `webhook_attempts` (migration 0002).

use serde::Serialize;
use sqlx::{Row, SqlitePool};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            _ => DeliveryStatus::Pending,
        }
    }
}

/// One delivery with its attempts, as `GET /v1/jobs/{id}/webhooks` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    /// Also the `webhook-id` header, identical on every retry.
    pub id: String,
    pub job_id: String,
    pub event: String,
    pub url: String,
    pub status: DeliveryStatus,
    pub attempts: Vec<Attempt>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When the next attempt is due, while the delivery is pending.
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip)]
    pub payload: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    pub attempt: u32,
    pub at: chrono::DateTime<chrono::Utc>,
    /// The HTTP status, or `None` when no response came back.
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A delivery a sender has claimed, with what it needs to send it.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub id: String,
    pub job_id: String,
    pub url: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

pub(crate) struct NewDelivery<'a> {
    pub id: &'a str,
    pub job_id: &'a str,
    pub event: &'a str,
    pub event_id: Option<i64>,
    pub url: &'a str,
    pub payload: &'a str,
    pub at_ms: i64,
}

pub(crate) fn millis_to_time(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub(crate) struct DeliveryStore {
    pool: SqlitePool,
}

impl DeliveryStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Inserts a pending delivery. Returns false when it was not inserted:
    /// its event was delivered already (`event_id` is unique), or `throttle_ms`
    /// is set and the job had a progress delivery less than that long before
    /// this event. Checking inside the INSERT keeps the throttle right with
    /// several processes publishing.
    pub async fn insert(
        &self,
        d: &NewDelivery<'_>,
        throttle_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO webhook_deliveries
                 (id, job_id, event, event_id, url, payload, status, attempts,
                  created_at, next_attempt_at, updated_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?8, ?8
              WHERE ?9 IS NULL OR NOT EXISTS (
                    SELECT 1 FROM webhook_deliveries
                     WHERE job_id = ?2 AND event = 'progress' AND created_at > ?7 - ?9)",
        )
        .bind(d.id)
        .bind(d.job_id)
        .bind(d.event)
        .bind(d.event_id)
        .bind(d.url)
        .bind(d.payload)
        .bind(d.at_ms)
        .bind(now_ms)
        .bind(throttle_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Claims up to `limit` due deliveries in one statement by pushing their
    /// `next_attempt_at` past `lease_until_ms`; two senders never claim the
    /// same row, and a sender that dies leaves the row due again later.
    pub async fn claim_due(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> Result<Vec<Claimed>, sqlx::Error> {
        let rows = sqlx::query(
            "UPDATE webhook_deliveries
                SET next_attempt_at = ?, updated_at = ?
              WHERE id IN (SELECT id FROM webhook_deliveries
                            WHERE status = 'pending' AND next_attempt_at <= ?
                            ORDER BY next_attempt_at, created_at, rowid
                            LIMIT ?)
                AND status = 'pending'
          RETURNING id, job_id, url, payload, attempts, created_at, rowid AS seq",
        )
        .bind(lease_until_ms)
        .bind(now_ms)
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        // RETURNING has no order; the sender wants each job's events in the
        // order they happened.
        let mut claimed: Vec<(i64, i64, Claimed)> = rows
            .into_iter()
            .map(|r| {
                (
                    r.get("created_at"),
                    r.get("seq"),
                    Claimed {
                        id: r.get("id"),
                        job_id: r.get("job_id"),
                        url: r.get("url"),
                        payload: r.get("payload"),
                        attempts: r.get::<i64, _>("attempts") as u32,
                    },
                )
            })
            .collect();
        claimed.sort_by_key(|(at, seq, _)| (*at, *seq));
        Ok(claimed.into_iter().map(|(_, _, c)| c).collect())
    }

    /// Records one attempt and moves the delivery to its next state in one
    /// transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_attempt(
        &self,
        id: &str,
        attempt: u32,
        at_ms: i64,
        status_code: Option<u16>,
        error: Option<&str>,
        duration_ms: u64,
        next: DeliveryStatus,
        next_attempt_at_ms: i64,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, error, duration_ms)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(attempt as i64)
        .bind(at_ms)
        .bind(status_code.map(i64::from))
        .bind(error)
        .bind(duration_ms as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhook_deliveries
                SET status = ?, attempts = ?, next_attempt_at = ?, updated_at = ?
              WHERE id = ?",
        )
        .bind(next.as_str())
        .bind(attempt as i64)
        .bind(next_attempt_at_ms)
        .bind(at_ms)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The earliest `next_attempt_at` of any pending delivery.
    pub async fn next_due(&self) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await
    }

    pub async fn for_job(&self, job_id: &str) -> Result<Vec<Delivery>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, job_id, event, url, payload, status, created_at, next_attempt_at
               FROM webhook_deliveries WHERE job_id = ? ORDER BY created_at, rowid",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let attempts = sqlx::query(
            "SELECT a.delivery_id, a.attempt, a.at, a.status_code, a.error, a.duration_ms
               FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
              WHERE d.job_id = ? ORDER BY a.delivery_id, a.attempt",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<Delivery> = rows
            .into_iter()
            .map(|r| {
                let status = DeliveryStatus::parse(r.get::<&str, _>("status"));
                Delivery {
                    id: r.get("id"),
                    job_id: r.get("job_id"),
                    event: r.get("event"),
                    url: r.get("url"),
                    payload: r.get("payload"),
                    status,
                    attempts: Vec::new(),
                    created_at: millis_to_time(r.get("created_at")),
                    next_attempt_at: (status == DeliveryStatus::Pending)
                        .then(|| millis_to_time(r.get("next_attempt_at"))),
                }
            })
            .collect();
        for a in attempts {
            let id: String = a.get("delivery_id");
            if let Some(d) = out.iter_mut().find(|d| d.id == id) {
                d.attempts.push(Attempt {
                    attempt: a.get::<i64, _>("attempt") as u32,
                    at: millis_to_time(a.get("at")),
                    status_code: a
                        .get::<Option<i64>, _>("status_code")
                        .and_then(|c| u16::try_from(c).ok()),
                    error: a.get("error"),
                    duration_ms: a.get::<i64, _>("duration_ms").max(0) as u64,
                });
            }
        }
        Ok(out)
    }
}
