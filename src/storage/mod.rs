//! The artifact store: one directory per job (what the render writes there) and the
//! uploaded images, under one root directory.
//!
//! Every name that comes from a request passes [`ArtifactStore::artifact_path`], which
//! accepts plain file names only, so no request can reach outside the root.

use std::path::{Path, PathBuf};

use uuid::Uuid;

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
}

type Result<T> = std::result::Result<T, StorageError>;

/// The name the render gives a job's resumable checkpoint.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
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

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

/// A frame the render wrote, by its step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub step: u32,
    pub path: PathBuf,
}

impl ArtifactStore {
    /// Opens the store, creating its directories on first use.
    pub fn open(root: impl Into<PathBuf>) -> Result<ArtifactStore> {
        let root = root.into();
        for dir in [root.join("jobs"), root.join("uploads")] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(ArtifactStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the render of `job` writes its files.
    pub fn job_dir(&self, job: Uuid) -> PathBuf {
        self.root.join("jobs").join(job.to_string())
    }

    pub fn create_job_dir(&self, job: Uuid) -> Result<PathBuf> {
        let dir = self.job_dir(job);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// An existing file of `job`, by plain name (`image.png`, `video.mp4`, ...).
    pub fn artifact_path(&self, job: Uuid, name: &str) -> Result<PathBuf> {
        if !is_safe_name(name) {
            return Err(StorageError::InvalidName(name.to_owned()));
        }
        let path = self.job_dir(job).join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(StorageError::Missing(name.to_owned()))
        }
    }

    /// The frames of `job`, in step order; the render names them by step number.
    pub fn frames(&self, job: Uuid) -> Result<Vec<Frame>> {
        let dir = self.job_dir(job).join("frames");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut frames = vec![];
        for entry in entries {
            let path = entry.map_err(io(&dir))?.path();
            let step = path
                .extension()
                .filter(|e| *e == "png")
                .and(path.file_stem())
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(step) = step {
                frames.push(Frame { step, path });
            }
        }
        frames.sort_by_key(|f| f.step);
        Ok(frames)
    }

    pub fn frame(&self, job: Uuid, step: u32) -> Result<PathBuf> {
        self.frames(job)?
            .into_iter()
            .find(|f| f.step == step)
            .map(|f| f.path)
            .ok_or_else(|| StorageError::Missing(format!("frame of step {step}")))
    }

    /// Removes everything `job` wrote; a job that wrote nothing is fine.
    pub fn remove_job(&self, job: Uuid) -> Result<()> {
        let dir = self.job_dir(job);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Removes a job's resumable checkpoint: a canceled job never resumes, and a job that
    /// has none is fine.
    pub fn remove_checkpoint(&self, job: Uuid) -> Result<()> {
        let path = self.job_dir(job).join(CHECKPOINT_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Stores an uploaded image; written to a temporary name first so a reader never
    /// sees half a file.
    pub fn put_upload(&self, id: Uuid, extension: &str, bytes: &[u8]) -> Result<String> {
        let name = format!("{id}.{extension}");
        if !is_safe_name(&name) {
            return Err(StorageError::InvalidName(name));
        }
        let path = self.root.join("uploads").join(&name);
        let tmp = self.root.join("uploads").join(format!("{id}.partial"));
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(name)
    }

    pub fn read_upload(&self, file_name: &str) -> Result<Vec<u8>> {
        if !is_safe_name(file_name) {
            return Err(StorageError::InvalidName(file_name.to_owned()));
        }
        let path = self.root.join("uploads").join(file_name);
        std::fs::read(&path).map_err(io(&path))
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
    }

    #[test]
    fn artifacts_frames_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().join("a")).unwrap();
        let job = Uuid::now_v7();
        let out = store.create_job_dir(job).unwrap();
        std::fs::write(out.join("image.png"), b"png").unwrap();
        std::fs::create_dir_all(out.join("frames")).unwrap();
        for name in ["00010.png", "00002.png", "notes.txt"] {
            std::fs::write(out.join("frames").join(name), b"f").unwrap();
        }
        assert!(store.artifact_path(job, "image.png").is_ok());
        assert!(matches!(
            store.artifact_path(job, "video.mp4"),
            Err(StorageError::Missing(_))
        ));
        assert!(matches!(
            store.artifact_path(job, "../../x"),
            Err(StorageError::InvalidName(_))
        ));
        let steps: Vec<u32> = store.frames(job).unwrap().iter().map(|f| f.step).collect();
        assert_eq!(steps, vec![2, 10]);
        assert!(store.frame(job, 10).unwrap().ends_with("frames/00010.png"));
        assert!(store.frame(job, 3).is_err());
        store.remove_job(job).unwrap();
        assert!(!out.exists());
        store.remove_job(job).unwrap();
        let name = store.put_upload(job, "png", b"img").unwrap();
        assert_eq!(store.read_upload(&name).unwrap(), b"img");
    }
}
