//! Several `[[upstream]]`s: routing by model, load sharing, the model list.

use crate::support;

use std::time::Duration;

use anteroom::config::{Models, Upstreams};
use anteroom::sim::{Mode, SimConfig};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

async fn ask(
    client: &HttpClient,
    base: &str,
    model: &str,
    id: &str,
) -> http::Response<hyper::body::Incoming> {
    let body = serde_json::json!({
        "model": model,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let req = Request::post(format!("{base}/v1/chat/completions"))
        .header("x-request-id", id)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    client.request(req).await.unwrap()
}

fn named(model: &str) -> SimConfig {
    SimConfig {
        model: model.into(),
        ..sim_config(Mode::Batch)
    }
}

#[tokio::test]
async fn requests_go_to_the_upstream_that_serves_their_model() {
    trace_init();
    let (a, b) = (sim(named("alpha")).await, sim(named("beta")).await);
    let rest = sim(named("other")).await;
    let (ua, ub, ur) = (a.url(), b.url(), rest.url());
    let log = log_path("routed");
    let log_s = log.display().to_string();
    let proxy = proxy("http://unused:1", |c| {
        c.request_log = log_s;
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::List(vec!["alpha".into()]), 4),
            entry(
                "b",
                ub,
                Models::List(vec!["beta".into(), "beta-large".into()]),
                4,
            ),
            // Takes what nobody names, and only that.
            entry("rest", ur, Models::Any, 4),
        ]);
    })
    .await;
    let client = client();
    for i in 0..6 {
        let model = if i % 3 == 0 { "alpha" } else { "beta" };
        let resp = ask(&client, &proxy.url(), model, &format!("r{i}")).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    assert_eq!(a.stats().received, 2);
    assert_eq!(b.stats().received, 4);
    assert_eq!(rest.stats().received, 0, "named upstreams come first");
    let resp = ask(&client, &proxy.url(), "gamma", "elsewhere").await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    assert_eq!(
        rest.stats().received,
        1,
        "the \"*\" upstream takes the rest"
    );
    // Each record names the upstream that answered.
    let records = by_id(&records(&proxy, &log).await);
    for (id, upstream) in [("r0", "a"), ("r1", "b"), ("r3", "a"), ("elsewhere", "rest")] {
        assert_eq!(records[id].upstream.as_deref(), Some(upstream), "{id}");
    }

    // The model list: the names each upstream is configured with (one the
    // backend does not report too), and what the "*" one reports.
    let req = Request::get(format!("{}/v1/models", proxy.url()))
        .body(Full::default())
        .unwrap();
    let list = body_json(client.request(req).await.unwrap()).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha", "beta", "beta-large", "other"], "{list}");
    let large = &list["data"][2];
    assert_eq!(large["owned_by"], "b", "not reported: named by anteroom");
    assert!(large.get("created").is_none(), "not known: {large}");
}

#[tokio::test]
async fn a_model_nobody_serves_is_a_404_that_lists_what_is() {
    let (a, b) = (sim(named("alpha")).await, sim(named("beta")).await);
    let (ua, ub) = (a.url(), b.url());
    let proxy = proxy("http://unused:1", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::List(vec!["alpha".into()]), 4),
            entry(
                "b",
                ub,
                Models::List(vec!["beta".into(), "beta-large".into()]),
                4,
            ),
        ]);
    })
    .await;
    let resp = ask(&client(), &proxy.url(), "gamma", "nope").await;
    assert_eq!(resp.status(), 404);
    let err = body_json(resp).await;
    assert_eq!(err["error"]["code"], "model_not_found");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("gamma") && msg.contains("alpha") && msg.contains("beta-large"),
        "{msg}"
    );
    assert_eq!(a.stats().received + b.stats().received, 0);
}

