//! One misbehaving client does not hold the server for the others.

use crate::support;

use std::time::Duration;

use anteroom::sim::Mode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read until the server closes; what it sent.
async fn read_to_close(sock: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open"),
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.header_read_timeout = "300ms".into()
    })
    .await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-a: ")
        .await
        .unwrap();
    // Others are served meanwhile.
    let resp = chat(&client, &proxy.url(), None, "other", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    // And the slow one is closed once its time is up.
    read_to_close(&mut slow).await;
}

#[tokio::test]
async fn oversized_headers_get_431_and_others_are_served() {
    let (_sim, proxy, client) =
        setup(sim_config(Mode::Batch), |c| c.max_header_bytes = 16384).await;
    let mut big = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let answer = read_to_close(&mut big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let resp = chat(&client, &proxy.url(), None, "other", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
}

#[tokio::test]
async fn connect_is_refused_never_tunnelled() {
    let (sim, proxy, _) = setup(sim_config(Mode::Batch), |_| {}).await;
    let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.contains("method_not_allowed"), "{answer}");
    assert_eq!(sim.stats().received, 0);
}

/// An absolute-form URI naming another host reaches the configured upstream,
/// never that host.
#[tokio::test]
async fn an_absolute_uri_for_another_host_goes_to_the_upstream_only() {
    let (sim, proxy, _) = setup(sim_config(Mode::Batch), |_| {}).await;
    let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(
        b"GET http://169.254.169.254/v1/models HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The simulator's model list: it was the upstream that answered.
    assert!(answer.contains(&sim_config(Mode::Batch).model), "{answer}");
    assert!(!answer.contains("169.254"), "{answer}");
    drop(sim);
}

/// A connection from 127.0.0.2 (Linux routes all of 127/8 to loopback).
async fn connect_from(ip: &str, to: std::net::SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_hoarding_connections_does_not_lock_out_others() {
    let (_sim, proxy, client) =
        setup(sim_config(Mode::Batch), |c| c.max_connections_per_ip = 3).await;
    // 127.0.0.2 opens three idle connections: its quota.
    let mut hoard = Vec::new();
    for _ in 0..3 {
        hoard.push(connect_from("127.0.0.2", proxy.addr).await);
    }
    let hoarder: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    wait_until("the three are in", || {
        proxy.connections.open_from(hoarder) == 3
    })
    .await;
    // Its fourth is closed at once.
    let mut fourth = connect_from("127.0.0.2", proxy.addr).await;
    let _ = fourth
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(
        read_to_close(&mut fourth).await,
        "",
        "refused without an answer"
    );
    // Another address is served.
    let resp = chat(&client, &proxy.url(), None, "other", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    // When the hoarder lets one go, it may connect again.
    drop(hoard.pop());
    wait_until("one of the three is gone", || {
        proxy.connections.open_from(hoarder) == 2
    })
    .await;
    let mut again = connect_from("127.0.0.2", proxy.addr).await;
    again
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut again).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_connection_limit_holds() {
    let (_sim, proxy, _) = setup(sim_config(Mode::Batch), |c| c.max_connections = 2).await;
    let _a = TcpStream::connect(proxy.addr).await.unwrap();
    let _b = TcpStream::connect(proxy.addr).await.unwrap();
    wait_until("both are in", || proxy.connections.open() == 2).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = c
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(read_to_close(&mut c).await, "");
}

/// An HTTP/2 client may have at most `http2_max_streams` requests open on
/// its connection; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_per_connection_are_bounded() {
    use bytes::Bytes;
    use http_body_util::Full;
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.http2_max_streams = 2;
        c.max_concurrency = 8.into();
    })
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut streams = Vec::new();
    for i in 0..5 {
        let mut send = send.clone();
        let req = http::Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
            .header("x-request-id", format!("h2-{i}"))
            .body(Full::new(Bytes::from(chat_body(true, 10_000))))
            .unwrap();
        streams.push(tokio::spawn(async move { send.send_request(req).await }));
    }
    wait_until("two streams running", || {
        proxy.scheduler.snapshot().running == 2
    })
    .await;
    // The other three stay with the client: never more than two here.
    for _ in 0..20 {
        let s = proxy.scheduler.snapshot();
        assert_eq!(s.running + s.waiting, 2, "{s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = chat(&client, &proxy.url(), None, "other", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    for s in streams {
        s.abort();
    }
}

#[tokio::test]
async fn too_many_headers_get_431_and_others_are_served() {
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| c.max_headers = 20).await;
    let mut many = TcpStream::connect(proxy.addr).await.unwrap();
    let headers: String = (0..50).map(|i| format!("x-h{i}: v\r\n")).collect();
    let head = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
    let _ = many.write_all(head.as_bytes()).await;
    let answer = read_to_close(&mut many).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let resp = chat(&client, &proxy.url(), None, "other", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
}

/// The default limit (100, hyper's own, which anteroom leaves to hyper so it
/// parses into an inline array): 100 request headers pass, 101 get a 431.
/// A bad `x-priority` gets anteroom's own 400, so what is counted is what
/// anteroom parsed, not what the backend would accept.
#[tokio::test]
async fn the_default_header_limit_is_one_hundred() {
    let (_sim, proxy, _client) = setup(sim_config(Mode::Batch), |_| {}).await;
    for (count, status) in [(100, "400"), (101, "431")] {
        let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
        // Host, Connection, Content-Length and x-priority count too.
        let headers: String = (0..count - 4).map(|i| format!("x-h{i}: v\r\n")).collect();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: 2\r\nx-priority: soon\r\n{headers}\r\n{{}}"
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let answer = read_to_close(&mut conn).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{count}: {answer}"
        );
    }
}

/// An endpoint spelled so that the backend reads it as a generation call,
/// but anteroom's exact match would not, is refused: nothing reaches the
/// model past the queue.
#[tokio::test]
async fn a_disguised_endpoint_is_refused_not_passed_by_the_queue() {
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |_| {}).await;
    let body = chat_body(false, 2);
    for path in [
        "/v1/chat/%63ompletions",
        "/v1/chat/completions/",
        "//v1/chat/completions",
        "/v1/x/../chat/completions",
        "/v1/./chat/completions",
        "/v1/chat%2Fcompletions",
        "/V1/chat/completions",
        "/v1\\chat\\completions",
        "/v1/completions/",
    ] {
        let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut sock).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(
            answer.contains("\"code\":\"invalid_path\""),
            "{path}: {answer}"
        );
    }
    assert_eq!(sim.stats().received, 0);
    // The endpoint as written is admitted, and other paths pass as they are.
    let resp = chat(&client, &proxy.url(), None, "plain", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(b"GET /v1/models/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut sock).await;
    assert!(!answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// A client that asks for a long stream and never reads it does not keep
/// its slot: once writes to it have been blocked for `client_write_timeout`
/// its connection is closed, and with one slot the next client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_loses_its_slot() {
    let mut cfg = sim_config(Mode::Batch);
    cfg.tokens_per_second = 1_000_000.0;
    let (sim, proxy, client) = setup(cfg, |c| {
        c.max_concurrency = anteroom::config::Concurrency::Fixed(1);
        c.client_write_timeout = "300ms".into();
    })
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut deaf = sock.connect(proxy.addr).await.unwrap();
    let body = chat_body(true, 50_000_000);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    deaf.write_all(req.as_bytes()).await.unwrap();
    wait_until("the deaf client's stream to run", || {
        sim.stats().in_flight == 1
    })
    .await;
    // Reads nothing; the next client waits for the one slot, and gets it.
    the_next_client_gets_the_slot(&sim, &proxy, &client).await;
    drop(deaf);
}

/// With one slot held by a client that reads nothing: the next client is
/// served once anteroom takes the slot back, and the backend stops the
/// unread generation.
async fn the_next_client_gets_the_slot(
    sim: &anteroom::sim::SimHandle,
    proxy: &anteroom::cli::serve::Running,
    client: &HttpClient,
) {
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        chat(client, &proxy.url(), None, "next", false, 2),
    )
    .await
    .expect("the slot was never freed");
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    wait_until("the unread generation to stop", || {
        sim.stats().cancelled >= 1
    })
    .await;
}

/// A client that stops sending its body gets a 408 once no piece of it has
/// come for `body_read_timeout`, admitted (buffered) or passed through
/// (streamed to the upstream), and the slot it would take goes to others.
#[tokio::test]
async fn a_body_that_stops_coming_is_a_408() {
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = anteroom::config::Concurrency::Fixed(1);
        c.admit_paths = vec!["/v1/chat/completions".into()];
        c.body_read_timeout = "300ms".into();
    })
    .await;
    for head in [
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":",
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{\"model\":\r\n",
    ] {
        let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
        slow.write_all(head.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut slow).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    }
    let resp = chat(&client, &proxy.url(), None, "next", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    wait_until("the upstream to see nothing left open", || {
        sim.stats().in_flight == 0
    })
    .await;
}

/// The bodies anteroom holds are bounded all together: past
/// `max_buffered_bytes` a request is refused with 503 `buffers_full` (unread
/// when it declares its length), and the bytes are given back as requests
/// finish.
#[tokio::test]
async fn buffered_bodies_are_bounded_all_together() {
    let (_sim, proxy, client, busy) = one_slot_busy(|c| c.max_buffered_bytes = 3_000).await;
    // The busy stream holds the slot; these wait, each body held.
    let pad = "x".repeat(700);
    let body = |i: usize| {
        serde_json::json!({"model": "anteroom-sim", "max_tokens": 1, "pad": pad, "i": i})
            .to_string()
    };
    let mut waiting = Vec::new();
    for i in 0..3 {
        let (client, url, b) = (client.clone(), proxy.url(), body(i));
        waiting.push(tokio::spawn(async move {
            let req = http::Request::post(format!("{url}/v1/chat/completions"))
                .body(http_body_util::Full::new(bytes::Bytes::from(b)))
                .unwrap();
            client.request(req).await.unwrap().status()
        }));
    }
    wait_until("three to wait", || proxy.scheduler.snapshot().waiting == 3).await;
    // A fourth would pass the bound: refused before its body is read.
    let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"code\":\"buffers_full\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    // The slot frees: the three are served and their bytes given back.
    drop(busy);
    for w in waiting {
        assert_eq!(w.await.unwrap(), 200);
    }
    // Had their bytes been kept, this one would pass the bound.
    let req = http::Request::post(format!("{}/v1/chat/completions", proxy.url()))
        .body(http_body_util::Full::new(bytes::Bytes::from(body(9))))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
}

/// Started with a low soft limit on open files (1024 is common), anteroom
/// raises it to the hard limit: each waiting client holds a descriptor.
#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let sim = sim(sim_config(Mode::Batch)).await;
    let (port, admin) = (free_port(), free_port());
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_anteroom"))
        .args(["serve", "--upstream", &sim.url()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let proc = Proc {
        child,
        url: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin}"),
    };
    let pid = proc.child.id();
    let limits = || std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let open_files = |text: &str| -> Option<(String, String)> {
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        let mut f = line["Max open files".len()..].split_whitespace();
        Some((f.next()?.to_owned(), f.next()?.to_owned()))
    };
    wait_until("the proxy to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let (soft, hard) = open_files(&limits()).expect("the process's limits");
    assert_eq!(soft, hard, "soft limit left at {soft}");
    assert_ne!(soft, "256");
    proc.terminate();
}

/// A 429 that advises a longer wait than an idle connection lives closes
/// its HTTP/1.1 connection, so the client's retry opens a fresh one; a
/// short wait keeps it.
#[tokio::test]
async fn a_long_advised_wait_closes_the_connection_a_short_one_keeps_it() {
    for (advice, closes) in [("30s", true), ("1s", false)] {
        let mut cfg = sim_config(Mode::Batch);
        cfg.reject_share = 1.0;
        cfg.reject_retry_after = Some(anteroom::config::parse_duration(advice).unwrap());
        let (_sim, proxy, _) = setup(cfg, |c| c.max_retries = 0).await;
        let body = chat_body(false, 2);
        let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let ended = loop {
            match tokio::time::timeout(Duration::from_millis(500), sock.read(&mut buf)).await {
                Ok(Ok(0)) => break true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(_)) => break true,
                Err(_) => break false,
            }
        };
        let answer = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 429"), "{answer}");
        assert_eq!(
            answer.contains("\r\nconnection: close\r\n"),
            closes,
            "{advice}: {answer}"
        );
        assert_eq!(ended, closes, "{advice}: closed?");
    }
}

/// The HTTP/2 connection preface and an empty SETTINGS frame.
const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// An HTTP/2 connection that opens no stream is closed once it has been
/// idle for `client_idle_timeout` (hyper's HTTP/2 server keeps it forever),
/// and a client that sends a part of the preface and stops is closed like
/// one that never finishes its headers.
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.client_idle_timeout = "300ms".into();
        c.header_read_timeout = "300ms".into();
    })
    .await;
    let mut quiet = TcpStream::connect(proxy.addr).await.unwrap();
    quiet.write_all(H2_HELLO).await.unwrap();
    let mut halfway = TcpStream::connect(proxy.addr).await.unwrap();
    halfway.write_all(&H2_HELLO[..16]).await.unwrap();
    // Others are served meanwhile.
    let resp = chat(&client, &proxy.url(), None, "other", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    // The server's SETTINGS, then (a GOAWAY and) the close.
    read_to_close(&mut quiet).await;
    assert_eq!(read_to_close(&mut halfway).await, "");
}

