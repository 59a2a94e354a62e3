//! Video styling over the API on a real server with the tiny models: an MP4 made by
//! our own encoder is uploaded, styled as a job with per-frame progress, and its
//! frames and video fetched; bad videos and bad video specs are 4xx problems.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use crate::support::*;
use mp4::Metadata as _;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use vqclip::queue::Jobs as _;

/// An MP4 of `n` noisy `w` x `h` frames at `fps`, made with the render's encoder.
fn noisy_mp4(dir: &Path, n: u32, (w, h): (u32, u32), fps: f32) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut paths: Vec<PathBuf> = Vec::new();
    for i in 0..n {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let base = [x * 255 / w, y * 255 / h, (i * 40) % 256];
            image::Rgb(base.map(|c| (c as i32 + rng.gen_range(-15..=15)).clamp(0, 255) as u8))
        });
        let p = dir.join(format!("src{n}-{i:05}.png"));
        img.save(&p).unwrap();
        paths.push(p);
    }
    let out = dir.join(format!("src{n}.mp4"));
    vqclip::render::output::write_mp4(&out, &paths, fps).unwrap();
    std::fs::read(out).unwrap()
}

async fn upload(s: &InProcessServer, body: Vec<u8>, content_type: &str) -> reqwest::Response {
    s.client
        .post(s.url("/v1/uploads"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn submit_raw(s: &InProcessServer, spec: &Value) -> reqwest::Response {
    s.client
        .post(s.url("/v1/jobs"))
        .json(spec)
        .send()
        .await
        .unwrap()
}

fn video_spec(video: &str) -> Value {
    let mut spec = tiny_spec("a red cube", 2);
    spec["width"] = json!(16);
    spec["height"] = json!(16);
    spec["video_style"] = json!({ "video": video, "steps_per_frame": 2, "max_frames": 3 });
    spec
}

#[tokio::test]
async fn an_uploaded_mp4_is_styled_frame_by_frame_with_progress_frames_and_video() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let mp4 = noisy_mp4(dir.path(), 4, (32, 32), 12.0);
    let r = upload(&s, mp4, "video/mp4").await;
    assert_eq!(r.status(), 201);
    let up: Value = r.json().await.unwrap();
    assert_eq!(up["content_type"], "video/mp4");
    assert_eq!(
        (up["width"].as_u64(), up["height"].as_u64()),
        (Some(32), Some(32))
    );
    assert_eq!(up["frames"], 4);
    assert!((up["fps"].as_f64().unwrap() - 12.0).abs() < 1e-3, "{up}");

    let job = s.submit(&video_spec(up["ref"].as_str().unwrap())).await;
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["progress"]["total"], 6, "{job}");
    let done = s.wait_terminal(&id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"]["step"], 6);

    let events = s.events(&id, None, 1000).await;
    let progress: Vec<(u64, u64, u64, u64)> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| {
            let d = &e.data;
            let n = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{k} in {d}"));
            (n("step"), n("frame"), n("frames"), n("frame_step"))
        })
        .collect();
    assert_eq!(
        progress,
        vec![
            (1, 0, 3, 1),
            (2, 0, 3, 2),
            (3, 1, 3, 1),
            (4, 1, 3, 2),
            (5, 2, 3, 1),
            (6, 2, 3, 2)
        ]
    );
    let frame_urls: Vec<String> = events
        .iter()
        .filter(|e| e.event == "frame")
        .map(|e| e.data["url"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(frame_urls.len(), 3);
    for (i, url) in frame_urls.iter().enumerate() {
        assert!(url.ends_with(&format!("/frames/{i}.png")), "{url}");
        let r = s.get(url).await;
        assert_eq!(r.status(), 200, "{url}");
        let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
    let listed = s.get_json(&format!("/v1/jobs/{id}/frames")).await;
    assert_eq!(listed["frames"].as_array().unwrap().len(), 3);

    let video = s.get_bytes(done["links"]["video"].as_str().unwrap()).await;
    let size = video.len() as u64;
    let reader = mp4::Mp4Reader::read_header(Cursor::new(video.to_vec()), size).unwrap();
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.sample_count(), 3);
    assert_eq!(track.duration(), std::time::Duration::from_millis(250));
    assert_eq!(reader.metadata().title().as_deref(), Some("a red cube"));
    assert!(reader.metadata().summary().unwrap().contains("seed: 7"));
    s.stop().await;
}

#[tokio::test]
async fn bad_videos_and_bad_video_specs_are_4xx_problems() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 0);
    config.limits.max_video_frames = 3;
    let s = InProcessServer::start(config).await;

    let p = problem(upload(&s, b"not a video".to_vec(), "video/mp4").await, 422).await;
    assert_eq!(p["type"], "urn:vqclip:problem:invalid-video");
    let mut truncated = noisy_mp4(dir.path(), 2, (32, 32), 10.0);
    truncated.truncate(truncated.len() / 2);
    problem(upload(&s, truncated, "video/mp4").await, 422).await;
    let long = noisy_mp4(dir.path(), 4, (32, 32), 10.0);
    let p = problem(upload(&s, long, "application/octet-stream").await, 422).await;
    assert_eq!(p["limit"], "limits.max_video_frames", "{p}");
    assert_eq!(p["max"], 3);
    assert!(p["detail"].as_str().unwrap().contains("4 frames"), "{p}");

    let r = upload(&s, noisy_mp4(dir.path(), 3, (32, 32), 10.0), "video/mp4").await;
    assert_eq!(r.status(), 201);
    let video_ref = r.json::<Value>().await.unwrap()["ref"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut png = Cursor::new(Vec::new());
    image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let r = upload(&s, png.into_inner(), "image/png").await;
    let image_ref = r.json::<Value>().await.unwrap()["ref"]
        .as_str()
        .unwrap()
        .to_owned();

    let ghost = format!("upload:{}", uuid::Uuid::now_v7());
    let mut cases: Vec<(Value, &str)> = vec![
        (video_spec(&ghost), "video_style.video"),
        (video_spec(&image_ref), "video_style.video"),
        (video_spec("clips/holiday.mp4"), "video_style.video"),
        (video_spec(""), "video_style.video"),
        (
            {
                let mut v = video_spec(&video_ref);
                v["video_style"]["max_frames"] = json!(4);
                v
            },
            "video_style.max_frames",
        ),
        (
            {
                let mut v = video_spec(&video_ref);
                v["video_style"]["steps_per_frame"] = json!(0);
                v
            },
            "video_style.steps_per_frame",
        ),
        (
            {
                let mut v = video_spec(&video_ref);
                v["init_noise"] = json!("pixels");
                v
            },
            "init_noise",
        ),
        (
            {
                let mut v = video_spec(&video_ref);
                v["video"] = json!({ "output_fps": 30, "length_seconds": 2 });
                v
            },
            "video.length_seconds",
        ),
        (
            {
                let mut v = tiny_spec("x", 2);
                v["video"] = json!({ "fps": 20, "output_fps": 15 });
                v
            },
            "video.output_fps",
        ),
    ];
    let mut video_as_image = tiny_spec("x", 2);
    video_as_image["init_image"] = json!(video_ref);
    cases.push((video_as_image, "init_image"));
    for (spec, field) in cases {
        let p = problem(submit_raw(&s, &spec).await, 422).await;
        assert_eq!(p["field"], field, "{spec}: {p}");
    }
    // Unknown fields inside video_style are refused too.
    let mut typo = video_spec(&video_ref);
    typo["video_style"]["step_per_frame"] = json!(2);
    problem(submit_raw(&s, &typo).await, 422).await;

    // A good one is accepted with frames x steps per frame as its total.
    let job = s.submit(&video_spec(&video_ref)).await;
    assert_eq!(job["progress"]["total"], 6, "{job}");
    s.stop().await;
}

#[tokio::test]
async fn a_video_job_handed_back_at_shutdown_resumes_at_its_next_frame() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let r = upload(&s, noisy_mp4(dir.path(), 6, (32, 32), 10.0), "video/mp4").await;
    assert_eq!(r.status(), 201);
    let video_ref = r.json::<Value>().await.unwrap()["ref"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut spec = video_spec(&video_ref);
    spec["video_style"] = json!({ "video": video_ref, "steps_per_frame": 30 });
    let id = s.submit(&spec).await["id"].as_str().unwrap().to_owned();
    s.wait_step(&id, 35, LONG).await;
    let store = s.store.clone();
    s.stop().await;

    let store2 = open_store(dir.path(), 2).await;
    drop(store);
    let job = store2
        .get(id.parse().unwrap(), &vqclip::queue::Scope::unrestricted())
        .await
        .unwrap();
    assert_eq!(job.state, vqclip::queue::JobState::Queued);
    assert_eq!(job.checkpoint.as_deref(), Some("video_checkpoint.json"));
    let stopped_at = job.checkpoint_step;
    assert!(
        (30..180).contains(&stopped_at) && stopped_at % 30 == 0,
        "{stopped_at}"
    );
    store2.pool().close().await;

    let s = InProcessServer::start(test_config(dir.path(), 1)).await;
    let done = s.wait_terminal(&id, LONG).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let events = s.events(&id, None, 100_000).await;
    let running: Vec<&SseEvent> = events
        .iter()
        .filter(|e| e.data["state"] == "running")
        .collect();
    assert_eq!(running.len(), 2);
    let resumed: Vec<u64> = events
        .iter()
        .filter(|e| e.id > running[1].id && e.event == "progress")
        .map(|e| e.data["step"].as_u64().unwrap())
        .collect();
    assert_eq!(resumed.first(), Some(&(u64::from(stopped_at) + 1)));
    assert_eq!(resumed.last(), Some(&180));
    let listed = s.get_json(&format!("/v1/jobs/{id}/frames")).await;
    assert_eq!(listed["frames"].as_array().unwrap().len(), 6);
    let video = s.get_bytes(done["links"]["video"].as_str().unwrap()).await;
    let size = video.len() as u64;
    let reader = mp4::Mp4Reader::read_header(Cursor::new(video.to_vec()), size).unwrap();
    assert_eq!(reader.tracks().values().next().unwrap().sample_count(), 6);
    s.stop().await;
}