#[tokio::test]
async fn replicas_of_one_model_share_the_load_within_their_limits() {
    let cfg = SimConfig {
        ttft: Duration::from_millis(20),
        ..sim_config(Mode::Batch)
    };
    let (a, b) = (sim(cfg.clone()).await, sim(cfg).await);
    let (ua, ub) = (a.url(), b.url());
    let proxy = proxy("http://unused:1", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::Any, 2),
            entry("b", ub, Models::Any, 2),
        ]);
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = proxy.url();
        tasks.push(tokio::spawn(async move {
            let resp = ask(&client(), &url, "anteroom-sim", &format!("r{i}")).await;
            let status = resp.status();
            body_bytes(resp).await;
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.received + sb.received, 40);
    assert!(
        sa.received >= 12 && sb.received >= 12,
        "{} / {}",
        sa.received,
        sb.received
    );
    // Each replica's own limit held.
    assert!(sa.peak_in_flight <= 2 && sb.peak_in_flight <= 2);
    // /status shows both.
    let req = Request::get(format!("http://{}/status", proxy.admin_addr))
        .body(Full::default())
        .unwrap();
    let status = body_json(client().request(req).await.unwrap()).await;
    assert_eq!(status["max_concurrency"], 4);
    assert_eq!(status["upstreams"][1]["name"], "b");
}

#[test]
fn upstream_tables_parse_and_validate() {
    let file = anteroom::config::FileConfig::parse(
        r#"
        [[upstream]]
        name = "gpu0"
        url = "http://10.0.0.1:8000"
        models = ["llama"]
        max_concurrency = 16

        [[upstream]]
        name = "gpu1"
        url = "http://10.0.0.2:8000"
        models = "*"
        weight = 2
        "#,
    )
    .unwrap();
    let c = file.validate().unwrap();
    assert_eq!(c.replicas.len(), 2);
    assert_eq!(c.replicas[0].max_concurrency, 16);
    assert_eq!(c.replicas[1].max_concurrency, 4, "the top-level default");
    assert_eq!(c.replicas[1].weight, 2);
    assert!(c.replicas[1].models.serves("anything"));
    let dup = anteroom::config::FileConfig::parse(
        "[[upstream]]\nname = \"x\"\nurl = \"http://a:1\"\n[[upstream]]\nname = \"x\"\nurl = \"http://b:1\"\n",
    )
    .unwrap()
    .validate()
    .unwrap_err();
    assert!(dup.0.contains("upstream `x`"), "{}", dup.0);

    // Aliases: a name, a { name, backend } table, "*" among them.
    let file = anteroom::config::FileConfig::parse(
        r#"
        [[upstream]]
        name = "rig"
        url = "http://10.0.0.1:8000"
        models = ["phi", { name = "llama-3-8b", backend = "rig" }, "*"]
        "#,
    )
    .unwrap();
    let c = file.validate().unwrap();
    let m = &c.replicas[0].models;
    assert!(m.names("llama-3-8b") && m.names("phi") && !m.names("rig"));
    assert!(m.any() && m.serves("rig"));
    // It writes out as it was written.
    let again = anteroom::config::FileConfig::parse(&toml::to_string(&file).unwrap()).unwrap();
    assert_eq!(again, file);
    for (models, why) in [
        ("[]", "models is empty"),
        (r#"["a", "a"]"#, "listed twice"),
        (r#"["a", { name = "a", backend = "b" }]"#, "listed twice"),
        (r#"[{ name = "*", backend = "b" }]"#, "no backend name"),
        (r#"[{ name = "", backend = "b" }]"#, "non-empty"),
        (r#"[{ name = "a", backend = "b\"c" }]"#, "without quotes"),
    ] {
        let err = anteroom::config::FileConfig::parse(&format!(
            "[[upstream]]\nname = \"x\"\nurl = \"http://a:1\"\nmodels = {models}\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(err.0.contains(why), "{models}: {}", err.0);
    }
    let unknown = anteroom::config::FileConfig::parse(
        "[[upstream]]\nname = \"x\"\nurl = \"http://a:1\"\nmodels = [{ name = \"a\", alias = \"b\" }]\n",
    )
    .unwrap_err();
    assert!(unknown.to_string().contains("models is"), "{unknown}");
}

/// Two upstreams that both take any model share sequential work evenly: a
/// tie goes round the upstreams (it used to go to the same one each time).
#[tokio::test]
async fn ties_between_catch_all_upstreams_go_round() {
    let a = sim(named("m")).await;
    let b = sim(named("m")).await;
    let (ua, ub) = (a.url(), b.url());
    let proxy = proxy("http://unused:1", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::Any, 4),
            entry("b", ub, Models::Any, 4),
        ]);
    })
    .await;
    let client = client();
    for i in 0..10 {
        body_bytes(ask(&client, &proxy.url(), "m", &format!("t{i}")).await).await;
    }
    assert_eq!((a.stats().received, b.stats().received), (5, 5));
}

fn fast_health(c: &mut anteroom::config::FileConfig) {
    c.health_interval = "100ms".into();
    c.eject_after = 2;
    c.retry_base_delay = "10ms".into();
}

// Ejection by probes and readmission after a good one are in `stack.rs`,
// in process on the paused clock.

#[tokio::test]
async fn a_dead_replica_is_taken_out_and_the_run_never_fails() {
    let a = sim(named("m")).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let ua = a.url();
    let proxy = proxy("http://unused:1", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::Any, 4),
            entry("dead", dead, Models::Any, 4),
        ]);
        fast_health(c);
    })
    .await;
    let client = client();
    for i in 0..30 {
        let resp = ask(&client, &proxy.url(), "m", &format!("r{i}")).await;
        assert_eq!(resp.status(), 200, "request {i}");
        body_bytes(resp).await;
    }
    assert_eq!(a.stats().received, 30);
}

