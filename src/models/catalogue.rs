//! The model catalogue: names users type (`ViT-B/32`, `vqgan_imagenet_f16_16384`)
//! mapped to where their files come from, and the cache they land in.
//!
//! A name resolves to a local path: from the cache when its files are there,
//! downloaded when they are not (unless offline). A local file or directory is
//! always accepted in place of a name and is returned as it is.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::Device;
use url::Url;

use super::download::{self, DownloadError, RemoteFile};
use super::{Clip, ModelError, Vqgan};

/// What a catalogue entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Clip,
    Vqgan,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Clip => "CLIP",
            ModelKind::Vqgan => "VQGAN",
        })
    }
}

/// One place a file can be fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A file in a Hugging Face hub model repository (the endpoint honours `HF_ENDPOINT`).
    Hub {
        repo: &'static str,
        revision: &'static str,
        file: &'static str,
    },
    /// A plain HTTPS URL.
    Url(&'static str),
}

/// One on-disk form of an artifact, with the mirrors it can come from (tried in order).
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// The file name inside the model's cache directory.
    pub local_name: &'static str,
    pub sources: &'static [Source],
    /// Known sha256 (lower-case hex). Hub LFS files are also checked against the
    /// hub's own `X-Linked-Etag` when this is `None`.
    pub sha256: Option<&'static str>,
}

/// A file a model needs, in any of its forms (e.g. safetensors, else a PyTorch pickle).
#[derive(Debug, Clone, Copy)]
pub struct Artifact {
    pub candidates: &'static [Candidate],
    /// Optional artifacts (CLIP's `tokenizer.json`: a tokenizer ships with vqclip)
    /// are fetched along with the rest but never make a model count as missing.
    pub required: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct CatalogueEntry {
    pub name: &'static str,
    pub kind: ModelKind,
    pub summary: &'static str,
    pub artifacts: &'static [Artifact],
    /// The file [`resolve`] returns inside the model directory; `None` returns the directory.
    pub entry_file: Option<&'static str>,
}

impl CatalogueEntry {
    /// The directory name in the cache: the name with path separators replaced.
    pub fn slug(&self) -> String {
        self.name.replace(['/', '\\', '@'], "-")
    }

