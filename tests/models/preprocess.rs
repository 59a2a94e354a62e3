//! CLIP preprocessing against transformers' PIL-backed `CLIPImageProcessor`
//! (reference written by `tests/fixtures/preprocess/make_reference.py`).

use std::path::PathBuf;

use candle_core::Device;
use vqclip::models::preprocess;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

#[test]
fn matches_the_transformers_reference() {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["image"].as_str().unwrap();
        let size = case["size"].as_u64().unwrap() as usize;
        let expected: Vec<f32> = case["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let img = preprocess::open_image(&fixtures().join(name)).unwrap();
        let pixels = preprocess::clip_pixels(&img, size, &Device::Cpu).unwrap();
        assert_eq!(pixels.dims(), &[1, 3, size, size], "{name}");
        let actual = pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Pillow's integer arithmetic is reproduced exactly, so every value is
        // bit-identical; one 8-bit step (1/255) would already fail.
        let mismatches: Vec<_> = actual
            .iter()
            .zip(&expected)
            .enumerate()
            .filter(|(_, (a, e))| a != e)
            .take(5)
            .collect();
        assert!(
            mismatches.is_empty(),
            "{name}: first mismatches {mismatches:?}"
        );
    }
}
