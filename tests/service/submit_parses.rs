//! A job's request is read, checked and parsed once, at submit: the worker renders the
//! validated document it stored, and a document stored by an older version (without
//! its validation) still renders.

use crate::support::*;
use serde_json::json;
use vqclip::models::{ClipTokenizer, TOKENIZED};
use vqclip::queue::{Jobs, NewJob};
use vqclip::render::prompts::PARSED;

/// The counters watch one marker at a time; the tests that watch take turns. Other
/// tests in this binary render at the same time, but their prompts lack the marker.
static COUNTED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn watch(marker: &str) {
    PARSED.watch(marker);
    TOKENIZED.watch(marker);
}

fn counts() -> (u64, u64) {
    (PARSED.count(), TOKENIZED.count())
}

#[tokio::test]
async fn a_submit_parses_and_tokenizes_each_prompt_once() {
    let _turn = COUNTED.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 0)).await;
    let mut spec = tiny_spec(
        "a red apple qxsub:2 | a green pear qxsub ^ a blue plum qxsub",
        4,
    );
    spec["change_prompt_every"] = json!(2);
    // Body tokens plus the start and end markers.
    let tok = ClipTokenizer::bundled().unwrap();
    let expected: Vec<usize> = [
        "a red apple qxsub",
        "a green pear qxsub",
        "a blue plum qxsub",
    ]
    .iter()
    .map(|t| tok.encode_body(t).unwrap().len() + 2)
    .collect();
    watch("qxsub");
    let job = s.api.submit(&spec).await;
    assert_eq!(
        counts(),
        (3, 3),
        "three prompts: one parse and one tokenization each"
    );
    // What the client sees is its request with the deployment's defaults, not the
    // stored validation.
    let shown = &job["spec"];
    assert_eq!(shown["prompts"], spec["prompts"]);
    assert_eq!(shown["priority"], 0);
    assert!(shown.get("validated").is_none(), "{shown}");
    let id = job["id"].as_str().unwrap();
    let stored = s
        .store
        .get(id.parse().unwrap(), &vqclip::queue::Scope::unrestricted())
        .await
        .unwrap();
    assert_eq!(stored.spec["validated"]["token_counts"], json!(expected));
    s.stop().await;
}

#[tokio::test]
async fn the_worker_renders_the_stored_validation_without_parsing_again() {
    let _turn = COUNTED.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    watch("qxwork");
    let job = s
        .api
        .submit(&tiny_spec("a lighthouse qxwork | fog qxwork:-1", 2))
        .await;
    let id = job["id"].as_str().unwrap();
    let done = s.api.wait_terminal(id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        PARSED.count(),
        2,
        "the prompts are parsed at submit and nowhere on the way to the render loop"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_job_stored_by_an_older_version_is_validated_again_and_renders() {
    let _turn = COUNTED.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    // The document an older version stored: the spec and the service's fields side by
    // side, models filled in, and no validation.
    let mut old = tiny_spec("a lighthouse qxold", 2);
    old["version"] = json!(1);
    old["priority"] = json!(5);
    old["keep"] = json!(false);
    old["webhook"] = json!(null);
    old["checkpoint_every"] = json!(50);
    old["models"] = json!({"vqgan": s.config.models.vqgan, "clip": s.config.models.clip});
    let new = NewJob {
        spec: old,
        priority: 5,
        keep: false,
        total_steps: 2,
        owner_key_id: None,
        idempotency_key: None,
        request_hash: "old".into(),
        max_attempts: 1,
        warnings: vec![],
        seed: Some(7),
    };
    watch("qxold");
    let job = s.store.submit(new, 100).await.unwrap().job().clone();
    let done = s.api.wait_terminal(&job.id.to_string(), LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(PARSED.count(), 1, "validated again once, by the worker");
    assert_eq!(done["spec"]["priority"], 5);
    s.stop().await;
}
