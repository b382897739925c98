//! Soak and chaos: anteroom (the release binary, its own process) in front
//! of the simulator (another process), driven from here on loopback
//! through phases meant to lose requests or leak slots:
//!
//! 1. `crowd`: thousands of clients at once, each on its own connection,
//!    through a cap of 4;
//! 2. `kills`: streams running while the backend is killed (SIGKILL) and
//!    started again, over and over;
//! 3. `leavers`: clients that leave while queued or mid-stream, among
//!    clients that stay;
//! 4. `reloads`: traffic while the config is rewritten and SIGHUP sent
//!    every 100 ms;
//! 5. `drain`: SIGTERM under load.
//!
//! For each phase it prints requests sent, answered (a status and, for a
//! stream, an end: `[DONE]` or an error event), left on purpose, and lost
//! (no answer and the client did not leave); after the phases, the slots
//! still held (`/status`: running and waiting, which must be 0), the
//! proxy's RSS before and after, and whether the request log holds exactly
//! one record per request sent. Every loop is bounded in count and time.
//! Run: `cargo bench --bench soak`; it exits non-zero on a lost request, a
//! leaked slot or a missing record.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const CROWD: usize = 3_000;
const KILLS: usize = 20;
const KILL_STREAMS: usize = 40;
const LEAVERS: usize = 1_000;
const STAYERS: usize = 300;
const RELOAD_REQUESTS: usize = 1_500;
const DRAIN_REQUESTS: usize = 200;
/// No phase may take longer.
const PHASE_LIMIT: Duration = Duration::from_secs(120);

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

/// The binary as users get it (`cargo build --release`), copied so a later
/// build does not replace it mid-run; `BENCH_BIN` runs another.
fn release_binary() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("BENCH_BIN") {
        return bin.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--release", "--locked", "--bin", "anteroom"])
        .current_dir(root)
        .status()
        .expect("run cargo")
        .success();
    assert!(ok, "cargo build --release failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let copy = std::env::temp_dir().join(format!("anteroom-soak-{}", std::process::id()));
    std::fs::copy(target.join("release").join("anteroom"), &copy).expect("copy binary");
    copy
}

fn start_sim(bin: &std::path::Path, port: u16) -> Proc {
    let child = Command::new(bin)
        .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--mode", "batch", "--slots", "8", "--ttft", "5ms"])
        .args(["--tokens-per-second", "400", "--output-tokens", "8"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the simulator");
    Proc(child)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How one request ended, as its client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// A status, and the whole body (for a stream: `[DONE]` or an error
    /// event last).
    Answered(u16),
    /// The client left on purpose.
    Left,
    /// Neither: a connection error, or a stream cut without an end.
    Lost,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    answered: u64,
    left: u64,
    lost: u64,
    statuses: BTreeMap<u16, u64>,
}

impl Tally {
    fn add(&mut self, end: End) {
        self.sent += 1;
        match end {
            End::Answered(s) => {
                self.answered += 1;
                *self.statuses.entry(s).or_default() += 1;
            }
            End::Left => self.left += 1,
            End::Lost => self.lost += 1,
        }
    }

    fn print(&self, phase: &str, took: Duration, rss: u64) {
        println!(
            "{phase:<8} sent {:>5}  answered {:>5}  left {:>5}  lost {:>3}  statuses {:?}  ({:.1} s, proxy RSS after {rss} KiB)",
            self.sent,
            self.answered,
            self.left,
            self.lost,
            self.statuses,
            took.as_secs_f64()
        );
    }
}

fn body(stream: bool, max_tokens: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": "anteroom-sim",
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "soak"}],
        })
        .to_string(),
    )
}

static IDS: AtomicU64 = AtomicU64::new(0);

/// One request; `leave_after`: drop it that long after sending.
async fn one(
    client: &HttpClient,
    url: &str,
    stream: bool,
    max_tokens: usize,
    leave_after: Option<Duration>,
) -> End {
    let id = format!("soak-{}", IDS.fetch_add(1, Ordering::Relaxed));
    let req = Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(Full::new(body(stream, max_tokens)))
        .unwrap();
    let exchange = async {
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(_) => return End::Lost,
        };
        let status = resp.status().as_u16();
        let sse = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let Ok(all) = resp.into_body().collect().await else {
            return End::Lost;
        };
        let all = all.to_bytes();
        if sse {
            let text = String::from_utf8_lossy(&all);
            let last = text.trim_end().rsplit("\n\n").next().unwrap_or("");
            if !(last.ends_with("[DONE]") || last.contains("\"error\"")) {
                return End::Lost;
            }
        }
        End::Answered(status)
    };
    match leave_after {
        Some(after) => match tokio::time::timeout(after, exchange).await {
            Ok(end) => end,
            Err(_) => End::Left,
        },
        None => match tokio::time::timeout(PHASE_LIMIT, exchange).await {
            Ok(end) => end,
            Err(_) => End::Lost,
        },
    }
}