#[tokio::test]
async fn requests_queued_for_an_upstream_that_goes_down_go_to_the_others() {
    let a = sim(named("m")).await;
    let b = sim(SimConfig {
        model: "m".into(),
        ..sim_config(Mode::Batch)
    })
    .await;
    let (ua, ub) = (a.url(), b.url());
    let proxy = proxy("http://unused:1", |c| {
        c.upstream = Upstreams::Many(vec![
            // b names the model: it gets it while it is in service.
            entry("a", ua, Models::Any, 4),
            entry("b", ub, Models::List(vec!["m".into()]), 1),
        ]);
        fast_health(c);
        c.queue_timeout = "20s".into();
    })
    .await;
    let client = client();
    // A long stream holds b's only slot; three more queue behind it.
    let busy = {
        let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 100000,
            "messages": [{"role": "user", "content": "hi"}]});
        let req = Request::post(format!("{}/v1/chat/completions", proxy.url()))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        client.request(req).await.unwrap()
    };
    let mut queued = Vec::new();
    for i in 0..3 {
        let (client, url) = (client.clone(), proxy.url());
        queued.push(tokio::spawn(async move {
            let resp = ask(&client, &url, "m", &format!("q{i}")).await;
            let status = resp.status();
            body_bytes(resp).await;
            status
        }));
    }
    wait_until("three queued on b", || {
        proxy.schedulers[1].snapshot().waiting == 3
    })
    .await;
    assert_eq!(a.stats().received, 0);
    // b stops taking connections: probes fail, it is taken out of service,
    // and its queue moves to a.
    drop(b);
    for q in queued {
        assert_eq!(q.await.unwrap(), 200);
    }
    assert_eq!(a.stats().received, 3);
    drop(busy);
}

