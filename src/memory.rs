//! In-process connections: an upstream whose host ends in
//! [`HOST_SUFFIX`] is reached through a tokio duplex pipe instead of TCP.
//!
//! This is what lets the whole stack (server-side hyper, every layer, the
//! pooled upstream client, a simulator speaking real HTTP/1.1) run in one
//! process on tokio's paused clock: no socket, so no real time passes and
//! every figure a test reads is exact. `.invalid` is reserved (RFC 2606):
//! such a name never resolves, so no real upstream can be shadowed, and the
//! check costs one suffix comparison per new upstream connection.

use std::collections::HashMap;
use std::sync::OnceLock;

use parking_lot::Mutex;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

/// Hosts ending in this are in-process listeners.
pub const HOST_SUFFIX: &str = ".memory.invalid";

/// Bytes each direction of a pipe buffers (a socket's buffer, roughly).
const PIPE_BYTES: usize = 64 << 10;

type Listeners = Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>;

fn listeners() -> &'static Listeners {
    static LISTENERS: OnceLock<Listeners> = OnceLock::new();
    LISTENERS.get_or_init(Default::default)
}

/// Whether `host` names an in-process listener.
pub(crate) fn is_memory(host: &str) -> bool {
    host.ends_with(HOST_SUFFIX)
}

/// Accepts the connections made to its host; the host is free again once
/// it is dropped.
#[derive(Debug)]
pub struct Listener {
    host: String,
    rx: mpsc::UnboundedReceiver<DuplexStream>,
}

impl Listener {
    /// Listen on `host` (which must end in [`HOST_SUFFIX`]); None if
    /// something already does.
    pub fn bind(host: &str) -> Option<Self> {
        assert!(is_memory(host), "{host} does not end in {HOST_SUFFIX}");
        let mut all = listeners().lock();
        if all.get(host).is_some_and(|tx| !tx.is_closed()) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        all.insert(host.to_owned(), tx);
        Some(Self {
            host: host.to_owned(),
            rx,
        })
    }

    /// The next connection.
    pub async fn accept(&mut self) -> Option<DuplexStream> {
        self.rx.recv().await
    }

    /// The host it listens on.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        listeners().lock().remove(&self.host);
    }
}

/// Connect to the listener on `host`: refused when there is none.
pub fn connect(host: &str) -> std::io::Result<DuplexStream> {
    let all = listeners().lock();
    let tx = all.get(host).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "nothing listens")
    })?;
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    tx.send(theirs).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "nothing listens")
    })?;
    Ok(ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_pipe_connects_while_its_listener_lives() {
        let host = "unit.memory.invalid";
        let mut l = Listener::bind(host).expect("free");
        assert!(Listener::bind(host).is_none(), "taken");
        let mut ours = connect(host).unwrap();
        let mut theirs = l.accept().await.unwrap();
        ours.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        drop(l);
        let refused = connect(host).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(Listener::bind(host).is_some(), "free again");
    }
}
