//! `GET /status/requests/{x-request-id}` on the admin port: where a
//! waiting request stands, to its own tenant only.

use crate::support;

use anteroom::cli::serve::Running;
use anteroom::config::KeyEntry;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

async fn standing(
    client: &HttpClient,
    proxy: &Running,
    id: &str,
    auth: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut b = Request::get(format!("http://{}/status/requests/{id}", proxy.admin_addr));
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    let resp = client
        .request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, body_json(resp).await)
}

/// Wait until `n` requests are queued.
async fn queued(proxy: &Running, n: u64) {
    for _ in 0..500 {
        if proxy_status(proxy).await["waiting"] == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{n} never queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_client_learns_its_place_and_a_finished_one_is_not_found() {
    let (_sim, proxy, client, busy) = one_slot_busy(|c| c.max_queue = 4).await;
    let url = proxy.url();
    let spawn = |id: &'static str, priority: i32| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { chat(&client, &url, Some(priority), id, false, 2).await })
    };
    let first = spawn("first", 0);
    queued(&proxy, 1).await;
    let second = spawn("second/with?odd%chars", 5);
    queued(&proxy, 2).await;
    let (status, s) = standing(&client, &proxy, "first", None).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (s["position"].as_u64(), s["priority"].as_i64()),
        (Some(1), Some(0))
    );
    assert_eq!(s["state"], "waiting");
    assert!(s["waited_ms"].as_u64().is_some(), "{s}");
    assert!(s.get("estimated_start_ms").is_some(), "{s}");
    // An id with reserved characters, percent-encoded in the path.
    let (status, s) = standing(&client, &proxy, "second%2Fwith%3Fodd%25chars", None).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (s["position"].as_u64(), s["priority"].as_i64()),
        (Some(2), Some(5))
    );
    assert_eq!(s["id"], "second/with?odd%chars");
    // Unknown: 404 in the OpenAI shape.
    let (status, e) = standing(&client, &proxy, "nobody", None).await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "request_not_found");
    // Started and finished: not found.
    drop(busy);
    body_bytes(first.await.unwrap()).await;
    body_bytes(second.await.unwrap()).await;
    for id in ["first", "second%2Fwith%3Fodd%25chars"] {
        assert_eq!(standing(&client, &proxy, id, None).await.0, 404, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_a_tenant_sees_only_its_own_and_the_admin_key_sees_all() {
    std::env::set_var("ANTEROOM_TEST_STANDING_ADMIN", "adm-standing");
    let key = |name: &str, secret: &[u8]| KeyEntry {
        name: name.into(),
        sha256: Some(hex(anteroom::types::digest(secret))),
        ..Default::default()
    };
    let (_sim, proxy, client, busy) = {
        let (sim, proxy, client) = setup(sim_config(anteroom::sim::Mode::Serial), |c| {
            c.max_concurrency = 1.into();
            c.admin_key_env = "ANTEROOM_TEST_STANDING_ADMIN".into();
            c.key = vec![key("alice", b"sk-alice"), key("bob", b"sk-bob")];
        })
        .await;
        let busy = chat_with(
            &client,
            &proxy.url(),
            &[("authorization", "Bearer sk-bob")],
            "busy",
            true,
            10_000,
        )
        .await;
        (sim, proxy, client, busy)
    };
    assert_eq!(busy.status(), 200);
    let waiter = {
        let (client, url) = (client.clone(), proxy.url());
        tokio::spawn(async move {
            chat_with(
                &client,
                &url,
                &[("authorization", "Bearer sk-alice")],
                "hers",
                false,
                2,
            )
            .await
        })
    };
    // (/status needs the admin key here: ask until it is listed.)
    let mut asked = (0, serde_json::Value::Null);
    for _ in 0..500 {
        asked = standing(&client, &proxy, "hers", Some("Bearer sk-alice")).await;
        if asked.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (status, s) = asked;
    assert_eq!((status, s["position"].as_u64()), (200, Some(1)), "{s}");
    // Another tenant: as if it did not exist.
    let (status, e) = standing(&client, &proxy, "hers", Some("Bearer sk-bob")).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("request_not_found"))
    );
    // No key, a wrong one: 401.
    for auth in [None, Some("Bearer sk-mallory")] {
        let (status, e) = standing(&client, &proxy, "hers", auth).await;
        assert_eq!(
            (status, e["error"]["code"].as_str()),
            (401, Some("invalid_api_key")),
            "{auth:?}"
        );
    }
    // The admin key sees any.
    let (status, _) = standing(&client, &proxy, "hers", Some("Bearer adm-standing")).await;
    assert_eq!(status, 200);
    drop(busy);
    body_bytes(waiter.await.unwrap()).await;
}
