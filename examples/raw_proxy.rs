//! How cheap an HTTP/1.1 reverse proxy can be on tokio without hyper: the
//! floor under a codec of our own, measured by the overhead bench beside
//! anteroom, the bare hyper proxy and nginx.
//!
//! It parses each request and response head with httparse, adds
//! `x-forwarded-for`, and relays the body bytes as they come (a chunked
//! body is walked to find its end, not decoded and re-encoded). One
//! upstream connection per client connection, kept alive: under the bench's
//! keep-alive load that is what a pool hands out. It is a measuring stick,
//! not a proxy to deploy: no hop-by-hop header handling, no chunked request
//! bodies, no timeouts, no error responses (a failure closes the
//! connection).
//!
//! `cargo run --release --example raw_proxy -- LISTEN UPSTREAM [WORKERS]`

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "support/workers.rs"]
mod workers;

const MAX_HEADERS: usize = 64;
const BUF: usize = 8192;

fn main() {
    workers::run("raw_proxy", |upstream| {
        let upstream: SocketAddr = upstream.parse().expect("UPSTREAM is host:port");
        move |stream, peer| async move {
            let _ = serve(stream, upstream, peer).await;
        }
    });
}

/// Serve one client connection until it closes.
async fn serve(mut client: TcpStream, upstream: SocketAddr, peer: SocketAddr) -> io::Result<()> {
    let mut up: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(BUF);
    let mut ubuf = Vec::with_capacity(BUF);
    let mut out = Vec::with_capacity(BUF);
    let xff = format!("x-forwarded-for: {}\r\n\r\n", peer.ip());
    loop {
        // The request head, then its body (Content-Length only).
        let (head, body) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf).map_err(invalid)? {
                httparse::Status::Complete(n) => break (n, content_length(req.headers)?),
                httparse::Status::Partial => {
                    if read_more(&mut client, &mut buf).await? == 0 {
                        return Ok(());
                    }
                }
            }
        };
        while buf.len() < head + body {
            if read_more(&mut client, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        out.clear();
        out.extend_from_slice(&buf[..head - 2]);
        out.extend_from_slice(xff.as_bytes());
        out.extend_from_slice(&buf[head..head + body]);
        buf.drain(..head + body);
        // A kept-alive upstream connection may have been closed since its
        // last use: then reconnect and send again, once.
        let mut reused = up.is_some();
        let (conn, head, mut framing) = loop {
            let conn = match up.take() {
                Some(c) => c,
                None => {
                    let c = TcpStream::connect(upstream).await?;
                    c.set_nodelay(true)?;
                    c
                }
            };
            let conn = up.insert(conn);
            ubuf.clear();
            match exchange(conn, &out, &mut ubuf).await {
                Ok((head, framing)) => break (conn, head, framing),
                Err(_) if reused => {
                    up = None;
                    reused = false;
                }
                Err(e) => return Err(e),
            }
        };
        let mut from = head;
        loop {
            // How much of what is buffered belongs to this response.
            let end = match &mut framing {
                Framing::Length(left) => {
                    let take = (*left).min(ubuf.len() - from);
                    *left -= take;
                    (*left == 0).then_some(from + take)
                }
                Framing::Chunked(chunks) => chunks.walk(&ubuf[from..]).map(|n| from + n),
            };
            client.write_all(&ubuf[..end.unwrap_or(ubuf.len())]).await?;
            if end.is_some() {
                // What follows is the next exchange's, which starts afresh.
                break;
            }
            ubuf.clear();
            from = 0;
            if read_more(conn, &mut ubuf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Send a request; read the response head into `ubuf`: its length and the
/// body's framing.
async fn exchange(
    conn: &mut TcpStream,
    request: &[u8],
    ubuf: &mut Vec<u8>,
) -> io::Result<(usize, Framing)> {
    conn.write_all(request).await?;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(ubuf).map_err(invalid)? {
            httparse::Status::Complete(n) => {
                let chunked = resp.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        && h.value.eq_ignore_ascii_case(b"chunked")
                });
                let framing = if chunked {
                    Framing::Chunked(Chunks::default())
                } else {
                    Framing::Length(content_length(resp.headers)?)
                };
                return Ok((n, framing));
            }
            httparse::Status::Partial => {
                if read_more(conn, ubuf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

/// Read what the socket has onto the end of `buf`.
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < BUF / 2 {
        buf.reserve(BUF);
    }
    s.read_buf(buf).await
}

fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<usize> {
    match headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        None => Ok(0),
        Some(h) => std::str::from_utf8(h.value)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| invalid("bad content-length")),
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

enum Framing {
    /// Body bytes still to come.
    Length(usize),
    Chunked(Chunks),
}

/// Where a chunked body ends, found by walking its framing as bytes pass.
#[derive(Default)]
struct Chunks {
    state: State,
    size: usize,
}

#[derive(Default, Clone, Copy)]
enum State {
    /// Hex digits of a chunk size.
    #[default]
    Size,
    /// Chunk extensions, up to the size line's LF.
    SizeLine,
    /// Chunk data and its CRLF (`size` bytes left, the CRLF included).
    Data,
    /// After the last chunk: trailer lines; `size` counts the bytes of the
    /// current line.
    Trailer,
}

impl Chunks {
    /// Walk `b`; the offset just past the body's end, if it is in `b`.
    fn walk(&mut self, b: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < b.len() {
            match self.state {
                State::Size => match (b[i] as char).to_digit(16) {
                    Some(d) => {
                        self.size = self.size * 16 + d as usize;
                        i += 1;
                    }
                    None => self.state = State::SizeLine,
                },
                State::SizeLine => {
                    let lf = memchr::memchr(b'\n', &b[i..])?;
                    i += lf + 1;
                    if self.size == 0 {
                        self.state = State::Trailer;
                    } else {
                        self.size += 2;
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let take = self.size.min(b.len() - i);
                    self.size -= take;
                    i += take;
                    if self.size == 0 {
                        self.state = State::Size;
                    }
                }
                State::Trailer => {
                    if b[i] == b'\n' {
                        if self.size <= 1 {
                            *self = Self::default();
                            return Some(i + 1);
                        }
                        self.size = 0;
                    } else {
                        self.size += 1;
                    }
                    i += 1;
                }
            }
        }
        None
    }
}
