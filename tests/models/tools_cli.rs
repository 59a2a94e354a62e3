//! `vqclip tokenize | embed | score | reconstruct` through the built binary, on the
//! tiny models that transformers and taming wrote (`tests/fixtures/make_fixtures.py`),
//! checked against their reference outputs.

use std::path::{Path, PathBuf};

use crate::support::{fixture, offline_vqclip, succeeded};
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// max |a - b| / max |b|, over a whole matrix.
fn max_relative_error(actual: &[Vec<f64>], expected: &[Vec<f64>]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!(a.len(), e.len());
        for (x, y) in a.iter().zip(e) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    diff / scale
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn embed_json_matches_the_reference() {
    let r = &reference()["embed_cli"];
    let clip = fixture(r["clip"].as_str().unwrap());
    let mut args = vec![
        "embed",
        "--json",
        "--device",
        "cpu",
        "--clip",
        path_str(&clip),
    ];
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let images: Vec<PathBuf> = r["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| fixture(i.as_str().unwrap()))
        .collect();
    for t in &texts {
        args.extend(["--text", t]);
    }
    for i in &images {
        args.extend(["--image", path_str(i)]);
    }
    let out: Value = serde_json::from_str(&succeeded(&offline_vqclip(&args))).unwrap();
    let text = matrix(&out["text"]);
    let image = matrix(&out["image"]);
    let text_err = max_relative_error(&text, &matrix(&r["text"]));
    let image_err = max_relative_error(&image, &matrix(&r["image"]));
    assert!(text_err <= 1e-4, "text embeddings off by {text_err:e}");
    assert!(image_err <= 1e-4, "image embeddings off by {image_err:e}");
    for row in text.iter().chain(&image) {
        let norm: f64 = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "not L2-normalised: {norm}");
    }
}

#[test]
fn score_prints_the_reference_cosines_as_a_table() {
    let r = &reference()["embed_cli"];
    let clip = fixture(r["clip"].as_str().unwrap());
    let image = fixture(r["images"][0].as_str().unwrap());
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut args = vec![
        "score",
        path_str(&image),
        "--clip",
        path_str(&clip),
        "--device",
        "cpu",
    ];
    args.extend(&texts);
    let stdout = succeeded(&offline_vqclip(&args));
    let expected = matrix(&r["score"]);
    for (prompt, cosine) in texts.iter().zip(&expected[0]) {
        let line = stdout
            .lines()
            .find(|l| l.trim_end().ends_with(prompt))
            .unwrap_or_else(|| panic!("no row for {prompt:?} in\n{stdout}"));
        let printed: f64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert!(
            (printed - cosine).abs() <= 6e-5,
            "{prompt}: {printed} vs {cosine}"
        );
    }
}

#[test]
fn reconstruct_json_gives_the_reference_indices_and_image() {
    let r = &reference()["reconstruct_cli"];
    let vqgan = fixture(r["vqgan"].as_str().unwrap());
    let input = fixture(r["image"].as_str().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("out.png");
    for model in [vqgan.clone(), vqgan.join("last.ckpt")] {
        let out = succeeded(&offline_vqclip(&[
            "reconstruct",
            path_str(&input),
            path_str(&output),
            "--json",
            "--device",
            "cpu",
            "--vqgan",
            path_str(&model),
        ]));
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            out["indices"],
            r["indices"],
            "with --vqgan {}",
            model.display()
        );
    }

    // The PNG is the reference decode, rounded to 8 bits.
    let decoded =
        candle_core::safetensors::load(fixture("reference.safetensors"), &candle_core::Device::Cpu)
            .unwrap()["vqgan_decoded"]
            .get(0)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
    let png = image::open(&output).unwrap().to_rgb8();
    assert_eq!((png.width(), png.height()), (32, 32));
    for (x, y, px) in png.enumerate_pixels() {
        for c in 0..3 {
            let want = (decoded[c][y as usize][x as usize].clamp(-1.0, 1.0) + 1.0) * 127.5;
            let got = f32::from(px[c]);
            assert!(
                (got - want).abs() <= 0.51,
                "pixel ({x},{y})[{c}]: {got} vs {want}"
            );
        }
    }
}

#[test]
fn reconstruct_resizes_to_a_multiple_of_the_downsampling_factor_and_says_so() {
    let vqgan = fixture("vqgan-tiny");
    let input = fixture("preprocess/landscape.png"); // 97x61, f = 4
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("out.png");
    let out = offline_vqclip(&[
        "reconstruct",
        path_str(&input),
        path_str(&output),
        "--vqgan",
        path_str(&vqgan),
        "--device",
        "cpu",
    ]);
    let stdout = succeeded(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resized 97x61 to 96x60"), "{stderr}");
    assert!(stdout.contains("24x15 grid"), "{stdout}");
    let png = image::open(&output).unwrap();
    assert_eq!((png.width(), png.height()), (96, 60));
}

#[test]
fn tokenize_json_matches_the_reference_and_reports_truncation() {
    let cases = reference()["tokenizer"]["cases"].clone();
    let mut saw_truncated = false;
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let out = offline_vqclip(&["tokenize", "--json", text]);
        let ids: Value = serde_json::from_str(&succeeded(&out)).unwrap();
        assert_eq!(ids, case["ids"], "{text:?}");
        let truncated = case["truncated"].as_bool().unwrap();
        let noted = String::from_utf8_lossy(&out.stderr).contains("truncated");
        assert_eq!(noted, truncated, "{text:?}: truncation note on stderr");
        saw_truncated |= truncated;
    }
    assert!(saw_truncated, "the reference has no over-long prompt");

    let plain = succeeded(&offline_vqclip(&["tokenize", "a photo of a cat"]));
    assert!(
        plain.contains("49406 320 1125 539 320 2368 49407"),
        "{plain}"
    );
}

#[test]
fn errors_say_what_to_do() {
    let clip = fixture("clip-tiny");
    let out = offline_vqclip(&[
        "embed",
        "--text",
        "x",
        "--clip",
        path_str(&clip),
        "--device",
        "cuda:0",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built without CUDA") && stderr.contains("--device cpu"),
        "{stderr}"
    );

    let out = offline_vqclip(&["embed", "--text", "x", "--device", "cpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("offline mode is on"), "{stderr}");
    assert!(
        stderr.contains("clip/ViT-B-32/model.safetensors"),
        "{stderr}"
    );

    let out = offline_vqclip(&[
        "embed", "--text", "x", "--clip", "ViT-Q/99", "--device", "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown CLIP model") && stderr.contains("ViT-B/32"),
        "{stderr}"
    );

    let out = offline_vqclip(&["embed", "--clip", path_str(&clip)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--text"));
}
