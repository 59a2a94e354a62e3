//! Webhook deliveries and the events they are made from, behind [`Deliveries`]. The
//! webhooks room decides what to send, to whom and when to retry; the store keeps the rows
//! and hands them out under leases, as it does jobs, so that with several API nodes each
//! delivery goes out once and a node that dies mid-delivery hands it over.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::QueueFuture;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Self {
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
    pub created_at: DateTime<Utc>,
    /// When the next attempt is due, while the delivery is pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub payload: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    pub attempt: u32,
    pub at: DateTime<Utc>,
    /// The HTTP status, or `None` when no response came back.
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A delivery a sender has claimed, with what it needs to send it.
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    pub id: String,
    pub job_id: String,
    pub url: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

#[derive(Clone, Debug)]
pub struct NewDelivery<'a> {
    pub id: &'a str,
    pub job_id: &'a str,
    pub event: &'a str,
    /// The job event it is made from: an event is delivered at most once however often,
    /// and by however many nodes, it is published.
    pub event_id: Option<i64>,
    pub url: &'a str,
    pub payload: &'a str,
    pub at_ms: i64,
}

/// One attempt's outcome and the delivery's next state.
#[derive(Clone, Debug)]
pub struct AttemptRecord<'a> {
    pub attempt: u32,
    pub at_ms: i64,
    pub status_code: Option<u16>,
    pub error: Option<&'a str>,
    pub duration_ms: u64,
    pub next: DeliveryStatus,
    pub next_attempt_at_ms: i64,
}

/// A job event that may need deliveries.
#[derive(Clone, Debug)]
pub struct HookEvent {
    pub job_id: String,
    /// The event id as SSE shows it.
    pub event_id: i64,
    pub kind: String,
    pub data: String,
    pub created_at_ms: i64,
    /// The job's stored `$.webhook`, when it has one.
    pub webhook: Option<String>,
}

/// Events read by [`Deliveries::unbridged_events`]; hand it back to
/// [`Deliveries::bridged`] once their deliveries are written.
#[derive(Clone, Debug, Default)]
pub struct HookEvents {
    pub events: Vec<HookEvent>,
    /// How many rows were read, with or without a webhook: fewer than the limit means the
    /// reader has caught up.
    pub read: usize,
    /// SQLite: the newest event id read (the cursor moves there).
    pub(crate) through: i64,
}

/// `webhook_deliveries`, `webhook_attempts`, and the reader of job events that makes them.
pub trait Deliveries: Send + Sync + 'static {
    /// Up to `limit` job events not yet turned into deliveries, oldest first. Several nodes
    /// may read the same events; [`Deliveries::insert_delivery`] keeps each delivery once.
    fn unbridged_events(&self, limit: u32) -> QueueFuture<'_, HookEvents>;
    /// Marks the events as turned into deliveries, so no reader returns them again.
    fn bridged<'a>(&'a self, events: &'a HookEvents) -> QueueFuture<'a, ()>;
    /// Inserts a pending delivery. False when it was not inserted: its event has one
    /// already, or `throttle_ms` is set and the job had a progress delivery less than that
    /// long before this event (checked inside the insert, so right with several nodes).
    fn insert_delivery<'a>(
        &'a self,
        delivery: &'a NewDelivery<'a>,
        throttle_ms: Option<i64>,
        now_ms: i64,
    ) -> QueueFuture<'a, bool>;
    /// Claims up to `limit` due deliveries in one statement under a lease held by `sender`
    /// until `lease_until_ms`: two senders never hold one row, and an expired lease is
    /// taken over. Each job's deliveries come in event order.
    fn claim_deliveries<'a>(
        &'a self,
        sender: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> QueueFuture<'a, Vec<ClaimedDelivery>>;
    /// Records an attempt and moves the delivery to its next state, in one transaction,
    /// and releases the lease. False (nothing written) when `sender` no longer holds it.
    fn record_attempt<'a>(
        &'a self,
        id: &'a str,
        sender: &'a str,
        attempt: &'a AttemptRecord<'a>,
    ) -> QueueFuture<'a, bool>;
    /// When the next pending delivery is due (or its lease runs out).
    fn next_delivery_due(&self) -> QueueFuture<'_, Option<i64>>;
    /// A job's deliveries with their attempts, oldest first.
    fn deliveries_for_job<'a>(&'a self, job_id: &'a str) -> QueueFuture<'a, Vec<Delivery>>;
}

/// Files an attempt under its delivery (both backends read attempts in a second query).
pub(crate) fn attach_attempt(deliveries: &mut [Delivery], delivery_id: &str, attempt: Attempt) {
    if let Some(d) = deliveries.iter_mut().find(|d| d.id == delivery_id) {
        d.attempts.push(attempt);
    }
}