/// A client that sends a whole request on a connection of its own, then
/// leaves `after` it was written (queued, or mid-stream): it left, unless
/// its answer was all there by then.
async fn leave(addr: std::net::SocketAddr, stream: bool, after: Duration) -> End {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut sock) = tokio::net::TcpStream::connect(addr).await else {
        return End::Lost;
    };
    let id = format!("soak-{}", IDS.fetch_add(1, Ordering::Relaxed));
    let body = body(stream, 40);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         x-request-id: {id}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if sock.write_all(head.as_bytes()).await.is_err() || sock.write_all(&body).await.is_err() {
        return End::Lost;
    }
    let mut got = Vec::new();
    let read = tokio::time::timeout(after, sock.read_to_end(&mut got)).await;
    match read {
        Ok(Ok(_)) if got.starts_with(b"HTTP/1.1 ") => {
            let status = std::str::from_utf8(&got[9..12])
                .ok()
                .and_then(|s| s.parse().ok());
            status.map_or(End::Lost, End::Answered)
        }
        Ok(_) => End::Lost,
        Err(_) => End::Left,
    }
}

/// `n` requests at once (even ones streamed), each on its own connection.
async fn crowd(
    url: &str,
    n: usize,
    max_tokens: usize,
    leave: impl Fn(usize) -> Option<Duration>,
) -> Tally {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let url = url.to_owned();
        let leave_after = leave(i);
        tasks.push(tokio::spawn(async move {
            // A client of its own: a connection of its own.
            let client = Client::builder(TokioExecutor::new()).build_http();
            one(&client, &url, i % 2 == 0, max_tokens, leave_after).await
        }));
    }
    let mut tally = Tally::default();
    for t in tasks {
        tally.add(t.await.unwrap_or(End::Lost));
    }
    tally
}

