//! Render fidelity against the PyTorch reference (tests/fixtures/reference_render.*,
//! written by make_fixtures.py --render): every kornia augmentation generate.py uses,
//! applied with kornia's own sampled parameters, gives kornia's output and input
//! gradient; and whole optimisation steps on the tiny fixture models, with the
//! Python loop's sampling replayed, give its gradient on z and its z.

use std::collections::HashMap;
use std::sync::OnceLock;

use std::sync::{Arc, Mutex};

use crate::support::fixture;
use candle_core::{DType, Device, Tensor, Var};
use vqclip::render::augment::{AugmentParams, Augmentations, Kornia, Rect, TPS_SOURCE};
use vqclip::render::cutouts::{Crop, CutoutNoise};
use vqclip::render::engine::{CutoutDraw, SamplingReplay};
use vqclip::render::{Augment, CutMethod, JobSpec, RenderJob, RenderSession};

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

/// Which cutouts module `name` of the augmentation tests touches.
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

/// The kind of each kornia module the fixture names (generate.py configures some
/// kinds several ways; the parameters carry the difference, except affine padding).
fn kind(name: &str) -> &'static str {
    match name {
        "Ji" | "UpJitter" | "PoolJitter" => "Ji",
        "Sh" | "UpSharp" => "Sh",
        "Pe" | "UpPersp" | "NrPe" | "PoolPersp" => "Pe",
        "Af" | "NrAf" => "Af",
        "UpAffine" | "PoolAffine" => "AfBorder",
        "UpFlip" => "Flip",
        "Gn" => "Gn",
        "Ro" => "Ro",
        "Et" => "Et",
        "Ts" => "Ts",
        "Cr" => "Cr",
        "Er" => "Er",
        "Re" => "Re",
        other => panic!("no kind for kornia module {other}"),
    }
}

/// The same kinds for vqclip's modules, to check a cut method's pipeline.
fn kind_of(m: &Kornia) -> &'static str {
    match m {
        Kornia::ColorJitter { .. } => "Ji",
        Kornia::Sharpness { .. } => "Sh",
        Kornia::GaussianNoise { .. } => "Gn",
        Kornia::Perspective { .. } => "Pe",
        Kornia::Rotation { .. } => "Ro",
        Kornia::Affine { border: false, .. } => "Af",
        Kornia::Affine { border: true, .. } => "AfBorder",
        Kornia::Elastic { .. } => "Et",
        Kornia::ThinPlate { .. } => "Ts",
        Kornia::Crop => "Cr",
        Kornia::Erasing { .. } => "Er",
        Kornia::ResizedCrop { .. } => "Re",
        Kornia::HorizontalFlip { .. } => "Flip",
    }
}

/// kornia's parameters for module `name` of the augmentation tests as vqclip's.
fn params(name: &str) -> AugmentParams {
    let (_, _, h, w) = get(&format!("aug.{name}.input")).dims4().unwrap();
    params_at(&format!("aug.{name}"), kind(name), h, w)
}

