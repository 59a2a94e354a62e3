//! The queue's state machine, the same on every backend: each test is generic over the store,
//! and each backend's `tests` module runs all of them ([`queue_suite!`]) on a fresh store of its own.

use std::time::Duration;

use super::*;

pub const LEASE: Duration = Duration::from_secs(30);

pub fn new_job(priority: i32) -> NewJob {
    NewJob {
        spec: serde_json::json!({ "prompts": "x", "priority": priority }),
        priority,
        keep: false,
        total_steps: 10,
        owner_key_id: None,
        idempotency_key: None,
        request_hash: "h".into(),
        max_attempts: 2,
        warnings: vec![],
        seed: Some(7),
    }
}

pub async fn submit<S: JobStore>(s: &S, priority: i32) -> Job {
    match s.submit(new_job(priority), 100).await.unwrap() {
        Submitted::Created(j) => j,
        Submitted::Existing(_) => panic!("no idempotency key was given"),
    }
}

pub async fn submit_spec<S: JobStore>(s: &S, priority: i32, spec: serde_json::Value) -> Job {
    let mut new = new_job(priority);
    new.spec = spec;
    match s.submit(new, 100).await.unwrap() {
        Submitted::Created(j) => j,
        Submitted::Existing(_) => panic!("no idempotency key was given"),
    }
}

/// Paths for candidates to agree on. The claim takes any; the worker hands it render's
/// batch key (`BatchKey::json_paths`), which the queue never imports.
fn agree_on() -> Vec<String> {
    ["$.width", "$.height", "$.models"]
        .map(String::from)
        .to_vec()
}

pub async fn claims_by_priority_then_first_in_first_out<S: JobStore + Clone>(s: S) {
    let a = submit(&s, 0).await;
    let b = submit(&s, 5).await;
    let c = submit(&s, 0).await;
    let d = submit(&s, 5).await;
    let pos = |j: Job| {
        let s = s.clone();
        async move { s.position(&j).await.unwrap() }
    };
    assert_eq!(pos(b.clone()).await, Some(1));
    assert_eq!(pos(d.clone()).await, Some(2));
    assert_eq!(pos(a.clone()).await, Some(3));
    assert_eq!(pos(c.clone()).await, Some(4));
    let mut order = vec![];
    while let Some(j) = s.claim("w1", "cpu", LEASE).await.unwrap() {
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.attempts, 1);
        assert_eq!(s.position(&j).await.unwrap(), None);
        order.push(j.id);
    }
    assert_eq!(order, vec![b.id, d.id, a.id, c.id]);
}

pub async fn concurrent_claims_take_each_job_once<S: JobStore + Clone>(s: S) {
    for i in 0..40 {
        submit(&s, i % 3).await;
    }
    let mut tasks = vec![];
    for w in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("w{w}");
            let mut got = vec![];
            while let Some(j) = s.claim(&id, "cpu", LEASE).await.unwrap() {
                got.push(j.id);
            }
            got
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, 40);
    assert_eq!(all.len(), 40);
}

pub async fn expired_leases_are_requeued_then_failed_at_max_attempts<S: JobStore + Clone>(s: S) {
    let job = submit(&s, 0).await;
    let short = Duration::from_millis(1);
    s.claim("w1", "cpu", short).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = s.rescue_expired().await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].state, JobState::Queued);
    let j = s.get(job.id, &Scope::unrestricted()).await.unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 1));
    // The old worker lost its lease: it can neither renew nor finish.
    assert!(matches!(
        s.renew(job.id, "w1", LEASE).await,
        Err(QueueError::LeaseLost { .. })
    ));
    let again = s.claim("w2", "cpu", short).await.unwrap().unwrap();
    assert_eq!(again.attempts, 2);
    assert!(matches!(
        s.finish(job.id, "w1", Finish::Failed { error: "x".into() })
            .await,
        Err(QueueError::LeaseLost { .. })
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = s.rescue_expired().await.unwrap();
    assert_eq!(r[0].state, JobState::Failed);
    let j = s.get(job.id, &Scope::unrestricted()).await.unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.error.unwrap().contains("2 times"));
    assert!(s.claim("w3", "cpu", LEASE).await.unwrap().is_none());
    // A live lease is left alone.
    let k = submit(&s, 0).await;
    s.claim("w3", "cpu", LEASE).await.unwrap().unwrap();
    assert!(s.rescue_expired().await.unwrap().is_empty());
    assert!(!s.renew(k.id, "w3", LEASE).await.unwrap().cancel_requested);
}