/// An upstream whose model list is endless (or just huge) is left out of
/// the merged list, read only up to a bound; the others' models are listed.
#[tokio::test]
async fn a_huge_model_list_is_read_only_up_to_a_bound() {
    use http_body_util::BodyExt;
    let a = sim(named("alpha")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let huge = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(anteroom::server::serve_fn(listener, |_req| async move {
        let mut list = String::from(r#"{"object":"list","data":["#);
        list.push_str(&r#"{"id":"x","object":"model"},"#.repeat(400_000));
        list.push_str(r#"{"id":"huge","object":"model"}]}"#);
        Ok::<_, std::convert::Infallible>(http::Response::new(
            Full::new(Bytes::from(list))
                .map_err(|n| match n {})
                .boxed_unsync(),
        ))
    }));
    let ua = a.url();
    let proxy = proxy("http://unused:1", |c| {
        c.upstream = Upstreams::Many(vec![
            entry("a", ua, Models::Any, 4),
            entry("huge", huge, Models::Any, 4),
        ]);
    })
    .await;
    let req = Request::get(format!("{}/v1/models", proxy.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let list = body_json(resp).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["alpha"]);
}

/// `{ name, backend }` in an upstream's models: the client asks for its
/// name, the backend (which, like vLLM, serves only its own) gets its
/// name, and the answer says the client's again, streamed, not streamed,
/// and put together from a stream (`stream_upgrade`). `/v1/models` lists
/// the names clients may use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_is_renamed_on_the_way_up_and_back_down() {
    use anteroom::config::ModelName;
    let mut cfg = named("rig");
    cfg.mode = Mode::Llama;
    cfg.only_model = true;
    cfg.output_tokens = 6;
    let backend = sim(cfg).await;
    let url = backend.url();
    let proxy = proxy("http://unused:1", |c| {
        c.backend =
            anteroom::config::backend::Setting::Is(anteroom::config::backend::Kind::LlamaCpp);
        c.upstream = Upstreams::Many(vec![entry(
            "rig",
            url,
            Models::List(vec![
                ModelName {
                    name: "llama-3-8b".into(),
                    backend: Some("rig".into()),
                },
                "*".into(),
            ]),
            4,
        )]);
    })
    .await;
    let client = client();
    let send = |model: &str, stream: bool, upgrade: bool| {
        let body = serde_json::json!({
            "model": model,
            "max_tokens": 6,
            "stream": stream,
            "messages": [{"role": "user", "content": "say \"model\":\"rig\""}],
        });
        let mut req = Request::post(format!("{}/v1/chat/completions", proxy.url()));
        if upgrade {
            req = req.header("x-anteroom-stream-upgrade", "1");
        }
        client.request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
    };

    // Not streamed (as it came, and put together from a stream).
    for upgrade in [false, true] {
        let resp = send("llama-3-8b", false, upgrade).await.unwrap();
        assert_eq!(resp.status(), 200, "the backend got its own name");
        let json = body_json(resp).await;
        assert_eq!(json["model"], "llama-3-8b", "upgrade {upgrade}: {json}");
        assert!(!json.to_string().contains("\"rig\""), "{json}");
    }
    // Streamed: every event.
    let resp = send("llama-3-8b", true, false).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(events.len() >= 6, "{text}");
    for e in &events {
        assert_eq!(e["model"], "llama-3-8b", "{e}");
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The backend's own name, taken by "*": as it is, both ways.
    let resp = send("rig", false, false).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(resp).await["model"], "rig");
    // Without the alias the backend refuses the name: the rename is what
    // let the first requests in.
    let resp = send("llama-3-70b", false, false).await.unwrap();
    assert_eq!(resp.status(), 404);
    body_bytes(resp).await;

    // The list: the alias (with the backend's entry for it), then what
    // "*" adds.
    let req = Request::get(format!("{}/v1/models", proxy.url()))
        .body(Full::default())
        .unwrap();
    let list = body_json(client.request(req).await.unwrap()).await;
    let data = list["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["llama-3-8b", "rig"], "{list}");
    assert_eq!(data[0]["owned_by"], "anteroom-sim", "the backend's entry");
}