/// kornia's parameters stored under `prefix` for a module of kind `name`, on
/// cutouts of `h`×`w`.
fn params_at(prefix: &str, name: &str, h: usize, w: usize) -> AugmentParams {
    let p = |k: &str| format!("{prefix}.{k}");
    let applied: Vec<bool> = flat(&p("batch_prob")).iter().map(|&b| b > 0.5).collect();
    let n = applied.len();
    match name {
        "Ji" => {
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
            noise: flat(&p("gaussian_noise"))
                .iter()
                .map(|&v| v as f32)
                .collect(),
        },
        "Pe" => AugmentParams::warp_from_points(
            applied,
            &points::<4>(&p("start_points")),
            &points::<4>(&p("end_points")),
        ),
        "Re" | "Cr" => AugmentParams::warp_from_points(
            applied,
            &points::<4>(&p("src")),
            &points::<4>(&p("dst")),
        ),
        "Ro" => AugmentParams::rotation(applied, &flat(&p("degrees")), h, w),
        "Af" | "AfBorder" => {
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
                &sx.iter()
                    .zip(&sy)
                    .map(|(&a, &b)| (a, b))
                    .collect::<Vec<_>>(),
                name == "AfBorder",
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
        "Flip" => {
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
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.max(1.0)
}

#[rustfmt::skip]
const MODULES: [&str; 21] = [
    "Ji", "Sh", "Gn", "Pe", "Ro", "Af", "Et", "Ts", "Cr", "Er", "Re", "UpFlip", "UpJitter",
    "UpAffine", "PoolJitter", "UpSharp", "UpPersp", "NrPe", "NrAf", "PoolAffine", "PoolPersp",
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
            failures.push(format!(
                "{name}: output {out_err:.2e}, gradient {grad_err:.2e}"
            ));
        }
    }
    assert!(failures.is_empty(), "differs from kornia: {failures:#?}");
}

#[test]
fn the_fixture_exercises_each_augmentation() {
    for name in MODULES {
        let a = applied(name);
        if name != "Cr" {
            assert!(
                a.iter().any(|&x| x),
                "{name} touches no cutout in the fixture"
            );
        }
    }
}

// ---- one optimisation step, end to end ----

/// CLIP's input size in the tiny fixture (cutouts are this square).
const CUT: usize = 32;

fn f32s(key: &str) -> Vec<f32> {
    flat(key).iter().map(|&v| v as f32).collect()
}

/// Hands the Python loop's sampling to the Rust step and keeps the gradients.
struct Replay {
    method: &'static str,
    grads: Arc<Mutex<Vec<Tensor>>>,
}

impl SamplingReplay for Replay {
    fn draw(&mut self, step: u32, clip: usize) -> Option<CutoutDraw> {
        assert_eq!(clip, 0, "one CLIP in this test");
        let key = format!("step.{}.{step}", self.method);
        let crops = if has(&format!("{key}.crops")) {
            flat(&format!("{key}.crops"))
                .chunks(3)
                .map(|c| Crop {
                    x: c[0] as usize,
                    y: c[1] as usize,
                    size: c[2] as usize,
                })
                .collect()
        } else {
            Vec::new()
        };
        if self.method == "original" {
            return Some(CutoutDraw {
                crops,
                augments: Vec::new(),
                noise: None,
            });
        }
        let augments = modules(self.method)
            .iter()
            .map(|name| params_at(&format!("{key}.{name}"), kind(name), CUT, CUT))
            .collect();
        Some(CutoutDraw {
            crops,
            augments,
            noise: Some(CutoutNoise {
                facs: f32s(&format!("{key}.facs")),
                noise: f32s(&format!("{key}.noise")),
            }),
        })
    }

    fn gradient(&mut self, _step: u32, grad: &Tensor) {
        self.grads.lock().unwrap().push(grad.clone());
    }
}

/// The fixture's kornia modules of each cut method, in generate.py's order.
fn modules(method: &str) -> &'static [&'static str] {
    match method {
        "original" => &[],
        "latest" => &["Af", "Pe", "Ji", "Er"],
        "updated" => &["UpFlip", "UpJitter", "UpSharp", "UpAffine", "UpPersp"],
        "nrupdated" => &["NrAf", "NrPe", "Ji", "Er"],
        "updatedpooling" => &["PoolAffine", "PoolPersp", "PoolJitter", "Er"],
        other => panic!("no cut method {other}"),
    }
}

use crate::support::tiny_models as models;