/// An HTTP/2 connection is idle only with no stream open: a stream that
/// runs longer than `client_idle_timeout` is not cut, and the connection
/// closes that long after its last stream ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_with_a_stream_open_is_not_idle() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let mut cfg = sim_config(Mode::Batch);
    cfg.tokens_per_second = 20.0;
    let (_sim, proxy, _client) = setup(cfg, |c| c.client_idle_timeout = "300ms".into()).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    // 20 tokens at 20 a second: a stream open for about a second.
    let req = http::Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(true, 20))))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let ended = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle connection was not closed")
        .unwrap()
        .unwrap();
    assert!(ended.elapsed() >= Duration::from_millis(250));
}

/// An HTTP/2 client that stops reading one response, withholding its
/// flow-control window while it keeps reading its connection, does not
/// keep the slot: hyper stops asking the body for more, and once it has
/// held a piece unread for `client_write_timeout` the stream is cut. With
/// one slot, the next client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_withholds_its_window_loses_its_slot() {
    use bytes::Bytes;
    use http_body_util::Full;
    let mut cfg = sim_config(Mode::Batch);
    cfg.tokens_per_second = 1_000_000.0;
    let (sim, proxy, client) = setup(cfg, |c| {
        c.max_concurrency = anteroom::config::Concurrency::Fixed(1);
        c.client_write_timeout = "300ms".into();
    })
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(true, 50_000_000))))
        .unwrap();
    // The response's head, and then its body is never read.
    let unread = send.send_request(req).await.unwrap();
    assert_eq!(unread.status(), 200);
    the_next_client_gets_the_slot(&sim, &proxy, &client).await;
    drop(unread);
}

