//! The API without workers: every bad input answers 4xx problem+json, and the queue
//! operations that need no render (idempotency, listing, positions, cancel, limits).

use std::time::Duration;

use crate::support::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use vqclip::queue::{Finish, Leases};

async fn server() -> (tempfile::TempDir, InProcessServer) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 0);
    config.server.max_body_bytes = 64 * 1024;
    config.server.max_upload_bytes = 256 * 1024;
    config.limits.max_queued_jobs = 50;
    let s = InProcessServer::start(config).await;
    (dir, s)
}

async fn post_json(s: &InProcessServer, spec: Value) -> reqwest::Response {
    s.client
        .post(s.url("/v1/jobs"))
        .json(&spec)
        .send()
        .await
        .unwrap()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb([200, 30, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// PNG chunk CRC (CRC-32/ISO-HDLC), as flate2 computes it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// A real PNG whose header claims 60000x60000 pixels: a decompression bomb's shape.
fn bomb() -> Vec<u8> {
    let mut bytes = png(1, 1);
    bytes[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

#[tokio::test]
async fn bad_job_bodies_are_4xx_problems() {
    let (_d, s) = server().await;
    let ok = tiny_spec("a red apple", 4);

    let r = s
        .client
        .post(s.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{\"prompts\": \"x\",")
        .send()
        .await
        .unwrap();
    let p = problem(r, 400).await;
    assert_eq!(p["type"], "urn:vqclip:problem:malformed-json");

    let mut unknown = ok.clone();
    unknown["promtps"] = json!("typo");
    let p = problem(post_json(&s, unknown).await, 422).await;
    assert!(p["detail"].as_str().unwrap().contains("promtps"), "{p}");

    let r = s
        .client
        .post(s.url("/v1/jobs"))
        .header("content-type", "text/plain")
        .body(ok.to_string())
        .send()
        .await
        .unwrap();
    problem(r, 415).await;
    let r = s
        .client
        .post(s.url("/v1/jobs"))
        .body(ok.to_string())
        .send()
        .await
        .unwrap();
    problem(r, 415).await;

    problem(post_json(&s, json!(["not", "an", "object"])).await, 422).await;
    let mut wrong_type = ok.clone();
    wrong_type["steps"] = json!("ten");
    problem(post_json(&s, wrong_type).await, 422).await;

    for (field, value) in [
        ("width", json!(33)),
        ("height", json!(40)),
        ("width", json!(4096)),
        ("steps", json!(0)),
        ("steps", json!(100_000)),
        ("cutn", json!(100_000)),
    ] {
        let mut bad = ok.clone();
        bad[field] = value.clone();
        let p = problem(post_json(&s, bad).await, 422).await;
        assert_eq!(p["field"], field, "{field}={value}: {p}");
    }

    for prompts in [json!(""), json!("   ")] {
        let mut bad = ok.clone();
        bad["prompts"] = prompts;
        let p = problem(post_json(&s, bad).await, 422).await;
        assert!(p["field"].as_str().unwrap().starts_with("prompts"), "{p}");
    }
    let mut many = ok.clone();
    many["prompts"] = json!(vec!["a cat"; 40].join("|"));
    problem(post_json(&s, many).await, 422).await;

    // Longer than CLIP's 77-token context: rejected, never silently truncated.
    let mut long = ok.clone();
    long["prompts"] = json!(vec!["banana"; 100].join(" "));
    let p = problem(post_json(&s, long).await, 422).await;
    assert!(p["detail"].as_str().unwrap().contains("77"), "{p}");

    let mut big = ok.clone();
    big["prompts"] = json!("x".repeat(100 * 1024));
    problem(post_json(&s, big).await, 413).await;

    let mut ghost = ok.clone();
    ghost["init_image"] = json!(format!("upload:{}", uuid::Uuid::now_v7()));
    let p = problem(post_json(&s, ghost).await, 422).await;
    assert_eq!(p["field"], "init_image");

    let mut inline_junk = ok.clone();
    inline_junk["image_prompts"] = json!([{ "image": "data:image/png;base64,aGVsbG8gd29ybGQ=" }]);
    problem(post_json(&s, inline_junk).await, 422).await;

    let r = s
        .client
        .post(s.url("/v1/jobs"))
        .header("idempotency-key", "")
        .json(&ok)
        .send()
        .await
        .unwrap();
    problem(r, 400).await;
    s.stop().await;
}

#[tokio::test]
async fn bad_uploads_are_4xx_problems_and_good_ones_are_usable() {
    let (_d, s) = server().await;
    let upload = |body: Vec<u8>, ct: &'static str| {
        s.client
            .post(s.url("/v1/uploads"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    problem(
        upload(b"hello, I am text".to_vec(), "image/png")
            .await
            .unwrap(),
        415,
    )
    .await;
    let p = problem(upload(bomb(), "image/png").await.unwrap(), 413).await;
    assert_eq!(p["type"], "urn:vqclip:problem:image-too-large");
    problem(
        upload(vec![0u8; 300 * 1024], "image/png").await.unwrap(),
        413,
    )
    .await;
    problem(upload(png(8, 8), "text/plain").await.unwrap(), 415).await;
    let mut truncated = png(16, 16);
    truncated.truncate(truncated.len() - 16);
    problem(upload(truncated, "image/png").await.unwrap(), 422).await;

    // Raw body, multipart and base64 JSON all work.
    let r = upload(png(16, 16), "image/png").await.unwrap();
    assert_eq!(r.status(), 201);
    let raw: Value = r.json().await.unwrap();
    assert_eq!(
        (raw["width"].as_u64(), raw["height"].as_u64()),
        (Some(16), Some(16))
    );
    let boundary = "vqclip-test-boundary";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\
         Content-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    form.extend(png(24, 8));
    form.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let r = s
        .client
        .post(s.url("/v1/uploads"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let multi: Value = r.json().await.unwrap();
    assert_eq!(multi["width"], 24);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(png(8, 8));
    let r = s
        .client
        .post(s.url("/v1/uploads"))
        .json(&json!({ "image": format!("data:image/png;base64,{b64}") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let mut spec = tiny_spec("a red apple", 4);
    spec["init_image"] = raw["ref"].clone();
    spec["image_prompts"] = json!([{ "image": multi["ref"], "weight": 0.5 }]);
    let job = s.submit(&spec).await;
    assert_eq!(job["spec"]["init_image"], raw["ref"]);
    s.stop().await;
}

#[tokio::test]
async fn unknown_ids_routes_and_traversal_are_4xx_problems() {
    let (_d, s) = server().await;
    let ghost = uuid::Uuid::now_v7();
    for path in [
        format!("/v1/jobs/{ghost}"),
        "/v1/jobs/not-a-uuid".to_owned(),
        format!("/v1/jobs/{ghost}/events"),
        format!("/v1/jobs/{ghost}/image.png"),
        format!("/v1/jobs/{ghost}/frames"),
        "/v1/nothing-here".to_owned(),
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd/image.png".to_owned(),
    ] {
        let r = s.get(&path).await;
        problem(r, 404).await;
    }
    let r = s.post(&format!("/v1/jobs/{ghost}/cancel")).await;
    problem(r, 404).await;
    let r = s.delete(&format!("/v1/jobs/{ghost}")).await;
    problem(r, 404).await;
    let r = s.client.put(s.url("/v1/jobs")).send().await.unwrap();
    problem(r, 405).await;

    let job = s.submit(&tiny_spec("x", 4)).await;
    let id = job["id"].as_str().unwrap();
    for name in [
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "..%2Fimage.png",
        "..%5C..%5Cx.png",
        "1.png%00",
        "abc.png",
    ] {
        let r = s.get(&format!("/v1/jobs/{id}/frames/{name}")).await;
        let p = problem(r, 400).await;
        assert_eq!(
            p["type"], "urn:vqclip:problem:invalid-artifact-name",
            "{name}"
        );
    }
    // Artifacts of an unfinished job do not exist yet.
    let r = s.get(&format!("/v1/jobs/{id}/image.png")).await;
    let p = problem(r, 404).await;
    assert_eq!(p["state"], "queued");

    for query in [
        "state=done",
        "cursor=abc",
        "limit=0",
        "limit=1000",
        "colour=red",
    ] {
        let r = s.get(&format!("/v1/jobs?{query}")).await;
        problem(r, 400).await;
    }
    let r = s
        .client
        .get(s.url(&format!("/v1/jobs/{id}/events")))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    problem(r, 400).await;
    s.stop().await;
}

#[tokio::test]
async fn idempotency_keys_return_the_same_job() {
    let (_d, s) = server().await;
    let spec = tiny_spec("an idempotent apple", 4);
    let send = |spec: Value, key: &'static str| {
        s.client
            .post(s.url("/v1/jobs"))
            .header("idempotency-key", key)
            .json(&spec)
            .send()
    };
    let first = send(spec.clone(), "key-1").await.unwrap();
    assert_eq!(first.status(), 201);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/jobs/{}", first["id"].as_str().unwrap())
    );
    let again = send(spec.clone(), "key-1").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["location"].to_str().unwrap(), location);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // The drawn seed is part of the job, so a retry gets the very same render.
    assert_eq!(again["seed"], first["seed"]);

    let mut other = spec.clone();
    other["prompts"] = json!("a different apple");
    let p = problem(send(other, "key-1").await.unwrap(), 422).await;
    assert_eq!(p["type"], "urn:vqclip:problem:idempotency-key-reused");
    let third = send(spec.clone(), "key-2").await.unwrap();
    assert_eq!(third.status(), 201);
    let third: Value = third.json().await.unwrap();
    assert_ne!(third["id"], first["id"]);
    s.stop().await;
}

#[tokio::test]
async fn positions_listing_and_a_full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 0);
    config.limits.max_queued_jobs = 4;
    let s = InProcessServer::start(config).await;
    let mut ids = vec![];
    for priority in [0, 10, 0, 10] {
        let mut spec = tiny_spec("p", 4);
        spec["priority"] = json!(priority);
        ids.push(s.submit(&spec).await["id"].as_str().unwrap().to_owned());
    }
    // Priority first, then first in, first out.
    for (id, want) in ids.iter().zip([3, 1, 4, 2]) {
        assert_eq!(s.job(id).await["position"], want, "{id}");
    }
    let r = post_json(&s, tiny_spec("one too many", 4)).await;
    assert_eq!(r.headers()["retry-after"], "3");
    let p = problem(r, 429).await;
    assert_eq!(p["type"], "urn:vqclip:problem:queue-full");

    let mut seen = vec![];
    let mut url = s.url("/v1/jobs?limit=3");
    loop {
        let page: Value = s
            .client
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().to_owned());
            assert!(j.get("spec").is_none());
        }
        match page["next_cursor"].as_str() {
            Some(c) => url = s.url(&format!("/v1/jobs?limit=3&cursor={c}")),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let r = s.post(&format!("/v1/jobs/{}/cancel", ids[1])).await;
    assert_eq!(r.status(), 200);
    let canceled: Value = r.json().await.unwrap();
    assert_eq!(canceled["state"], "canceled");
    assert_eq!(s.job(&ids[3]).await["position"], 1);
    let only = s.get_json("/v1/jobs?state=canceled").await;
    assert_eq!(only["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(only["jobs"][0]["id"], ids[1].as_str());
    s.stop().await;
}

#[tokio::test]
async fn cancel_and_delete_follow_the_documented_rules() {
    let (_d, s) = server().await;
    let job = s.submit(&tiny_spec("c", 4)).await;
    let id = job["id"].as_str().unwrap();
    let cancel = || {
        s.client
            .post(s.url(&format!("/v1/jobs/{id}/cancel")))
            .send()
    };
    let delete = |id: String| s.client.delete(s.url(&format!("/v1/jobs/{id}"))).send();

    let p = problem(delete(id.to_owned()).await.unwrap(), 409).await;
    assert_eq!(p["state"], "queued");
    assert_eq!(cancel().await.unwrap().status(), 200);
    // Canceling again is idempotent.
    let r = cancel().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "canceled");
    assert_eq!(delete(id.to_owned()).await.unwrap().status(), 204);
    problem(s.get(&format!("/v1/jobs/{id}")).await, 404).await;

    // A succeeded job cannot be canceled: 409.
    let done = s.submit(&tiny_spec("d", 4)).await;
    let done_id: uuid::Uuid = done["id"].as_str().unwrap().parse().unwrap();
    let claimed = s
        .store
        .claim("test", "cpu", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, done_id);
    s.store
        .finish(
            done_id,
            "test",
            Finish::Succeeded {
                data: json!({"state": "succeeded"}),
            },
        )
        .await
        .unwrap();
    let r = s.post(&format!("/v1/jobs/{done_id}/cancel")).await;
    let p = problem(r, 409).await;
    assert_eq!(p["state"], "succeeded");
    s.stop().await;
}

#[tokio::test]
async fn sse_of_a_canceled_job_replays_and_ends() {
    let (_d, s) = server().await;
    let job = s.submit(&tiny_spec("sse", 4)).await;
    let id = job["id"].as_str().unwrap();
    s.post(&format!("/v1/jobs/{id}/cancel")).await;
    let r = s.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let all = tokio::time::timeout(Duration::from_secs(10), read_events(r, 100))
        .await
        .expect("the stream ends after the terminal event");
    let kinds: Vec<_> = all.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["state", "canceled"]);
    // Resuming after the first event gives only the rest; after the last, nothing, and the stream ends.
    for (after, want) in [(all[0].id, 1), (all[1].id, 0)] {
        let r = s
            .client
            .get(s.url(&format!("/v1/jobs/{id}/events")))
            .header("last-event-id", after.to_string())
            .send()
            .await
            .unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(10), read_events(r, 100))
            .await
            .unwrap();
        assert_eq!(rest.len(), want);
        if want == 1 {
            assert_eq!(rest[0], all[1]);
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn operations_endpoints() {
    let (_d, s) = server().await;
    let r = s.get("/healthz").await;
    assert_eq!(r.status(), StatusCode::OK);
    // No worker anywhere: not ready.
    let r = s.get("/readyz").await;
    problem(r, 503).await;
    s.submit(&tiny_spec("m", 4)).await;
    let text = s.metrics().await;
    assert!(text.contains("vqclip_jobs{state=\"queued\"} 1"), "{text}");
    assert!(text.contains("vqclip_queue_depth 1"), "{text}");
    assert!(
        text.contains(
            "vqclip_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("vqclip_step_duration_seconds_bucket"),
        "{text}"
    );
    let spec = s.get_text("/openapi.yaml").await;
    assert!(spec.starts_with("openapi: 3."));
    s.stop().await;
}

#[tokio::test]
async fn cors_headers_only_for_configured_origins() {
    let dir = tempfile::tempdir().unwrap();
    let plain = InProcessServer::start(test_config(dir.path(), 0)).await;
    let r = plain
        .get_from_origin("/healthz", "https://app.example")
        .await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    plain.stop().await;

    let mut config = test_config(dir.path(), 0);
    config.server.cors_allowed_origins = vec!["https://app.example".into()];
    let s = InProcessServer::start(config).await;
    let r = s.get_from_origin("/healthz", "https://app.example").await;
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let r = s.get_from_origin("/healthz", "https://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    s.stop().await;
}

#[tokio::test]
async fn sse_sends_keep_alives_while_nothing_happens() {
    use futures::StreamExt;
    let (_d, s) = server().await;
    let job = s.submit(&tiny_spec("waiting for a worker", 4)).await;
    let id = job["id"].as_str().unwrap();
    let r = s.get(&format!("/v1/jobs/{id}/events")).await;
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(": keep-alive") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("a keep-alive within the interval")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: state"), "{seen}");
    s.stop().await;
}
