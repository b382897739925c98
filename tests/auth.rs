//! API keys: 401 without a good one, the key stays with anteroom, the key's
//! name is the tenant, and its priority bounds apply.

use crate::support;

use std::convert::Infallible;

use anteroom::config::KeyEntry;
use anteroom::telemetry::Record;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::*;

/// An upstream that answers with the Authorization it was sent.
async fn authorization_echo() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(anteroom::server::serve_fn(
        listener,
        |req: Request<Incoming>| async move {
            let got = req
                .headers()
                .get("authorization")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = serde_json::json!({"authorization": got}).to_string();
            Ok::<_, Infallible>(Response::new(
                Full::new(Bytes::from(body))
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            ))
        },
    ));
    url
}

/// An upstream that says whether it was sent an Authorization or x-api-key.
async fn echo_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(anteroom::server::serve_fn(
        listener,
        |req: Request<Incoming>| async move {
            let leaked = req.headers().contains_key("authorization")
                || req.headers().contains_key("x-api-key");
            let body = serde_json::json!({"leaked": leaked}).to_string();
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(
                        Full::new(Bytes::from(body))
                            .map_err(|n| match n {})
                            .boxed_unsync(),
                    )
                    .unwrap(),
            )
        },
    ));
    url
}

async fn post(
    client: &HttpClient,
    base: &str,
    header: Option<(&str, &str)>,
    priority: Option<i32>,
    id: &str,
) -> Response<Incoming> {
    let mut b = Request::post(format!("{base}/v1/chat/completions")).header("x-request-id", id);
    if let Some((k, v)) = header {
        b = b.header(k, v);
    }
    if let Some(p) = priority {
        b = b.header("x-priority", p);
    }
    client
        .request(
            b.body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
                .unwrap(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn keys_are_checked_kept_and_named() {
    std::env::set_var("ANTEROOM_TEST_KEY_B", "sk-bravo");
    let upstream = echo_upstream().await;
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("auth-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log_s = log.display().to_string();
    let proxy = proxy(&upstream, |c| {
        c.request_log = log_s;
        c.key = vec![
            KeyEntry {
                name: "alpha".into(),
                sha256: Some(hex(anteroom::types::digest(b"sk-alpha"))),
                env: None,
                default_priority: Some(10),
                max_priority: Some(5),
                requests_per_minute: None,
                ..Default::default()
            },
            KeyEntry {
                name: "bravo".into(),
                sha256: None,
                env: Some("ANTEROOM_TEST_KEY_B".into()),
                default_priority: None,
                max_priority: None,
                requests_per_minute: None,
                ..Default::default()
            },
        ];
    })
    .await;
    let client = client();
    let base = proxy.url();

    // No key, a wrong key, a good key in the wrong place (no Bearer,
    // Azure's api-key header, Basic): 401 in the OpenAI shape, nothing
    // reaches upstream.
    for (h, id) in [
        (None, "none"),
        (Some(("authorization", "Bearer sk-wrong")), "wrong"),
        (Some(("authorization", "sk-alpha")), "no-bearer"),
        (Some(("api-key", "sk-alpha")), "azure-header"),
        (Some(("authorization", "Basic sk-alpha")), "basic"),
    ] {
        let resp = post(&client, &base, h, None, id).await;
        assert_eq!(resp.status(), 401, "{id}");
        let err = body_json(resp).await;
        assert_eq!(err["error"]["code"], "invalid_api_key");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert!(
            !err.to_string().contains("sk-wrong"),
            "the key is never echoed"
        );
    }

    // Good keys, either header: through, and the key is not passed on.
    let resp = post(
        &client,
        &base,
        Some(("authorization", "Bearer sk-alpha")),
        None,
        "a1",
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("x-anteroom-priority-clamped"));
    assert_eq!(body_json(resp).await["leaked"], false);
    let resp = post(&client, &base, Some(("x-api-key", "sk-bravo")), None, "b1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(resp).await["leaked"], false);

    // alpha may not ask for more urgency than 5: clamped, and told so.
    let resp = post(
        &client,
        &base,
        Some(("authorization", "Bearer sk-alpha")),
        Some(0),
        "a2",
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header_u64(&resp, "x-anteroom-priority-clamped"), Some(5));
    body_bytes(resp).await;

    proxy.recorder.flush().await;
    let recs: Vec<Record> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by = |id: &str| recs.iter().find(|r| r.request_id == id).unwrap().clone();
    assert_eq!(by("none").status, 401);
    assert_eq!(by("none").tenant, None);
    assert_eq!(by("a1").tenant.as_deref(), Some("alpha"));
    assert_eq!(by("a1").priority, Some(10), "alpha's default priority");
    assert_eq!(by("b1").tenant.as_deref(), Some("bravo"));
    assert_eq!(by("b1").priority, Some(0));
    assert_eq!(by("a2").priority, Some(5));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("sk-alpha") && !text.contains("sk-bravo"),
        "no key in the log"
    );
}

#[test]
fn key_tables_refuse_plain_or_missing_secrets() {
    let both = anteroom::config::FileConfig::parse(
        "[[key]]\nname = \"x\"\nsha256 = \"00\"\nenv = \"Y\"\n",
    )
    .unwrap()
    .validate()
    .unwrap_err();
    assert!(both.0.contains("exactly one"), "{}", both.0);
    let plain = anteroom::config::FileConfig::parse("[[key]]\nname = \"x\"\nkey = \"sk-1\"\n");
    assert!(plain.is_err(), "no field holds a plain key");
    let unset = anteroom::config::FileConfig::parse(
        "[[key]]\nname = \"x\"\nenv = \"ANTEROOM_SURELY_UNSET_VAR\"\n",
    )
    .unwrap()
    .validate()
    .unwrap_err();
    assert!(unset.0.contains("ANTEROOM_SURELY_UNSET_VAR"), "{}", unset.0);
}

#[tokio::test]
async fn a_key_over_its_rate_limit_gets_a_429_with_the_limiters_advice() {
    let upstream = echo_upstream().await;
    let proxy = proxy(&upstream, |c| {
        c.key = vec![KeyEntry {
            name: "slow".into(),
            sha256: Some(hex(anteroom::types::digest(b"sk-slow"))),
            env: None,
            default_priority: None,
            max_priority: None,
            requests_per_minute: Some(3),
            ..Default::default()
        }];
    })
    .await;
    let client = client();
    let auth = Some(("authorization", "Bearer sk-slow"));
    // A burst of 3 passes; the 4th is refused with when to come back: one
    // request per 20 s replenishes.
    for i in 0..3 {
        let resp = post(&client, &proxy.url(), auth, None, &format!("ok{i}")).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    let resp = post(&client, &proxy.url(), auth, None, "over").await;
    assert_eq!(resp.status(), 429);
    let secs = header_u64(&resp, "retry-after").unwrap();
    let ms = header_u64(&resp, "retry-after-ms").unwrap();
    assert!((15..=20).contains(&secs), "{secs}");
    assert!((15_000..=20_000).contains(&ms), "{ms}");
    let err = body_json(resp).await;
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
}

/// Tokens per minute: charged the prompt's estimate plus `max_tokens` on
/// admission, corrected by the real `usage` at the end; over it, a 429 whose
/// advice, followed, lets the request through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limit_is_corrected_by_usage_and_its_advice_works() {
    use anteroom::sim::Mode;
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.key = vec![KeyEntry {
            name: "tok".into(),
            sha256: Some(hex(anteroom::types::digest(b"sk-tok"))),
            // 100 tokens a second.
            tokens_per_minute: Some(6000),
            ..Default::default()
        }];
    })
    .await;
    let ask = |id: &'static str, max_tokens: u64| {
        let (client, url) = (client.clone(), proxy.url());
        async move {
            // The model stops after 4 tokens, whatever max_tokens allows.
            let body = serde_json::json!({
                "model": "m", "max_tokens": max_tokens, "sim_stop_after": 4,
                "messages": [{"role": "user", "content": "hello"}],
            });
            let req = Request::post(format!("{url}/v1/chat/completions"))
                .header("authorization", "Bearer sk-tok")
                .header("x-request-id", id)
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            client.request(req).await.unwrap()
        }
    };
    // Each may write 5000 tokens but writes 4: charged ~5030, used ~30.
    // Without the correction the second would not fit.
    for id in ["t0", "t1"] {
        let resp = ask(id, 5000).await;
        assert_eq!(resp.status(), 200, "{id}");
        body_bytes(resp).await;
    }
    // The bucket has given out ~5060 of its 6000; the credit of ~5000
    // pays most of the next charge, ~6080, so it needs ~1080: ~140 more
    // than are free, a wait of ~1.4 s.
    let resp = ask("big", 6050).await;
    assert_eq!(resp.status(), 429);
    let ms = header_u64(&resp, "retry-after-ms").unwrap();
    assert!((1..=2_000).contains(&ms), "retry-after-ms {ms}");
    let err = body_json(resp).await;
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tokens-per-minute"));
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    let resp = ask("big", 6050).await;
    assert_eq!(resp.status(), 200, "after the advised wait");
    body_bytes(resp).await;
    // /status shows the key's limits and its one refusal.
    let resp = client
        .get(
            format!("http://{}/status", proxy.admin_addr)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    let status = body_json(resp).await;
    let key = &status["keys"][0];
    assert_eq!(key["name"], "tok");
    assert_eq!(key["tokens_per_minute"], 6000);
    assert_eq!(key["rate_limited"], 1);
}

/// The upstream's own key replaces whatever the client sent, on generation
/// and pass-through requests alike, and appears nowhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_key_replaces_the_clients() {
    std::env::set_var("ANTEROOM_TEST_UPSTREAM_KEY", "sk-backend-secret");
    let upstream = authorization_echo().await;
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("upstream-key-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log_s = log.display().to_string();
    let proxy = proxy(&upstream, |c| {
        c.upstream_api_key_env = "ANTEROOM_TEST_UPSTREAM_KEY".into();
        c.request_log = log_s;
    })
    .await;
    let client = client();
    let base = proxy.url();
    for (header, id) in [
        (Some(("authorization", "Bearer sk-client")), "with"),
        (None, "without"),
    ] {
        let resp = post(&client, &base, header, None, id).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            body_json(resp).await["authorization"],
            "Bearer sk-backend-secret",
            "{id}"
        );
    }
    let resp = client
        .get(format!("{base}/v1/models").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        body_json(resp).await["authorization"],
        "Bearer sk-backend-secret"
    );
    // Not in /status, /metrics or the request log.
    let admin = format!("http://{}", proxy.admin_addr);
    for path in ["/status", "/metrics"] {
        let resp = client
            .get(format!("{admin}{path}").parse().unwrap())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body_bytes(resp).await).into_owned();
        assert!(!text.contains("sk-backend"), "{path}");
    }
    drop(proxy);
    wait_until("log written", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 3)
    })
    .await;
    assert!(!std::fs::read_to_string(&log).unwrap().contains("sk-"));

    // A variable that is not set is refused at start, by name.
    let mut f = anteroom::config::FileConfig {
        upstream_api_key_env: "ANTEROOM_SURELY_UNSET_UPSTREAM".into(),
        ..Default::default()
    };
    let err = f.validate().unwrap_err().0;
    assert!(err.contains("ANTEROOM_SURELY_UNSET_UPSTREAM"), "{err}");
    f.upstream_api_key_env = String::new();
    f.upstream_api_key = "sk-x\u{1}".into();
    let err = f.validate().unwrap_err().0;
    assert!(
        err.contains("upstream_api_key") && !err.contains("sk-x"),
        "{err}"
    );
}

