//! `x-anteroom-deadline-ms`: a client bounds its own wait in the queue.

use crate::support;

use support::*;

const DEADLINE: &str = "x-anteroom-deadline-ms";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_header_is_checked_bounds_the_wait_and_is_clamped() {
    let (_sim, proxy, client, busy) = one_slot_busy(|c| c.max_queue = 4).await;
    assert_eq!(busy.status(), 200);
    // Malformed: 400 in the OpenAI shape, before the body is read.
    for bad in ["soon", "-5", "1.5", "", "12 ms"] {
        let resp = chat_with(&client, &proxy.url(), &[(DEADLINE, bad)], "bad", false, 2).await;
        assert_eq!(resp.status(), 400, "{bad:?}");
        let err = body_json(resp).await;
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert_eq!(err["error"]["code"], "invalid_deadline", "{bad:?}");
        assert!(err["error"]["message"].as_str().unwrap().contains(DEADLINE));
    }
    // Past any bound: clamped to queue_timeout, so it waits like any other.
    let url = proxy.url();
    let patient = {
        let client = client.clone();
        tokio::spawn(async move {
            chat_with(
                &client,
                &url,
                &[(DEADLINE, "99999999999999999999999")],
                "patient",
                false,
                2,
            )
            .await
        })
    };
    for _ in 0..500 {
        if proxy_status(&proxy).await["waiting"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        proxy_status(&proxy).await["waiting"],
        1,
        "the patient one queued"
    );
    // Zero: it would have to wait, so it is refused at once.
    let resp = chat_with(&client, &proxy.url(), &[(DEADLINE, "0")], "now", false, 2).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after-ms"));
    assert_eq!(body_json(resp).await["error"]["code"], "deadline_exceeded");
    // A short one waits that long, then leaves with its 429.
    let t0 = tokio::time::Instant::now();
    let resp = chat_with(
        &client,
        &proxy.url(),
        &[(DEADLINE, "300")],
        "short",
        false,
        2,
    )
    .await;
    assert!(t0.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(resp.status(), 429);
    assert_eq!(body_json(resp).await["error"]["code"], "deadline_exceeded");
    // The slot frees: the patient one is served.
    drop(busy);
    let resp = patient.await.unwrap();
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
}
