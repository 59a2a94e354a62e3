//! `GET /v1/jobs/{id}/events`: Server-Sent Events read from the `job_events` table.
//!
//! The stream subscribes to the store's "new event" notices *before* it reads, then
//! always reads from the database after the last id it sent. A notice can only
//! shorten a wait, never carry data, so nothing is missed or sent twice, and a
//! reconnect with `Last-Event-ID` resumes exactly, across restarts too.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::extract::{job_id, Caller, PathParams};
use super::{ApiError, AppState};
use crate::queue::{EventNotice, JobEvent, JobStore, Scope};

/// Without a notice (e.g. the worker runs in another process) the database is polled this often.
const POLL: Duration = Duration::from_millis(500);
const BATCH: u32 = 256;

struct Cursor {
    store: Arc<dyn JobStore>,
    job: Uuid,
    scope: Scope,
    last_id: i64,
    notices: broadcast::Receiver<EventNotice>,
    pending: VecDeque<JobEvent>,
    finished: bool,
    terminal_seen: bool,
    shutdown: CancellationToken,
}

fn resume_point(headers: &HeaderMap, query: Option<&str>) -> Result<i64, ApiError> {
    let from_query = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "last_event_id")
        .map(|(_, v)| v.into_owned());
    let raw = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().unwrap_or("").to_owned()),
        None => from_query,
    };
    match raw {
        None => Ok(0),
        // An empty id is refused like an empty `cursor`: both name no point to resume from.
        Some(s) => s
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid-last-event-id",
                    format!("Last-Event-ID {s:?} is not an event id this server sent"),
                )
            }),
    }
}

fn to_sse(event: &JobEvent) -> Event {
    Event::default()
        .id(event.id.to_string())
        .event(event.kind.as_str())
        .data(event.data.to_string())
}

impl Cursor {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last_id = event.id;
                if event.kind.is_terminal() {
                    self.finished = true;
                    self.pending.clear();
                }
                return Some(to_sse(&event));
            }
            if self.finished || self.shutdown.is_cancelled() {
                return None;
            }
            match self.store.events_after(self.job, self.last_id, BATCH).await {
                Ok(events) if !events.is_empty() => {
                    self.pending.extend(events);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(job = %self.job, "reading events: {e}");
                    return None;
                }
            }
            // A job's terminal event commits with its terminal state, so once the state
            // reads terminal one more read has everything: after it the stream ends
            // (this is how a client that resumes after the last event gets an end).
            if self.terminal_seen {
                return None;
            }
            match self.store.get(self.job, &self.scope).await {
                Ok(job) if job.state.is_terminal() => {
                    self.terminal_seen = true;
                    continue;
                }
                Ok(_) => {}
                // Deleted while watched: nothing more will come.
                Err(_) => return None,
            }
            if !self.wait().await {
                return None;
            }
        }
    }

    /// Waits for a notice about this job, the poll interval or shutdown; false ends the stream.
    async fn wait(&mut self) -> bool {
        let deadline = tokio::time::sleep(POLL);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = &mut deadline => return true,
                notice = self.notices.recv() => match notice {
                    Ok(n) if n.job_id == self.job => return true,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return true,
                },
            }
        }
    }
}

pub(super) async fn stream(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = job_id(&id)?;
    let last_id = resume_point(&headers, query.as_deref())?;
    let notices = st.store.subscribe();
    st.store.get(id, &scope).await?;
    let cursor = Cursor {
        store: st.store.clone(),
        job: id,
        scope,
        last_id,
        notices,
        pending: VecDeque::new(),
        finished: false,
        terminal_seen: false,
        shutdown: st.shutdown.clone(),
    };
    let events =
        futures::stream::unfold(
            cursor,
            |mut c| async move { c.next().await.map(|e| (Ok(e), c)) },
        );
    let keep_alive = KeepAlive::new()
        .interval(Duration::from_secs(
            st.config.server.sse_keep_alive_seconds.max(1),
        ))
        .text("keep-alive");
    Ok(Sse::new(events).keep_alive(keep_alive))
}
