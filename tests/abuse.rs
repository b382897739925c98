//! One misbehaving client does not hold the server for the others.

mod support;

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