    /// Where the primary file comes from, for listings.
    pub fn source_summary(&self) -> String {
        let weights = self
            .artifacts
            .iter()
            .find(|a| a.required && a.candidates.len() > 1)
            .or_else(|| self.artifacts.last())
            .and_then(|a| a.candidates.first())
            .and_then(|c| c.sources.first());
        match weights {
            Some(Source::Hub { repo, revision, .. }) if *revision == "main" => format!("hf:{repo}"),
            Some(Source::Hub { repo, revision, .. }) => format!("hf:{repo}@{revision}"),
            Some(Source::Url(u)) => Url::parse(u)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_else(|| (*u).to_owned()),
            None => String::new(),
        }
    }
}

const fn hub(repo: &'static str, revision: &'static str, file: &'static str) -> Source {
    Source::Hub {
        repo,
        revision,
        file,
    }
}

const fn file(local_name: &'static str, sources: &'static [Source]) -> Candidate {
    Candidate {
        local_name,
        sources,
        sha256: None,
    }
}

/// A HF CLIP directory: config, weights (safetensors preferred), tokenizer.
macro_rules! clip_artifacts {
    ($repo:literal, $safetensors_rev:literal, $rev:literal) => {
        &[
            Artifact {
                candidates: &[file("config.json", &[hub($repo, $rev, "config.json")])],
                required: true,
            },
            Artifact {
                candidates: &[
                    file(
                        "model.safetensors",
                        &[hub($repo, $safetensors_rev, "model.safetensors")],
                    ),
                    file(
                        "pytorch_model.bin",
                        &[hub($repo, "main", "pytorch_model.bin")],
                    ),
                ],
                required: true,
            },
            Artifact {
                candidates: &[file(
                    "tokenizer.json",
                    &[hub($repo, $rev, "tokenizer.json")],
                )],
                required: false,
            },
        ]
    };
}

/// One of OpenAI's own CLIP files (the `clip` package's `_MODELS`): a TorchScript `.pt` whose
/// sha256 is the URL's last directory, loaded as it is (or once through `vqclip models convert`).
macro_rules! openai_clip_artifacts {
    ($sha:literal, $file:literal) => {
        &[Artifact {
            candidates: &[Candidate {
                local_name: $file,
                sources: &[Source::Url(concat!(
                    "https://openaipublic.azureedge.net/clip/models/",
                    $sha,
                    "/",
                    $file
                ))],
                sha256: Some($sha),
            }],
            required: true,
        }]
    };
}

/// A taming model: its `model.yaml` and Lightning `last.ckpt`, each from the URLs given.
macro_rules! taming_artifacts {
    ([$($yaml:expr),+], [$($ckpt:expr),+]) => {
        &[
            Artifact {
                candidates: &[file("model.yaml", &[$(Source::Url($yaml)),+])],
                required: true,
            },
            Artifact {
                candidates: &[file("last.ckpt", &[$(Source::Url($ckpt)),+])],
                required: true,
            },
        ]
    };
}

/// Every model vqclip can fetch by name.
///
/// No sha256 is published for the taming checkpoints, so those are `None`; hub
/// files are checked against the hub's LFS sha256.
pub static CATALOGUE: &[CatalogueEntry] = &[
    CatalogueEntry {
        name: "ViT-B/32",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ViT-B/32, 224 px (the classic VQGAN+CLIP choice)",
        // `main` has only the PyTorch pickle; the safetensors conversion lives in PR 15.
        artifacts: clip_artifacts!("openai/clip-vit-base-patch32", "refs/pr/15", "refs/pr/15"),
        entry_file: None,
    },
    CatalogueEntry {
        name: "ViT-B/16",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ViT-B/16, 224 px",
        artifacts: clip_artifacts!("openai/clip-vit-base-patch16", "main", "main"),
        entry_file: None,
    },
    CatalogueEntry {
        name: "ViT-L/14",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ViT-L/14, 224 px",
        artifacts: clip_artifacts!("openai/clip-vit-large-patch14", "main", "main"),
        entry_file: None,
    },
    CatalogueEntry {
        name: "ViT-L/14@336px",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ViT-L/14, 336 px",
        artifacts: clip_artifacts!("openai/clip-vit-large-patch14-336", "main", "main"),
        entry_file: None,
    },
    CatalogueEntry {
        name: "vqgan_imagenet_f16_16384",
        kind: ModelKind::Vqgan,
        summary: "taming VQGAN, ImageNet, f=16, 16384 codes (the usual default)",
        artifacts: &[
            Artifact {
                candidates: &[file(
                    "model.yaml",
                    &[
                        Source::Url(concat!(
                            "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/files/",
                            "?p=%2Fconfigs%2Fmodel.yaml&dl=1"
                        )),
                        Source::Url("https://heibox.uni-heidelberg.de/f/274fb24ed38341bfa753/?dl=1"),
                    ],
                )],
                required: true,
            },
            Artifact {
                candidates: &[file(
                    "last.ckpt",
                    &[
                        Source::Url(concat!(
                            "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/files/",
                            "?p=%2Fckpts%2Flast.ckpt&dl=1"
                        )),
                        Source::Url("https://heibox.uni-heidelberg.de/f/867b05fc8c4841768640/?dl=1"),
                    ],
                )],
                required: true,
            },
        ],
        entry_file: Some("last.ckpt"),
    },
    CatalogueEntry {
        name: "vqgan_imagenet_f16_1024",
        kind: ModelKind::Vqgan,
        summary: "taming VQGAN, ImageNet, f=16, 1024 codes",
        artifacts: &[
            Artifact {
                candidates: &[file(
                    "model.yaml",
                    &[Source::Url(concat!(
                        "https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/files/",
                        "?p=%2Fconfigs%2Fmodel.yaml&dl=1"
                    ))],
                )],
                required: true,
            },
            Artifact {
                candidates: &[file(
                    "last.ckpt",
                    &[Source::Url(concat!(
                        "https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/files/",
                        "?p=%2Fckpts%2Flast.ckpt&dl=1"
                    ))],
                )],
                required: true,
            },
        ],
        entry_file: Some("last.ckpt"),
    },
    CatalogueEntry {
        name: "wikiart_16384",
        kind: ModelKind::Vqgan,
        summary: "taming VQGAN fine-tuned on WikiArt, f=16, 16384 codes",
        // The original host (eaidata.bmk.sh) serves plain http only, which we refuse;
        // this is the widely used HTTPS mirror of the same files.
        artifacts: &[
            Artifact {
                candidates: &[file(
                    "model.yaml",
                    &[Source::Url(
                        "https://github.com/Eleiber/VQGAN-Mirrors/releases/download/0.0.1/wikiart_16384.yaml",
                    )],
                )],
                required: true,
            },
            Artifact {
                candidates: &[file(
                    "last.ckpt",
                    &[Source::Url(
                        "https://github.com/Eleiber/VQGAN-Mirrors/releases/download/0.0.1/wikiart_16384.ckpt",
                    )],
                )],
                required: true,
            },
        ],
        entry_file: Some("last.ckpt"),
    },
    CatalogueEntry {
        name: "vqgan_gumbel_f8_8192",
        kind: ModelKind::Vqgan,
        summary: "taming GumbelVQ, OpenImages, f=8, 8192 codes (was openimages_f16_8192)",
        artifacts: taming_artifacts!(
            [concat!(
                "https://heibox.uni-heidelberg.de/d/2e5662443a6b4307b470/files/",
                "?p=%2Fconfigs%2Fmodel.yaml&dl=1"
            )],
            [concat!(
                "https://heibox.uni-heidelberg.de/d/2e5662443a6b4307b470/files/",
                "?p=%2Fckpts%2Flast.ckpt&dl=1"
            )]
        ),
        entry_file: Some("last.ckpt"),
    },
    CatalogueEntry {
        name: "sflckr",
        kind: ModelKind::Vqgan,
        summary: "first stage of taming's S-FLCKR Net2Net transformer (landscapes), f=16",
        artifacts: taming_artifacts!(
            [concat!(
                "https://heibox.uni-heidelberg.de/d/73487ab6e5314cb5adba/files/",
                "?p=%2Fconfigs%2F2020-11-09T13-31-51-project.yaml&dl=1"
            )],
            [concat!(
                "https://heibox.uni-heidelberg.de/d/73487ab6e5314cb5adba/files/",
                "?p=%2Fcheckpoints%2Flast.ckpt&dl=1"
            )]
        ),
        entry_file: Some("last.ckpt"),
    },
    CatalogueEntry {
        name: "coco",
        kind: ModelKind::Vqgan,
        summary: "first stage of taming's COCO Net2Net transformer, f=16 (8.4 GB download)",
        artifacts: taming_artifacts!(
            ["https://dl.nmkd.de/ai/clip/coco/coco.yaml"],
            ["https://dl.nmkd.de/ai/clip/coco/coco.ckpt"]
        ),
        entry_file: Some("last.ckpt"),
    },
    CatalogueEntry {
        name: "faceshq",
        kind: ModelKind::Vqgan,
        summary: "first stage of taming's FacesHQ Net2Net transformer, f=16",
        artifacts: taming_artifacts!(
            ["https://drive.google.com/uc?export=download&id=1fHwGx_hnBtC8nsq7hesJvs-Klv-P0gzT"],
            [concat!(
                "https://app.koofr.net/content/links/a04deec9-0c59-4673-8b37-3d696fe63a5d/files/get/",
                "last.ckpt?path=%2F2020-11-13T21-41-45_faceshq_transformer%2Fcheckpoints%2Flast.ckpt"
            )]
        ),
        entry_file: Some("last.ckpt"),
    },
    CatalogueEntry {
        name: "RN50",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ResNet-50, 224 px",
        artifacts: openai_clip_artifacts!(
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
            "RN50.pt"
        ),
        entry_file: Some("RN50.pt"),
    },
    CatalogueEntry {
        name: "RN101",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ResNet-101, 224 px",
        artifacts: openai_clip_artifacts!(
            "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
            "RN101.pt"
        ),
        entry_file: Some("RN101.pt"),
    },
    CatalogueEntry {
        name: "RN50x4",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ResNet-50x4, 288 px",
        artifacts: openai_clip_artifacts!(
            "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
            "RN50x4.pt"
        ),
        entry_file: Some("RN50x4.pt"),
    },
    CatalogueEntry {
        name: "RN50x16",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ResNet-50x16, 384 px",
        artifacts: openai_clip_artifacts!(
            "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
            "RN50x16.pt"
        ),
        entry_file: Some("RN50x16.pt"),
    },
    CatalogueEntry {
        name: "RN50x64",
        kind: ModelKind::Clip,
        summary: "OpenAI CLIP ResNet-50x64, 448 px",
        artifacts: openai_clip_artifacts!(
            "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
            "RN50x64.pt"
        ),
        entry_file: Some("RN50x64.pt"),
    },
];

/// Finds a catalogue entry by its name, its cache slug or its hub repository id
/// (all case-insensitive).
pub fn find(name: &str) -> Option<&'static CatalogueEntry> {
    let name = name.trim();
    CATALOGUE.iter().find(|e| {
        e.name.eq_ignore_ascii_case(name)
            || e.slug().eq_ignore_ascii_case(name)
            || e.artifacts.iter().any(|a| {
                a.candidates.iter().any(|c| {
                    c.sources.iter().any(
                        |s| matches!(s, Source::Hub { repo, .. } if repo.eq_ignore_ascii_case(name)),
                    )
                })
            })
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("unknown {kind} model {name:?}: known {kind} models are {known}; or pass the path of a model {what} (no file or directory of that name exists)")]
    UnknownModel {
        name: String,
        kind: ModelKind,
        known: String,
        what: &'static str,
    },
    #[error("{name:?} is not in the catalogue; `vqclip models list` shows the names: {known}")]
    NotInCatalogue { name: String, known: String },
    #[error("{name:?} is a {actual} model, but a {expected} model is needed here")]
    WrongKind {
        name: String,
        expected: ModelKind,
        actual: ModelKind,
    },
    #[error("no such file or directory: {}", .0.display())]
    PathNotFound(PathBuf),
    #[error("{}", offline_message(.model, .dir, .missing))]
    Offline {
        model: String,
        dir: PathBuf,
        missing: Vec<MissingFile>,
    },
    #[error("could not download {file} of {model}:{}", attempts_message(.attempts))]
    Download {
        model: String,
        file: String,
        /// Where the file was to go.
        path: PathBuf,
        attempts: Vec<(String, DownloadError)>,
    },
    #[error("the Hugging Face hub client could not be set up: {0}")]
    Hub(String),
}

/// A file a model needs that is not in the cache.
#[derive(Debug, Clone)]
pub struct MissingFile {
    /// Where the file must be put (the first form, when several are accepted).
    pub path: PathBuf,
    /// Other accepted file names in the same directory.
    pub alternatives: Vec<String>,
    /// Where it can be downloaded from, on a machine with network.
    pub urls: Vec<String>,
}

fn offline_message(model: &str, dir: &Path, missing: &[MissingFile]) -> String {
    let mut msg = format!(
        "offline mode is on (HF_HUB_OFFLINE=1 or VQCLIP_OFFLINE=1) and {model} is not fully in the model cache {}.\n",
        dir.display()
    );
    for m in missing {
        msg.push_str(&format!("  missing: {}", m.path.display()));
        if !m.alternatives.is_empty() {
            msg.push_str(&format!(" (or {} beside it)", m.alternatives.join(", ")));
        }
        msg.push('\n');
        if let Some(url) = m.urls.first() {
            msg.push_str(&format!("    get it from: {url}\n"));
        }
    }
    msg.push_str(&format!(
        "Put the file(s) at exactly that path, or run `vqclip models pull {model}` with network access, or pass a local path instead of the name."
    ));
    msg
}

fn attempts_message(attempts: &[(String, DownloadError)]) -> String {
    attempts
        .iter()
        .map(|(_, e)| format!("\n  {e}"))
        .collect::<String>()
}

/// The model cache directory, resolved in one place for the server, the workers and the
/// command line: `setting` (`models.cache_dir`) when not empty, else `VQCLIP_MODEL_CACHE`,
/// else `$XDG_CACHE_HOME/vqclip`, else `~/.cache/vqclip` (else `.vqclip-cache` without a
/// home directory).
pub fn cache_root(setting: &str) -> PathBuf {
    Some(setting)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("VQCLIP_MODEL_CACHE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(|d| PathBuf::from(d).join("vqclip"))
        })
        .or_else(|| home_dir().map(|h| h.join(".cache").join("vqclip")))
        .unwrap_or_else(|| PathBuf::from(".vqclip-cache"))
}

