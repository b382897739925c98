//! What a broken or hostile backend (the simulator's hostile kinds), or a
//! client sending a broken body, does to anteroom: every request still gets
//! an answer, nothing is sent twice that the backend already had, and a
//! client cannot get a healthy upstream taken out of service.

use crate::support;

use std::time::Duration;

use anteroom::cli::serve::Running;
use anteroom::config::{Models, Upstreams};
use anteroom::sim::hostile::{self, Hostile, HostileHandle};
use anteroom::sim::Mode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn hostile(kind: Hostile) -> HostileHandle {
    hostile::start("127.0.0.1:0".parse().unwrap(), kind)
        .await
        .unwrap()
}

/// A proxy in front of a hostile backend, quick to retry, adjusted by `f`.
async fn in_front(
    kind: Hostile,
    f: impl FnOnce(&mut anteroom::config::FileConfig),
) -> (HostileHandle, Running) {
    let h = hostile(kind).await;
    let proxy = proxy(&h.url(), |c| {
        no_probes(c);
        c.retry_base_delay = "10ms".into();
        f(c);
    })
    .await;
    (h, proxy)
}

/// Send `req` on a fresh connection and read until the proxy closes it or
/// `within` passes: what came back.
async fn raw(addr: std::net::SocketAddr, req: &[u8], within: Duration) -> String {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(req).await.unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(within, async {
        while let Ok(n) = sock.read(&mut buf).await {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&all).into_owned()
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn a_malformed_answer_is_a_502_and_never_sent_again() {
    let (h, proxy) = in_front(Hostile::Garbage, |_| {}).await;
    let answer = raw(
        proxy.addr,
        &post("/v1/chat/completions", &chat_body(false, 2)),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("upstream_unavailable"), "{answer}");
    assert!(answer.contains("not valid HTTP"), "{answer}");
    // The backend had the whole request: it may be generating. Once only.
    assert_eq!(h.received(), 1);
}

#[tokio::test]
async fn a_huge_response_header_is_a_502_sent_once() {
    let (h, proxy) = in_front(Hostile::HugeHeader, |_| {}).await;
    let answer = raw(
        proxy.addr,
        &post("/v1/chat/completions", &chat_body(false, 2)),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert_eq!(h.received(), 1);
}

#[tokio::test]
async fn an_answer_with_two_framings_reaches_the_client_whole() {
    let (_h, proxy) = in_front(Hostile::ClTe, |_| {}).await;
    let answer = raw(
        proxy.addr,
        &post("/v1/chat/completions", &chat_body(false, 2)),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer
            .to_ascii_lowercase()
            .contains("content-length: 5\r\n"),
        "{answer}"
    );
    assert!(answer.contains(hostile::ANSWER), "{answer}");
}

#[tokio::test]
async fn advice_of_any_size_or_none_is_an_answer_not_a_cut() {
    for kind in [Hostile::HugeAdvice, Hostile::BadAdvice] {
        let (h, proxy) = in_front(kind, |c| c.max_retries = 1).await;
        let answer = raw(
            proxy.addr,
            &post("/v1/chat/completions", &chat_body(false, 2)),
            Duration::from_secs(10),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 429"), "{kind:?}: {answer}");
        let lower = answer.to_ascii_lowercase();
        let secs: u64 = lower
            .split("\r\nretry-after: ")
            .nth(1)
            .and_then(|v| v.split("\r\n").next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{kind:?}: no Retry-After in seconds: {answer}"));
        assert!(secs >= 1, "{kind:?}: {answer}");
        if kind == Hostile::BadAdvice {
            assert!(
                !lower.contains("nan") && !lower.contains("soon"),
                "{answer}"
            );
            let ms: Option<u64> = lower
                .split("\r\nretry-after-ms: ")
                .nth(1)
                .and_then(|v| v.split("\r\n").next())
                .and_then(|v| v.trim().parse().ok());
            assert!(ms.is_some_and(|ms| ms >= 1), "{answer}");
        }
        // A 1e30 ms wait is longer than any retry: given to the client at
        // once; unreadable advice is retried on our own back-off.
        let sent = if kind == Hostile::HugeAdvice { 1 } else { 2 };
        assert_eq!(h.received(), sent, "{kind:?}");
    }
}

/// A client whose pass-through body is broken gets a 400; the upstream it
/// was passing through to is not blamed (three such bodies used to take it
/// out of service).
#[tokio::test]
async fn a_broken_request_body_is_the_clients_fault_not_the_upstreams() {
    let a = sim(sim_config(Mode::Batch)).await;
    let b = sim(sim_config(Mode::Batch)).await;
    let (ua, ub) = (a.url(), b.url());
    let proxy = proxy("http://unused:1", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::Any, 4),
            entry("b", ub, Models::Any, 4),
        ]);
        // Embeddings pass through (streamed, not buffered) here.
        c.admit_paths = vec!["/v1/chat/completions".into()];
        c.eject_after = 2;
        c.health_interval = "60s".into();
    })
    .await;
    for _ in 0..4 {
        let answer = raw(
            proxy.addr,
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              5\r\n{\"a\":\r\nfffffffffffffffff1\r\nxx\r\n",
            Duration::from_secs(10),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("invalid_body"), "{answer}");
    }
    // Both upstreams still take work.
    let before = a.stats().received;
    let client = client();
    for i in 0..6 {
        let resp = chat(&client, &proxy.url(), None, &format!("after{i}"), false, 2).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    assert!(
        a.stats().received > before,
        "a was taken out of service: a {:?} b {:?}",
        a.stats().received,
        b.stats().received
    );
    assert!(b.stats().received > 0);
}
