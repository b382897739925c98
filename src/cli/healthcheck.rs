//! `anteroom healthcheck`: GET a /healthz URL, exit 0 on 200. For container
//! HEALTHCHECKs in images that have no curl or wget (distroless, scratch).

use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::BoxError;

/// Arguments of `anteroom healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The admin listener's health URL.
    #[arg(long, default_value = "http://127.0.0.1:8081/healthz")]
    pub url: String,
    /// Most time to wait for the answer.
    #[arg(long, default_value = "3s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

/// Check once: `Ok` on a 200, an error saying what went wrong otherwise.
pub async fn run(args: HealthcheckArgs) -> Result<(), BoxError> {
    let uri: http::Uri = args
        .url
        .parse()
        .map_err(|e| format!("`{}`: {e}", args.url))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{}` has no host", args.url))?
        .clone();
    let ask = async {
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host().trim_matches(|c| c == '[' || c == ']');
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        Ok::<_, BoxError>(resp.status())
    };
    match tokio::time::timeout(args.timeout, ask).await {
        Ok(Ok(status)) if status == http::StatusCode::OK => Ok(()),
        Ok(Ok(status)) => Err(format!("{}: {status}", args.url).into()),
        Ok(Err(e)) => Err(format!("{}: {}", args.url, crate::error::chain(&*e)).into()),
        Err(_) => Err(format!("{}: no answer within {:?}", args.url, args.timeout).into()),
    }
}