/// Where models are cached, and whether the network may be used to fill it.
#[derive(Debug, Clone)]
pub struct ModelCache {
    root: PathBuf,
    offline: bool,
    hub_endpoint: Option<String>,
    progress: Option<DownloadWatcher>,
}

/// One step of a model download, for whoever waits on it (a job's events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    pub model: String,
    pub file: String,
    pub bytes: u64,
    pub total: Option<u64>,
}

/// Called as model files download (often: every chunk).
#[derive(Clone)]
pub struct DownloadWatcher(pub std::sync::Arc<dyn Fn(&DownloadProgress) + Send + Sync>);

impl fmt::Debug for DownloadWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DownloadWatcher")
    }
}

impl ModelCache {
    /// A cache at `root`, online, with the hub endpoint from `HF_ENDPOINT`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            offline: false,
            hub_endpoint: None,
            progress: None,
        }
    }

    /// The same cache, telling `watcher` how its downloads progress.
    pub fn with_download_watcher(mut self, watcher: DownloadWatcher) -> Self {
        self.progress = Some(watcher);
        self
    }

    /// The cache at [`cache_root`] with no setting; offline when `HF_HUB_OFFLINE` or
    /// `VQCLIP_OFFLINE` is set to a true value.
    pub fn from_env() -> Self {
        Self::configured("")
    }

    /// The cache at [`cache_root`] of `setting` (`models.cache_dir`); offline as
    /// [`ModelCache::from_env`].
    pub fn configured(setting: &str) -> Self {
        let offline = env_flag("HF_HUB_OFFLINE") || env_flag("VQCLIP_OFFLINE");
        Self::new(cache_root(setting)).with_offline(offline)
    }

    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    pub fn set_offline(&mut self, offline: bool) {
        self.offline = offline;
    }

    /// Overrides `HF_ENDPOINT` (e.g. a local mirror).
    pub fn with_hub_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.hub_endpoint = Some(endpoint.into());
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The directory holding one catalogue model's files.
    pub fn model_dir(&self, entry: &CatalogueEntry) -> PathBuf {
        let kind = match entry.kind {
            ModelKind::Clip => "clip",
            ModelKind::Vqgan => "vqgan",
        };
        self.root.join(kind).join(entry.slug())
    }

    /// How much of a model is in the cache.
    pub fn status(&self, entry: &CatalogueEntry) -> CacheStatus {
        let dir = self.model_dir(entry);
        let present = |a: &Artifact| {
            a.candidates
                .iter()
                .any(|c| dir.join(c.local_name).is_file())
        };
        let required: Vec<bool> = entry
            .artifacts
            .iter()
            .filter(|a| a.required)
            .map(present)
            .collect();
        if required.iter().all(|p| *p) {
            CacheStatus::Complete
        } else if required.iter().any(|p| *p) || holds_data(&dir) {
            CacheStatus::Partial
        } else {
            CacheStatus::Missing
        }
    }

    /// The URL of a source, with the hub endpoint applied.
    pub fn source_url(&self, source: &Source) -> Result<Url, CatalogueError> {
        let raw = match source {
            Source::Url(u) => (*u).to_owned(),
            Source::Hub {
                repo,
                revision,
                file,
            } => {
                let mut builder = hf_hub::api::tokio::ApiBuilder::from_env().with_progress(false);
                if let Some(endpoint) = &self.hub_endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                let api = builder
                    .build()
                    .map_err(|e| CatalogueError::Hub(e.to_string()))?;
                let repo = hf_hub::Repo::with_revision(
                    (*repo).to_owned(),
                    hf_hub::RepoType::Model,
                    (*revision).to_owned(),
                );
                api.repo(repo).url(file)
            }
        };
        Url::parse(&raw).map_err(|e| CatalogueError::Hub(format!("bad URL {raw}: {e}")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Complete,
    Partial,
    Missing,
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheStatus::Complete => "yes",
            CacheStatus::Partial => "partial",
            CacheStatus::Missing => "no",
        })
    }
}

