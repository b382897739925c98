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

fn quick_timeouts(c: &mut anteroom::config::FileConfig) {
    c.max_concurrency = anteroom::config::Concurrency::Fixed(1);
    c.first_token_timeout = "300ms".into();
    c.stream_idle_timeout = "300ms".into();
    c.upstream_timeout = "300ms".into();
}

/// A backend that stalls, before its headers or after them, whatever it
/// answers with (JSON, NDJSON, SSE), holds the one slot only as long as the
/// timeouts say, and each client gets an end it can tell from a success.
#[tokio::test]
async fn a_backend_that_stalls_holds_its_slot_only_until_a_timeout() {
    for kind in [
        Hostile::StallBeforeHeaders,
        Hostile::StallJson,
        Hostile::StallNdjson,
        Hostile::StallSse,
    ] {
        let log = log_path(&format!("stall-{kind:?}"));
        let log_s = log.display().to_string();
        let (_h, proxy) = in_front(kind, |c| {
            quick_timeouts(c);
            c.request_log = log_s;
        })
        .await;
        let stream = kind == Hostile::StallSse;
        for _ in 0..2 {
            // Two in a row: the first's slot is free again for the second.
            let answer = raw(
                proxy.addr,
                &post("/v1/chat/completions", &chat_body(stream, 2)),
                Duration::from_secs(10),
            )
            .await;
            match kind {
                // Nothing of an answer went out: a 504 in its place.
                Hostile::StallBeforeHeaders | Hostile::StallJson => {
                    assert!(answer.starts_with("HTTP/1.1 504"), "{kind:?}: {answer}");
                    assert!(answer.contains("upstream_timeout"), "{kind:?}: {answer}");
                }
                Hostile::StallSse => {
                    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                    assert!(answer.contains("first_token_timeout"), "{answer}");
                }
                // The headers went out: the body ends short (the
                // connection closes), which no client takes for a whole
                // answer.
                _ => assert!(answer.starts_with("HTTP/1.1 200"), "{kind:?}: {answer}"),
            }
        }
        let records = records(&proxy, &log).await;
        assert_eq!(records.len(), 2, "{kind:?}");
        for r in &records {
            let want = match kind {
                Hostile::StallBeforeHeaders | Hostile::StallJson => "upstream_timeout",
                Hostile::StallNdjson => "stream_idle_timeout",
                _ => "first_token_timeout",
            };
            assert_eq!(r.error.as_deref(), Some(want), "{kind:?}: {r:?}");
        }
    }
}

