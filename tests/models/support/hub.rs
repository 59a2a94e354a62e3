//! A local HTTP server on 127.0.0.1 that stands in for the Hugging Face hub
//! (LFS files answer `resolve` with a 302 and `X-Linked-Etag`, as the hub does)
//! and for plain download URLs. It honours `Range` and logs every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use sha2::{Digest, Sha256};

/// The hub resolve paths the catalogue uses for CLIP ViT-B/32 and ViT-B/16.
pub const B32: &str = "/openai/clip-vit-base-patch32/resolve/refs%2Fpr%2F15";
pub const B16: &str = "/openai/clip-vit-base-patch16/resolve/main";

#[derive(Clone, Default)]
pub struct ServedFile {
    pub bytes: Vec<u8>,
    /// Answer like a hub LFS file: 302 to a CDN path, with this sha256 as `X-Linked-Etag`.
    pub linked_sha256: Option<String>,
    /// Drop the connection after this many bytes on the first full (non-Range) GET.
    pub cut_first_response_at: Option<usize>,
    /// Answer with a 302 to this absolute URL instead of serving bytes.
    pub redirect_to: Option<String>,
}

impl ServedFile {
    pub fn plain(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            ..Self::default()
        }
    }

    /// An LFS file whose advertised sha256 is its true one.
    pub fn lfs(bytes: Vec<u8>) -> Self {
        let sha = sha256_hex(&bytes);
        Self {
            bytes,
            linked_sha256: Some(sha),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, ServedFile>,
    cut_done: HashMap<String, bool>,
    log: Vec<Logged>,
}

pub struct HubServer {
    pub base: String,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic, non-repeating test content.
pub fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

impl HubServer {
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let shared = shared.clone();
            async move { serve(&shared, &uri, &headers) }
        });
        runtime.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base: format!("http://{addr}"),
            state,
            _runtime: runtime,
        }
    }

    /// Serves `file` at `path` (the raw, still percent-encoded request path).
    /// A hub model: `config` as a plain `config.json` and `weights` as the LFS file
    /// `weights_name`, both under the resolve path `prefix`.
    pub fn put_model(&self, prefix: &str, config: &[u8], weights_name: &str, weights: Vec<u8>) {
        self.put(
            &format!("{prefix}/config.json"),
            ServedFile::plain(config.to_vec()),
        );
        self.put(
            &format!("{prefix}/{weights_name}"),
            ServedFile::lfs(weights),
        );
    }

    pub fn put(&self, path: &str, file: ServedFile) {
        self.state
            .lock()
            .unwrap()
            .files
            .insert(path.to_owned(), file);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }
}

fn serve(state: &Mutex<State>, uri: &Uri, headers: &HeaderMap) -> Response {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let range = headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .map(str::to_owned);
    let mut st = state.lock().unwrap();
    st.log.push(Logged {
        path: path.clone(),
        range: range.clone(),
    });

    if let Some(key) = path.strip_prefix("/cdn") {
        let Some(file) = st.files.get(key).cloned() else {
            return status(StatusCode::NOT_FOUND);
        };
        let cut = file
            .cut_first_response_at
            .filter(|_| range.is_none())
            .filter(|_| !st.cut_done.get(key).copied().unwrap_or(false));
        if cut.is_some() {
            st.cut_done.insert(key.to_owned(), true);
        }
        return body_response(&file.bytes, range.as_deref(), cut);
    }
    let Some(file) = st.files.get(&path).cloned() else {
        return status(StatusCode::NOT_FOUND);
    };
    if let Some(to) = &file.redirect_to {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, to)
            .body(Body::empty())
            .unwrap();
    }
    if let Some(sha) = &file.linked_sha256 {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("/cdn{path}"))
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-repo-commit", "0123456789abcdef0123456789abcdef01234567")
            .body(Body::empty())
            .unwrap();
    }
    let cut = file
        .cut_first_response_at
        .filter(|_| range.is_none())
        .filter(|_| !st.cut_done.get(&path).copied().unwrap_or(false));
    if cut.is_some() {
        st.cut_done.insert(path.clone(), true);
    }
    body_response(&file.bytes, range.as_deref(), cut)
}

fn status(code: StatusCode) -> Response {
    Response::builder()
        .status(code)
        .body(Body::empty())
        .unwrap()
}

fn body_response(bytes: &[u8], range: Option<&str>, cut: Option<usize>) -> Response {
    let total = bytes.len();
    if let Some(range) = range {
        let start: usize = range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|s| s.parse().ok())
            .expect("the client sends open-ended ranges");
        if start >= total {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .body(Body::empty())
                .unwrap();
        }
        return Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", total - 1),
            )
            .header(header::CONTENT_LENGTH, total - start)
            .body(Body::from(bytes[start..].to_vec()))
            .unwrap();
    }
    if let Some(cut) = cut {
        // Send `cut` bytes, then fail the stream: the client sees a broken transfer.
        let head = bytes::Bytes::copy_from_slice(&bytes[..cut]);
        // The pause lets hyper flush the head before the failure aborts the connection.
        let failure = futures::stream::once(async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "cut",
            ))
        });
        let stream = futures::StreamExt::chain(
            futures::stream::once(async move { Ok::<_, std::io::Error>(head) }),
            failure,
        );
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, total)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, total)
        .body(Body::from(bytes.to_vec()))
        .unwrap()
}
