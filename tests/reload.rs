//! Hot reload: POST /reload and SIGHUP re-read the config file; limits,
//! priorities and keys change without dropping a queued or running request;
//! a bad file, or a change that needs a restart, is refused and the running
//! config stays.

use crate::support;

use std::path::PathBuf;

use anteroom::config::{FileConfig, KeyEntry};
use anteroom::sim::{Mode, SimConfig};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

fn config_path(tag: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("reload-{tag}-{}.toml", std::process::id()))
}

fn write(path: &PathBuf, file: &FileConfig) {
    std::fs::write(path, toml::to_string(file).unwrap()).unwrap();
}

async fn post_reload(admin: &str) -> (u16, serde_json::Value) {
    let req = Request::post(format!("{admin}/reload"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, body_json(resp).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_priorities_and_keys_change_without_dropping_requests() {
    trace_init();
    let sim = sim(sim_config(Mode::Batch)).await;
    let path = config_path("live");
    let log = config_path("live").with_extension("jsonl");
    let _ = std::fs::remove_file(&log);
    let mut file = FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: sim.url().as_str().into(),
        max_concurrency: 1.into(),
        request_log: log.display().to_string(),
        ..FileConfig::default()
    };
    write(&path, &file);
    let proxy = anteroom::cli::serve::start(&file.validate().unwrap())
        .await
        .unwrap();
    let source = path.clone();
    proxy
        .reloader
        .set_source(Box::new(move || anteroom::app::read_config(&source)));
    let admin = format!("http://{}", proxy.admin_addr);
    let client = client();

    // One long stream runs, three wait.
    let busy = chat(&client, &proxy.url(), None, "busy", true, 10_000).await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        let (client, url) = (client.clone(), proxy.url());
        waiting.push(tokio::spawn(async move {
            let r = chat(&client, &url, None, &format!("w{i}"), false, 2).await;
            let s = r.status().as_u16();
            body_bytes(r).await;
            s
        }));
    }
    wait_until("three waiting", || proxy.scheduler.snapshot().waiting == 3).await;

    // Raise the limit and the default priority: the waiters start at once.
    file.max_concurrency = 4.into();
    file.default_priority = 7;
    write(&path, &file);
    let (code, body) = post_reload(&admin).await;
    assert_eq!(code, 200, "{body}");
    let said = body["message"].as_str().unwrap();
    assert!(
        said.contains("max_concurrency") && said.contains("default_priority"),
        "{said}"
    );
    for w in waiting {
        assert_eq!(w.await.unwrap(), 200, "a waiter was dropped");
    }
    assert_eq!(status(&admin).await["max_concurrency"], 4);

    // Lower it below what runs: the running ones go on.
    let mut running = Vec::new();
    for i in 0..2 {
        running.push(chat(&client, &proxy.url(), None, &format!("r{i}"), true, 10_000).await);
    }
    wait_until("three running", || proxy.scheduler.snapshot().running == 3).await;
    file.max_concurrency = 1.into();
    write(&path, &file);
    assert_eq!(post_reload(&admin).await.0, 200);
    let s = proxy.scheduler.snapshot();
    assert_eq!(
        (s.running, s.max_concurrency),
        (3, 1),
        "running requests finish"
    );
    // A new request waits until the count is under the new limit.
    let (c2, url) = (client.clone(), proxy.url());
    let late = tokio::spawn(async move { chat(&c2, &url, None, "late", false, 2).await.status() });
    wait_until("late waits", || proxy.scheduler.snapshot().waiting == 1).await;
    drop(running);
    drop(busy);
    assert_eq!(late.await.unwrap(), 200);

    // The new default priority applied to the requests after the reload.
    proxy.recorder.flush().await;
    let records: Vec<anteroom::telemetry::Record> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let priority = |id: &str| {
        records
            .iter()
            .find(|r| r.request_id == id)
            .unwrap()
            .priority
    };
    assert_eq!((priority("w0"), priority("late")), (Some(0), Some(7)));

    // Keys: adding one closes the open door for the next request.
    file.key = vec![KeyEntry {
        name: "ci".into(),
        sha256: Some(hex(anteroom::types::digest(b"sk-ci"))),
        ..Default::default()
    }];
    write(&path, &file);
    assert_eq!(post_reload(&admin).await.0, 200);
    let resp = chat(&client, &proxy.url(), None, "no-key", false, 2).await;
    assert_eq!(resp.status(), 401);
    let resp = chat_with(
        &client,
        &proxy.url(),
        &[("authorization", "Bearer sk-ci")],
        "with-key",
        false,
        2,
    )
    .await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;

    // A file that does not validate: refused, naming the key; nothing changes.
    std::fs::write(&path, "max_queue = -3\n").unwrap();
    let (code, body) = post_reload(&admin).await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "reload_refused");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_queue"),
        "{body}"
    );
    // A change that needs a restart: refused as a whole, naming it.
    let mut moved = file.clone();
    moved.listen = "127.0.0.1:1".into();
    moved.max_queue = 5;
    write(&path, &moved);
    let (code, body) = post_reload(&admin).await;
    assert_eq!(code, 400);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("listen") && msg.contains("restart"), "{msg}");
    let st = status(&admin).await;
    assert_eq!(
        (st["max_concurrency"].as_u64(), st["max_queue"].as_u64()),
        (Some(1), Some(4096))
    );
    // The key set is the one last applied.
    assert_eq!(
        chat(&client, &proxy.url(), None, "still", false, 2)
            .await
            .status(),
        401
    );
}

