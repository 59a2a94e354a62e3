//! Fetching one remote file into the model cache.
//!
//! Hub files and plain URLs share this one transfer path: a `.part` file that a
//! later run resumes with `Range`, a sha256 check before anything is published,
//! and an atomic rename into place. Only HTTPS is spoken, except to loopback
//! hosts (so tests and local mirrors can serve plain HTTP).

use std::io::{IsTerminal, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_RANGE, LOCATION, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use url::Url;

/// Redirects are followed by hand so that every hop is checked for HTTPS and
/// the hub's own checksum header is read before the CDN answers.
const MAX_REDIRECTS: usize = 10;

/// Where one file comes from and what it must hash to.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub url: Url,
    /// Sent only to the first host; dropped when a redirect leaves it.
    pub bearer_token: Option<String>,
    /// Lower-case hex. When absent, the hub's `X-Linked-Etag` (the sha256 of an
    /// LFS file) is used if the server sends one.
    pub sha256: Option<String>,
}

impl RemoteFile {
    pub fn new(url: Url) -> Self {
        Self {
            url,
            bearer_token: None,
            sha256: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("refusing to download {url}: only https:// is allowed (plain http only to 127.0.0.1, ::1 or localhost)")]
    InsecureUrl { url: String },
    #[error("{url} was not found (HTTP 404)")]
    NotFound { url: String },
    #[error("{url} answered HTTP {status}; if the file is gated or private, set HF_TOKEN")]
    Status { url: String, status: u16 },
    #[error("{url} redirected more than {MAX_REDIRECTS} times or to a bad location")]
    BadRedirect { url: String },
    #[error("downloading {url} failed: {}{}", cause_chain(.source), resume_hint(.partial))]
    Network {
        url: String,
        partial: Option<PathBuf>,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} ended after {got} of {expected} bytes{}", resume_hint(.partial))]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
        partial: Option<PathBuf>,
    },
    #[error("sha256 mismatch for {url}: expected {expected}, got {actual}; the download was deleted, run the command again (if it keeps failing the source changed)")]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the download runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The error and every cause under it: reqwest's own message ("error sending request")
/// hides the one that says what to fix (DNS, connection refused, timeout).
pub fn cause_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

impl DownloadError {
    /// A failure that may pass by itself (no route, refused, timed out, a server
    /// error): worth retrying later, unlike a 404 or a checksum mismatch.
    pub fn is_transient(&self) -> bool {
        match self {
            DownloadError::Network { .. } | DownloadError::Truncated { .. } => true,
            DownloadError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// What went wrong, without local paths (for API clients; URLs are public).
    pub fn public_cause(&self) -> String {
        match self {
            DownloadError::Network { source, .. } => {
                let chain = cause_chain(source);
                // The first link repeats the URL; the causes after it are the news.
                match chain.split_once(": ") {
                    Some((_, causes)) => causes.to_owned(),
                    None => chain,
                }
            }
            DownloadError::Io { source, .. } => {
                format!("the model cache could not be written ({source})")
            }
            DownloadError::Runtime(e) => format!("the download could not start ({e})"),
            DownloadError::Truncated {
                url, got, expected, ..
            } => {
                format!("{url} ended after {got} of {expected} bytes")
            }
            other => other.to_string(),
        }
    }
}

fn resume_hint(partial: &Option<PathBuf>) -> String {
    match partial {
        Some(p) => format!(
            " (the partial file {} is kept; run the command again to resume)",
            p.display()
        ),
        None => String::new(),
    }
}

/// The outcome of [`fetch`]: where the file is now and what it hashes to.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    /// The sha256 of what was downloaded; `None` when the file was already there
    /// (it is not re-hashed on every use).
    pub sha256: Option<String>,
    pub bytes: u64,
    /// Bytes that were already on disk from an earlier, interrupted run.
    pub resumed_from: u64,
}

/// `dest` with `.part` appended: the in-progress download a later run resumes.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn lock_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dest.with_file_name(name)
}

/// True for URLs this module may fetch: HTTPS anywhere, HTTP only to loopback.
pub fn is_allowed_url(url: &Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => match url.host() {
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            None => false,
        },
        _ => false,
    }
}

/// Downloads `remote` to `dest` unless `dest` already exists, blocking the
/// calling thread. Safe to call from inside or outside a tokio runtime: the
/// transfer runs on its own thread with its own runtime.
///
/// Concurrent callers (threads or processes) for the same `dest` serialise on a
/// lock file, so the second one finds the finished file.
pub fn fetch_blocking(remote: &RemoteFile, dest: &Path) -> Result<Fetched, DownloadError> {
    fetch_blocking_with_progress(remote, dest, &|_, _| {})
}

