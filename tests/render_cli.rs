//! `vqclip render` as a new user runs it, on the tiny fixtures.

mod fixture_support;

use std::process::Command;

use fixture_support::fixture;

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