/// The binary reloads on SIGHUP; a bad file leaves it running as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_a_bad_one_changes_nothing() {
    let sim = sim(sim_config(Mode::Batch)).await;
    let path = config_path("hup");
    std::fs::write(&path, "max_queue = 100\n").unwrap();
    let path_s = path.display().to_string();
    let proc = anteroom_process(&sim.url(), &["--config", &path_s]).await;
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &proc.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    assert_eq!(status(&proc.admin).await["max_queue"], 100);
    std::fs::write(&path, "max_queue = 50\n").unwrap();
    hup();
    let mut seen = 0;
    for _ in 0..200 {
        seen = status(&proc.admin).await["max_queue"].as_u64().unwrap();
        if seen == 50 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 50, "SIGHUP reloaded the file");
    // A bad file: logged and refused; the process serves on, unchanged.
    std::fs::write(&path, "max_queue = \"many\"\n").unwrap();
    hup();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(status(&proc.admin).await["max_queue"], 50);
    let resp = chat(&client(), &proc.url, None, "after", false, 2).await;
    assert_eq!(resp.status(), 200);
}

/// An `[[upstream]]`'s models and weight change live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_models_change_live() {
    use anteroom::config::{Models, Upstreams};
    let (a, b) = (
        sim(sim_config(Mode::Batch)).await,
        sim(sim_config(Mode::Batch)).await,
    );
    let mut file = FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: Upstreams::Many(vec![
            entry("a", a.url(), Models::Any, 4),
            entry("b", b.url(), Models::Any, 4),
        ]),
        ..FileConfig::default()
    };
    let proxy = anteroom::cli::serve::start(&file.validate().unwrap())
        .await
        .unwrap();
    let client = client();
    for i in 0..6 {
        let r = chat(&client, &proxy.url(), None, &format!("x{i}"), false, 2).await;
        assert_eq!(r.status(), 200);
        body_bytes(r).await;
    }
    assert!(b.stats().completed > 0, "both serve at first");
    let before = b.stats().completed;
    // b now serves another model only: the simulator's go to a.
    if let Upstreams::Many(e) = &mut file.upstream {
        e[1].models = Models::List(vec!["other".into()]);
    }
    let said = proxy.reloader.apply(file.clone()).unwrap();
    assert!(said.contains("upstream"), "{said}");
    assert!(
        !said.contains("added") && !said.contains("removed"),
        "{said}"
    );
    for i in 0..6 {
        let r = chat(&client, &proxy.url(), None, &format!("y{i}"), false, 2).await;
        assert_eq!(r.status(), 200);
        body_bytes(r).await;
    }
    assert_eq!(b.stats().completed, before, "b no longer gets them");
}

/// Send a chat request in the background; its status and whole body.
fn send(
    url: String,
    id: &str,
    stream: bool,
    tokens: usize,
) -> tokio::task::JoinHandle<(u16, Bytes)> {
    let id = id.to_owned();
    tokio::spawn(async move {
        let r = chat(&client(), &url, None, &id, stream, tokens).await;
        let status = r.status().as_u16();
        (status, body_bytes(r).await)
    })
}

