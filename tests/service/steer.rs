//! Steering a job with PATCH and forking from a saved frame, through the real server
//! and its worker on the tiny models.

use std::process::Command;

use serde_json::{json, Value};

use crate::support::s3::{backends, storage_config, Backend};
use crate::support::{
    assert_signed, loopback_webhooks, problem, succeeded, test_config, tiny_spec, InProcessServer,
    Receiver, SseEvent, LONG,
};

const SECRET: &str = "whsec_c3RlZXJpbmctdGVzdC1zZWNyZXQ=";

impl crate::support::Api {
    async fn patch(&self, path: &str, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut r = self.client.patch(self.url(path)).json(body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send().await.unwrap()
    }

    async fn post_json(&self, path: &str, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send().await.unwrap()
    }
}

async fn json_of(r: reqwest::Response, status: u16) -> Value {
    let got = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    body
}

/// The step of each event, in order, as `kind step`.
fn timeline(events: &[SseEvent]) -> Vec<(String, u64)> {
    events
        .iter()
        .filter_map(|e| {
            let step = e.data["step"].as_u64()?;
            Some((e.event.clone(), step))
        })
        .collect()
}

#[tokio::test]
async fn a_running_job_steered_twice_records_both_revisions_and_their_steps() {
    let (hook_url, receiver) = Receiver::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 1);
    let start_sender = loopback_webhooks(&mut config, SECRET);
    let server = InProcessServer::start(config).await;
    let (stop, sender) = start_sender(&server);
    let mut spec = tiny_spec("a red apple", 400);
    spec["save_every"] = json!(50);
    spec["webhook"] = json!({"url": hook_url, "events": ["steered", "completed"]});
    let job = server.submit(&spec).await;
    let id = job["id"].as_str().unwrap();
    server.wait_step(id, 3, LONG).await;

    let first = server
        .patch(
            &format!("/v1/jobs/{id}"),
            &json!({"prompts": "a blue lake", "lr": 0.2}),
            None,
        )
        .await;
    let first = json_of(first, 202).await;
    assert_eq!(first["revision"], 1);
    assert_eq!(
        first["changes"],
        json!({"prompts": "a blue lake", "lr": 0.2})
    );
    let at = server.job(id).await["progress"]["step"].as_u64().unwrap();
    let second = server
        .patch(
            &format!("/v1/jobs/{id}"),
            &json!({"cutn": 3, "steps": at + 25}),
            None,
        )
        .await;
    assert_eq!(json_of(second, 202).await["revision"], 2);

    let done = server.wait_terminal(id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let revisions = done["revisions"].as_array().unwrap();
    assert_eq!(revisions.len(), 2, "{done}");
    let steps: Vec<u64> = revisions
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps[0] >= 3 && steps[1] >= steps[0] && steps[1] <= at + 25,
        "{steps:?}"
    );
    assert_eq!(done["progress"]["total"], at + 25);
    // The effective spec shows in the revisions, the submitted one stays the job's spec.
    assert_eq!(done["spec"]["prompts"], "a red apple");

