//! What anteroom adds: latency and CPU per request against a direct
//! connection to the simulator.
//!
//! Runs the simulator and `anteroom serve` as separate processes (the
//! release binary), drives them from this process on loopback, and reads the
//! proxy's CPU time from /proc, so the CPU figure is the proxy's alone.
//! Every loop is bounded in count. Run: `cargo bench --bench overhead`.
//! With nginx installed it is measured the same way; with redis-server
//! installed, so is anteroom in cluster mode (`[cluster]` on a Redis of its
//! own on loopback), with Redis's CPU and its script calls per request.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SEQUENTIAL: usize = 2_000;
const CONCURRENT: usize = 20_000;
const CONCURRENCY: usize = 32;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start the anteroom binary. `BENCH_WORKERS=N` runs the proxy on N worker
/// threads (and the simulator on N tokio workers); without it, the
/// defaults (one per core), as users run it.
/// `BENCH_BIN=PATH` runs another build instead (to compare two commits).
fn spawn(args: &[&str]) -> Proc {
    let bin = std::env::var_os("BENCH_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(release_binary);
    let mut cmd = Command::new(bin);
    cmd.args(args).env("RUST_LOG", "warn").stdout(Stdio::null());
    if let Some(n) = std::env::var_os("BENCH_WORKERS") {
        // The simulator's runtime, and the proxy's threads.
        cmd.env("TOKIO_WORKER_THREADS", &n);
        if args.first() == Some(&"serve") {
            cmd.arg("--workers").arg(&n);
        }
    }
    Proc(cmd.spawn().expect("start anteroom"))
}

/// The binary as users get it: `cargo build --release`. Not
/// `CARGO_BIN_EXE_anteroom`: under `cargo bench` that one is built with the
/// dev-dependencies' features, tokio's `test-util` among them, whose clock
/// checks cost ~1-2 µs of CPU per request and overstated every figure here.
fn release_binary() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = build_release(&["--bin", "anteroom"]);
            // Copied: a later cargo command may put another build there.
            let copy = std::env::temp_dir().join(format!("anteroom-bench-{}", std::process::id()));
            std::fs::copy(target.join("release").join("anteroom"), &copy).expect("copy binary");
            copy
        })
        .clone()
}