/// Upstreams are re-addressed, added and removed by a reload while requests
/// wait and run: waiters keep their place or move to an upstream still in
/// service, running streams finish where they started, and every request
/// gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_readdressed_added_and_removed_live() {
    use anteroom::config::{Models, Upstreams};
    trace_init();
    let cfg = SimConfig {
        tokens_per_second: 1000.0,
        ..sim_config(Mode::Batch)
    };
    let (a, b, c) = (
        sim(cfg.clone()).await,
        sim(cfg.clone()).await,
        sim(cfg).await,
    );
    let mut file = FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: Upstreams::Many(vec![entry("main", a.url(), Models::Any, 1)]),
        ..FileConfig::default()
    };
    let proxy = anteroom::cli::serve::start(&file.validate().unwrap())
        .await
        .unwrap();
    let admin = format!("http://{}", proxy.admin_addr);
    let url = proxy.url();

    // 1. The one upstream moves (say LM Studio came back on another port)
    // while its slot is busy and three wait: the waiters keep their place
    // and go to the new address; the running stream ends where it began.
    let busy = send(url.clone(), "busy", true, 1500);
    wait_until("busy runs", || proxy.scheduler.snapshot().running == 1).await;
    let waiting: Vec<_> = (0..3)
        .map(|i| send(url.clone(), &format!("w{i}"), false, 2))
        .collect();
    wait_until("three wait", || proxy.scheduler.snapshot().waiting == 3).await;
    file.upstream = Upstreams::Many(vec![entry("main", b.url(), Models::Any, 1)]);
    let said = proxy.reloader.apply(file.clone()).unwrap();
    assert!(said.contains("re-addressed: main"), "{said}");
    assert_eq!(proxy.scheduler.snapshot().waiting, 3, "waiters kept");
    let (code, body) = busy.await.unwrap();
    assert_eq!(code, 200);
    assert!(body.ends_with(b"data: [DONE]\n\n"), "the stream finished");
    for w in waiting {
        assert_eq!(w.await.unwrap().0, 200);
    }
    assert_eq!(a.stats().completed, 1, "only the stream that began there");
    assert_eq!(
        b.stats().completed,
        3,
        "the waiters went to the new address"
    );

    // 2. A second upstream is added: it takes a share at once.
    file.upstream = Upstreams::Many(vec![
        entry("main", b.url(), Models::Any, 1),
        entry("extra", c.url(), Models::Any, 1),
    ]);
    let said = proxy.reloader.apply(file.clone()).unwrap();
    assert!(said.contains("added: extra"), "{said}");
    let burst: Vec<_> = (0..6)
        .map(|i| send(url.clone(), &format!("x{i}"), false, 2))
        .collect();
    for r in burst {
        assert_eq!(r.await.unwrap().0, 200);
    }
    assert!(c.stats().completed > 0, "the new upstream serves");
    let st = status(&admin).await;
    assert_eq!(st["upstreams"].as_array().map(Vec::len), Some(2), "{st}");

    // 3. The first is removed while each runs a stream and two wait at
    // each: main's waiters move to extra, main's stream finishes.
    let on_b = b.stats().completed;
    let all = |f: fn(&anteroom::types::QueueStatus) -> usize| {
        proxy
            .router
            .all_schedulers()
            .iter()
            .map(|s| f(&s.snapshot()))
            .sum::<usize>()
    };
    let s1 = send(url.clone(), "s1", true, 1500);
    wait_until("one runs", || all(|s| s.running) == 1).await;
    let s2 = send(url.clone(), "s2", true, 1500);
    wait_until("one runs at each", || all(|s| s.running) == 2).await;
    let waiting: Vec<_> = (0..4)
        .map(|i| send(url.clone(), &format!("v{i}"), false, 2))
        .collect();
    wait_until("four wait", || all(|s| s.waiting) == 4).await;
    file.upstream = Upstreams::Many(vec![entry("extra", c.url(), Models::Any, 1)]);
    let said = proxy.reloader.apply(file.clone()).unwrap();
    assert!(said.contains("removed: main"), "{said}");
    let st = status(&admin).await;
    let retired = st["upstreams"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == "main"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(retired["retired"], true, "{st}");
    assert_eq!(retired["running"], 1, "{st}");
    assert_eq!(retired["waiting"], 0, "its waiters moved: {st}");
    for s in [s1, s2] {
        let (code, body) = s.await.unwrap();
        assert_eq!(code, 200);
        assert!(body.ends_with(b"data: [DONE]\n\n"), "both streams finished");
    }
    for w in waiting {
        assert_eq!(w.await.unwrap().0, 200);
    }
    assert_eq!(b.stats().completed, on_b + 1, "main got only its stream");
    // The one left is not the first of the table: everything goes there,
    // requests that are not admitted included.
    let models = client()
        .get(format!("{url}/v1/models").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let before = c.stats().completed;
    let r = chat(&client(), &url, None, "last", false, 2).await;
    assert_eq!(r.status(), 200);
    body_bytes(r).await;
    assert_eq!(c.stats().completed, before + 1);
    assert_eq!(b.stats().completed, on_b + 1);
}