/// Bytes written so far and the total when the server said it.
pub type OnProgress<'a> = &'a (dyn Fn(u64, Option<u64>) + Sync);

/// As [`fetch_blocking`], reporting progress as chunks arrive.
pub fn fetch_blocking_with_progress(
    remote: &RemoteFile,
    dest: &Path,
    on_progress: OnProgress<'_>,
) -> Result<Fetched, DownloadError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| DownloadError::Io {
        path: parent.to_path_buf(),
        source,
    })?;
    let _lock = FileLock::acquire(&lock_path(dest))?;
    if dest.is_file() {
        return existing(dest);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(DownloadError::Runtime)?;
                runtime.block_on(fetch_with_progress(remote, dest, on_progress))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn existing(dest: &Path) -> Result<Fetched, DownloadError> {
    let bytes = std::fs::metadata(dest)
        .map_err(|source| DownloadError::Io {
            path: dest.to_path_buf(),
            source,
        })?
        .len();
    Ok(Fetched {
        path: dest.to_path_buf(),
        sha256: None,
        bytes,
        resumed_from: bytes,
    })
}

/// Downloads `remote` to `dest` (no lock; see [`fetch_blocking`]). Resumes from
/// `dest.part` when one is there, checks the sha256 and renames into place.
pub async fn fetch(remote: &RemoteFile, dest: &Path) -> Result<Fetched, DownloadError> {
    fetch_with_progress(remote, dest, &|_, _| {}).await
}

/// As [`fetch`], reporting progress as chunks arrive.
pub async fn fetch_with_progress(
    remote: &RemoteFile,
    dest: &Path,
    on_progress: OnProgress<'_>,
) -> Result<Fetched, DownloadError> {
    if dest.is_file() {
        return existing(dest);
    }
    let part = part_path(dest);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DownloadError::Io { path, source }
    };

    let mut offset = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!("vqclip/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| network(&remote.url, None, source))?;

    let mut response = send_following_redirects(&client, remote, offset).await?;
    let mut hub_sha = response.hub_sha256;
    if response.status == StatusCode::RANGE_NOT_SATISFIABLE && offset > 0 {
        // The partial file is as long as (or longer than) the remote one: it may
        // be complete, or stale from another version. Start over to be sure.
        tracing::info!(file = %part.display(), "partial download cannot be resumed; restarting");
        offset = 0;
        response = send_following_redirects(&client, remote, 0).await?;
        hub_sha = hub_sha.or(response.hub_sha256.take());
    }
    let url = response.url.to_string();
    let resp = response.response;
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return Err(DownloadError::NotFound { url });
    }
    if !status.is_success() {
        return Err(DownloadError::Status {
            url,
            status: status.as_u16(),
        });
    }
    // A server that ignores `Range` sends the whole file with 200.
    let resuming = offset > 0 && status == StatusCode::PARTIAL_CONTENT;
    if !resuming {
        offset = 0;
    }
    let total = if resuming {
        total_from_content_range(resp.headers())
    } else {
        resp.content_length()
    };

    let mut hasher = Sha256::new();
    let mut file = if resuming {
        hash_existing(&part, &mut hasher).map_err(io(&part))?;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .map_err(io(&part))?
    } else {
        std::fs::File::create(&part).map_err(io(&part))?
    };

    let bar = progress_bar(total, dest);
    bar.set_position(offset);
    if resuming {
        tracing::info!(%url, from = offset, "resuming download");
    } else {
        tracing::info!(%url, to = %dest.display(), "downloading");
    }
    let mut written = offset;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(source) => {
                bar.abandon();
                let _ = file.flush();
                let partial = (written > 0).then(|| part.clone());
                return Err(network(&response.url, partial, source));
            }
        };
        file.write_all(&chunk).map_err(io(&part))?;
        hasher.update(&chunk);
        written += chunk.len() as u64;
        bar.set_position(written);
        on_progress(written, total);
    }
    bar.finish_and_clear();
    file.sync_all().map_err(io(&part))?;
    drop(file);

    if let Some(expected) = total {
        if written != expected {
            return Err(DownloadError::Truncated {
                url,
                got: written,
                expected,
                partial: Some(part),
            });
        }
    }
    let actual = hex::encode(hasher.finalize());
    let expected = remote.sha256.clone().or(hub_sha);
    if let Some(expected) = expected {
        if !expected.eq_ignore_ascii_case(&actual) {
            // A corrupt partial must not be resumed either: delete it.
            let _ = std::fs::remove_file(&part);
            return Err(DownloadError::ChecksumMismatch {
                url,
                expected,
                actual,
            });
        }
    }
    std::fs::rename(&part, dest).map_err(io(dest))?;
    Ok(Fetched {
        path: dest.to_path_buf(),
        sha256: Some(actual),
        bytes: written,
        resumed_from: offset,
    })
}