/// Whether a model directory holds any downloaded bytes. A failed first download
/// leaves only its empty `.lock` file behind, which is not a partial model.
fn holds_data(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let is_lock = e.path().extension().is_some_and(|x| x == "lock");
        !is_lock && e.metadata().is_ok_and(|m| m.len() > 0)
    })
}

/// Whether a configured model can be loaded without the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// A local file or directory.
    Local,
    /// A catalogue model, complete in the cache.
    Cached,
    /// A catalogue model, partly downloaded.
    Partial,
    /// A catalogue model not in the cache: the first job downloads it.
    Missing,
    /// Neither an existing path nor a catalogue name.
    Unknown,
}

impl Presence {
    pub fn is_present(self) -> bool {
        matches!(self, Presence::Local | Presence::Cached)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Local => "local",
            Presence::Cached => "cached",
            Presence::Partial => "partial",
            Presence::Missing => "missing",
            Presence::Unknown => "unknown",
        }
    }
}

/// Whether `spec` (a name or a path) is ready to load, without touching the network.
pub fn presence(spec: &str, kind: ModelKind, cache: &ModelCache) -> Presence {
    if expand_tilde(spec).exists() {
        return Presence::Local;
    }
    match find(spec) {
        Some(entry) if entry.kind == kind => match cache.status(entry) {
            CacheStatus::Complete => Presence::Cached,
            CacheStatus::Partial => Presence::Partial,
            CacheStatus::Missing => Presence::Missing,
        },
        _ => Presence::Unknown,
    }
}

