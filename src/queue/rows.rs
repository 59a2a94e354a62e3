//! Row readers both backends share. Keys and deliveries decode alike on SQLite and PostgreSQL
//! (times are Unix milliseconds, counts are integers, flags booleans), so one text, expanded
//! over each backend's row type, reads both.

/// Defines `key_from_row`, `claimed_from_row`, `delivery_from_row` and `attempt_from_row`
/// over `$row`; the caller has `sqlx::Row`, `ts` and `crate::queue::*` in scope.
macro_rules! row_readers {
    ($row:ty) => {
        fn key_from_row(r: &$row) -> QueueResult<ApiKey> {
            let opt_u32 = |c: &str| -> QueueResult<Option<u32>> {
                Ok(r.try_get::<Option<i64>, _>(c)?
                    .map(|v| u32::try_from(v).unwrap_or(u32::MAX)))
            };
            Ok(ApiKey {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                prefix: r.try_get("key_prefix")?,
                admin: r.try_get("admin")?,
                created_at: ts(r.try_get("created_at")?),
                revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(ts),
                limits: LimitOverrides {
                    requests_per_second: r.try_get("requests_per_second")?,
                    burst: opt_u32("burst")?,
                    max_queued: opt_u32("max_queued")?,
                    max_running: opt_u32("max_running")?,
                },
            })
        }

        fn claimed_from_row(r: &$row) -> QueueResult<ClaimedDelivery> {
            Ok(ClaimedDelivery {
                id: r.try_get("id")?,
                job_id: r.try_get("job_id")?,
                url: r.try_get("url")?,
                payload: r.try_get("payload")?,
                attempts: r.try_get::<i64, _>("attempts")? as u32,
            })
        }

        fn delivery_from_row(r: &$row) -> QueueResult<Delivery> {
            let status = DeliveryStatus::parse(r.try_get("status")?);
            Ok(Delivery {
                id: r.try_get("id")?,
                job_id: r.try_get("job_id")?,
                event: r.try_get("event")?,
                url: r.try_get("url")?,
                payload: r.try_get("payload")?,
                status,
                attempts: Vec::new(),
                created_at: ts(r.try_get("created_at")?),
                next_attempt_at: (status == DeliveryStatus::Pending)
                    .then(|| r.try_get("next_attempt_at").map(ts))
                    .transpose()?,
            })
        }

        /// The attempt, with the id of its delivery.
        fn attempt_from_row(r: &$row) -> QueueResult<(String, Attempt)> {
            let attempt = Attempt {
                attempt: r.try_get::<i64, _>("attempt")? as u32,
                at: ts(r.try_get("at")?),
                status_code: r
                    .try_get::<Option<i64>, _>("status_code")?
                    .and_then(|c| u16::try_from(c).ok()),
                error: r.try_get("error")?,
                duration_ms: r.try_get::<i64, _>("duration_ms")?.max(0) as u64,
            };
            Ok((r.try_get("delivery_id")?, attempt))
        }
    };
}
pub(super) use row_readers;
