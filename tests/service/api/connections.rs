//! The connection layer, driven with raw TCP sockets: slow and silent clients get 408
//! and are closed, idle keep-alive connections are closed, open connections are
//! bounded, and errors the HTTP parser answers itself come back as problem+json.

use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn server(
    header_ms: u64,
    keep_alive_s: u64,
    max_connections: usize,
) -> (tempfile::TempDir, InProcessServer) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 0);
    config.server.header_read_timeout_ms = header_ms;
    config.server.keep_alive_timeout_seconds = keep_alive_s;
    config.server.max_connections = max_connections;
    let s = InProcessServer::start(config).await;
    (dir, s)
}

async fn connect(s: &InProcessServer) -> TcpStream {
    TcpStream::connect(s.base.strip_prefix("http://").unwrap())
        .await
        .unwrap()
}

/// Everything the server sends until it closes the connection, and how long that took;
/// panics if it is still open after `limit`.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let read = async {
        let mut chunk = vec![0u8; 8192];
        // A reset after the answer (the server closed with our request unread) ends
        // the stream like a close does.
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            got.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .expect("the server closes the connection");
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

/// Status code, lower-cased head and body of one raw HTTP response.
fn parse(raw: &str) -> (u16, String, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    (code, head.to_ascii_lowercase(), body.to_owned())
}

fn assert_problem(raw: &str, status: u16) -> serde_json::Value {
    let (code, head, body) = parse(raw);
    assert_eq!(code, status, "{raw}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{raw}"
    );
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["status"], status);
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .starts_with("urn:vqclip:problem:"));
    problem
}

#[tokio::test]
async fn a_slowloris_client_gets_408_and_is_closed() {
    let (_d, s) = server(1500, 30, 64).await;
    let mut stream = connect(&s).await;
    let started = Instant::now();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A header byte every 100 ms; each one must not restart the 1.5 s deadline, which
    // runs from the first byte. (Stopping before it keeps our writes from racing the
    // server's close.)
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(b"X").await.unwrap();
    }
    let (raw, _) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(2500),
        "closed after {took:?}"
    );
    assert_problem(&raw, 408);
}

#[tokio::test]
async fn a_silent_connection_gets_408_and_is_closed() {
    let (_d, s) = server(500, 30, 64).await;
    let mut stream = connect(&s).await;
    let (raw, took) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    assert_problem(&raw, 408);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_are_not() {
    let (_d, s) = server(500, 1, 64).await;
    let mut stream = connect(&s).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    let (code, _, _) = parse(&String::from_utf8_lossy(&buf[..n]));
    assert_eq!(code, 200);
    // Idle for the keep-alive timeout (1 s, longer than the 0.5 s head deadline, which
    // must not apply between requests): closed without a word.
    let (rest, took) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(rest, "", "an idle connection is closed quietly");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    // A request that takes longer than both deadlines (an SSE stream of keep-alives)
    // is never cut by them.
    let job = s.submit(&tiny_spec("a slow watch", 4)).await;
    let id = job["id"].as_str().unwrap();
    let mut stream = connect(&s).await;
    stream
        .write_all(format!("GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        let mut chunk = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut chunk)).await {
            Ok(Ok(0)) => panic!(
                "the event stream was closed: {}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("keep-alive"), "{text}");
}

#[tokio::test]
async fn connections_over_the_bound_get_503_with_retry_after() {
    let (_d, s) = server(3000, 30, 4).await;
    let mut held = vec![];
    for _ in 0..4 {
        held.push(connect(&s).await);
    }
    // Let the server accept the four before the fifth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = connect(&s).await;
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (raw, _) = read_to_close(&mut extra, Duration::from_secs(2)).await;
    assert_problem(&raw, 503);
    assert!(parse(&raw).1.contains("retry-after:"), "{raw}");
    // Once the held ones are gone the server takes connections again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = s.get("/healthz").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn errors_of_the_http_parser_are_problems() {
    let (_d, s) = server(5000, 30, 64).await;
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                .to_vec(),
            400,
        ),
        (
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            414,
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(1_000_000))
                .into_bytes(),
            431,
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_vec(), 400),
    ];
    for (request, status) in cases {
        let mut stream = connect(&s).await;
        // The server may answer and close before it has read everything.
        let _ = stream.write_all(&request).await;
        let (raw, _) = read_to_close(&mut stream, Duration::from_secs(5)).await;
        assert_problem(&raw, status);
    }
}
