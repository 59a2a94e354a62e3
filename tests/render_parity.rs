//! Render fidelity against the PyTorch reference (tests/fixtures/reference_render.*,
//! written by make_fixtures.py --render): every kornia augmentation generate.py uses,
//! applied with kornia's own sampled parameters, gives kornia's output and input
//! gradient.

mod fixture_support;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use fixture_support::fixture;
use vqclip::render::augment::{AugmentParams, Rect, TPS_SOURCE};

fn reference() -> &'static HashMap<String, Tensor> {
    static REF: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    REF.get_or_init(|| {
        candle_core::safetensors::load(fixture("reference_render.safetensors"), &Device::Cpu)
            .expect("reference_render.safetensors loads")
    })
}

fn get(key: &str) -> &'static Tensor {
    reference()
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing from reference_render.safetensors"))
}

fn has(key: &str) -> bool {
    reference().contains_key(key)
}

fn flat(key: &str) -> Vec<f64> {
    get(key)
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn applied(name: &str) -> Vec<bool> {
    flat(&format!("aug.{name}.batch_prob"))
        .iter()
        .map(|&p| p > 0.5)
        .collect()
}

/// Pairs of consecutive values: (N, K, 2) → N lists of K points.
fn points<const K: usize>(key: &str) -> Vec<[(f64, f64); K]> {
    let v = flat(key);
    v.chunks(2 * K)
        .map(|c| std::array::from_fn(|i| (c[2 * i], c[2 * i + 1])))
        .collect()
}

fn pairs(key: &str) -> Vec<(f64, f64)> {
    flat(key).chunks(2).map(|c| (c[0], c[1])).collect()
}

/// kornia's parameters for module `name` as vqclip's.
fn params(name: &str) -> AugmentParams {
    let p = |k: &str| format!("aug.{name}.{k}");
    let applied = applied(name);
    let n = applied.len();
    let (h, w) = {
        let d = get(&p("input")).dims4().unwrap();
        (d.2, d.3)
    };
    match name {
        "Ji" | "UpJitter" | "PoolJitter" => {
            let cols = [
                flat(&p("brightness_factor")),
                flat(&p("contrast_factor")),
                flat(&p("saturation_factor")),
                flat(&p("hue_factor")),
            ];
            AugmentParams::Jitter {
                applied,
                factors: (0..n).map(|i| cols.clone().map(|c| c[i] as f32)).collect(),
                order: flat(&p("order")).iter().map(|&o| o as usize).collect(),
            }
        }
        "Sh" => AugmentParams::Sharpness {
            applied,
            factors: flat(&p("sharpness")).iter().map(|&v| v as f32).collect(),
        },
        "Gn" => AugmentParams::Noise {
            applied,
            noise: flat(&p("gaussian_noise")).iter().map(|&v| v as f32).collect(),
        },
        "Pe" => AugmentParams::warp_from_points(
            applied,
            &points::<4>(&p("start_points")),
            &points::<4>(&p("end_points")),
        ),
        "Re" | "Cr" => {
            AugmentParams::warp_from_points(applied, &points::<4>(&p("src")), &points::<4>(&p("dst")))
        }
        "Ro" => AugmentParams::rotation(applied, &flat(&p("degrees")), h, w),
        "Af" | "UpAffine" => {
            let shear = |k: &str| {
                if has(&p(k)) {
                    flat(&p(k))
                } else {
                    vec![0.0; n]
                }
            };
            let (sx, sy) = (shear("shear_x"), shear("shear_y"));
            AugmentParams::affine(
                applied,
                &pairs(&p("translations")),
                &pairs(&p("center")),
                &pairs(&p("scale")),
                &flat(&p("angle")),
                &sx.iter().zip(&sy).map(|(&a, &b)| (a, b)).collect::<Vec<_>>(),
                name == "UpAffine",
            )
        }
        "Et" => AugmentParams::Elastic {
            applied,
            noise: flat(&p("noise")).iter().map(|&v| v as f32).collect(),
        },
        "Ts" => {
            for src in points::<5>(&p("src")) {
                assert_eq!(src, TPS_SOURCE, "kornia's thin-plate control points moved");
            }
            AugmentParams::ThinPlate {
                applied,
                dst: points::<5>(&p("dst")),
            }
        }
        "Er" => {
            let at = |k: &str| flat(&p(k))[0] as usize;
            assert!(
                flat(&p("values")).iter().all(|&v| v == 0.0),
                "generate.py erases to 0"
            );
            AugmentParams::Erase {
                applied,
                rect: Rect {
                    x: at("xs"),
                    y: at("ys"),
                    w: at("widths"),
                    h: at("heights"),
                },
            }
        }
        "UpFlip" => {
            let wf = w as f64;
            AugmentParams::Warp {
                applied,
                matrices: vec![[[-1.0, 0.0, wf - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]; n],
                border: false,
            }
        }
        other => panic!("no mapping for kornia module {other}"),
    }
}

/// max |a − b| / max(max |b|, 1).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.max(1.0)
}

const MODULES: [&str; 15] = [
    "Ji", "Sh", "Gn", "Pe", "Ro", "Af", "Et", "Ts", "Cr", "Er", "Re", "UpFlip", "UpJitter",
    "UpAffine", "PoolJitter",
];

#[test]
fn every_augmentation_equals_kornia_with_its_parameters() {
    let mut failures = Vec::new();
    for name in MODULES {
        let x = get(&format!("aug.{name}.input"));
        let var = Var::from_tensor(x).unwrap();
        let params = params(name);
        let y = params.apply(var.as_tensor()).unwrap();
        let out_err = rel_err(&y, get(&format!("aug.{name}.output")));
        let wts = get(&format!("aug.{name}.weights"));
        let grads = (&y * wts).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap();
        let grad_err = rel_err(grad, get(&format!("aug.{name}.grad")));
        eprintln!("{name}: output {out_err:.2e}, input gradient {grad_err:.2e}");
        if out_err > 1e-4 || grad_err > 1e-4 {
            failures.push(format!("{name}: output {out_err:.2e}, gradient {grad_err:.2e}"));
        }
    }
    assert!(failures.is_empty(), "differs from kornia: {failures:#?}");
}

#[test]
fn the_fixture_exercises_each_augmentation() {
    for name in MODULES {
        let a = applied(name);
        if name != "Cr" {
            assert!(a.iter().any(|&x| x), "{name} touches no cutout in the fixture");
        }
    }
}