/// Why a job's models could not be made ready, worded for the API client: every
/// model that is missing, the real cause and the next step, without server paths
/// (the server log has the full errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelsUnavailable {
    pub message: String,
    /// Every failure was the network's: a later attempt may succeed.
    pub transient: bool,
}

/// Resolves (downloading when needed and allowed) every model in `specs`, going on
/// past a failure so that one answer names all that are missing.
pub fn ensure_models(
    specs: &[(ModelKind, &str)],
    cache: &ModelCache,
) -> Result<(), ModelsUnavailable> {
    let mut failures = Vec::new();
    for (kind, spec) in specs {
        if let Err(e) = resolve(spec, *kind, cache) {
            tracing::warn!(model = %spec, cache = %cache.root().display(), "model unavailable: {e}");
            failures.push((*kind, *spec, e));
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    let transient = failures.iter().all(|(_, _, e)| match e {
        CatalogueError::Download { attempts, .. } => {
            !attempts.is_empty() && attempts.iter().all(|(_, a)| a.is_transient())
        }
        _ => false,
    });
    let mut message = String::from("the models this job needs are not available on the server:");
    for (kind, spec, e) in &failures {
        message.push_str(&format!("\n  {kind} model {spec:?}: {}", public_reason(e)));
    }
    let names: Vec<&str> = failures
        .iter()
        .filter(|(_, _, e)| {
            matches!(
                e,
                CatalogueError::Download { .. } | CatalogueError::Offline { .. }
            )
        })
        .map(|(_, spec, _)| *spec)
        .collect();
    if !names.is_empty() {
        message.push_str(&format!(
            "\nThe server downloads catalogue models on first use. Its operator can run \
             `vqclip models pull {}` on the server (or on a machine with network access, then \
             copy the model cache over), or place the files in the server's model cache by \
             hand and run with VQCLIP_OFFLINE=1; `vqclip models list` shows what is present \
             and where each file goes.",
            names.join(" ")
        ));
    }
    Err(ModelsUnavailable { message, transient })
}

/// One model's failure without local paths.
fn public_reason(e: &CatalogueError) -> String {
    match e {
        CatalogueError::Offline { .. } => {
            "not in the model cache, and offline mode is on (HF_HUB_OFFLINE or VQCLIP_OFFLINE)"
                .into()
        }
        CatalogueError::Download { file, attempts, .. } => {
            let mut causes: Vec<String> = Vec::new();
            for (_, a) in attempts {
                let cause = a.public_cause();
                if !causes.contains(&cause) {
                    causes.push(cause);
                }
            }
            format!("downloading {file} failed: {}", causes.join("; "))
        }
        CatalogueError::PathNotFound(_) => {
            "no such model file or directory on the server, and not a catalogue name".into()
        }
        other => other.to_string(),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

fn expand_tilde(spec: &str) -> PathBuf {
    match spec.strip_prefix("~/") {
        Some(rest) => home_dir()
            .map(|h| h.join(rest))
            .unwrap_or_else(|| spec.into()),
        None => PathBuf::from(spec),
    }
}

/// Looks like a path rather than a catalogue name: used to say "no such file"
/// instead of "unknown model" for a mistyped path.
fn looks_like_path(spec: &str) -> bool {
    spec.starts_with(['.', '/', '~'])
        || spec.matches(['/', std::path::MAIN_SEPARATOR]).count() > 1
        || [".ckpt", ".safetensors", ".bin", ".pt", ".yaml", ".json"]
            .iter()
            .any(|ext| spec.to_ascii_lowercase().ends_with(ext))
}

/// A CLIP name or path to a local path `Clip::load` accepts (a HF directory or a
/// file in it). Downloads a missing model unless the cache is offline.
pub fn resolve_clip(spec: &str, cache: &ModelCache) -> Result<PathBuf, ModelError> {
    Ok(resolve(spec, ModelKind::Clip, cache)?)
}

/// A VQGAN name or path to a local path `Vqgan::load` accepts (a checkpoint with
/// `model.yaml` beside it, or a directory holding both).
pub fn resolve_vqgan(spec: &str, cache: &ModelCache) -> Result<PathBuf, ModelError> {
    Ok(resolve(spec, ModelKind::Vqgan, cache)?)
}

/// Resolves `spec` (name or path) and loads the CLIP model on `device`: the one
/// call the CLI tools, `render` and the workers share.
pub fn load_clip(spec: &str, cache: &ModelCache, device: &Device) -> Result<Clip, ModelError> {
    Clip::load(&resolve_clip(spec, cache)?, device)
}

/// Resolves `spec` (name or path) and loads the VQGAN on `device`.
pub fn load_vqgan(spec: &str, cache: &ModelCache, device: &Device) -> Result<Vqgan, ModelError> {
    Vqgan::load(&resolve_vqgan(spec, cache)?, device)
}

/// A device from `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU when this build
/// has CUDA and one is present, else the CPU).
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let spec = spec.trim().to_ascii_lowercase();
    let cuda = |ordinal: usize| {
        if !candle_core::utils::cuda_is_available() {
            return Err(ModelError::Input(format!(
                "--device {spec}: this vqclip was built without CUDA; use --device cpu, or rebuild with `cargo build --release --features cuda`"
            )));
        }
        Device::new_cuda(ordinal).map_err(|e| {
            ModelError::Input(format!(
                "--device {spec}: cannot open CUDA device {ordinal}: {e}"
            ))
        })
    };
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" if candle_core::utils::cuda_is_available() => cuda(0),
        "auto" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => Err(ModelError::Input(format!(
                "unknown device {spec:?}: use cpu, cuda:N (e.g. cuda:0) or auto"
            ))),
        },
    }
}

impl From<CatalogueError> for ModelError {
    fn from(err: CatalogueError) -> Self {
        match err {
            CatalogueError::PathNotFound(path) => ModelError::Missing {
                path,
                hint: "It is neither an existing path nor a catalogue name (`vqclip models list`)."
                    .into(),
            },
            CatalogueError::Offline { ref missing, .. } => ModelError::Missing {
                path: missing.first().map(|m| m.path.clone()).unwrap_or_default(),
                hint: err.to_string(),
            },
            CatalogueError::Download { ref path, .. } => ModelError::Io {
                path: path.clone(),
                source: std::io::Error::other(err),
            },
            other => ModelError::Input(other.to_string()),
        }
    }
}

/// Resolves a name or a path. A cached model is returned without any network request.
pub fn resolve(spec: &str, kind: ModelKind, cache: &ModelCache) -> Result<PathBuf, CatalogueError> {
    let path = expand_tilde(spec);
    if path.exists() {
        return Ok(path);
    }
    let entry = lookup(spec, kind)?;
    let dir = cache.model_dir(entry);
    let missing = missing_required(entry, &dir);
    if !missing.is_empty() {
        if cache.is_offline() {
            return Err(offline_error(entry, &dir, &missing, cache));
        }
        fetch_artifacts(entry, &dir, cache)?;
    }
    Ok(entry_path(entry, &dir))
}

/// Downloads every file of a catalogue model (optional ones too) into the cache.
pub fn pull(name: &str, cache: &ModelCache) -> Result<PathBuf, CatalogueError> {
    let entry = find(name).ok_or_else(|| CatalogueError::NotInCatalogue {
        name: name.to_owned(),
        known: CATALOGUE
            .iter()
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let dir = cache.model_dir(entry);
    if cache.is_offline() {
        let missing = missing_required(entry, &dir);
        if !missing.is_empty() {
            return Err(offline_error(entry, &dir, &missing, cache));
        }
        return Ok(entry_path(entry, &dir));
    }
    fetch_artifacts(entry, &dir, cache)?;
    Ok(entry_path(entry, &dir))
}

fn lookup(spec: &str, kind: ModelKind) -> Result<&'static CatalogueEntry, CatalogueError> {
    match find(spec) {
        Some(e) if e.kind == kind => Ok(e),
        Some(e) => Err(CatalogueError::WrongKind {
            name: spec.to_owned(),
            expected: kind,
            actual: e.kind,
        }),
        None if looks_like_path(spec) => Err(CatalogueError::PathNotFound(expand_tilde(spec))),
        None => Err(CatalogueError::UnknownModel {
            name: spec.to_owned(),
            kind,
            known: CATALOGUE
                .iter()
                .filter(|e| e.kind == kind)
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", "),
            what: match kind {
                ModelKind::Clip => "directory (config.json + model.safetensors)",
                ModelKind::Vqgan => "checkpoint (.ckpt or .safetensors with model.yaml beside it)",
            },
        }),
    }
}

fn entry_path(entry: &CatalogueEntry, dir: &Path) -> PathBuf {
    match entry.entry_file {
        Some(f) => dir.join(f),
        None => dir.to_path_buf(),
    }
}

fn missing_required<'a>(entry: &'a CatalogueEntry, dir: &Path) -> Vec<&'a Artifact> {
    entry
        .artifacts
        .iter()
        .filter(|a| a.required)
        .filter(|a| {
            !a.candidates
                .iter()
                .any(|c| dir.join(c.local_name).is_file())
        })
        .collect()
}

