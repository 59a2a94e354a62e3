//! Issue 9's API-edge defects, each driven through a real server: undecodable paths,
//! `models` naming server paths, the published limits, frame names past u32, empty
//! cursors, weak ETags, and the memory budget over concurrent image decodes.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

async fn server(
    workers: usize,
    tune: impl FnOnce(&mut vqclip::config::Config),
) -> (tempfile::TempDir, InProcessServer) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), workers);
    tune(&mut config);
    let s = InProcessServer::start(config).await;
    (dir, s)
}

async fn submit_raw(s: &InProcessServer, spec: &Value) -> reqwest::Response {
    s.client
        .post(s.url("/v1/jobs"))
        .json(spec)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn undecodable_path_segments_are_problems_on_every_id_route() {
    let (_d, s) = server(0, |_| {}).await;
    let job = s.submit(&tiny_spec("a path", 2)).await;
    let id = job["id"].as_str().unwrap();
    let routes = [
        ("GET", "/v1/jobs/%FF".to_owned()),
        ("DELETE", "/v1/jobs/%FF".to_owned()),
        ("POST", "/v1/jobs/%FF/cancel".to_owned()),
        ("GET", "/v1/jobs/%FF/events".to_owned()),
        ("GET", "/v1/jobs/%FF/webhooks".to_owned()),
        ("GET", "/v1/jobs/%FF/image.png".to_owned()),
        ("GET", "/v1/jobs/%FF/frames".to_owned()),
        ("GET", "/v1/jobs/%FF/frames/1.png".to_owned()),
        ("GET", format!("/v1/jobs/{id}/frames/%FF.png")),
        ("GET", "/v1/jobs/%FF/video.mp4".to_owned()),
        ("GET", "/v1/jobs/%FF/metadata.json".to_owned()),
    ];
    for (method, path) in routes {
        let r = s
            .client
            .request(method.parse().unwrap(), s.url(&path))
            .send()
            .await
            .unwrap();
        let p = problem(r, 400).await;
        assert_eq!(
            p["type"], "urn:vqclip:problem:invalid-path",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn models_must_be_catalogue_names_or_inside_model_directories() {
    let models = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(models.path().join("clip-copy")).unwrap();
    let dirs = vec![models.path().to_owned()];
    let (_d, s) = server(0, |c| c.models.dirs = dirs).await;
    let with = |models: Value| {
        let mut spec = tiny_spec("a guarded model", 2);
        spec["models"] = models;
        spec
    };
    for (models, field) in [
        (json!({"clip": ["/etc"]}), "models.clip[0]"),
        (json!({"vqgan": "/etc"}), "models.vqgan"),
        (json!({"vqgan": "/etc/passwd"}), "models.vqgan"),
        (json!({"clip": ["../../../../../../etc"]}), "models.clip[0]"),
        (
            json!({"clip": [format!("{}/../", models.path().display())]}),
            "models.clip[0]",
        ),
        (json!({"vqgan": "ViT-B/32"}), "models.vqgan"),
        (json!({"clip": ["no-such-model"]}), "models.clip[0]"),
    ] {
        let r = submit_raw(&s, &with(models.clone())).await;
        let p = problem(r, 422).await;
        assert_eq!(p["field"], field, "{models}: {p}");
        let detail = p["detail"].as_str().unwrap();
        // Nothing about the server's files: not whether it exists, nor what is inside.
        assert!(
            !detail.contains("last.ckpt") && !detail.contains("exist"),
            "{detail}"
        );
    }
    // Catalogue names, and paths inside a configured model directory, are taken.
    for models in [
        json!({"vqgan": "vqgan_imagenet_f16_16384", "clip": ["ViT-B/32", "ViT-B/16"]}),
        json!({"clip": [models.path().join("clip-copy").display().to_string()]}),
    ] {
        let r = submit_raw(&s, &with(models.clone())).await;
        assert_eq!(r.status(), 201, "{models}: {}", r.text().await.unwrap());
    }
    // A path outside them is refused even when it exists and holds a model.
    let r = submit_raw(
        &s,
        &with(json!({"clip": [fixture("clip-tiny-bin").display().to_string()]})),
    )
    .await;
    problem(r, 422).await;
}

#[tokio::test]
async fn limits_are_published_and_enforced() {
    let (_d, s) = server(0, |c| {
        c.limits.max_side = 256;
        c.limits.max_steps = 30;
    })
    .await;
    let limits = s.get_json("/v1/limits").await;
    assert_eq!(limits["max_width"], 256);
    assert_eq!(limits["max_height"], 256);
    assert_eq!(limits["max_steps"], 30);
    assert_eq!(limits["max_cutn"], s.config.limits.max_cutn);
    assert!(limits["models"]["clip"]
        .as_array()
        .unwrap()
        .contains(&json!("ViT-B/32")));
    let mut spec = tiny_spec("too long", 31);
    let p = problem(submit_raw(&s, &spec).await, 422).await;
    assert_eq!(p["field"], "steps");
    spec["steps"] = json!(30);
    spec["width"] = json!(272);
    let p = problem(submit_raw(&s, &spec).await, 422).await;
    assert_eq!(p["field"], "width");
}

#[tokio::test]
async fn query_and_frame_edge_cases_follow_the_spec() {
    let (_d, s) = server(0, |_| {}).await;
    let job = s.submit(&tiny_spec("edges", 2)).await;
    let id = job["id"].as_str().unwrap();
    // An empty cursor and an empty last_event_id are treated alike: both are 400, as
    // the spec's patterns say; a number, or nothing, is a start.
    problem(s.get("/v1/jobs?cursor=").await, 400).await;
    problem(s.get("/v1/jobs?cursor=abc").await, 400).await;
    assert_eq!(s.get("/v1/jobs?limit=5").await.status(), 200);
    let events = format!("/v1/jobs/{id}/events");
    problem(s.get(&format!("{events}?last_event_id=")).await, 400).await;
    problem(s.get(&format!("{events}?last_event_id=x")).await, 400).await;
    let r = s
        .client
        .get(s.url(&events))
        .header("last-event-id", "")
        .send()
        .await
        .unwrap();
    problem(r, 400).await;
    // The stream of a queued job stays open: only its head matters here.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        s.get(&format!("{events}?last_event_id=0")),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    // A frame name the spec's pattern allows is never a 400, however large.
    for name in ["4294967296.png", "99999999999999999999999.png", "7.png"] {
        problem(s.get(&format!("/v1/jobs/{id}/frames/{name}")).await, 404).await;
    }
    problem(s.get(&format!("/v1/jobs/{id}/frames/x.png")).await, 400).await;
}

#[tokio::test]
async fn a_weak_etag_in_if_none_match_gets_304() {
    let (_d, s) = server(1, |_| {}).await;
    let job = s.submit(&tiny_spec("an etag", 2)).await;
    let id = job["id"].as_str().unwrap();
    let done = s.wait_terminal(id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let frames = s.get_json(&format!("/v1/jobs/{id}/frames")).await;
    let frame = frames["frames"][0]["url"].as_str().unwrap().to_owned();
    let paths = [
        format!("/v1/jobs/{id}/image.png"),
        format!("/v1/jobs/{id}/metadata.json"),
        frame,
    ];
    for path in paths {
        let url = s.url(&path);
        let r = s.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let etag = r.headers()["etag"].to_str().unwrap().to_owned();
        for tag in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"nope\", W/{etag}"),
        ] {
            let r = s
                .client
                .get(&url)
                .header("if-none-match", &tag)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 304, "{path} If-None-Match: {tag}");
        }
        let r = s
            .client
            .get(&url)
            .header("if-none-match", "W/\"other\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let full_type = r.headers()["content-type"].clone();
        // A range comes with the file's own type, as the spec now says.
        let r = s
            .client
            .get(&url)
            .header("range", "bytes=0-3")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{path}");
        assert_eq!(r.headers()["content-type"], full_type, "{path}");
        assert_eq!(r.bytes().await.unwrap().len(), 4);
    }
}

/// A PNG of `side` x `side` pixels that compresses to a few kilobytes.
fn big_png(side: u32) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(side, side, image::Luma([90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn concurrent_image_decodes_stay_within_the_memory_budget() {
    // Room for one 2048x2048 decode (32 MiB by the budget's count), not two, and no wait.
    let (_d, s) = server(0, |c| {
        c.limits.max_decode_bytes = 48 << 20;
        c.limits.decode_wait_ms = 0;
        c.server.retry_after_seconds = 2;
    })
    .await;
    let png = big_png(2048);
    assert!(png.len() < 100_000);
    let uploads = (0..24).map(|_| {
        s.client
            .post(s.url("/v1/uploads"))
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
    });
    let inline = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png)
    );
    let jobs = (0..8).map(|_| {
        let mut spec = tiny_spec("an inline init", 2);
        spec["init_image"] = json!(inline);
        s.client.post(s.url("/v1/jobs")).json(&spec).send()
    });
    let (uploads, jobs) = tokio::join!(
        futures::future::join_all(uploads),
        futures::future::join_all(jobs)
    );
    let (mut ok, mut busy) = (0, 0);
    for r in uploads.into_iter().chain(jobs) {
        let r = r.unwrap();
        match r.status().as_u16() {
            201 => ok += 1,
            503 => {
                let (headers, p) = problem_response(r, 503).await;
                assert_eq!(headers["retry-after"], "2");
                assert_eq!(p["type"], "urn:vqclip:problem:decode-busy");
                busy += 1;
            }
            other => panic!("{other}: {}", r.text().await.unwrap()),
        }
    }
    assert!(ok >= 1, "some decodes ran");
    assert!(
        busy >= 1,
        "32 parallel 2048x2048 decodes never overlapped under the budget"
    );
    // With the budget free again, a decode goes through.
    let r = s
        .client
        .post(s.url("/v1/uploads"))
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn empty_uploads_are_refused_as_the_schema_says() {
    let (_d, s) = server(0, |_| {}).await;
    let r = s
        .client
        .post(s.url("/v1/uploads"))
        .json(&json!({"image": ""}))
        .send()
        .await
        .unwrap();
    problem(r, 422).await;
    let boundary = "vqclipboundary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nno file here\r\n--{boundary}--\r\n"
    );
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
    problem(r, 400).await;
    // The schema says the same: a non-empty image, a required file field.
    let spec: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap(),
    )
    .unwrap();
    let body = &spec["paths"]["/v1/uploads"]["post"]["requestBody"]["content"];
    assert_eq!(
        body["application/json"]["schema"]["properties"]["image"]["minLength"],
        1
    );
    assert_eq!(
        body["multipart/form-data"]["schema"]["required"][0].as_str(),
        Some("file")
    );
}