/// `cargo build --release --locked` with `what`; the target directory.
fn build_release(what: &[&str]) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--release", "--locked"])
        .args(what)
        .current_dir(root)
        .status()
        .expect("run cargo")
        .success();
    assert!(ok, "cargo build --release {what:?} failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// User and system CPU time of a process, from /proc (clock ticks of 10 ms).
fn cpu_times(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("linux /proc");
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| Duration::from_millis(fields[i].parse::<u64>().unwrap() * 10);
    (ticks(11), ticks(12))
}

async fn wait_ready(client: &Client<HttpConnector, Full<Bytes>>, url: &str) {
    for _ in 0..500 {
        if let Ok(r) = client.get(url.parse().unwrap()).await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{url} did not come up");
}

fn body(stream: bool, tokens: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": "m", "stream": stream, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        })
        .to_string(),
    )
}

async fn one(client: &Client<HttpConnector, Full<Bytes>>, url: &str, body: &Bytes) -> usize {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let resp = client.request(req).await.expect("request");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn sequential(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: &Bytes,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        let t = Instant::now();
        one(client, url, body).await;
        out.push(t.elapsed());
    }
    out.sort();
    out
}

async fn concurrent(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: &Bytes,
    n: usize,
) -> Duration {
    let t = Instant::now();
    let per = n / CONCURRENCY;
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                one(&client, &url, &body).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    t.elapsed()
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("linux /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Memory of 10,000 waiting requests: a backend that never answers in time,
/// `max_concurrency` 1, and 10,000 requests queued, over HTTP/1.1 (one
/// connection each) or HTTP/2 (multiplexed on one connection).
async fn queued_memory(http2: bool) {
    const WAITING: usize = 10_000;
    let sim_addr = format!("127.0.0.1:{}", free_port());
    let _sim = spawn(&[
        "simulate", "--listen", &sim_addr, "--mode", "serial", "--ttft", "120s",
    ]);
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = spawn(&[
        "serve",
        "--upstream",
        &format!("http://{sim_addr}"),
        "--listen",
        &listen,
        "--admin-listen",
        &admin,
        "--max-concurrency",
        "1",
        "--max-queue",
        "20000",
        "--queue-timeout",
        "120s",
    ]);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // HTTP/2: hyper's server allows 200 concurrent streams per connection,
    // so 10,001 streams take 51 connections, one client each.
    let loads: Vec<Client<HttpConnector, Full<Bytes>>> = (0..if http2 { 51 } else { 1 })
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .http2_only(http2)
                .build_http()
        })
        .collect();
    wait_ready(&client, &format!("http://{admin}/healthz")).await;
    let idle = rss_kib(proxy.0.id());
    let url = format!("http://{listen}/v1/chat/completions");
    let b = body(false, 16);
    let mut tasks = Vec::new();
    for i in 0..WAITING + 1 {
        let (load, url, b) = (loads[i % loads.len()].clone(), url.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url).body(Full::new(b)).unwrap();
            let _ = load.request(req).await;
        }));
    }
    let status_url = format!("http://{admin}/status");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client.get(status_url.parse().unwrap()).await.unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        if v["waiting"].as_u64() == Some(WAITING as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "queue did not fill: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let full = rss_kib(proxy.0.id());
    println!(
        "memory: {WAITING} waiting requests ({} B bodies, {}): RSS {} KiB idle, {} KiB queued, {:.1} KiB per waiting request",
        b.len(),
        if http2 { "HTTP/2, multiplexed" } else { "HTTP/1.1, one connection each" },
        idle,
        full,
        (full - idle) as f64 / WAITING as f64
    );
    for t in tasks {
        t.abort();
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for a list; nothing to list
    }
    let sim_port = free_port();
    let proxy_port = free_port();
    let admin_port = free_port();
    let sim_addr = format!("127.0.0.1:{sim_port}");
    let _sim = spawn(&[
        "simulate",
        "--listen",
        &sim_addr,
        "--mode",
        "batch",
        "--slots",
        "1024",
        "--ttft",
        "0ms",
        "--tokens-per-second",
        "1000000",
        "--batch-slowdown",
        "0",
        "--stamp-events",
    ]);
    let proxy = spawn(&[
        "serve",
        "--upstream",
        &format!("http://{sim_addr}"),
        "--listen",
        &format!("127.0.0.1:{proxy_port}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin_port}"),
        "--max-concurrency",
        "64",
        "--max-queue",
        "100000",
        "--queue-timeout",
        "60s",
    ]);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY * 2)
        .build_http();
    wait_ready(&client, &format!("http://{sim_addr}/v1/models")).await;
    wait_ready(&client, &format!("http://127.0.0.1:{admin_port}/healthz")).await;
    let direct = format!("http://{sim_addr}/v1/chat/completions");
    let proxied = format!("http://127.0.0.1:{proxy_port}/v1/chat/completions");

    if std::env::var_os("BENCH_SKIP_MEMORY").is_none() {
        queued_memory(false).await;
        queued_memory(true).await;
        if std::env::var_os("BENCH_MEMORY_ONLY").is_some() {
            return;
        }
    }
    // The same load through nginx, for a baseline measured the same way,
    // when nginx is installed (it is not needed for anteroom's tests).
    let nginx = start_nginx(&sim_addr).await;
    // And through a bare hyper proxy (examples/bare_proxy.rs): the floor
    // that hyper and tokio alone set under anteroom's cost.
    let bare = start_bare("bare_proxy", &sim_addr).await;
    // And through a proxy on tokio and httparse without hyper
    // (examples/raw_proxy.rs): the floor for an HTTP/1.1 codec of our own.
    let raw = start_bare("raw_proxy", &sim_addr).await;
    // And anteroom in cluster mode, when redis-server is installed.
    let clustered = start_clustered(&sim_addr).await;
    let mut targets = vec![("anteroom", proxied.clone(), proxy.0.id())];
    if let Some(c) = &clustered {
        targets.push(("cluster", c.url.clone(), c.proxy.0.id()));
    }
    if let Some((_, url, pid)) = &nginx {
        targets.push(("nginx", url.clone(), *pid));
    }
    targets.push(("bare hyper", bare.1.clone(), bare.0 .0.id()));
    targets.push(("raw tokio", raw.1.clone(), raw.0 .0.id()));

    println!("proxy overhead (loopback; simulator with zero model time)\n");
    for (name, b, n) in [
        (
            "small JSON (1 token, non-streamed)",
            body(false, 1),
            CONCURRENT,
        ),
        (
            "SSE stream of 32 events (30 tokens)",
            body(true, 30),
            CONCURRENT / 4,
        ),
    ] {
        println!("{name}:");
        concurrent(&client, &direct, &b, CONCURRENCY * 10).await;
        let d = sequential(&client, &direct, &b).await;
        let wall_direct = concurrent(&client, &direct, &b, n).await;
        println!(
            "  direct:   one at a time p50 {:?} p99 {:?}; {:.0} req/s at concurrency {CONCURRENCY}",
            pct(&d, 0.5),
            pct(&d, 0.99),
            n as f64 / wall_direct.as_secs_f64()
        );
        for (proxy_name, url, pid) in &targets {
            // Warm the proxy's upstream pool.
            concurrent(&client, url, &b, CONCURRENCY * 10).await;
            let p = sequential(&client, url, &b).await;
            let redis = clustered.as_ref().filter(|_| *proxy_name == "cluster");
            let redis0 = redis.map(Clustered::redis_load);
            let (user0, sys0) = cpu_times(*pid);
            let wall = concurrent(&client, url, &b, n).await;
            let (user1, sys1) = cpu_times(*pid);
            let (user, sys) = (user1 - user0, sys1 - sys0);
            let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
            println!(
                "  {proxy_name:<10} one at a time p50 {:?} p99 {:?} (adds {:?} at p50); {:.0} req/s; CPU {:.1} µs per request (user {:.1}, system {:.1}; {:?} over {n})",
                pct(&p, 0.5),
                pct(&p, 0.99),
                pct(&p, 0.5).saturating_sub(pct(&d, 0.5)),
                n as f64 / wall.as_secs_f64(),
                per(user + sys),
                per(user),
                per(sys),
                user + sys
            );
            if let (Some(c), Some((cpu0, calls0))) = (redis, redis0) {
                let (cpu1, calls1) = c.redis_load();
                println!(
                    "             Redis: CPU {:.1} µs per request; {:.2} script calls per request",
                    per(cpu1 - cpu0),
                    (calls1 - calls0) as f64 / n as f64
                );
            }
        }
        println!();
    }

    // Delivery delay of each SSE event: the simulator stamps its wall-clock
    // send time into every chunk; the client, on the same machine, reads it
    // on arrival. 20 streams of 40 events 5 ms apart, one stream at a time.
    println!(
        "SSE event delivery delay (backend write -> client read), 20 x 40 events, 5 ms apart:"
    );
    let slow = Bytes::from(
        serde_json::json!({
            "model": "m", "stream": true, "max_tokens": 40, "sim_tokens_per_second": 200,
            "messages": [{"role": "user", "content": "Tell me a story."}],
        })
        .to_string(),
    );
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut all = vec![("direct", direct.clone(), &client)];
    all.extend(targets.iter().map(|(n, u, _)| (*n, u.clone(), &client)));
    // The same through anteroom over HTTP/2 (h2c; nginx's proxy here speaks
    // HTTP/1.1 only).
    all.push(("anteroom h2", proxied.clone(), &h2));
    let mut direct_p50 = None;
    for (name, url, client) in all {
        let mut delays = Vec::new();
        for _ in 0..20 {
            delays.extend(event_delays(client, &url, &slow).await);
        }
        delays.sort();
        let p50 = pct(&delays, 0.5);
        let added = direct_p50.map_or(String::new(), |d: Duration| {
            format!(" (adds {:?} at p50)", p50.saturating_sub(d))
        });
        direct_p50.get_or_insert(p50);
        println!(
            "  {name:<11} p50 {:?} p99 {:?} max {:?} over {} events{added}",
            p50,
            pct(&delays, 0.99),
            delays.last().copied().unwrap_or_default(),
            delays.len()
        );
    }
    // nginx's files, and the copy of the release binary made for this run
    // if one was.
    drop(nginx);
    let _ = std::fs::remove_dir_all(nginx_dir());
    if std::env::var_os("BENCH_BIN").is_none() {
        let _ = std::fs::remove_file(release_binary());
    }
}

