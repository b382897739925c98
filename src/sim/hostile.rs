//! A backend that answers generation requests badly, on purpose: each
//! [`Hostile`] kind is one way a broken or malicious model server has been
//! seen to answer. It writes raw bytes (hyper would not let it write most of
//! them), answers `GET /v1/models` properly so health probes pass, and
//! counts what it received, so tests can tell what anteroom sent on.
//!
//! Loopback tests only: it reads requests loosely (a head, then a body by
//! `Content-Length` or chunked framing) and trusts them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How generation requests (any POST) are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hostile {
    /// 429 advising `retry-after-ms: 1e30`.
    HugeAdvice,
    /// 429 advising `Retry-After: soon` and `retry-after-ms: NaN`.
    BadAdvice,
    /// A status line that is not HTTP, after the whole request was read.
    Garbage,
    /// 200 with both `Content-Length: 5` and `Transfer-Encoding: chunked`
    /// (the chunked body is the real one, longer than 5).
    ClTe,
    /// SSE headers, then one line that never ends.
    EndlessLine,
    /// A 1 MiB response header.
    HugeHeader,
    /// Reads the request, never answers.
    StallBeforeHeaders,
    /// JSON headers (with a length), then nothing.
    StallJson,
    /// SSE headers, then nothing.
    StallSse,
    /// NDJSON headers (Ollama's native streams) and one line, then nothing.
    StallNdjson,
    /// JSON headers announcing 200 bytes, then the connection closes.
    FailJson,
    /// A JSON 200 with no length, its end marked by closing the connection.
    CloseDelimited,
    /// A stream whose usage event comes twice.
    UsageTwice,
    /// A stream whose usage holds no counts (`-3`, `"ten"`, `1e99`).
    BadUsage,
    /// A stream that ends (cleanly, at the HTTP level) without `[DONE]`.
    NoDone,
    /// A llama.cpp-style stream whose `timings` hold strings.
    BadTimings,
    /// A JSON answer to every request, streamed or not (a server that
    /// ignores `stream`).
    JsonForStream,
}

/// One token event of the hostile streams.
pub(crate) const TOKEN_EVENT: &str = r#"{"id":"h","object":"chat.completion.chunk","created":1,"model":"hostile","choices":[{"index":0,"delta":{"role":"assistant","content":"hostile"},"finish_reason":null}]}"#;

/// The finish event of the hostile streams.
pub(crate) const FINISH_EVENT: &str = r#"{"id":"h","object":"chat.completion.chunk","created":1,"model":"hostile","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;

/// A usage event with `completion_tokens` of `n`.
pub(crate) fn usage_event(n: &str) -> String {
    format!(
        r#"{{"id":"h","object":"chat.completion.chunk","created":1,"model":"hostile","choices":[],"usage":{{"prompt_tokens":1,"completion_tokens":{n},"total_tokens":2}}}}"#
    )
}

/// A 200 SSE answer of these events (`data:` lines), chunked.
fn sse(events: &[&str]) -> Vec<u8> {
    let mut out = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for e in events {
        let ev = format!("data: {e}\n\n");
        out += &format!("{:x}\r\n{ev}\r\n", ev.len());
    }
    out += "0\r\n\r\n";
    out.into_bytes()
}

/// The generation answer every hostile kind's tests can recognise.
pub const ANSWER: &str = r#"{"id":"h","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hostile"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// A running hostile backend.
#[derive(Debug)]
pub struct HostileHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileHandle {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Generation requests received (whole: head and body).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for HostileHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serve `kind` on `listener` in the background.
pub fn spawn(listener: TcpListener, kind: Hostile) -> std::io::Result<HostileHandle> {
    let addr = listener.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(connection(sock, kind, counter.clone()));
        }
    });
    Ok(HostileHandle {
        addr,
        received,
        task,
    })
}

/// Bind `addr` and serve `kind` on it.
pub async fn start(addr: SocketAddr, kind: Hostile) -> std::io::Result<HostileHandle> {
    spawn(TcpListener::bind(addr).await?, kind)
}

/// Requests on one connection, until it closes or an answer ends it.
async fn connection(mut sock: TcpStream, kind: Hostile, received: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    loop {
        let Some((head, rest)) = read_request(&mut sock, std::mem::take(&mut buf)).await else {
            return;
        };
        buf = rest;
        if !head.starts_with("post ") {
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                MODELS.len(),
                MODELS
            );
            if sock.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        received.fetch_add(1, Ordering::SeqCst);
        if !answer(&mut sock, kind).await {
            return;
        }
    }
}

