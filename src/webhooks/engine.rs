//! The delivery engine: turns job events into persisted deliveries and sends
//! them with retries.

use super::signing::Signer;
use super::target::{check_target, literal_refusal, GuardedResolver, TargetPolicy};
use super::{Delivery, EventKind, WebhookConfig, WebhookError, WebhookSpec};
use crate::queue::{
    AttemptRecord, ClaimedDelivery as Claimed, Deliveries, DeliveryStatus, NewDelivery, QueueError,
};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Event types in the payload are `job.<event>`, e.g. `job.completed`.
pub const EVENT_TYPE_PREFIX: &str = "job.";

/// The response code after which a receiver is never retried: the Standard
/// Webhooks way for an endpoint to say it is gone for good.
const GONE: u16 = 410;

pub struct WebhookEngine {
    pub(crate) store: Arc<dyn Deliveries>,
    /// Who holds the delivery leases this engine takes: unique per process and engine.
    sender: String,
    config: WebhookConfig,
    signer: Option<Signer>,
    policy: TargetPolicy,
    client: reqwest::Client,
    wake: Notify,
}

impl std::fmt::Debug for WebhookEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEngine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl WebhookEngine {
    /// `store` holds the deliveries, in the job store's database.
    pub fn new(
        store: Arc<dyn Deliveries>,
        config: WebhookConfig,
    ) -> Result<Arc<Self>, WebhookError> {
        let signer = match config.secret.as_str() {
            "" => None,
            secret => Some(Signer::from_secret(secret)?),
        };
        let policy = config.target_policy();
        let client = reqwest::Client::builder()
            .timeout(config.timeout_ms)
            // A redirect could lead to a private address the checks never saw.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve the name itself, past the guarded resolver.
            .no_proxy()
            .dns_resolver(GuardedResolver::shared(policy.clone()))
            .user_agent(concat!("vqclip-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Self {
            store,
            sender: format!(
                "{}:{}:{}",
                crate::queue::hostname(),
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ),
            config,
            signer,
            policy,
            client,
            wake: Notify::new(),
        }))
    }

    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    /// Checks a job's webhook when the job is submitted: a secret must be
    /// configured and the URL must pass the SSRF checks.
    pub async fn validate(&self, spec: &WebhookSpec) -> Result<(), WebhookError> {
        if self.signer.is_none() {
            return Err(WebhookError::NoSecret);
        }
        check_target(&spec.url, &self.policy).await?;
        Ok(())
    }

    /// Queues the delivery of one job event if the job's webhook subscribes to
    /// it. A `progress` event less than `progress_interval_ms` after the job's
    /// previous progress delivery is dropped. Returns the delivery id when one
    /// was queued.
    pub async fn publish(
        &self,
        spec: &WebhookSpec,
        event: OutgoingEvent,
    ) -> Result<Option<String>, WebhookError> {
        if !spec.wants(event.kind) {
            return Ok(None);
        }
        let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        let payload = envelope(&event);
        let throttle = (event.kind == EventKind::Progress)
            .then_some(self.config.progress_interval_ms.as_millis() as i64);
        let delivery = NewDelivery {
            id: &id,
            job_id: &event.job_id,
            event: event.kind.as_str(),
            event_id: event.event_id,
            url: &spec.url,
            payload: &payload,
            at_ms: event.at_ms,
        };
        if !self
            .store
            .insert_delivery(&delivery, throttle, now_ms())
            .await?
        {
            return Ok(None);
        }
        self.wake.notify_one();
        Ok(Some(id))
    }

    /// Wakes the sender, e.g. when the job store reports a new event.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The delivery history of a job, oldest first.
    pub async fn history(&self, job_id: &str) -> Result<Vec<Delivery>, WebhookError> {
        Ok(self.store.deliveries_for_job(job_id).await?)
    }

    /// Sends every delivery that is due now, `concurrency` at a time.
    /// Returns how many were attempted.
    pub async fn deliver_due(&self) -> Result<usize, WebhookError> {
        use futures::StreamExt;
        let batch = self.config.concurrency.max(1);
        let lease = self.config.timeout_ms * 2 + Duration::from_secs(5);
        let mut total = 0;
        loop {
            let now = now_ms();
            let claimed = self
                .store
                .claim_deliveries(
                    &self.sender,
                    now,
                    now + lease.as_millis() as i64,
                    batch as u32,
                )
                .await?;
            let n = claimed.len();
            total += n;
            // One job's deliveries go out one after another, in event order, so
            // a receiver sees `running` before `completed`; different jobs'
            // deliveries go out side by side.
            let mut by_job: Vec<Vec<Claimed>> = Vec::new();
            for c in claimed {
                match by_job.iter_mut().find(|g| g[0].job_id == c.job_id) {
                    Some(group) => group.push(c),
                    None => by_job.push(vec![c]),
                }
            }
            let results: Vec<Result<(), QueueError>> = futures::stream::iter(by_job)
                .map(|group| async move {
                    for c in group {
                        self.attempt(c).await?;
                    }
                    Ok(())
                })
                .buffer_unordered(batch)
                .collect()
                .await;
            for r in results {
                r?;
            }
            if n < batch {
                return Ok(total);
            }
        }
    }

    async fn attempt(&self, c: Claimed) -> Result<(), QueueError> {
        let attempt = c.attempts + 1;
        let started = Instant::now();
        let outcome = self.send(&c).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let now = now_ms();
        let (code, error, retryable) = match outcome {
            Ok(code) if (200..300).contains(&code) => (Some(code), None, false),
            Ok(code) => (Some(code), Some(format!("HTTP {code}")), code != GONE),
            Err(Failure::Transient(e)) => (None, Some(e), true),
            Err(Failure::Permanent(e)) => (None, Some(e), false),
        };
        let (next, next_at) = if error.is_none() {
            (DeliveryStatus::Delivered, now)
        } else if retryable && attempt < self.config.max_attempts {
            let wait = backoff(&self.config, attempt, &mut rand::thread_rng());
            (DeliveryStatus::Pending, now + wait.as_millis() as i64)
        } else {
            (DeliveryStatus::Failed, now)
        };
        if let Some(e) = &error {
            tracing::warn!(delivery = %c.id, attempt, error = %e, next = ?next, "webhook attempt failed");
        }
        let record = AttemptRecord {
            attempt,
            at_ms: now,
            status_code: code,
            error: error.as_deref(),
            duration_ms,
            next,
            next_attempt_at_ms: next_at,
        };
        if !self
            .store
            .record_attempt(&c.id, &self.sender, &record)
            .await?
        {
            // Only a send that outlived its lease gets here; the new holder records its own.
            tracing::warn!(delivery = %c.id, attempt, "webhook lease was taken over during the attempt");
        }
        Ok(())
    }

    async fn send(&self, c: &Claimed) -> Result<u16, Failure> {
        let url = url::Url::parse(&c.url).map_err(|e| Failure::Permanent(e.to_string()))?;
        if let Some(refused) = literal_refusal(&url, &self.policy) {
            return Err(Failure::Permanent(refused.to_string()));
        }
        // Without a secret nothing can be signed; the delivery waits for a
        // restart with one configured rather than going out unsigned.
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| Failure::Transient(WebhookError::NoSecret.to_string()))?;
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signer.sign(&c.id, timestamp, c.payload.as_bytes());
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &c.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(c.payload.clone())
            .send()
            .await
            .map_err(|e| {
                // The guarded resolver's refusal is final; other errors may pass.
                if refused_by_resolver(&e) {
                    Failure::Permanent(error_chain(&e))
                } else {
                    Failure::Transient(error_chain(&e))
                }
            })?;
        Ok(response.status().as_u16())
    }

    /// Starts the sender: it turns new job events into deliveries
    /// ([`Self::pump_events`]), sends due deliveries, sleeps until the next one
    /// is due (at most `poll_interval_ms`) or a new one is published, and
    /// stops when `shutdown` fires. Pending rows from before a restart are
    /// due at once, so they go out on the first pass.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            let poll = engine.config.poll_interval_ms;
            loop {
                if let Err(e) = engine.pump_events().await {
                    tracing::error!(error = %e, "reading job events for webhooks failed");
                }
                if let Err(e) = engine.deliver_due().await {
                    tracing::error!(error = %e, "webhook sender pass failed");
                }
                let wait = match engine.store.next_delivery_due().await {
                    Ok(Some(due)) => Duration::from_millis(
                        (due - now_ms()).clamp(0, poll.as_millis() as i64) as u64,
                    ),
                    _ => poll,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = engine.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        })
    }
}

