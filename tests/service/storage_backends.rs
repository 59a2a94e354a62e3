//! The artifact store against both backends (a temporary directory, and a bucket on a real
//! S3 API server): what the render writes reaches the store, is listed, read whole and in
//! ranges, restored into a fresh scratch directory, and deleted by retention.

use std::time::Duration;

use crate::support::s3::{backends, storage_config, Backend};
use futures::TryStreamExt;
use uuid::Uuid;
use vqclip::queue::{Finish, Jobs, Leases, NewJob, SqliteStore, Submitted};
use vqclip::storage::{ArtifactStore, StorageError, CHECKPOINT_FILE};
use vqclip::worker::retention::prune_once;

async fn read_all(store: &ArtifactStore, job: Uuid, name: &str) -> Vec<u8> {
    let artifact = store.artifact(job, name).await.unwrap();
    let chunks: Vec<bytes::Bytes> = store
        .read(&artifact, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

/// Writes what a render writes into the job's scratch directory.
fn render_files(store: &ArtifactStore, job: Uuid, video: &[u8]) {
    let dir = store.create_job_dir(job).unwrap();
    std::fs::create_dir_all(dir.join("frames")).unwrap();
    for step in [2u32, 10, 4] {
        std::fs::write(
            dir.join("frames").join(format!("{step:05}.png")),
            format!("frame {step}"),
        )
        .unwrap();
    }
    std::fs::write(dir.join("frames/notes.txt"), b"not a frame").unwrap();
    std::fs::write(dir.join("image.png"), b"final image").unwrap();
    std::fs::write(dir.join("video.mp4"), video).unwrap();
    std::fs::write(dir.join(CHECKPOINT_FILE), b"checkpoint v1").unwrap();
}

#[tokio::test]
async fn artifacts_round_trip_on_both_backends() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, _moto) = storage_config(backend, dir.path()).await;
        let store = ArtifactStore::from_config(&settings).unwrap();
        let job = Uuid::now_v7();
        // Larger than one chunk of any backend's stream, and not a multiple of it.
        let video: Vec<u8> = (0..300_001u32).map(|i| (i * 7 % 251) as u8).collect();
        render_files(&store, job, &video);
        let frame = store.job_dir(job).join("frames/00002.png");
        store.persist(job, &frame).await.unwrap();
        let steps: Vec<u32> = store
            .frames(job)
            .await
            .unwrap()
            .iter()
            .map(|f| f.step)
            .collect();
        match backend {
            // The local backend stores in place: every frame is there as it is written.
            Backend::Local => assert_eq!(steps, vec![2, 4, 10]),
            // Only the persisted frame has reached the bucket.
            Backend::S3 => assert_eq!(steps, vec![2]),
        }
        store.persist_job(job).await.unwrap();
        let steps: Vec<u32> = store
            .frames(job)
            .await
            .unwrap()
            .iter()
            .map(|f| f.step)
            .collect();
        assert_eq!(steps, vec![2, 4, 10], "{backend:?}");

        assert_eq!(read_all(&store, job, "image.png").await, b"final image");
        assert_eq!(
            read_all(&store, job, "video.mp4").await,
            video,
            "{backend:?}"
        );
        let artifact = store.artifact(job, "video.mp4").await.unwrap();
        assert_eq!(artifact.size, video.len() as u64);
        assert!(artifact.etag.starts_with('"') && artifact.etag.ends_with('"'));
        assert!(artifact.etag.len() > 2, "{backend:?}: {}", artifact.etag);
        let part: Vec<bytes::Bytes> = store
            .read(&artifact, Some(1000..70_000))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(part.concat(), &video[1000..70_000], "{backend:?}");
        let frame = store.frame(job, 10).await.unwrap();
        assert_eq!(frame.size, "frame 10".len() as u64);
        assert!(matches!(
            store.frame(job, 3).await,
            Err(StorageError::Missing(_))
        ));
        assert!(matches!(
            store.artifact(job, "metadata.json").await,
            Err(StorageError::Missing(_))
        ));
        assert!(matches!(
            store.artifact(job, "../../x").await,
            Err(StorageError::InvalidName(_))
        ));

        // A rewritten checkpoint keeps its size; it is stored again all the same.
        std::fs::write(store.job_dir(job).join(CHECKPOINT_FILE), b"checkpoint v2").unwrap();
        store.persist_job(job).await.unwrap();
        assert_eq!(
            read_all(&store, job, CHECKPOINT_FILE).await,
            b"checkpoint v2"
        );
        store.remove_checkpoint(job).await.unwrap();
        assert!(matches!(
            store.artifact(job, CHECKPOINT_FILE).await,
            Err(StorageError::Missing(_))
        ));
        store.remove_checkpoint(job).await.unwrap();

        let name = store
            .put_upload(job, "png", bytes::Bytes::from_static(b"uploaded"))
            .await
            .unwrap();
        assert_eq!(store.read_upload(&name).await.unwrap(), b"uploaded");
        assert!(matches!(
            store.read_upload("../secret").await,
            Err(StorageError::InvalidName(_))
        ));

        store.delete_job(job).await.unwrap();
        assert!(store.frames(job).await.unwrap().is_empty(), "{backend:?}");
        assert!(matches!(
            store.artifact(job, "image.png").await,
            Err(StorageError::Missing(_))
        ));
        assert!(!store.job_dir(job).exists(), "{backend:?}");
        // Deleting what is gone is fine; the upload is not the job's and stays.
        store.delete_job(job).await.unwrap();
        assert_eq!(store.read_upload(&name).await.unwrap(), b"uploaded");
    }
}