async fn status(admin: &str) -> serde_json::Value {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("{admin}/status"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.expect("admin /status");
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

/// Wait until the proxy holds no slot and no queue place (what finished
/// requests must give back), within 10 s; what it holds then.
async fn settle(admin: &str) -> (u64, u64) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(admin).await;
        let held = (
            s["running"].as_u64().unwrap_or(u64::MAX),
            s["waiting"].as_u64().unwrap_or(u64::MAX),
        );
        if held == (0, 0) || Instant::now() > until {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(sim_port: u16, max_concurrency: usize, log: &std::path::Path) -> String {
    format!(
        "upstream = \"http://127.0.0.1:{sim_port}\"\nbackend = \"openai\"\n\
         max_concurrency = {max_concurrency}\nmax_queue = 8192\nqueue_timeout = \"100s\"\n\
         retry_base_delay = \"50ms\"\nrequest_log = \"{}\"\ndrain_timeout = \"20s\"\n",
        log.display()
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failed = rt.block_on(run());
    std::process::exit(i32::from(failed));
}

async fn run() -> bool {
    let bin = release_binary();
    let dir = std::env::temp_dir().join(format!("anteroom-soak-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cfg_path, log) = (dir.join("soak.toml"), dir.join("requests.jsonl"));
    let _ = std::fs::remove_file(&log);
    let sim_port = free_port();
    let mut sim = start_sim(&bin, sim_port);
    std::fs::write(&cfg_path, config(sim_port, 4, &log)).unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let proxy = Proc(
        Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("start anteroom"),
    );
    let pid = proxy.0.id();
    let (url, admin) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{admin_port}"),
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut total = Tally::default();
    // Warm-up, until both are up; what reached the proxy counts.
    for _ in 0..200 {
        match one(&client, &url, false, 1, None).await {
            End::Answered(200) => {
                total.add(End::Answered(200));
                break;
            }
            End::Answered(s) => total.add(End::Answered(s)),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_before = rss_kib(pid);
    let mut phases: Vec<(&str, Tally)> = Vec::new();

    // 1. A crowd through a cap of 4.
    let t = Instant::now();
    let tally = crowd(&url, CROWD, 8, |_| None).await;
    tally.print("crowd", t.elapsed(), rss_kib(pid));
    println!("         (ids up to {})", IDS.load(Ordering::Relaxed));
    phases.push(("crowd", tally));

    // 1b. The same crowd three times more: the first crowd's high-water
    // mark is kept by the allocator, and RSS that keeps growing crowd
    // after crowd would be a leak.
    for name in ["crowd 2", "crowd 3", "crowd 4"] {
        let t = Instant::now();
        let tally = crowd(&url, CROWD, 8, |_| None).await;
        tally.print(name, t.elapsed(), rss_kib(pid));
        phases.push((name, tally));
    }

    // 2. Streams while the backend is killed and started again.
    let t = Instant::now();
    let mut kills = Tally::default();
    for _ in 0..KILLS {
        let running = {
            let url = url.clone();
            tokio::spawn(async move { crowd(&url, KILL_STREAMS, 60, |_| None).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(sim.0.id(), "-KILL");
        let _ = sim.0.wait();
        tokio::time::sleep(Duration::from_millis(100)).await;
        sim = start_sim(&bin, sim_port);
        let got = running.await.unwrap();
        kills.sent += got.sent;
        kills.answered += got.answered;
        kills.left += got.left;
        kills.lost += got.lost;
        for (s, n) in got.statuses {
            *kills.statuses.entry(s).or_default() += n;
        }
    }
    kills.print("kills", t.elapsed(), rss_kib(pid));
    println!("         (ids up to {})", IDS.load(Ordering::Relaxed));
    phases.push(("kills", kills));

    // 3. Clients leaving while queued or mid-stream, among ones that stay.
    let t = Instant::now();
    let leavers = {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for i in 0..LEAVERS {
                let after = Duration::from_millis(20 + (i as u64 * 7919) % 300);
                tasks.push(tokio::spawn(leave(addr, i % 2 == 0, after)));
            }
            let mut tally = Tally::default();
            for t in tasks {
                tally.add(t.await.unwrap_or(End::Lost));
            }
            tally
        })
    };
    let stayers = crowd(&url, STAYERS, 8, |_| None).await;
    let leavers = leavers.await.unwrap();
    let mut both = stayers;
    both.sent += leavers.sent;
    both.answered += leavers.answered;
    both.left += leavers.left;
    both.lost += leavers.lost;
    for (s, n) in leavers.statuses {
        *both.statuses.entry(s).or_default() += n;
    }
    both.print("leavers", t.elapsed(), rss_kib(pid));
    println!("         (ids up to {})", IDS.load(Ordering::Relaxed));
    phases.push(("leavers", both));

    // 4. Reloads under load: the limit moves between 3 and 5.
    let t = Instant::now();
    let load = {
        let url = url.clone();
        tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let mut tally = Tally::default();
            let mut tasks = Vec::new();
            for chunk in 0..RELOAD_REQUESTS / 50 {
                for i in 0..50 {
                    let (client, url) = (client.clone(), url.clone());
                    tasks.push(tokio::spawn(async move {
                        one(&client, &url, (chunk + i) % 2 == 0, 8, None).await
                    }));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for t in tasks {
                tally.add(t.await.unwrap_or(End::Lost));
            }
            tally
        })
    };
    let mut reloads = 0;
    while !load.is_finished() && t.elapsed() < PHASE_LIMIT {
        reloads += 1;
        std::fs::write(&cfg_path, config(sim_port, 3 + 2 * (reloads % 2), &log)).unwrap();
        signal(pid, "-HUP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tally = load.await.unwrap();
    tally.print("reloads", t.elapsed(), rss_kib(pid));
    println!(
        "         ({reloads} reloads; ids up to {})",
        IDS.load(Ordering::Relaxed)
    );
    phases.push(("reloads", tally));

    let held = settle(&admin).await;
    let rss_after = rss_kib(pid);

    // 5. SIGTERM under load: every request answered, the process exits.
    let t = Instant::now();
    let draining = {
        let url = url.clone();
        tokio::spawn(async move { crowd(&url, DRAIN_REQUESTS, 100, |_| None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(pid, "-TERM");
    let tally = draining.await.unwrap();
    tally.print("drain", t.elapsed(), 0);
    phases.push(("drain", tally));
    let mut proxy = proxy;
    let mut exited = None;
    for _ in 0..800 {
        // 40 s at most.
        if let Ok(Some(s)) = proxy.0.try_wait() {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sim);

    for (_, p) in &phases {
        total.sent += p.sent;
        total.answered += p.answered;
        total.left += p.left;
        total.lost += p.lost;
    }
    // The log, written out at exit: one record per request sent.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut per_id: HashMap<String, u32> = HashMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(id) = v["request_id"].as_str() {
                *per_id.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    let recorded = per_id.keys().filter(|k| k.starts_with("soak-")).count() as u64;
    let issued = IDS.load(Ordering::Relaxed);
    let missing: Vec<u64> = (0..issued)
        .filter(|i| !per_id.contains_key(&format!("soak-{i}")))
        .collect();
    if !missing.is_empty() {
        println!(
            "ids with no record ({}; a warm-up attempt made before the proxy listened is one), first: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
    }
    let twice = per_id.values().filter(|&&n| n > 1).count();
    println!(
        "total    sent {}  answered {}  left {}  lost {}; records {} ({} twice); slots held after the load: running {}, waiting {}; RSS {} KiB before, {} KiB after; exit {:?}",
        total.sent, total.answered, total.left, total.lost, recorded, twice, held.0, held.1,
        rss_before, rss_after, exited
    );
    let _ = std::fs::remove_dir_all(&dir);
    let failed = total.lost > 0
        || held != (0, 0)
        || recorded != total.sent
        || twice > 0
        || !exited.is_some_and(|s| s.success());
    if failed {
        println!("FAILED");
    }
    failed
}