fn offline_error(
    entry: &CatalogueEntry,
    dir: &Path,
    missing: &[&Artifact],
    cache: &ModelCache,
) -> CatalogueError {
    let missing = missing
        .iter()
        .map(|a| MissingFile {
            path: dir.join(a.candidates[0].local_name),
            alternatives: a.candidates[1..]
                .iter()
                .map(|c| c.local_name.to_owned())
                .collect(),
            urls: a
                .candidates
                .iter()
                .flat_map(|c| c.sources.iter())
                .filter_map(|s| cache.source_url(s).ok().map(|u| u.to_string()))
                .collect(),
        })
        .collect();
    CatalogueError::Offline {
        model: entry.name.to_owned(),
        dir: dir.to_path_buf(),
        missing,
    }
}

/// Fetches the artifacts not yet in `dir`. An optional file the sources lack
/// (404 everywhere) is skipped.
fn fetch_artifacts(
    entry: &CatalogueEntry,
    dir: &Path,
    cache: &ModelCache,
) -> Result<(), CatalogueError> {
    let token = hub_token();
    for artifact in entry.artifacts {
        if artifact
            .candidates
            .iter()
            .any(|c| dir.join(c.local_name).is_file())
        {
            continue;
        }
        let mut attempts = Vec::new();
        let mut done = false;
        'candidates: for candidate in artifact.candidates {
            for source in candidate.sources {
                let url = cache.source_url(source)?;
                let remote = RemoteFile {
                    bearer_token: matches!(source, Source::Hub { .. })
                        .then(|| token.clone())
                        .flatten(),
                    sha256: candidate.sha256.map(str::to_owned),
                    url: url.clone(),
                };
                let on_progress = |bytes: u64, total: Option<u64>| {
                    if let Some(watcher) = &cache.progress {
                        (watcher.0)(&DownloadProgress {
                            model: entry.name.to_owned(),
                            file: candidate.local_name.to_owned(),
                            bytes,
                            total,
                        });
                    }
                };
                let dest = dir.join(candidate.local_name);
                match download::fetch_blocking_with_progress(&remote, &dest, &on_progress) {
                    Ok(fetched) => {
                        tracing::info!(
                            model = entry.name,
                            file = %fetched.path.display(),
                            sha256 = fetched.sha256.as_deref().unwrap_or("(already present)"),
                            "model file ready"
                        );
                        done = true;
                        break 'candidates;
                    }
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "source failed; trying the next one");
                        attempts.push((url.to_string(), e));
                    }
                }
            }
        }
        if !done {
            let all_missing = attempts
                .iter()
                .all(|(_, e)| matches!(e, DownloadError::NotFound { .. }));
            if !artifact.required && all_missing {
                continue;
            }
            return Err(CatalogueError::Download {
                model: entry.name.to_owned(),
                file: artifact.candidates[0].local_name.to_owned(),
                path: dir.join(artifact.candidates[0].local_name),
                attempts,
            });
        }
    }
    Ok(())
}