pub async fn graceful_release_requeues_without_spending_an_attempt<S: JobStore + Clone>(s: S) {
    let job = submit(&s, 0).await;
    s.claim("w1", "cpu", LEASE).await.unwrap().unwrap();
    s.set_checkpoint(job.id, "w1", "checkpoint.bin", 4)
        .await
        .unwrap();
    s.release(job.id, "w1").await.unwrap();
    let j = s.get(job.id, &Scope::unrestricted()).await.unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0));
    assert_eq!(j.checkpoint.as_deref(), Some("checkpoint.bin"));
    assert_eq!(j.checkpoint_step, 4);
    let j = s.claim("w2", "cpu", LEASE).await.unwrap().unwrap();
    assert_eq!(j.attempts, 1);
}

pub async fn cancel_covers_every_state<S: JobStore + Clone>(s: S) {
    let all = Scope::unrestricted();
    let queued = submit(&s, 0).await;
    assert!(matches!(
        s.cancel(queued.id, &all).await.unwrap(),
        CancelOutcome::Canceled(j) if j.state == JobState::Canceled
    ));
    assert!(matches!(
        s.cancel(queued.id, &all).await.unwrap(),
        CancelOutcome::AlreadyCanceled(_)
    ));
    let running = submit(&s, 0).await;
    s.claim("w", "cpu", LEASE).await.unwrap().unwrap();
    assert!(matches!(
        s.cancel(running.id, &all).await.unwrap(),
        CancelOutcome::Requested(j) if j.state == JobState::Running && j.cancel_requested
    ));
    assert!(
        s.renew(running.id, "w", LEASE)
            .await
            .unwrap()
            .cancel_requested
    );
    s.finish(running.id, "w", Finish::Canceled { step: 3 })
        .await
        .unwrap();
    let done = submit(&s, 0).await;
    s.claim("w", "cpu", LEASE).await.unwrap().unwrap();
    s.finish(
        done.id,
        "w",
        Finish::Succeeded {
            data: serde_json::json!({}),
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        s.cancel(done.id, &all).await,
        Err(QueueError::Conflict {
            state: JobState::Succeeded,
            ..
        })
    ));
    assert!(matches!(
        s.cancel(Uuid::now_v7(), &all).await,
        Err(QueueError::NotFound(_))
    ));
    let kinds: Vec<_> = s
        .events_after(running.id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![EventKind::State, EventKind::State, EventKind::Canceled]
    );
}

pub async fn delete_only_terminal_jobs_and_their_events<S: JobStore + Clone>(s: S) {
    let all = Scope::unrestricted();
    let j = submit(&s, 0).await;
    assert!(matches!(
        s.delete(j.id, &all).await,
        Err(QueueError::Conflict {
            state: JobState::Queued,
            ..
        })
    ));
    s.cancel(j.id, &all).await.unwrap();
    s.delete(j.id, &all).await.unwrap();
    assert!(matches!(
        s.get(j.id, &all).await,
        Err(QueueError::NotFound(_))
    ));
    assert!(s.events_after(j.id, 0, 10).await.unwrap().is_empty());
}