/// A second machine with an empty scratch directory gets the checkpoint and frames the
/// first one stored, and nothing else of the first machine's disk.
#[tokio::test]
async fn a_fresh_scratch_directory_restores_a_job_from_the_store() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, _moto) = storage_config(backend, dir.path()).await;
        let first = ArtifactStore::from_config(&settings).unwrap();
        let job = Uuid::now_v7();
        render_files(&first, job, b"video");
        first.persist_job(job).await.unwrap();
        let unstored = first.job_dir(job).join("frames/00099.png");
        std::fs::write(&unstored, b"never stored").unwrap();

        let mut elsewhere = settings.clone();
        elsewhere.scratch_dir = dir.path().join("second-machine");
        let second = ArtifactStore::from_config(&elsewhere).unwrap();
        let fetched = second.restore_job(job).await.unwrap();
        let local = second.job_dir(job);
        match backend {
            Backend::Local => assert_eq!(fetched, 0, "the directory is the store"),
            Backend::S3 => {
                assert_eq!(fetched, 7, "frames, image, video, checkpoint, notes");
                assert!(!local.join("frames/00099.png").exists());
            }
        }
        assert_eq!(
            std::fs::read(local.join(CHECKPOINT_FILE)).unwrap(),
            b"checkpoint v1"
        );
        assert_eq!(
            std::fs::read(local.join("frames/00010.png")).unwrap(),
            b"frame 10"
        );
        // What is already there at the same size is not fetched again.
        assert_eq!(second.restore_job(job).await.unwrap(), 0);
    }
}

/// Retention removes a pruned job's artifacts from either backend, and leaves those of a
/// job it keeps.
#[tokio::test]
async fn retention_deletes_artifacts_on_both_backends() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, _moto) = storage_config(backend, dir.path()).await;
        let artifacts = ArtifactStore::from_config(&settings).unwrap();
        let queue = SqliteStore::connect(
            &format!("sqlite://{}/q.db", dir.path().display()),
            Duration::from_secs(5),
            2,
        )
        .await
        .unwrap();
        let mut ids = vec![];
        for prompt in ["old", "running"] {
            let new = NewJob {
                spec: serde_json::json!({ "prompts": prompt }),
                priority: 0,
                keep: false,
                total_steps: 10,
                owner_key_id: None,
                idempotency_key: None,
                request_hash: prompt.into(),
                max_attempts: 1,
                warnings: vec![],
                seed: Some(1),
            };
            let job = match queue.submit(new, 100).await.unwrap() {
                Submitted::Created(j) | Submitted::Existing(j) => j,
            };
            render_files(&artifacts, job.id, b"video");
            artifacts.persist_job(job.id).await.unwrap();
            ids.push(job.id);
        }
        let claimed = queue
            .claim("w", "cpu", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.id, ids[0]);
        queue
            .finish(
                ids[0],
                "w",
                Finish::Succeeded {
                    data: serde_json::json!({}),
                },
            )
            .await
            .unwrap();
        // A zero age prunes every job finished before now.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let pruned = prune_once(&queue, &artifacts, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(pruned, vec![ids[0]], "{backend:?}");
        assert!(artifacts.frames(ids[0]).await.unwrap().is_empty());
        assert!(matches!(
            artifacts.artifact(ids[0], "image.png").await,
            Err(StorageError::Missing(_))
        ));
        assert!(!artifacts.job_dir(ids[0]).exists());
        assert_eq!(artifacts.frames(ids[1]).await.unwrap().len(), 3);
        assert!(artifacts.artifact(ids[1], "image.png").await.is_ok());
        queue.pool().close().await;
    }
}