#[tokio::test]
async fn a_huge_max_tokens_cannot_wrap_past_the_token_limit() {
    use anteroom::sim::Mode;
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.key = vec![KeyEntry {
            name: "tok".into(),
            sha256: Some(hex(anteroom::types::digest(b"sk-tok"))),
            tokens_per_minute: Some(1000),
            ..Default::default()
        }];
    })
    .await;
    let ask = |id: &'static str| {
        let (client, url) = (client.clone(), proxy.url());
        async move {
            // prompt + u64::MAX wrapped to a charge of a few tokens.
            let body = format!(
                "{{\"model\":\"m\",\"max_tokens\":{},\"sim_stop_after\":4,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}",
                u64::MAX
            );
            let req = Request::post(format!("{url}/v1/chat/completions"))
                .header("authorization", "Bearer sk-tok")
                .header("x-request-id", id)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            client.request(req).await.unwrap()
        }
    };
    // The first takes a whole minute's tokens; the next must wait for them.
    let first = ask("h0").await;
    assert_eq!(first.status(), 200);
    body_bytes(first).await;
    for id in ["h1", "h2", "h3"] {
        let resp = ask(id).await;
        assert_eq!(resp.status(), 429, "{id}");
        let body = body_json(resp).await;
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }
}

/// An upstream that answers with the body it was sent, as JSON.
async fn body_echo() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(anteroom::server::serve_fn(
        listener,
        |req: Request<Incoming>| async move {
            let declared = req
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let echo = serde_json::json!({
                "body": String::from_utf8_lossy(&body),
                "length_ok": declared == Some(body.len()),
            });
            Ok::<_, Infallible>(Response::new(
                Full::new(Bytes::from(echo.to_string()))
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            ))
        },
    ));
    url
}

