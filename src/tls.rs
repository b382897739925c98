//! TLS with rustls (ring as the crypto provider): the HTTPS listener and
//! `https://` upstreams.
//!
//! - The listener (`tls_cert`, `tls_key`: PEM files) offers HTTP/2 and
//!   HTTP/1.1 by ALPN. The handshake runs in the connection's own task,
//!   bounded by `header_read_timeout`, so a client that stalls it holds
//!   nothing but its own socket.
//! - An upstream may be `https://`: its certificate is checked against the
//!   webpki roots (Mozilla's), plus the CAs of `upstream_ca_file` so a
//!   self-signed backend works. ALPN offers HTTP/1.1 only: upstream
//!   connections are HTTP/1.1.
//!
//! Files that are missing, unreadable or hold no usable certificate or key
//! are refused at start with their path in the message.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    std::fs::metadata(path).map_err(|e| format!("{what} `{shown}`: {e}"))?;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} `{shown}`: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} `{shown}`: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} `{shown}`: no certificate in it"));
    }
    Ok(certs)
}

/// The listener's TLS settings from a certificate chain and its key.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = certs(cert, "tls_cert")?;
    let shown = key.display();
    std::fs::metadata(key).map_err(|e| format!("tls_key `{shown}`: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("tls_key `{shown}`: no PEM private key in it ({e})"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls_cert / tls_key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The settings for `https://` upstreams: the webpki roots, plus the CAs in
/// `extra_ca` if given.
pub(crate) fn client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in certs(path, "upstream_ca_file")? {
            roots
                .add(cert)
                .map_err(|e| format!("upstream_ca_file `{}`: {e}", path.display()))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How to reach an `https://` upstream: the settings and the name its
/// certificate must carry.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl UpstreamTls {
    /// For the host `host` (a DNS name or an IP address).
    pub fn new(config: Arc<rustls::ClientConfig>, host: &str) -> Result<Self, String> {
        let host = host.trim_matches(|c| c == '[' || c == ']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("`{host}` cannot be checked against a certificate: {e}"))?;
        Ok(Self { config, name })
    }

    /// Run the handshake over `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await?;
        Ok(Stream::ClientTls(Box::new(tls)))
    }
}

/// A connection, plain or TLS (client or server side).
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS to an upstream.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS from a client.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// An in-process pipe (see [`memory`](crate::memory)).
    Memory(tokio::io::DuplexStream),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::ClientTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Stream::ServerTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Stream::Memory($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::Memory(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}