pub async fn idempotency_keys_return_the_same_job_per_owner<S: JobStore + Clone>(s: S) {
    let mut n = new_job(0);
    n.idempotency_key = Some("k1".into());
    let first = s.submit(n.clone(), 100).await.unwrap();
    assert!(matches!(first, Submitted::Created(_)));
    let again = s.submit(n.clone(), 100).await.unwrap();
    assert!(matches!(&again, Submitted::Existing(j) if j.id == first.job().id));
    let mut other_body = n.clone();
    other_body.request_hash = "other".into();
    assert!(matches!(
        s.submit(other_body, 100).await,
        Err(QueueError::IdempotencyMismatch { .. })
    ));
    let mut other_owner = n.clone();
    other_owner.owner_key_id = Some("key-b".into());
    let b = s.submit(other_owner, 100).await.unwrap();
    assert!(matches!(&b, Submitted::Created(j) if j.id != first.job().id));
    // Scopes hide other owners' jobs.
    assert!(s.get(b.job().id, &Scope::key("key-a")).await.is_err());
    assert!(s.get(b.job().id, &Scope::key("key-b")).await.is_ok());
}

pub async fn a_full_queue_refuses_new_jobs<S: JobStore + Clone>(s: S) {
    s.submit(new_job(0), 2).await.unwrap();
    s.submit(new_job(0), 2).await.unwrap();
    assert!(matches!(
        s.submit(new_job(0), 2).await,
        Err(QueueError::QueueFull {
            queued: 2,
            limit: 2
        })
    ));
    s.claim("w", "cpu", LEASE).await.unwrap().unwrap();
    s.submit(new_job(0), 2).await.unwrap();
}