/// Three steps of `method` against the reference: the gradient on z at each step and
/// z after each step within 1e-4 of the reference's largest value.
fn steps_match_pytorch(method: &'static str) {
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "prompts": "a red apple", "width": 40, "height": 40, "cutn": 4,
        "cut_method": method, "augments": ["Af", "Pe", "Ji", "Er"], "optimizer": "adam",
        "lr": 0.1, "init_weight": 0.0, "seed": 7, "steps": 3, "save_every": 0,
        "checkpoint_every": 0
    }))
    .unwrap();
    // The pipeline vqclip builds for the method has the reference's modules, in order.
    let ours: Vec<&str> = Augmentations::for_method(spec.cut_method, &spec.augments)
        .modules()
        .iter()
        .map(kind_of)
        .collect();
    let theirs: Vec<&str> = modules(method).iter().map(|m| kind(m)).collect();
    assert_eq!(ours, theirs, "{method}'s augmentation pipeline");
    let dir = tempfile::tempdir().unwrap();
    let job = RenderJob::new(spec, dir.path());
    let mut session = RenderSession::new(&job, models()).unwrap();
    session.set_z(get(&format!("step.{method}.z0"))).unwrap();
    let grads = Arc::new(Mutex::new(Vec::new()));
    session.set_replay(Box::new(Replay {
        method,
        grads: grads.clone(),
    }));
    let losses = flat(&format!("step.{method}.losses"));
    let mut failures = Vec::new();
    for (i, &expected_loss) in losses.iter().enumerate() {
        let stats = session.step().unwrap();
        let grad = grads.lock().unwrap()[i].clone();
        let g_err = rel_scaled(&grad, get(&format!("step.{method}.grad.{i}")));
        let z_err = rel_scaled(session.z(), get(&format!("step.{method}.z.{}", i + 1)));
        let l_err = (f64::from(stats.loss) - expected_loss).abs() / expected_loss.abs();
        eprintln!("{method} step {i}: loss {l_err:.2e}, grad {g_err:.2e}, z {z_err:.2e}");
        if g_err > 1e-4 || z_err > 1e-4 || l_err > 1e-4 {
            failures.push(format!(
                "step {i}: loss {l_err:.2e}, gradient {g_err:.2e}, z {z_err:.2e}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{method} differs from PyTorch: {failures:#?}"
    );
}

/// max |a − b| / max |b|: relative to the tensor's scale, however small it is.
fn rel_scaled(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff.to_scalar::<f64>().unwrap() / scale
}

#[test]
fn original_steps_equal_pytorch() {
    steps_match_pytorch("original");
}

#[test]
fn latest_steps_equal_pytorch() {
    steps_match_pytorch("latest");
}

#[test]
fn updated_steps_equal_pytorch() {
    steps_match_pytorch("updated");
}

#[test]
fn nrupdated_steps_equal_pytorch() {
    steps_match_pytorch("nrupdated");
}

#[test]
fn updatedpooling_steps_equal_pytorch() {
    steps_match_pytorch("updatedpooling");
}

#[test]
fn cut_methods_parse_as_generate_py_names_them() {
    for (name, method) in [
        ("original", CutMethod::Original),
        ("latest", CutMethod::Latest),
        ("updated", CutMethod::Updated),
        ("nrupdated", CutMethod::Nrupdated),
        ("updatedpooling", CutMethod::Updatedpooling),
    ] {
        let parsed: CutMethod = serde_json::from_value(serde_json::json!(name)).unwrap();
        assert_eq!(parsed, method);
    }
    // nrupdated keeps the code list but with MakeCutoutsNRUpdate's strengths.
    let nr = Augmentations::for_method(CutMethod::Nrupdated, &[Augment::Pe, Augment::Af]);
    assert!(matches!(
        nr.modules(),
        [
            Kornia::Perspective { distortion, .. },
            Kornia::Affine { degrees, .. }
        ] if *distortion == 0.5 && *degrees == 30.0
    ));
}

/// Without a replay each cut method draws its own crops, parameters and noise: steps
/// run, give finite losses, move z, and repeat under the same seed.
#[test]
fn every_cut_method_steps_from_its_own_sampling() {
    for method in ["updated", "nrupdated", "updatedpooling"] {
        let run = || {
            let spec: JobSpec = serde_json::from_value(serde_json::json!({
                "prompts": "a red apple", "width": 40, "height": 40, "cutn": 4,
                "cut_method": method, "augments": ["Ji", "Sh", "Gn", "Pe", "Ro", "Af", "Et", "Ts", "Cr", "Er", "Re"],
                "seed": 11, "steps": 2, "save_every": 0, "checkpoint_every": 0
            }))
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let job = RenderJob::new(spec, dir.path());
            let mut session = RenderSession::new(&job, models()).unwrap();
            let z0 = session.z().copy().unwrap();
            let losses: Vec<f32> = (0..2).map(|_| session.step().unwrap().loss).collect();
            let moved = (session.z() - &z0)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            (losses, moved)
        };
        let (losses, moved) = run();
        assert!(
            losses.iter().all(|l| l.is_finite() && *l > 0.0),
            "{method}: {losses:?}"
        );
        assert!(moved > 0.0, "{method}: z did not move");
        assert_eq!(run().0, losses, "{method}: the same seed gave other losses");
    }
}
