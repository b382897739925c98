//! OpenAI's `x-ratelimit-*` headers: a key's limits, the queue's room, on
//! answers and refusals alike; off with `rate_limit_headers = false`.

use crate::support;

use anteroom::config::KeyEntry;
use anteroom::sim::Mode;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::body::Incoming;
use support::*;

fn header<'a>(resp: &'a http::Response<Incoming>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

fn key(name: &str, secret: &[u8], rpm: Option<u32>, tpm: Option<u32>) -> KeyEntry {
    KeyEntry {
        name: name.into(),
        sha256: Some(hex(anteroom::types::digest(secret))),
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
        ..Default::default()
    }
}

async fn post(
    client: &HttpClient,
    url: &str,
    secret: &str,
    body: &str,
) -> http::Response<Incoming> {
    let req = Request::post(format!("{url}/v1/chat/completions"))
        .header("authorization", format!("Bearer {secret}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    client.request(req).await.unwrap()
}

/// A key's requests and tokens a minute, counted down request by request;
/// a refusal says none are left and when all are back; a probe that is
/// refused (curator's empty `messages`) still learns the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_limits_are_told_request_by_request() {
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.key = vec![
            key("metered", b"sk-metered", Some(3), Some(6000)),
            key("probe", b"sk-probe", Some(600), Some(100_000)),
        ];
    })
    .await;
    let url = proxy.url();
    // 200 bytes of body: a prompt estimate of 50 tokens, plus max_tokens 100.
    let body = serde_json::json!({
        "model": "m", "max_tokens": 100,
        "messages": [{"role": "user", "content": "x".repeat(128)}],
    })
    .to_string();
    assert_eq!(body.len(), 200);
    let mut tokens_left = Vec::new();
    for (i, (left, reset)) in [("2", "20s"), ("1", "40s"), ("0", "1m0s")]
        .into_iter()
        .enumerate()
    {
        let resp = post(&client, &url, "sk-metered", &body).await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(header(&resp, "x-ratelimit-limit-requests"), Some("3"));
        // The queue has far more room than the key: the key's count.
        assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some(left));
        // One request comes back every 20 s.
        assert_eq!(header(&resp, "x-ratelimit-reset-requests"), Some(reset));
        assert_eq!(header(&resp, "x-ratelimit-limit-tokens"), Some("6000"));
        let t: u64 = header(&resp, "x-ratelimit-remaining-tokens")
            .unwrap()
            .parse()
            .unwrap();
        assert!(header(&resp, "x-ratelimit-reset-tokens")
            .unwrap()
            .ends_with('s'));
        tokens_left.push(t);
        body_bytes(resp).await;
    }
    // The first charge was 150 tokens; later ones are corrected by what
    // the answers used (the simulator writes 4 tokens), so each leaves
    // more than 150 fewer would.
    assert_eq!(tokens_left[0], 6000 - 150);
    assert!(tokens_left[1] > 6000 - 2 * 150, "{tokens_left:?}");
    assert!(tokens_left.windows(2).all(|w| w[1] < w[0] + 150));
    // Over the requests a minute: refused, none left, all back in a minute.
    let resp = post(&client, &url, "sk-metered", &body).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(header(&resp, "x-ratelimit-reset-requests"), Some("1m0s"));
    assert_eq!(header(&resp, "x-ratelimit-limit-tokens"), Some("6000"));
    let err = body_json(resp).await;
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");

    // curator's probe: refused as a 400, with the limits it reads.
    let resp = post(&client, &url, "sk-probe", r#"{"model":"m","messages":[]}"#).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(header(&resp, "x-ratelimit-limit-requests"), Some("600"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("599"));
    assert_eq!(header(&resp, "x-ratelimit-limit-tokens"), Some("100000"));
    // It was never charged: nothing is said of tokens left.
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), None);
}

/// Over a key's tokens a minute: the tokens are the allowance that is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refusal_says_no_tokens_are_left() {
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.key = vec![key("tok", b"sk-tok", None, Some(1000))];
    })
    .await;
    let body = serde_json::json!({
        "model": "m", "max_tokens": 5000, "sim_stop_after": 4,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string();
    // The first takes the whole minute's tokens (a charge is cut to it).
    let resp = post(&client, &proxy.url(), "sk-tok", &body).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let resp = post(&client, &proxy.url(), "sk-tok", &body).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), Some("0"));
    assert!(header(&resp, "x-ratelimit-reset-tokens").is_some());
    // No requests-per-minute limit: the requests allowance is the queue's.
    assert!(header(&resp, "x-ratelimit-limit-requests").is_none());
}

/// Without keys, the requests allowance is the queue's room: the slots and
/// the queue's places, what is free after the request, and how long the
/// slots take to work through the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_queues_room_is_the_allowance() {
    let (_sim, proxy, client, busy) = one_slot_busy(|c| c.max_queue = 2).await;
    // The busy stream took the slot: the two queue places are left.
    assert_eq!(header(&busy, "x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(header(&busy, "x-ratelimit-remaining-requests"), Some("2"));
    let mut queued = Vec::new();
    for i in 0..2 {
        let (client, url) = (client.clone(), proxy.url());
        queued.push(tokio::spawn(async move {
            let resp = chat(&client, &url, None, &format!("q{i}"), false, 1).await;
            let left = header(&resp, "x-ratelimit-remaining-requests").map(str::to_owned);
            body_bytes(resp).await;
            left
        }));
        let n = i + 1;
        wait_until("queued", || proxy.scheduler.snapshot().waiting == n).await;
    }
    let resp = chat(&client, &proxy.url(), None, "over", false, 1).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("0"));
    let reset = header(&resp, "x-ratelimit-reset-requests").unwrap();
    assert_ne!(reset, "0s", "three to work through");
    drop(busy);
    let mut left = Vec::new();
    for q in queued {
        left.push(q.await.unwrap());
    }
    // Each was told what was free once it had taken its place.
    assert_eq!(left, [Some("1".to_owned()), Some("0".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_can_be_turned_off() {
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.rate_limit_headers = false;
        c.key = vec![key("k", b"sk-k", Some(2), Some(6000))];
    })
    .await;
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    for status in [200, 200, 429] {
        let resp = post(&client, &proxy.url(), "sk-k", &body).await;
        assert_eq!(resp.status(), status);
        let names: Vec<_> = resp
            .headers()
            .keys()
            .filter(|n| n.as_str().starts_with("x-ratelimit"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        body_bytes(resp).await;
    }
}