/// `HF_TOKEN`, else the token `huggingface-cli login` stored.
fn hub_token() -> Option<String> {
    std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| hf_hub::Cache::from_env().token())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_slugs_and_repo_ids_find_entries() {
        assert_eq!(find("ViT-B/32").unwrap().name, "ViT-B/32");
        assert_eq!(find("vit-b-32").unwrap().name, "ViT-B/32");
        assert_eq!(
            find("openai/clip-vit-large-patch14").unwrap().name,
            "ViT-L/14"
        );
        assert_eq!(
            find("vqgan_imagenet_f16_16384").unwrap().kind,
            ModelKind::Vqgan
        );
        assert!(find("ViT-H/14").is_none());
    }

    #[test]
    fn every_entry_has_https_sources_and_distinct_slugs() {
        let cache = ModelCache::new("/tmp/x").with_hub_endpoint("https://huggingface.co");
        let mut slugs = std::collections::HashSet::new();
        for e in CATALOGUE {
            assert!(slugs.insert(e.slug()), "duplicate slug {}", e.slug());
            for a in e.artifacts {
                for c in a.candidates {
                    for s in c.sources {
                        let url = cache.source_url(s).unwrap();
                        assert_eq!(url.scheme(), "https", "{} {url}", e.name);
                    }
                }
            }
        }
    }

    #[test]
    fn hub_urls_encode_the_revision() {
        let cache = ModelCache::new("/tmp/x").with_hub_endpoint("https://huggingface.co");
        let url = cache
            .source_url(&hub(
                "openai/clip-vit-base-patch32",
                "refs/pr/15",
                "model.safetensors",
            ))
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://huggingface.co/openai/clip-vit-base-patch32/resolve/refs%2Fpr%2F15/model.safetensors"
        );
    }

    #[test]
    fn an_empty_lock_file_is_not_a_partial_model() {
        let root = tempfile::tempdir().unwrap();
        let cache = ModelCache::new(root.path()).with_offline(true);
        let entry = &CATALOGUE[0];
        let dir = cache.model_dir(entry);
        std::fs::create_dir_all(&dir).unwrap();
        let first = entry.artifacts[0].candidates[0].local_name;
        // What a failed first download leaves behind.
        std::fs::write(dir.join(format!("{first}.lock")), b"").unwrap();
        assert_eq!(cache.status(entry), CacheStatus::Missing);
        assert_eq!(presence(entry.name, entry.kind, &cache), Presence::Missing);
        // Bytes of an interrupted download are a partial model.
        std::fs::write(dir.join(format!("{first}.part")), b"0123").unwrap();
        assert_eq!(cache.status(entry), CacheStatus::Partial);
    }

    #[test]
    fn every_missing_model_is_named_without_server_paths() {
        let root = tempfile::tempdir().unwrap();
        let cache = ModelCache::new(root.path()).with_offline(true);
        let clip = CATALOGUE
            .iter()
            .find(|e| e.kind == ModelKind::Clip)
            .unwrap();
        let vqgan = CATALOGUE
            .iter()
            .find(|e| e.kind == ModelKind::Vqgan)
            .unwrap();
        let err = ensure_models(
            &[(ModelKind::Vqgan, vqgan.name), (ModelKind::Clip, clip.name)],
            &cache,
        )
        .unwrap_err();
        assert!(!err.transient);
        for name in [vqgan.name, clip.name] {
            assert!(err.message.contains(name), "{}", err.message);
        }
        assert!(
            err.message.contains("vqclip models pull"),
            "{}",
            err.message
        );
        assert!(err.message.contains("VQCLIP_OFFLINE"), "{}", err.message);
        let root = root.path().display().to_string();
        assert!(!err.message.contains(&root), "{}", err.message);
    }

    #[test]
    fn an_unreachable_source_is_transient_and_says_why() {
        let root = tempfile::tempdir().unwrap();
        // Nothing listens on port 1: the connection is refused at once.
        let cache = ModelCache::new(root.path()).with_hub_endpoint("http://127.0.0.1:1");
        let err = ensure_models(&[(ModelKind::Clip, "ViT-B/32")], &cache).unwrap_err();
        assert!(err.transient, "{}", err.message);
        assert!(err.message.contains("ViT-B/32"), "{}", err.message);
        assert!(
            err.message.to_ascii_lowercase().contains("refused"),
            "the real cause is named: {}",
            err.message
        );
        assert!(
            err.message.contains("vqclip models pull ViT-B/32"),
            "{}",
            err.message
        );
        let root = root.path().display().to_string();
        assert!(!err.message.contains(&root), "{}", err.message);
        assert_eq!(
            cache.status(find("ViT-B/32").unwrap()),
            CacheStatus::Missing,
            "a failed first download leaves no partial model"
        );
    }

    #[test]
    fn wrong_kind_and_unknown_names_are_explained() {
        let cache = ModelCache::new("/nonexistent-cache").with_offline(true);
        let err = resolve("vqgan_imagenet_f16_16384", ModelKind::Clip, &cache).unwrap_err();
        assert!(matches!(err, CatalogueError::WrongKind { .. }), "{err}");
        let err = resolve_vqgan("imagenet-mystery", &cache).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown VQGAN model"), "{msg}");
        assert!(msg.contains("wikiart_16384"), "{msg}");
        let err = resolve("./missing/model.ckpt", ModelKind::Vqgan, &cache).unwrap_err();
        assert!(matches!(err, CatalogueError::PathNotFound(_)), "{err}");
    }
}