    // Each `steered` event sits between the progress events of its step and the next.
    let events = server.events(id, None, 10_000).await;
    let steered: Vec<&SseEvent> = events.iter().filter(|e| e.event == "steered").collect();
    let shown: Vec<(u64, u64)> = steered
        .iter()
        .map(|e| {
            (
                e.data["revision"].as_u64().unwrap(),
                e.data["step"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, vec![(1, steps[0]), (2, steps[1])]);
    let line = timeline(&events);
    for (at, (kind, step)) in line.iter().enumerate() {
        if kind != "steered" {
            continue;
        }
        let before = line[..at].iter().rev().find(|(k, _)| k == "progress");
        let after = line[at + 1..].iter().find(|(k, _)| k == "progress");
        if *step > 0 {
            assert_eq!(before.map(|b| b.1), Some(*step), "{line:?}");
        }
        assert_eq!(after.map(|a| a.1), Some(step + 1), "{line:?}");
    }
    assert_eq!(
        steered[0].data["changes"],
        json!({"prompts": "a blue lake", "lr": 0.2})
    );

    let meta = server
        .get_json(&format!("/v1/jobs/{id}/metadata.json"))
        .await;
    let listed: Vec<(u64, u64)> = meta["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["number"].as_u64().unwrap(), r["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(listed, vec![(1, steps[0]), (2, steps[1])]);

    // The webhook hears each revision as `job.steered`, with its step, before the end.
    let mut bodies: Vec<Value> = vec![];
    for _ in 0..200 {
        bodies = receiver
            .got()
            .iter()
            .map(|r| serde_json::from_str(&r.body).unwrap())
            .collect();
        if bodies.iter().any(|b| b["type"] == "job.completed") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let types: Vec<&str> = bodies.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["job.steered", "job.steered", "job.completed"]);
    let hooked: Vec<(u64, u64)> = bodies[..2]
        .iter()
        .map(|b| {
            assert_eq!(b["data"]["job_id"], id);
            (
                b["data"]["revision"].as_u64().unwrap(),
                b["data"]["step"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(hooked, vec![(1, steps[0]), (2, steps[1])]);
    for r in &receiver.got() {
        assert_signed(SECRET, r);
    }
    stop.cancel();
    sender.await.unwrap();

    // A finished job is not steered.
    let late = server
        .patch(&format!("/v1/jobs/{id}"), &json!({"lr": 0.1}), None)
        .await;
    let p = problem(late, 409).await;
    assert_eq!(p["state"], "succeeded");
    server.stop().await;
}

#[tokio::test]
async fn bad_changes_are_refused_with_the_field_and_a_queued_job_takes_them_at_its_start() {
    let dir = tempfile::tempdir().unwrap();
    // No worker: the job stays queued.
    let server = InProcessServer::start(test_config(dir.path(), 0)).await;
    let job = server.submit(&tiny_spec("a red apple", 10)).await;
    let id = job["id"].as_str().unwrap();
    let path = format!("/v1/jobs/{id}");
    for (body, field) in [
        (json!({"lr": -1}), "lr"),
        (json!({"width": 64}), "width"),
        (json!({"prompts": "a|:2"}), "prompts[1]"),
        (json!({"steps": 0}), "steps"),
        (json!({}), "body"),
        (json!(["lr"]), "body"),
    ] {
        let p = problem(server.patch(&path, &body, None).await, 422).await;
        assert_eq!(p["field"], field, "{body}: {p}");
    }
    let unknown = Value::String(uuid::Uuid::now_v7().to_string());
    let p = problem(
        server
            .patch(
                &format!("/v1/jobs/{}", unknown.as_str().unwrap()),
                &json!({"lr": 0.1}),
                None,
            )
            .await,
        404,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("no job"));

    let ok = json_of(server.patch(&path, &json!({"steps": 12}), None).await, 202).await;
    assert_eq!(ok["step"], Value::Null);
    let shown = server.job(id).await;
    assert_eq!(shown["revisions"][0]["changes"], json!({"steps": 12}));
    assert_eq!(shown["revisions"][0]["step"], Value::Null);
    server.stop().await;

    // A worker takes the pending revision at the job's first step boundary.
    let server = InProcessServer::start(test_config(dir.path(), 1)).await;
    let done = server.wait_terminal(id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["revisions"][0]["step"], 0);
    assert_eq!(done["progress"]["step"], 12);
    server.stop().await;
}

#[tokio::test]
async fn a_fork_without_changes_continues_as_its_parent_and_forks_chain_on_both_backends() {
    for backend in backends() {
        fork_chain(backend).await;
    }
}

async fn fork_chain(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (storage, _moto) = storage_config(backend, dir.path()).await;
    let mut config = test_config(dir.path(), 1);
    config.storage = storage;
    let server = InProcessServer::start(config).await;
    let mut spec = tiny_spec("a castle", 20);
    spec["save_every"] = json!(10);
    let parent = server.submit(&spec).await;
    let pid = parent["id"].as_str().unwrap().to_owned();
    assert_eq!(server.wait_terminal(&pid, LONG).await["state"], "succeeded");

    // Only saved frames are fork points; the answer lists the nearest.
    let p = problem(
        server
            .post_json(
                &format!("/v1/jobs/{pid}/fork"),
                &json!({"from_step": 7}),
                None,
            )
            .await,
        422,
    )
    .await;
    assert_eq!(p["field"], "from_step");
    assert_eq!(p["nearest"], json!([0, 10, 20]));
    let p = problem(
        server
            .post_json(
                &format!("/v1/jobs/{pid}/fork"),
                &json!({"from_step": 10, "changes": {"height": 64}}),
                None,
            )
            .await,
        422,
    )
    .await;
    assert_eq!(p["field"], "height");

    let child = server
        .post_json(
            &format!("/v1/jobs/{pid}/fork"),
            &json!({"from_step": 10}),
            None,
        )
        .await;
    let child = json_of(child, 201).await;
    let cid = child["id"].as_str().unwrap().to_owned();
    assert_eq!(
        child["parent"],
        json!({"id": pid, "step": 10, "href": format!("/v1/jobs/{pid}")})
    );
    assert_eq!(server.wait_terminal(&cid, LONG).await["state"], "succeeded");
    for path in ["frames/20.png", "image.png"] {
        let a = server.get_bytes(&format!("/v1/jobs/{pid}/{path}")).await;
        let b = server.get_bytes(&format!("/v1/jobs/{cid}/{path}")).await;
        assert!(a == b, "{path} differs between the parent and its fork");
    }
    assert_eq!(server.job(&pid).await["forks"][0]["id"], cid);

    // A fork of the fork, with changes; the parent's removal does not break it.
    assert_eq!(
        server.delete(&format!("/v1/jobs/{pid}")).await.status(),
        204
    );
    let grandchild = server
        .post_json(
            &format!("/v1/jobs/{cid}/fork"),
            &json!({"from_step": 20, "changes": {"prompts": "a ruin", "steps": 24}, "reset_optimizer": true}),
            None,
        )
        .await;
    let grandchild = json_of(grandchild, 201).await;
    let gid = grandchild["id"].as_str().unwrap();
    assert_eq!(grandchild["spec"]["prompts"], "a ruin");
    assert_eq!(grandchild["parent"]["id"], cid);
    let done = server.wait_terminal(gid, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"]["step"], 24);
    server.stop().await;
}

fn vqclip_keys(db: &str, name: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["keys", "create", "--name", name, "--database-url", db])
        .env_remove("VQCLIP_CONFIG")
        .output()
        .unwrap();
    succeeded(&out).trim().to_owned()
}

#[tokio::test]
async fn another_keys_job_is_not_found_for_patch_and_fork() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), 0);
    let (a, b) = (
        vqclip_keys(&config.database.url, "a"),
        vqclip_keys(&config.database.url, "b"),
    );
    let server = InProcessServer::start(config).await;
    let r = server
        .post_json("/v1/jobs", &tiny_spec("mine", 4), Some(&a))
        .await;
    let id = json_of(r, 201).await["id"].as_str().unwrap().to_owned();
    problem(
        server
            .patch(&format!("/v1/jobs/{id}"), &json!({"lr": 0.2}), Some(&b))
            .await,
        404,
    )
    .await;
    problem(
        server
            .post_json(
                &format!("/v1/jobs/{id}/fork"),
                &json!({"from_step": 0}),
                Some(&b),
            )
            .await,
        404,
    )
    .await;
    json_of(
        server
            .patch(&format!("/v1/jobs/{id}"), &json!({"lr": 0.2}), Some(&a))
            .await,
        202,
    )
    .await;
    server.stop().await;
}