const MODELS: &str = r#"{"object":"list","data":[{"id":"hostile","object":"model","created":0,"owned_by":"anteroom-sim"}]}"#;

/// Answer one generation request as `kind` does; whether the connection
/// may carry another.
async fn answer(sock: &mut TcpStream, kind: Hostile) -> bool {
    let json = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let refused =
        r#"{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":"busy"}}"#;
    let out: Vec<u8> = match kind {
        Hostile::HugeAdvice => {
            json("429 Too Many Requests", "retry-after-ms: 1e30\r\n", refused).into()
        }
        Hostile::BadAdvice => json(
            "429 Too Many Requests",
            "retry-after: soon\r\nretry-after-ms: NaN\r\n",
            refused,
        )
        .into(),
        Hostile::Garbage => b"HTTP/1.1 2OO KO\r\n\x00\x01garbage\r\n\r\n".to_vec(),
        Hostile::ClTe => {
            let body = ANSWER;
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
            .into()
        }
        Hostile::UsageTwice => {
            let usage = usage_event("1");
            sse(&[TOKEN_EVENT, FINISH_EVENT, &usage, &usage, "[DONE]"])
        }
        Hostile::BadUsage => {
            let (a, b, c) = (
                usage_event("-3"),
                usage_event("\"ten\""),
                usage_event("1e99"),
            );
            sse(&[TOKEN_EVENT, FINISH_EVENT, &a, &b, &c, "[DONE]"])
        }
        Hostile::NoDone => sse(&[TOKEN_EVENT, TOKEN_EVENT, FINISH_EVENT]),
        Hostile::BadTimings => {
            let last = FINISH_EVENT.replace(
                r#""finish_reason":"stop"}]}"#,
                r#""finish_reason":"stop"}],"timings":{"prompt_n":"1","predicted_n":"8","prompt_ms":"x"}}"#,
            );
            sse(&[TOKEN_EVENT, &last, "[DONE]"])
        }
        Hostile::JsonForStream => json("200 OK", "", ANSWER).into(),
        Hostile::HugeHeader => json(
            "200 OK",
            &format!("x-huge: {}\r\n", "h".repeat(1 << 20)),
            ANSWER,
        )
        .into(),
        Hostile::CloseDelimited => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
            let _ = sock.write_all(head.as_bytes()).await;
            // In pieces, as a server writing as it goes.
            let (a, b) = ANSWER.split_at(ANSWER.len() / 2);
            let _ = sock.write_all(a.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = sock.write_all(b.as_bytes()).await;
            let _ = sock.shutdown().await;
            return false;
        }
        Hostile::FailJson => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n";
            let _ = sock.write_all(head.as_bytes()).await;
            return false;
        }
        Hostile::StallBeforeHeaders => return stall(sock).await,
        Hostile::StallJson => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n";
            let _ = sock.write_all(head.as_bytes()).await;
            return stall(sock).await;
        }
        Hostile::StallSse => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            let _ = sock.write_all(head.as_bytes()).await;
            return stall(sock).await;
        }
        Hostile::StallNdjson => {
            let line = "{\"model\":\"hostile\",\"message\":{\"role\":\"assistant\",\"content\":\"a\"},\"done\":false}\n";
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{line}\r\n",
                line.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            return stall(sock).await;
        }
        Hostile::EndlessLine => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            let piece = format!("{:x}\r\ndata: {}\r\n", 4096 + 6, "x".repeat(4096));
            // Bounded: 256 MiB at most, or until the reader goes.
            for _ in 0..(1 << 16) {
                if sock.write_all(piece.as_bytes()).await.is_err() {
                    return false;
                }
            }
            return false;
        }
    };
    sock.write_all(&out).await.is_ok()
}

/// Hold the connection open, reading nothing more, until the peer closes it
/// (or an hour passes).
async fn stall(sock: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(3600), async {
        while let Ok(n) = sock.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    false
}

/// Read one request (head and body) from `sock`, starting with what is in
/// `buf`: its head, and what was read past its end.
async fn read_request(sock: &mut TcpStream, mut buf: Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let mut rest = buf.split_off(head_end);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let body_end = |rest: &[u8]| -> Option<usize> {
        if chunked {
            find(rest, b"0\r\n\r\n").map(|i| i + 5)
        } else {
            let n = length.unwrap_or(0);
            (rest.len() >= n).then_some(n)
        }
    };
    loop {
        if let Some(end) = body_end(&rest) {
            let after = rest.split_off(end);
            return Some((head, after));
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}