enum Failure {
    Transient(String),
    Permanent(String),
}

fn refused_by_resolver(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<super::TargetError>().is_some() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// reqwest's top-level message hides the cause ("error sending request");
/// the attempt history should say what actually happened.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One job event on its way to a webhook.
#[derive(Clone, Debug)]
pub struct OutgoingEvent {
    pub job_id: String,
    pub kind: EventKind,
    pub data: serde_json::Value,
    /// The `job_events` row it comes from: an event is delivered at most once
    /// however often it is published.
    pub event_id: Option<i64>,
    /// When it happened, unix milliseconds.
    pub at_ms: i64,
}

impl OutgoingEvent {
    /// An event happening now that is not backed by a `job_events` row.
    pub fn now(job_id: impl Into<String>, kind: EventKind, data: serde_json::Value) -> Self {
        Self {
            job_id: job_id.into(),
            kind,
            data,
            event_id: None,
            at_ms: now_ms(),
        }
    }
}

/// The body: Standard Webhooks' recommended `{type, timestamp, data}`, with
/// the job id added to the event's data.
fn envelope(event: &OutgoingEvent) -> String {
    let data = match &event.data {
        serde_json::Value::Object(m) => {
            let mut m = m.clone();
            m.insert("job_id".into(), event.job_id.clone().into());
            serde_json::Value::Object(m)
        }
        other => serde_json::json!({ "job_id": event.job_id, "value": other }),
    };
    let at = chrono::DateTime::from_timestamp_millis(event.at_ms).unwrap_or_default();
    serde_json::json!({
        "type": format!("{EVENT_TYPE_PREFIX}{}", event.kind.as_str()),
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": data,
    })
    .to_string()
}

/// Exponential backoff with "equal jitter": half the step is fixed, half is
/// random, so retries of many deliveries spread out but never come sooner
/// than half the nominal delay.
fn backoff(config: &WebhookConfig, attempt: u32, rng: &mut impl Rng) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    let step = config
        .initial_backoff_ms
        .saturating_mul(factor)
        .min(config.max_backoff_ms);
    let half = step / 2;
    half + half.mul_f64(rng.gen::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let cfg = WebhookConfig {
            initial_backoff_ms: Duration::from_secs(2),
            max_backoff_ms: Duration::from_secs(60),
            ..WebhookConfig::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for attempt in 1..=12u32 {
            let nominal =
                (Duration::from_secs(2) * 2u32.pow(attempt - 1)).min(Duration::from_secs(60));
            let samples: Vec<Duration> =
                (0..200).map(|_| backoff(&cfg, attempt, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d >= nominal / 2 && *d <= nominal));
            // Jitter actually spreads the retries.
            let min = samples.iter().min().unwrap();
            let max = samples.iter().max().unwrap();
            assert!(
                *max - *min > nominal / 4,
                "attempt {attempt}: {min:?}..{max:?}"
            );
        }
        assert!(backoff(&cfg, u32::MAX, &mut rng) <= Duration::from_secs(60));
    }

    #[test]
    fn envelope_has_type_timestamp_and_job_id() {
        let body = envelope(&OutgoingEvent::now(
            "job1",
            EventKind::Completed,
            serde_json::json!({"state": "succeeded"}),
        ));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "job.completed");
        assert_eq!(v["data"]["job_id"], "job1");
        assert_eq!(v["data"]["state"], "succeeded");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
