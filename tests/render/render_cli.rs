//! `vqclip render` as a new user runs it, on the tiny fixtures.

use std::process::Command;

use crate::support::fixture;

#[test]
fn render_command_writes_png_frames_video_and_metadata() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args([
            "render",
            "--prompt",
            "a wooden banana temple in an underwater kingdom | trending on artstation",
            "--width",
            "16",
            "--height",
            "16",
            "--steps",
            "3",
            "--save-every",
            "1",
            "--cutn",
            "4",
            "--seed",
            "7",
            "--device",
            "cpu",
        ])
        .arg("--clip")
        .arg(fixture("clip-tiny"))
        .arg("--vqgan")
        .arg(fixture("vqgan-tiny"))
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    for name in [
        "image.png",
        "video.mp4",
        "metadata.json",
        "frames/00003.png",
    ] {
        assert!(
            out.path().join(name).is_file(),
            "{name} missing; stdout: {stdout}"
        );
    }
    assert!(stdout.contains(&out.path().join("image.png").display().to_string()));
    assert!(stderr.contains("seed 7"), "{stderr}");

    // A bad flag value fails with a message naming the field.
    let output = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(["render", "--prompt", "x", "--width", "20", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("width: must be a multiple of 16"),
        "{stderr}"
    );
}

/// Every generate.py option the spec has is a flag: story phrases, zoom, noise prompts,
/// init noise, image prompts as `path:weight:stop`. Each lands in the recorded spec, and
/// a zoom render writes a frame before every zoom step.
#[test]
fn render_command_takes_every_spec_field() {
    let out = tempfile::tempdir().unwrap();
    let image_prompt = format!("{}:0.5:-1", fixture("input.png").display());
    let output = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args([
            "render",
            "--prompt",
            "a forest ^ a city:2",
            "--change-prompt-every",
            "2",
            "--image-prompt",
            &image_prompt,
            "--noise-prompt-seeds",
            "3",
            "4",
            "--noise-prompt-weights",
            "0.25",
            "-0.5",
            "--init-noise",
            "gradient",
            "--init-regulariser",
            "mse_init",
            "--init-weight",
            "0.5",
            "--zoom-every",
            "2",
            "--zoom-scale",
            "1.25",
            "--zoom-shift-x",
            "-1",
            "--zoom-shift-y",
            "2",
            "--zoom-start",
            "2",
            "--optimizer",
            "DiffGrad",
            "--width",
            "16",
            "--height",
            "16",
            "--steps",
            "4",
            "--save-every",
            "0",
            "--cutn",
            "2",
            "--seed",
            "5",
            "--device",
            "cpu",
        ])
        .arg("--clip")
        .arg(fixture("clip-tiny"))
        .arg("--vqgan")
        .arg(fixture("vqgan-tiny"))
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr: {stderr}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("metadata.json")).unwrap()).unwrap();
    let spec = &meta["spec"];
    assert_eq!(spec["prompts"], "a forest ^ a city:2");
    assert_eq!(spec["change_prompt_every"], 2);
    assert_eq!(spec["image_prompts"][0]["weight"], 0.5);
    assert_eq!(spec["image_prompts"][0]["stop"], -1.0);
    assert_eq!(spec["noise_prompt_seeds"], serde_json::json!([3, 4]));
    assert_eq!(
        spec["noise_prompt_weights"],
        serde_json::json!([0.25, -0.5])
    );
    assert_eq!(spec["init_noise"], "gradient");
    assert_eq!(spec["init_regulariser"], "mse_init");
    assert_eq!(spec["optimizer"], "diffgrad");
    assert_eq!(
        spec["zoom"],
        serde_json::json!({"start": 2, "every": 2, "scale": 1.25, "shift_x": -1, "shift_y": 2})
    );
    // Text (1 in force), image and two noise prompts, then the regulariser.
    assert_eq!(meta["losses"][0].as_array().unwrap().len(), 5);
    // save_every 0, yet the zoom video's frames: before steps 0, 2 and after the last.
    let mut frames: Vec<String> = std::fs::read_dir(out.path().join("frames"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".png"))
        .collect();
    frames.sort();
    assert_eq!(frames, ["00000.png", "00002.png", "00004.png"]);

    // Unpaired noise seeds fail, naming the field.
    let output = Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args([
            "render",
            "--prompt",
            "x",
            "--noise-prompt-seeds",
            "1",
            "2",
            "--noise-prompt-weights",
            "1",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("noise_prompt_weights: must give exactly one weight per entry"),
        "{stderr}"
    );
}

/// `--fork DIR:STEP` starts from the state saved beside a frame of an earlier run: with
/// the same settings it ends where that run ended; a step without a saved frame fails,
/// listing the saved ones.
#[test]
fn render_fork_continues_a_local_run_from_a_saved_frame() {
    let render = |out: &std::path::Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vqclip"))
            .args([
                "render",
                "--prompt",
                "a lighthouse",
                "--width",
                "16",
                "--height",
                "16",
                "--steps",
                "6",
                "--save-every",
                "3",
                "--cutn",
                "4",
                "--device",
                "cpu",
            ])
            .args(extra)
            .arg("--clip")
            .arg(fixture("clip-tiny"))
            .arg("--vqgan")
            .arg(fixture("vqgan-tiny"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let source = tempfile::tempdir().unwrap();
    let done = render(source.path(), &["--seed", "11"]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(source.path().join("frames/00003.ckpt").is_file());

    let fork = tempfile::tempdir().unwrap();
    let from = format!("{}:3", source.path().display());
    // No --seed: a fork keeps its source's.
    let done = render(fork.path(), &["--fork", &from]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(stderr.contains("seed 11"), "{stderr}");
    // The pixels: the text chunks record each run's own flags.
    let pixels = |d: &std::path::Path| {
        image::open(d.join("image.png"))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    assert!(
        pixels(source.path()) == pixels(fork.path()),
        "the fork ended elsewhere"
    );
    assert!(!fork.path().join("frames/00000.png").exists());

    let bad = render(
        fork.path(),
        &["--fork", &format!("{}:4", source.path().display())],
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("saved steps: 0, 3, 6"), "{stderr}");
}