/// One streamed request; the delay of each event from its `x_sent_ns`.
async fn event_delays(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: &Bytes,
) -> Vec<Duration> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let mut resp = client.request(req).await.unwrap().into_body();
    let mut out = Vec::new();
    while let Some(frame) = resp.frame().await {
        let Ok(frame) = frame else { break };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let text = String::from_utf8_lossy(data);
        for part in text.split("\"x_sent_ns\":").skip(1) {
            let digits: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(sent) = digits.parse::<u64>() {
                out.push(Duration::from_nanos(now.saturating_sub(sent)));
            }
        }
    }
    out
}

/// One of the floor proxies (examples/bare_proxy.rs, examples/raw_proxy.rs),
/// built for release, in front of `upstream` with as many workers as
/// anteroom runs.
async fn start_bare(example: &str, upstream: &str) -> (Proc, String) {
    let target = build_release(&["--example", example]);
    let workers = std::env::var("BENCH_WORKERS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string()
    });
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(target.join("release/examples").join(example))
        .args([listen.as_str(), upstream, workers.as_str()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {example}: {e}"));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    wait_ready(&client, &format!("http://{listen}/v1/models")).await;
    (Proc(child), format!("http://{listen}/v1/chat/completions"))
}

/// nginx's config, pid file and temp paths for this run.
fn nginx_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("anteroom-bench-nginx-{}", std::process::id()))
}