#[tokio::test]
async fn a_close_delimited_answer_is_passed_on_whole() {
    let (_h, proxy) = in_front(Hostile::CloseDelimited, |_| {}).await;
    let answer = raw(
        proxy.addr,
        &post("/v1/chat/completions", &chat_body(false, 2)),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(dechunk(&answer), hostile::ANSWER, "{answer}");
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(answer: &str) -> String {
    let (_, mut rest) = answer.split_once("\r\n\r\n").unwrap();
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
}

/// An answer whose body breaks before its first byte is a 502 with a
/// status line, not a connection closed on a client that has nothing.
#[tokio::test]
async fn a_json_answer_cut_after_its_headers_is_a_502() {
    let (h, proxy) = in_front(Hostile::FailJson, |_| {}).await;
    let answer = raw(
        proxy.addr,
        &post("/v1/chat/completions", &chat_body(false, 2)),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer:?}");
    assert!(answer.contains("upstream_unavailable"), "{answer}");
    assert!(answer.contains("broke off"), "{answer}");
    assert_eq!(h.received(), 1);
}

/// An SSE line that never ends: passed on as it comes (the client decides
/// what to make of it), held by anteroom only up to a bound.
#[tokio::test]
async fn an_endless_event_line_flows_through_and_is_recorded_once() {
    let log = log_path("endless-line");
    let log_s = log.display().to_string();
    let (_h, proxy) = in_front(Hostile::EndlessLine, |c| c.request_log = log_s).await;
    let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(&post("/v1/chat/completions", &chat_body(true, 2)))
        .await
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while got < 4 << 20 {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
    }
    drop(sock);
    wait_until("the stream's record", || {
        std::fs::read_to_string(&log).is_ok_and(|s| !s.is_empty())
    })
    .await;
    let records = records(&proxy, &log).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, anteroom::telemetry::Outcome::Cancelled);
}

/// A stream through the proxy (no `stream_options` of its own) against a
/// hostile `kind` of backend taken as `backend`: its bytes, and its record.
async fn counted(
    kind: Hostile,
    backend: anteroom::config::backend::Kind,
    stream: bool,
) -> (String, anteroom::telemetry::Record) {
    let log = log_path("hostile-counts");
    let log_s = log.display().to_string();
    let (_h, proxy) = in_front(kind, |c| {
        c.backend = anteroom::config::backend::Setting::Is(backend);
        c.request_log = log_s;
        c.stream_upgrade = true;
    })
    .await;
    let answer = raw(
        proxy.addr,
        &post("/v1/chat/completions", &chat_body(stream, 2)),
        Duration::from_secs(10),
    )
    .await;
    let recs = records(&proxy, &log).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    (answer, recs.into_iter().next().unwrap())
}

/// Bad token counts from a backend: a usage event twice, counts that are
/// no numbers, a stream with no `[DONE]`, `timings` of the wrong type, a
/// JSON answer where a stream was asked for. The client gets the answer
/// the backend sent (less only the usage event anteroom asked for), the
/// record says where its counts came from, and nothing is made up.
#[tokio::test]
async fn bad_token_counts_never_break_an_answer_or_make_up_a_count() {
    use anteroom::config::backend::Kind;
    use anteroom::telemetry::TokenSource;
    let (body, r) = counted(Hostile::UsageTwice, Kind::Vllm, true).await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    // The one asked for is taken out; the backend's own second one stays.
    assert_eq!(body.matches(r#""usage":{"#).count(), 1, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");
    assert_eq!(
        (r.timings.completion_tokens, r.timings.tokens_from),
        (Some(1), Some(TokenSource::Usage))
    );

    let (body, r) = counted(Hostile::BadUsage, Kind::Vllm, true).await;
    // No count in any of them: none is taken out, and events are counted.
    assert_eq!(body.matches(r#""usage":{"#).count(), 3, "{body}");
    assert_eq!(
        (r.timings.completion_tokens, r.timings.tokens_from),
        (Some(1), Some(TokenSource::Counted)),
        "{r:?}"
    );

    let (body, r) = counted(Hostile::NoDone, Kind::Vllm, true).await;
    assert!(body.contains(r#""finish_reason":"stop""#), "{body}");
    assert_eq!(r.timings.tokens_from, Some(TokenSource::Counted));

    let (body, r) = counted(Hostile::BadTimings, Kind::LlamaCpp, true).await;
    assert!(body.contains("data: [DONE]"), "{body}");
    assert_eq!(r.timings.tokens_from, Some(TokenSource::Counted), "{r:?}");
    assert_eq!(r.timings.backend_prompt_ms, None);

    // Asked to stream (upgraded), answered with JSON: passed on as it is.
    let (body, r) = counted(Hostile::JsonForStream, Kind::LlamaCpp, false).await;
    assert!(body.ends_with(hostile::ANSWER), "{body}");
    assert!(!r.upgraded && r.timings.ttft_ms.is_none(), "{r:?}");
    // And a non-streamed answer that cannot be put together (no [DONE]).
    let (body, r) = counted(Hostile::NoDone, Kind::LlamaCpp, false).await;
    assert!(body.starts_with("HTTP/1.1 502"), "{body}");
    assert!(body.contains(r#""code":"#), "{body}");
    assert_eq!(r.status, 502);
}