/// Requests that pass without admission are bounded too
/// (`max_passthrough`): clients that trickle them pin that many backend
/// connections and no more; past it a request gets 503 `passthrough_full`
/// with a `Retry-After`, admitted requests are still served, and the place
/// comes back when one ends.
#[tokio::test]
async fn requests_that_pass_through_are_bounded() {
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.admit_paths = vec!["/v1/chat/completions".into()];
        c.max_passthrough = 2;
    })
    .await;
    let mut tricklers = Vec::new();
    for _ in 0..2 {
        let mut t = TcpStream::connect(proxy.addr).await.unwrap();
        t.write_all(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{\"model\":\r\n",
        )
        .await
        .unwrap();
        tricklers.push(t);
    }
    wait_until("both to reach the upstream", || sim.stats().in_flight == 2).await;
    let get = |client: HttpClient| {
        let url = format!("{}/v1/models", proxy.url());
        async move {
            client
                .request(
                    http::Request::get(url)
                        .body(http_body_util::Full::default())
                        .unwrap(),
                )
                .await
                .unwrap()
        }
    };
    let refused = get(client.clone()).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body = String::from_utf8(body_bytes(refused).await.to_vec()).unwrap();
    assert!(body.contains("\"code\":\"passthrough_full\""), "{body}");
    assert_eq!(
        sim.stats().in_flight,
        2,
        "the refused one reached the upstream"
    );
    // Admitted work does not count against it.
    let resp = chat(&client, &proxy.url(), None, "admitted", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    // One trickler gone: its place is free again.
    drop(tricklers.pop());
    wait_until("the upstream to see one left", || {
        sim.stats().in_flight == 1
    })
    .await;
    let mut passed = None;
    for _ in 0..100 {
        let resp = get(client.clone()).await;
        if resp.status() == 200 {
            passed = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let passed = passed.expect("the freed place was never given back");
    body_bytes(passed).await;
}
