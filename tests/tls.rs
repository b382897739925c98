//! TLS: the listener serves HTTPS with HTTP/2 and HTTP/1.1 by ALPN, an
//! `https://` upstream with a self-signed certificate works once its CA is
//! trusted (and not before), and bad certificate files are refused at start
//! with their path named. Certificates are made here, with rcgen.

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;

use anteroom::config::FileConfig;
use anteroom::sim::Mode;
use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM
/// files: (cert path, key path, DER).
fn certificate(tag: &str) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let cert = dir.join(format!("tls-{tag}-{}.crt", std::process::id()));
    let key = dir.join(format!("tls-{tag}-{}.key", std::process::id()));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    (cert, key, made.cert.der().clone())
}

fn https(c: &mut FileConfig, cert: &std::path::Path, key: &std::path::Path) {
    c.tls_cert = cert.display().to_string();
    c.tls_key = key.display().to_string();
}

/// A TLS connection to `addr` trusting `ca`, offering `alpn`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

fn chat_request(authority: &str) -> Request<Full<Bytes>> {
    Request::post(format!("https://{authority}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(false, 3))))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_speaks_h2_and_http1_by_alpn() {
    trace_init();
    let (cert, key, der) = certificate("listener");
    let (_sim, proxy, _client) = setup(sim_config(Mode::Batch), |c| https(c, &cert, &key)).await;
    let authority = format!("localhost:{}", proxy.addr.port());

    let tls = tls_connect(proxy.addr, &der, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(chat_request(&authority)).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), resp.version()),
        (200, Version::HTTP_2)
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("chat.completion"));

    let tls = tls_connect(proxy.addr, &der, b"http/1.1").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = chat_request(&authority);
    *req.uri_mut() = "/v1/chat/completions".parse().unwrap();
    req.headers_mut().insert("host", authority.parse().unwrap());
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), resp.version()),
        (200, Version::HTTP_11)
    );

    // Plain HTTP to the TLS port is not served.
    let plain = client()
        .get(format!("http://{}/v1/models", proxy.addr).parse().unwrap())
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_https_upstream_works_once_its_ca_is_trusted() {
    trace_init();
    let (cert, key, _) = certificate("upstream");
    // The backend: an anteroom serving HTTPS in front of the simulator.
    let (sim, backend, client) = setup(sim_config(Mode::Batch), |c| https(c, &cert, &key)).await;
    let upstream = format!("https://127.0.0.1:{}", backend.addr.port());

    let trusting = proxy(&upstream, |c| {
        c.upstream_ca_file = cert.display().to_string()
    })
    .await;
    let resp = chat(&client, &trusting.url(), None, "via-tls", true, 3).await;
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8_lossy(&body_bytes(resp).await).into_owned();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(sim.stats().order, ["via-tls"]);

    // Only the webpki roots: the self-signed certificate is refused, 502.
    let wary = proxy(&upstream, |_| {}).await;
    let resp = chat(&client, &wary.url(), None, "refused", false, 3).await;
    assert_eq!(resp.status(), 502);
    let err = body_json(resp).await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{err}"
    );
    assert_eq!(sim.stats().order, ["via-tls"]);
}

#[test]
fn bad_certificate_files_are_refused_at_start_by_path() {
    let (cert, key, _) = certificate("bad");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let missing = dir.join("surely-missing.pem");
    let garbage = dir.join(format!("garbage-{}.pem", std::process::id()));
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let refused = |f: &dyn Fn(&mut FileConfig)| {
        let mut c = FileConfig::default();
        f(&mut c);
        c.validate()
            .and_then(|c| anteroom::app::build(&c))
            .unwrap_err()
            .0
    };
    let e = refused(&|c| https(c, &missing, &key));
    assert!(
        e.contains("tls_cert") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    let e = refused(&|c| https(c, &garbage, &key));
    assert!(e.contains(&garbage.display().to_string()), "{e}");
    let e = refused(&|c| https(c, &cert, &garbage));
    assert!(
        e.contains("tls_key") && e.contains(&garbage.display().to_string()),
        "{e}"
    );
    let e = refused(&|c| c.tls_cert = cert.display().to_string());
    assert!(e.contains("give both"), "{e}");
    let e = refused(&|c| c.upstream_ca_file = missing.display().to_string());
    assert!(
        e.contains("upstream_ca_file") && e.contains("surely-missing"),
        "{e}"
    );
    // A good pair is accepted.
    let mut c = FileConfig::default();
    https(&mut c, &cert, &key);
    let app = anteroom::app::build(&c.validate().unwrap()).unwrap();
    assert!(app.tls.is_some());
}