/// A key whose priority is clamped cannot reach past the clamp through the
/// body either: vLLM reads the body's `priority`, so the backend is sent the
/// priority the request was queued at, however the body spelled its own.
#[tokio::test]
async fn a_clamped_priority_is_what_the_backend_is_sent() {
    let upstream = body_echo().await;
    let proxy = proxy(&upstream, |c| {
        c.key = vec![
            KeyEntry {
                name: "clamped".into(),
                sha256: Some(hex(anteroom::types::digest(b"sk-clamped"))),
                max_priority: Some(5),
                ..Default::default()
            },
            KeyEntry {
                name: "free".into(),
                sha256: Some(hex(anteroom::types::digest(b"sk-free"))),
                ..Default::default()
            },
        ];
    })
    .await;
    let client = client();
    let send = |key: &'static str, body: &'static str, header: Option<i32>| {
        let mut b = Request::post(format!("{}/v1/chat/completions", proxy.url()))
            .header("authorization", format!("Bearer {key}"));
        if let Some(p) = header {
            b = b.header("x-priority", p);
        }
        let req = b
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let client = client.clone();
        async move {
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            body_json(resp).await
        }
    };
    for (body, header, want) in [
        (
            r#"{"model":"m","priority":-1000}"#,
            None,
            r#"{"model":"m","priority":5}"#,
        ),
        (
            r#"{"model":"m","priority":"-1000"}"#,
            None,
            r#"{"model":"m","priority":5}"#,
        ),
        (
            r#"{"priority":-1e3,"model":"m","priority":0}"#,
            None,
            r#"{"priority":5,"model":"m","priority":5}"#,
        ),
        // The header decided (7, within the clamp): the body says so too.
        (
            r#"{"model":"m","priority":-1000}"#,
            Some(7),
            r#"{"model":"m","priority":7}"#,
        ),
        // Within the clamp, and no body priority: untouched.
        (
            r#"{"model":"m","priority":9}"#,
            None,
            r#"{"model":"m","priority":9}"#,
        ),
        (r#"{"model":"m"}"#, Some(0), r#"{"model":"m"}"#),
    ] {
        let echo = send("sk-clamped", body, header).await;
        assert_eq!(echo["body"], want, "{body} {header:?}");
        assert_eq!(echo["length_ok"], true, "{body}");
    }
    // A key with no clamp: the body goes as it came.
    let echo = send("sk-free", r#"{"model":"m","priority":-1000}"#, None).await;
    assert_eq!(echo["body"], r#"{"model":"m","priority":-1000}"#);
}

/// With an admin key, the admin port answers only requests that carry it,
/// but for the liveness check; the scheme is read in any case, on the admin
/// port and the proxy's.
#[tokio::test]
async fn the_admin_port_needs_its_key_and_healthz_does_not() {
    std::env::set_var("ANTEROOM_TEST_ADMIN_KEY", "adm-secret");
    let (_sim, proxy, client) = setup(sim_config(anteroom::sim::Mode::Batch), |c| {
        c.admin_key_env = "ANTEROOM_TEST_ADMIN_KEY".into();
        c.key = vec![KeyEntry {
            name: "k".into(),
            sha256: Some(hex(anteroom::types::digest(b"sk-k"))),
            ..Default::default()
        }];
    })
    .await;
    let admin = format!("http://{}", proxy.admin_addr);
    let ask = |method: &'static str, path: &'static str, auth: Option<&'static str>| {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{admin}{path}"));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let req = b.body(Full::new(Bytes::new())).unwrap();
        let client = client.clone();
        async move { client.request(req).await.unwrap() }
    };
    assert_eq!(ask("GET", "/healthz", None).await.status(), 200);
    for (method, path) in [("GET", "/status"), ("GET", "/metrics"), ("POST", "/reload")] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic adm-secret"),
            Some("adm-secret"),
        ] {
            let resp = ask(method, path, auth).await;
            assert_eq!(resp.status(), 401, "{method} {path} {auth:?}");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
            let err = body_json(resp).await;
            assert_eq!(err["error"]["code"], "invalid_api_key");
            assert!(!err.to_string().contains("adm-secret"));
        }
    }
    for auth in [
        "Bearer adm-secret",
        "BEARER adm-secret",
        "bearer  adm-secret ",
    ] {
        let resp = ask("GET", "/status", Some(auth)).await;
        assert_eq!(resp.status(), 200, "{auth}");
    }
    // The proxy's own keys: any case of the scheme.
    let req = Request::post(format!("{}/v1/chat/completions", proxy.url()))
        .header("authorization", "BEARER sk-k")
        .body(Full::new(Bytes::from(chat_body(false, 2))))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
}