struct FinalResponse {
    url: Url,
    status: StatusCode,
    response: reqwest::Response,
    hub_sha256: Option<String>,
}

async fn send_following_redirects(
    client: &reqwest::Client,
    remote: &RemoteFile,
    offset: u64,
) -> Result<FinalResponse, DownloadError> {
    let mut url = remote.url.clone();
    let first_host = url.host_str().map(str::to_owned);
    let mut hub_sha256 = None;
    for _ in 0..=MAX_REDIRECTS {
        if !is_allowed_url(&url) {
            return Err(DownloadError::InsecureUrl {
                url: url.to_string(),
            });
        }
        let mut request = client.get(url.clone());
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        if let Some(token) = &remote.bearer_token {
            if url.host_str().map(str::to_owned) == first_host {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
        }
        let response = request
            .send()
            .await
            .map_err(|source| network(&url, None, source))?;
        if hub_sha256.is_none() {
            hub_sha256 = linked_sha256(response.headers());
        }
        if !response.status().is_redirection() {
            return Ok(FinalResponse {
                url,
                status: response.status(),
                response,
                hub_sha256,
            });
        }
        let next = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url.join(l).ok())
            .ok_or_else(|| DownloadError::BadRedirect {
                url: url.to_string(),
            })?;
        url = next;
    }
    Err(DownloadError::BadRedirect {
        url: remote.url.to_string(),
    })
}

/// The hub answers a `resolve` of an LFS file with `X-Linked-Etag: "<sha256>"`.
fn linked_sha256(headers: &HeaderMap) -> Option<String> {
    let etag = headers.get("x-linked-etag")?.to_str().ok()?;
    let etag = etag.trim().trim_start_matches("W/").trim_matches('"');
    (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| etag.to_ascii_lowercase())
}

fn total_from_content_range(headers: &HeaderMap) -> Option<u64> {
    let range = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    range.rsplit('/').next()?.trim().parse().ok()
}

fn hash_existing(path: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

fn network(url: &Url, partial: Option<PathBuf>, source: reqwest::Error) -> DownloadError {
    DownloadError::Network {
        url: url.to_string(),
        partial,
        source,
    }
}

fn progress_bar(total: Option<u64>, dest: &Path) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    bar.set_message(name);
    bar
}

/// An exclusive advisory lock held for as long as the value lives.
struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<Self, DownloadError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| DownloadError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        // An advisory lock (flock on unix), released when the file closes.
        file.lock().map_err(|source| DownloadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_is_allowed() {
        let ok = [
            "https://huggingface.co/x",
            "http://127.0.0.1:8080/x",
            "http://[::1]/x",
            "http://localhost/x",
        ];
        let bad = [
            "http://huggingface.co/x",
            "http://10.0.0.1/x",
            "ftp://127.0.0.1/x",
            "file:///etc/passwd",
        ];
        for u in ok {
            assert!(is_allowed_url(&Url::parse(u).unwrap()), "{u}");
        }
        for u in bad {
            assert!(!is_allowed_url(&Url::parse(u).unwrap()), "{u}");
        }
    }

    #[test]
    fn linked_etag_is_taken_only_when_it_is_a_sha256() {
        let sha = "a".repeat(64);
        let mut h = HeaderMap::new();
        h.insert("x-linked-etag", format!("\"{sha}\"").parse().unwrap());
        assert_eq!(linked_sha256(&h), Some(sha));
        h.insert("x-linked-etag", "\"abc123\"".parse().unwrap());
        assert_eq!(linked_sha256(&h), None);
    }

    #[test]
    fn content_range_total() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, "bytes 100-199/200".parse().unwrap());
        assert_eq!(total_from_content_range(&h), Some(200));
    }

    #[test]
    fn part_path_appends() {
        assert_eq!(
            part_path(Path::new("/c/model.safetensors")),
            PathBuf::from("/c/model.safetensors.part")
        );
    }
}
