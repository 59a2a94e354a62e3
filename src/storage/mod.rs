//! The artifact store: what each job's render wrote (image, frames, video, metadata,
//! checkpoints) under `jobs/<id>/`, and the uploaded images and videos under `uploads/`.
//!
//! The store is `object_store`'s trait with one of two backends, chosen by `storage.url`:
//! a local directory (the default, `storage.artifact_dir`) or an S3-compatible bucket
//! (`s3://bucket/prefix`, see [`s3`]). The render thread writes plain files into a local
//! scratch directory; the worker copies each durable file into the store before it reports
//! it, so another machine can serve it or resume from it. For the local backend the scratch
//! directory *is* the store, and nothing is copied.
//!
//! Every name that comes from a request passes [`is_safe_name`], which accepts plain file
//! names only, so no request can reach outside a job's prefix.

pub mod s3;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, PutPayload};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::config::StorageConfig;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid artifact name {0:?}: names are plain file names of letters, digits, '.', '_' and '-'")]
    InvalidName(String),
    #[error("artifact {0} does not exist")]
    Missing(String),
    #[error("artifact store, {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("storage settings: {0}")]
    Settings(String),
}

type Result<T> = std::result::Result<T, StorageError>;

/// The name the render gives a job's resumable checkpoint.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The checkpoint of a video-styling job (`render::video` writes it under this name).
pub const VIDEO_CHECKPOINT_FILE: &str = "video_checkpoint.json";
/// A fork's copy of the state it starts from (its parent's `frames/NNNNN.ckpt`).
pub const FORK_POINT_FILE: &str = "fork.ckpt";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

fn store_err(key: &Key) -> impl FnOnce(object_store::Error) -> StorageError + '_ {
    move |source| match source {
        object_store::Error::NotFound { .. } => StorageError::Missing(key.to_string()),
        source => StorageError::Store {
            key: key.to_string(),
            source,
        },
    }
}

/// A file name with no directory part, no leading dot and no odd characters.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A stored artifact as the API serves it: where it is, how long, and its version.
#[derive(Debug, Clone)]
pub struct Artifact {
    key: Key,
    pub size: u64,
    /// A strong validator from the backend (an S3 ETag, or inode, mtime and size on disk),
    /// quoted as HTTP wants it.
    pub etag: String,
}

/// A frame the render wrote, by its step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub step: u32,
    pub size: u64,
}

#[derive(Clone)]
pub struct ArtifactStore {
    objects: Arc<dyn ObjectStore>,
    /// Where the render thread writes a job's files before they are stored.
    scratch: PathBuf,
    /// The local backend stores in `scratch` itself: no copy to make, nothing to fetch.
    in_place: bool,
    /// For logs: the directory or the `s3://` URL.
    location: String,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStore")
            .field("location", &self.location)
            .field("scratch", &self.scratch)
            .finish()
    }
}

fn job_prefix(job: Uuid) -> Key {
    Key::from(format!("jobs/{job}"))
}

/// The key of a file of `job`, by its path relative to the job directory (`image.png`,
/// `frames/00010.png`); every part must be a safe name.
fn job_key(job: Uuid, rel: &str) -> Result<Key> {
    if rel.split('/').all(is_safe_name) {
        Ok(Key::from(format!("jobs/{job}/{rel}")))
    } else {
        Err(StorageError::InvalidName(rel.to_owned()))
    }
}

fn upload_key(name: &str) -> Result<Key> {
    if is_safe_name(name) {
        Ok(Key::from(format!("uploads/{name}")))
    } else {
        Err(StorageError::InvalidName(name.to_owned()))
    }
}

/// HTTP wants the entity tag quoted; S3 quotes its own, the local backend does not.
fn quoted_etag(meta: &ObjectMeta) -> String {
    let raw = meta.e_tag.as_deref().unwrap_or_default();
    let bare = raw.trim().trim_start_matches("W/").trim_matches('"');
    if bare.is_empty() {
        // A backend without ETags: size and modification time still tell versions apart.
        format!(
            "\"{:x}-{:x}\"",
            meta.size,
            meta.last_modified.timestamp_nanos_opt().unwrap_or_default()
        )
    } else {
        format!("\"{bare}\"")
    }
}