/// nginx as a reverse proxy to `upstream`: one worker, no master process (so
/// its pid is the one doing the work), upstream keep-alive, no buffering of
/// the response (as for SSE), no access log.
async fn start_nginx(upstream: &str) -> Option<(Proc, String, u32)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = nginx_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let port = free_port();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; error_log stderr error; pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
  upstream sim {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://sim; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_buffering off;
    }}
  }}
}}
",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    wait_ready(&client, &format!("http://127.0.0.1:{port}/v1/models")).await;
    Some((Proc(child), url, pid))
}

/// anteroom in cluster mode and the redis-server it shares through.
struct Clustered {
    proxy: Proc,
    redis: Proc,
    redis_port: u16,
    url: String,
    config: std::path::PathBuf,
}

impl Clustered {
    /// Redis's CPU time so far, and the scripts it has run (EVALSHA and
    /// EVAL calls: one round trip each), from `INFO commandstats`.
    fn redis_load(&self) -> (Duration, u64) {
        use std::io::{Read, Write};
        let (user, sys) = cpu_times(self.redis.0.id());
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.redis_port)).expect("redis");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"INFO commandstats\r\n").unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 16384];
        // The bulk reply ends with a blank line after the last section.
        while !text.ends_with("\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        let calls = text
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        (user + sys, calls)
    }
}

impl Drop for Clustered {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// anteroom with `[cluster]` on a redis-server of its own (loopback, no
/// persistence), the same limits as the plain one, when redis-server is
/// installed.
async fn start_clustered(upstream: &str) -> Option<Clustered> {
    let redis_port = free_port();
    let redis = Command::new("redis-server")
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Proc(redis);
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let config = std::env::temp_dir().join(format!(
        "anteroom-bench-cluster-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        format!(
            "max_concurrency = 64\nmax_queue = 100000\nqueue_timeout = \"60s\"\n\
             [cluster]\nredis_url = \"redis://127.0.0.1:{redis_port}\"\non_unavailable = \"closed\"\n"
        ),
    )
    .ok()?;
    let (port, admin) = (free_port(), free_port());
    let proxy = spawn(&[
        "serve",
        "--config",
        config.to_str()?,
        "--upstream",
        &format!("http://{upstream}"),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
    ]);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    wait_ready(&client, &format!("http://127.0.0.1:{admin}/healthz")).await;
    Some(Clustered {
        proxy,
        redis,
        redis_port,
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        config,
    })
}