pub async fn lists_newest_first_with_a_cursor_and_state_filter<S: JobStore + Clone>(s: S) {
    let mut ids = vec![];
    for _ in 0..5 {
        ids.push(submit(&s, 0).await.id);
    }
    s.claim("w", "cpu", LEASE).await.unwrap().unwrap();
    let all = Scope::unrestricted();
    let mut seen = vec![];
    let mut q = ListQuery {
        limit: 2,
        ..Default::default()
    };
    loop {
        let page = s.list(&q, &all).await.unwrap();
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next_cursor {
            Some(c) => q.before = Some(c),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let running = s
        .list(
            &ListQuery {
                state: Some(JobState::Running),
                limit: 10,
                before: None,
            },
            &all,
        )
        .await
        .unwrap();
    assert_eq!(running.jobs.len(), 1);
    assert_eq!(running.jobs[0].id, *ids.last().unwrap());
}

pub async fn events_are_ordered_and_notified_after_commit<S: JobStore + Clone>(s: S) {
    let mut rx = s.subscribe();
    let j = submit(&s, 0).await;
    s.claim("w", "cpu", LEASE).await.unwrap().unwrap();
    for step in 1..=3 {
        let p = Progress {
            step,
            total: 10,
            loss: Some(1.0 / step as f64),
            eta_seconds: Some(1.0),
        };
        s.progress(j.id, "w", p, serde_json::json!({ "step": step }))
            .await
            .unwrap();
    }
    let events = s.events_after(j.id, 0, 100).await.unwrap();
    assert_eq!(events.len(), 5);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    let tail = s.events_after(j.id, events[2].id, 100).await.unwrap();
    assert_eq!(tail.len(), 2);
    assert_eq!(tail[0].data["step"], 2);
    let mut notified = vec![];
    while let Ok(n) = rx.try_recv() {
        notified.push(n.event_id);
    }
    assert_eq!(notified, events.iter().map(|e| e.id).collect::<Vec<_>>());
    let got = s.get(j.id, &Scope::unrestricted()).await.unwrap();
    assert_eq!(got.progress.step, 3);
}

pub async fn claims_alongside_take_only_jobs_agreeing_with_the_leader<S: JobStore + Clone>(s: S) {
    let models = |clip: &str| serde_json::json!({ "vqgan": "v", "clip": [clip] });
    let spec = |w: u32, h: u32, clip: &str, prompt: &str| serde_json::json!({ "prompts": prompt, "width": w, "height": h, "models": models(clip) });
    let leader = submit_spec(&s, 9, spec(64, 64, "a", "leader")).await;
    let wide = submit_spec(&s, 8, spec(128, 64, "a", "wide")).await;
    let other_models = submit_spec(&s, 8, spec(64, 64, "b", "other models")).await;
    let low = submit_spec(&s, 0, spec(64, 64, "a", "low")).await;
    let high = submit_spec(&s, 5, spec(64, 64, "a", "high")).await;

    assert_eq!(
        s.claim("w1", "cpu", LEASE).await.unwrap().unwrap().id,
        leader.id
    );
    let mut taken = vec![];
    while let Some(j) = s
        .claim_alongside("w1", "cpu", LEASE, leader.id, &agree_on())
        .await
        .unwrap()
    {
        assert_eq!(
            (j.state, j.lease_owner.as_deref()),
            (JobState::Running, Some("w1"))
        );
        taken.push(j.id);
    }
    // Compatible jobs only, in the claim's own order (priority, then first in).
    assert_eq!(taken, vec![high.id, low.id]);
    for id in [wide.id, other_models.id] {
        let j = s.get(id, &Scope::unrestricted()).await.unwrap();
        assert_eq!(j.state, JobState::Queued);
    }
    // Each claim alongside is a claim: a `running` state event per job.
    let events = s.events_after(high.id, 0, 10).await.unwrap();
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::State && e.data["state"] == "running"));
    // With no paths to agree on, any queued job goes along.
    let any = s
        .claim_alongside("w1", "cpu", LEASE, leader.id, &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(any.id, wide.id);
}

pub async fn concurrent_claims_alongside_take_each_job_once<S: JobStore + Clone>(s: S) {
    let spec = serde_json::json!({ "prompts": "x", "width": 32, "height": 32 });
    let leader = submit_spec(&s, 0, spec.clone()).await;
    for _ in 0..30 {
        submit_spec(&s, 0, spec.clone()).await;
    }
    s.claim("w0", "cpu", LEASE).await.unwrap().unwrap();
    let mut tasks = vec![];
    for w in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("w{w}");
            let mut got = vec![];
            while let Some(j) = s
                .claim_alongside(&id, "cpu", LEASE, leader.id, &agree_on())
                .await
                .unwrap()
            {
                got.push(j.id);
            }
            got
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!((n, all.len()), (30, 30));
}

/// One `#[tokio::test]` per suite test, each on a store from `$make().await`, which returns
/// `Some((guard, store))`; the guard lives to the end of the test (a temporary directory, a
/// database). `None` skips, which a backend allows only when told to explicitly.
pub async fn revisions_are_numbered_applied_once_and_refused_when_finished<S: JobStore + Clone>(
    s: S,
) {
    let job = submit(&s, 0).await;
    let all = Scope::unrestricted();
    let doc = |p: &str| serde_json::json!({ "prompts": p });
    // Another key's job is not there to steer.
    let other = s
        .steer(
            job.id,
            &Scope::key("someone"),
            serde_json::json!({}),
            doc("a"),
        )
        .await;
    assert!(matches!(other, Err(QueueError::NotFound(_))), "{other:?}");
    let mut steered = s.steerings();
    let r1 = s
        .steer(
            job.id,
            &all,
            serde_json::json!({ "prompts": "a" }),
            doc("a"),
        )
        .await
        .unwrap();
    // Workers in this process hear of it the moment it commits.
    assert_eq!(steered.try_recv().unwrap(), job.id);
    let r2 = s
        .steer(
            job.id,
            &all,
            serde_json::json!({ "prompts": "b" }),
            doc("b"),
        )
        .await
        .unwrap();
    assert_eq!((r1.number, r2.number), (1, 2));
    assert_eq!((r1.step, r2.step), (None, None));

    let claimed = s.claim("w1", "cpu", LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.id, job.id);
    // Only the lease holder records where a revision took effect.
    let lost = s
        .revision_applied(job.id, "w2", 1, 0, serde_json::json!({}))
        .await;
    assert!(
        matches!(lost, Err(QueueError::LeaseLost { .. })),
        "{lost:?}"
    );
    let data = serde_json::json!({ "revision": 1, "step": 4 });
    s.revision_applied(job.id, "w1", 1, 4, data.clone())
        .await
        .unwrap();
    // Applied once: a repeat neither moves the step nor adds an event.
    s.revision_applied(job.id, "w1", 1, 9, data.clone())
        .await
        .unwrap();
    let revisions = s.revisions(job.id).await.unwrap();
    assert_eq!(revisions.len(), 2);
    assert_eq!(revisions[0].step, Some(4));
    assert_eq!(revisions[0].spec, doc("a"));
    assert_eq!(revisions[1].step, None);
    let steered: Vec<JobEvent> = s
        .events_after(job.id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::Steered)
        .collect();
    assert_eq!(steered.len(), 1);
    assert_eq!(steered[0].data, data);

    s.finish(job.id, "w1", Finish::Canceled { step: 5 })
        .await
        .unwrap();
    let late = s.steer(job.id, &all, serde_json::json!({}), doc("c")).await;
    assert!(
        matches!(
            late,
            Err(QueueError::Conflict {
                state: JobState::Canceled,
                ..
            })
        ),
        "{late:?}"
    );
}

pub async fn forks_link_both_ways_and_outlive_their_parent<S: JobStore + Clone>(s: S) {
    let parent = submit(&s, 0).await;
    let fork = |from: Uuid, step: u32| {
        let s = s.clone();
        async move {
            match s
                .fork(new_job(0), ForkLink { job: from, step }, 100)
                .await
                .unwrap()
            {
                Submitted::Created(j) => j,
                Submitted::Existing(_) => panic!("no idempotency key was given"),
            }
        }
    };
    let a = fork(parent.id, 10).await;
    let b = fork(parent.id, 20).await;
    let c = fork(a.id, 30).await;
    assert_eq!(c.state, JobState::Queued);
    let lineage = s.lineage(parent.id).await.unwrap();
    assert_eq!(lineage.parent, None);
    assert_eq!(
        lineage.forks,
        vec![
            ForkLink {
                job: a.id,
                step: 10
            },
            ForkLink {
                job: b.id,
                step: 20
            }
        ]
    );
    let of_a = s.lineage(a.id).await.unwrap();
    assert_eq!(
        of_a.parent,
        Some(ForkLink {
            job: parent.id,
            step: 10
        })
    );
    assert_eq!(
        of_a.forks,
        vec![ForkLink {
            job: c.id,
            step: 30
        }]
    );

    // The parent goes; its forks still name it.
    let all = Scope::unrestricted();
    s.cancel(parent.id, &all).await.unwrap();
    s.delete(parent.id, &all).await.unwrap();
    assert_eq!(
        s.lineage(a.id).await.unwrap().parent,
        Some(ForkLink {
            job: parent.id,
            step: 10
        })
    );
    // A fork that goes leaves its parent's list.
    s.cancel(c.id, &all).await.unwrap();
    s.delete(c.id, &all).await.unwrap();
    assert!(s.lineage(a.id).await.unwrap().forks.is_empty());
}

macro_rules! queue_suite {
    ($make:ident) => {
        $crate::queue::suite::queue_suite!(@ $make; claims_by_priority_then_first_in_first_out, concurrent_claims_take_each_job_once, expired_leases_are_requeued_then_failed_at_max_attempts, graceful_release_requeues_without_spending_an_attempt, cancel_covers_every_state, delete_only_terminal_jobs_and_their_events, idempotency_keys_return_the_same_job_per_owner, a_full_queue_refuses_new_jobs, lists_newest_first_with_a_cursor_and_state_filter, events_are_ordered_and_notified_after_commit, claims_alongside_take_only_jobs_agreeing_with_the_leader, concurrent_claims_alongside_take_each_job_once, revisions_are_numbered_applied_once_and_refused_when_finished, forks_link_both_ways_and_outlive_their_parent);
    };
    (@ $make:ident; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some((_guard, s)) = $make().await else {
                    return;
                };
                $crate::queue::suite::$name(s).await;
            }
        )*
    };
}
pub(crate) use queue_suite;