impl ArtifactStore {
    /// Opens the store `storage` describes: `url` empty (or `file://…`) is a local
    /// directory, `s3://bucket/prefix` a bucket.
    pub fn from_config(storage: &StorageConfig) -> Result<ArtifactStore> {
        let url = storage.url.trim();
        if url.is_empty() {
            return ArtifactStore::open(&storage.artifact_dir);
        }
        if let Some(dir) = url.strip_prefix("file://") {
            return ArtifactStore::open(dir);
        }
        if url.starts_with("s3://") {
            let scratch = if storage.scratch_dir.as_os_str().is_empty() {
                storage.artifact_dir.clone()
            } else {
                storage.scratch_dir.clone()
            };
            let objects = s3::build(url, storage)?;
            return ArtifactStore::remote(objects, scratch, url.to_owned());
        }
        Err(StorageError::Settings(format!(
            "storage.url {url:?} is neither empty (the local directory storage.artifact_dir), file:///dir nor s3://bucket/prefix"
        )))
    }

    /// The local backend: everything under `root`, created on first use.
    pub fn open(root: impl Into<PathBuf>) -> Result<ArtifactStore> {
        let root = root.into();
        for dir in [root.join("jobs"), root.join("uploads")] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        // Deleting a job's last file removes its emptied directories too.
        let objects = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| StorageError::Settings(format!("{}: {e}", root.display())))?
            .with_automatic_cleanup(true);
        Ok(ArtifactStore {
            objects: Arc::new(objects),
            location: root.display().to_string(),
            scratch: root,
            in_place: true,
        })
    }

    /// A store elsewhere (a bucket), with a local scratch directory for the render.
    pub fn remote(
        objects: Arc<dyn ObjectStore>,
        scratch: impl Into<PathBuf>,
        location: String,
    ) -> Result<ArtifactStore> {
        let scratch = scratch.into();
        let jobs = scratch.join("jobs");
        std::fs::create_dir_all(&jobs).map_err(io(&jobs))?;
        Ok(ArtifactStore {
            objects,
            scratch,
            in_place: false,
            location,
        })
    }

    /// The directory or URL, for logs.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Where the render of `job` writes its files (a scratch copy unless local).
    pub fn job_dir(&self, job: Uuid) -> PathBuf {
        self.scratch.join("jobs").join(job.to_string())
    }

    pub fn create_job_dir(&self, job: Uuid) -> Result<PathBuf> {
        let dir = self.job_dir(job);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// Copies what the store holds of `job` (checkpoint, frames) into its scratch
    /// directory, so a job started on another machine resumes here. Files already
    /// present with the same size are kept. Returns how many files were fetched.
    pub async fn restore_job(&self, job: Uuid) -> Result<usize> {
        if self.in_place {
            return Ok(0);
        }
        let dir = self.create_job_dir(job)?;
        let prefix = job_prefix(job);
        let stored: Vec<ObjectMeta> = self
            .objects
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(store_err(&prefix))?;
        let mut fetched = 0;
        for meta in stored {
            let Some(rel) = meta.location.prefix_match(&prefix) else {
                continue;
            };
            let parts: Vec<String> = rel.map(|p| p.as_ref().to_owned()).collect();
            if parts.is_empty() || !parts.iter().all(|p| is_safe_name(p)) {
                continue;
            }
            let path = parts.iter().fold(dir.clone(), |p, part| p.join(part));
            let same = tokio::fs::metadata(&path)
                .await
                .is_ok_and(|m| m.len() == meta.size);
            if !same {
                self.download(&meta.location, &path).await?;
                fetched += 1;
            }
        }
        Ok(fetched)
    }

    /// Streams an object into a file, via a temporary name so the render never reads
    /// half of one.
    async fn download(&self, key: &Key, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(parent))?;
        }
        let tmp = path.with_extension("fetching");
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        let mut chunks = self
            .objects
            .get(key)
            .await
            .map_err(store_err(key))?
            .into_stream();
        while let Some(chunk) = chunks.next().await {
            file.write_all(&chunk.map_err(store_err(key))?)
                .await
                .map_err(io(&tmp))?;
        }
        file.sync_all().await.map_err(io(&tmp))?;
        drop(file);
        tokio::fs::rename(&tmp, path).await.map_err(io(path))
    }

    /// Stores a file the render wrote under `job`'s scratch directory (`path` is absolute,
    /// or relative to that directory). Streamed, so a long video takes little memory.
    pub async fn persist(&self, job: Uuid, path: &Path) -> Result<()> {
        if self.in_place {
            return Ok(());
        }
        let dir = self.job_dir(job);
        let rel = path.strip_prefix(&dir).unwrap_or(path);
        let rel_str = rel
            .to_str()
            .ok_or_else(|| StorageError::InvalidName(rel.display().to_string()))?;
        let key = job_key(job, rel_str)?;
        let full = dir.join(rel);
        let mut file = tokio::fs::File::open(&full).await.map_err(io(&full))?;
        let mut writer = object_store::buffered::BufWriter::new(self.objects.clone(), key.clone());
        if let Err(e) = tokio::io::copy(&mut file, &mut writer).await {
            let _ = writer.abort().await;
            return Err(io(&full)(e));
        }
        writer.shutdown().await.map_err(|e| StorageError::Store {
            key: key.to_string(),
            source: object_store::Error::Generic {
                store: "artifact upload",
                source: Box::new(e),
            },
        })
    }

    /// Stores `job`'s scratch directory: every top-level file (image, video, metadata,
    /// checkpoint: a checkpoint is rewritten at the same size, so sizes prove nothing),
    /// and each frame the store lacks or holds at another size (frames are written once).
    pub async fn persist_job(&self, job: Uuid) -> Result<usize> {
        if self.in_place {
            return Ok(0);
        }
        let prefix = job_prefix(job);
        let stored: std::collections::HashMap<String, u64> = self
            .objects
            .list(Some(&prefix))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .map_err(store_err(&prefix))?;
        let dir = self.job_dir(job);
        let mut files = vec![];
        for (sub, top) in [(dir.clone(), true), (dir.join("frames"), false)] {
            let mut entries = match tokio::fs::read_dir(&sub).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&sub)(e)),
            };
            while let Some(entry) = entries.next_entry().await.map_err(io(&sub))? {
                let meta = entry.metadata().await.map_err(io(&sub))?;
                let name = entry.file_name();
                let safe = name.to_str().is_some_and(is_safe_name);
                if meta.is_file() && safe {
                    files.push((entry.path(), meta.len(), top));
                }
            }
        }
        let mut stored_now = 0;
        for (path, len, top) in files {
            let rel = path.strip_prefix(&dir).unwrap_or(&path);
            let key = job_key(job, &rel.to_string_lossy())?;
            if top || stored.get(key.as_ref()) != Some(&len) {
                self.persist(job, &path).await?;
                stored_now += 1;
            }
        }
        Ok(stored_now)
    }

    /// Frees the scratch copy of a finished job; the local backend's directory is the
    /// store itself and stays.
    pub async fn drop_scratch(&self, job: Uuid) -> Result<()> {
        if self.in_place {
            return Ok(());
        }
        let dir = self.job_dir(job);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// A stored file of `job`, by plain name (`image.png`, `video.mp4`, ...).
    pub async fn artifact(&self, job: Uuid, name: &str) -> Result<Artifact> {
        if !is_safe_name(name) {
            return Err(StorageError::InvalidName(name.to_owned()));
        }
        let key = job_key(job, name)?;
        self.stat(key, name).await
    }

    /// The stored frame of `job` at `step`.
    pub async fn frame(&self, job: Uuid, step: u32) -> Result<Artifact> {
        let key = job_key(job, &format!("frames/{step:05}.png"))?;
        self.stat(key, &format!("frame of step {step}")).await
    }

    async fn stat(&self, key: Key, what: &str) -> Result<Artifact> {
        match self.objects.head(&key).await {
            Ok(meta) => Ok(Artifact {
                size: meta.size,
                etag: quoted_etag(&meta),
                key,
            }),
            Err(object_store::Error::NotFound { .. }) => {
                Err(StorageError::Missing(what.to_owned()))
            }
            Err(source) => Err(StorageError::Store {
                key: key.to_string(),
                source,
            }),
        }
    }

    /// The bytes of `artifact` (all, or `range`), as a stream of chunks: a large video
    /// never sits in memory whole.
    pub async fn read(
        &self,
        artifact: &Artifact,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, std::result::Result<Bytes, StorageError>>> {
        let options = GetOptions {
            range: range.filter(|r| !r.is_empty()).map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let key = artifact.key.clone();
        let got = self
            .objects
            .get_opts(&key, options)
            .await
            .map_err(store_err(&key))?;
        Ok(got
            .into_stream()
            .map_err(move |source| StorageError::Store {
                key: key.to_string(),
                source,
            })
            .boxed())
    }

    /// The frames of `job` in the store, in step order; the render names them by step.
    pub async fn frames(&self, job: Uuid) -> Result<Vec<Frame>> {
        self.frame_files(job, ".png").await
    }

    /// The steps of `job` whose frame has its saved state beside it (`NNNNN.ckpt`): the
    /// steps a fork may start from, in order.
    pub async fn fork_points(&self, job: Uuid) -> Result<Vec<u32>> {
        Ok(self
            .frame_files(job, ".ckpt")
            .await?
            .into_iter()
            .map(|f| f.step)
            .collect())
    }

    /// Gives `child` its own copy of `parent`'s state saved at `step`, as
    /// [`FORK_POINT_FILE`]: the child never depends on the parent's artifacts, which
    /// retention or a DELETE may remove.
    pub async fn copy_fork_point(&self, parent: Uuid, step: u32, child: Uuid) -> Result<()> {
        let from = job_key(parent, &format!("frames/{step:05}.ckpt"))?;
        let to = job_key(child, FORK_POINT_FILE)?;
        match self.objects.copy(&from, &to).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => {
                Err(StorageError::Missing(format!("saved state of step {step}")))
            }
            Err(e) => Err(store_err(&from)(e)),
        }
    }

    /// Stored files of `job`'s `frames/` named `NNNNN<suffix>`, in step order.
    async fn frame_files(&self, job: Uuid, suffix: &str) -> Result<Vec<Frame>> {
        let prefix = Key::from(format!("jobs/{job}/frames"));
        let stored: Vec<ObjectMeta> = self
            .objects
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(store_err(&prefix))?;
        let mut frames: Vec<Frame> = stored
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let step = name.strip_suffix(suffix)?.parse::<u32>().ok()?;
                Some(Frame { step, size: m.size })
            })
            .collect();
        frames.sort_by_key(|f| f.step);
        Ok(frames)
    }

    /// Removes everything `job` wrote, from the store and the scratch directory; a job
    /// that wrote nothing is fine.
    pub async fn delete_job(&self, job: Uuid) -> Result<()> {
        let prefix = job_prefix(job);
        let keys = self
            .objects
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .boxed();
        let mut deleted = self.objects.delete_stream(keys);
        while let Some(done) = deleted.next().await {
            match done {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => {
                    return Err(StorageError::Store {
                        key: prefix.to_string(),
                        source,
                    })
                }
            }
        }
        let dir = self.job_dir(job);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Removes a job's resumable checkpoints: a canceled job never resumes, and a job
    /// that has none is fine.
    pub async fn remove_checkpoint(&self, job: Uuid) -> Result<()> {
        for name in [CHECKPOINT_FILE, VIDEO_CHECKPOINT_FILE] {
            let key = job_key(job, name)?;
            match self.objects.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => {
                    return Err(StorageError::Store {
                        key: key.to_string(),
                        source,
                    })
                }
            }
            if !self.in_place {
                let path = self.job_dir(job).join(name);
                match tokio::fs::remove_file(&path).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&path)(e)),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Stores an uploaded image or video; a reader never sees half of it (the local
    /// backend writes a temporary file and renames it, S3 commits a PUT whole).
    pub async fn put_upload(&self, id: Uuid, extension: &str, bytes: Bytes) -> Result<String> {
        let name = format!("{id}.{extension}");
        let key = upload_key(&name)?;
        self.objects
            .put(&key, PutPayload::from_bytes(bytes))
            .await
            .map_err(store_err(&key))?;
        Ok(name)
    }

    /// An upload's bytes; uploads are bounded by `limits`, so they are read whole.
    pub async fn read_upload(&self, file_name: &str) -> Result<Vec<u8>> {
        let key = upload_key(file_name)?;
        let got = self.objects.get(&key).await.map_err(store_err(&key))?;
        let bytes = got.bytes().await.map_err(store_err(&key))?;
        Ok(bytes.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "a\\b",
            "a\0b",
            "ü.png",
        ] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
        for good in ["image.png", "video.mp4", "metadata.json", "00050.png"] {
            assert!(is_safe_name(good), "{good:?}");
        }
        let job = Uuid::now_v7();
        assert!(job_key(job, "frames/00010.png").is_ok());
        for bad in ["../x", "frames/../../x", "/etc/passwd", "frames//x", ""] {
            assert!(job_key(job, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn etags_are_quoted_once() {
        let meta = |tag: Option<&str>| ObjectMeta {
            location: Key::from("a"),
            last_modified: chrono::DateTime::from_timestamp(1, 0).unwrap_or_default(),
            size: 26,
            e_tag: tag.map(str::to_owned),
            version: None,
        };
        assert_eq!(quoted_etag(&meta(Some("\"abc\""))), "\"abc\"");
        assert_eq!(quoted_etag(&meta(Some("1a-2b-3c"))), "\"1a-2b-3c\"");
        assert_eq!(quoted_etag(&meta(None)), "\"1a-3b9aca00\"");
    }
}
