//! The request log: one JSON object per line per request (JSONL).
//!
//! Records leave the request path through a bounded channel (`try_send`,
//! never a wait) to a writer on a thread of its own, which serialises them
//! and writes through a buffer, flushing whenever it has caught up. A slow
//! disk therefore never slows a request. If the writer falls so far behind
//! that the channel is full, the record is dropped, counted in
//! `anteroom_request_log_dropped_total`, and a warning is logged (the first
//! time and then every thousandth), never silently.
//!
//! [`RequestLog::flush`] waits until every record sent before it is on disk;
//! shutdown calls it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};

use super::record::Finished;

/// Records the channel holds before new ones are dropped.
pub(crate) const CAPACITY: usize = 65_536;

enum Msg {
    Record(Box<Finished>),
    Flush(oneshot::Sender<()>),
}

/// The sending side of the request log; cheap to share.
#[derive(Debug)]
pub struct RequestLog {
    tx: mpsc::Sender<Msg>,
    dropped: IntCounter,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Record(_) => "Record",
            Msg::Flush(_) => "Flush",
        })
    }
}

impl RequestLog {
    /// Open (append to, or create) `path` and start the writer thread.
    pub fn open(path: &Path, written: IntCounter, dropped: IntCounter) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Self::with_writer(file, CAPACITY, written, dropped)
    }

    fn with_writer(
        file: File,
        capacity: usize,
        written: IntCounter,
        dropped: IntCounter,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(capacity);
        let failed = dropped.clone();
        std::thread::Builder::new()
            .name("anteroom-request-log".into())
            .spawn(move || {
                write_loop(
                    rx,
                    BufWriter::with_capacity(64 * 1024, file),
                    written,
                    failed,
                )
            })?;
        Ok(Self { tx, dropped })
    }

    /// Hand a record to the writer, or count it as dropped.
    pub fn send(&self, record: Finished) {
        if let Err(e) = self.tx.try_send(Msg::Record(Box::new(record))) {
            self.dropped.inc();
            let n = self.dropped.get();
            if n == 1 || n % 1000 == 0 {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "the writer is behind",
                    mpsc::error::TrySendError::Closed(_) => "the writer stopped",
                };
                tracing::warn!(dropped = n, "request log record dropped: {why}");
            }
        }
    }

    /// Wait until every record sent before this call has been written and
    /// flushed.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }
}

fn write_loop(
    mut rx: mpsc::Receiver<Msg>,
    mut out: BufWriter<File>,
    written: IntCounter,
    failed: IntCounter,
) {
    let mut line = Vec::with_capacity(1024);
    let mut broken = false;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Record(r) => {
                line.clear();
                let ok = serde_json::to_writer(&mut line, &r.into_record()).is_ok() && {
                    line.push(b'\n');
                    out.write_all(&line).is_ok()
                };
                if ok {
                    written.inc();
                } else {
                    failed.inc();
                    if !broken {
                        broken = true;
                        tracing::error!("cannot write the request log; records are being dropped");
                    }
                }
            }
            Msg::Flush(ack) => {
                flush(&mut out, &mut broken);
                let _ = ack.send(());
            }
        }
        if rx.is_empty() {
            flush(&mut out, &mut broken);
        }
    }
    flush(&mut out, &mut broken);
}

fn flush(out: &mut BufWriter<File>, broken: &mut bool) {
    if let Err(e) = out.flush() {
        if !*broken {
            *broken = true;
            tracing::error!(error = %e, "cannot flush the request log");
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::io::Read;
    use std::time::SystemTime;

    use super::*;
    use crate::telemetry::record::{Outcome, Timings};
    use crate::telemetry::Tap;

    fn finished(i: usize) -> Finished {
        Finished {
            request_id: Some(http::HeaderValue::from_str(&format!("r{i}")).unwrap()),
            received: SystemTime::now(),
            method: http::Method::POST,
            uri: http::Uri::from_static("/v1/chat/completions"),
            tap: Tap::new(tokio::time::Instant::now(), false, None),
            client: None,
            priority: Some(0),
            stream: false,
            status: 200,
            error: None,
            outcome: Outcome::Ok,
            timings: Timings::default(),
        }
    }

    /// A writer stuck on a full pipe (a disk that stopped) never blocks the
    /// sender: what does not fit is dropped and counted, and the rest is
    /// written once the pipe drains.
    #[tokio::test]
    async fn a_stalled_writer_drops_and_counts_instead_of_blocking() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-fifo");
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join(format!("log-{}.fifo", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // The reader end first (it opens at once with a writer pending).
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::File::open(reader_path).unwrap());
        let file = OpenOptions::new().write(true).open(&fifo).unwrap();
        let mut reader = reader.join().unwrap();

        let written = IntCounter::new("w", "w").unwrap();
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = RequestLog::with_writer(file, 16, written.clone(), dropped.clone()).unwrap();
        // Nobody reads the pipe: its 64 KiB fill up, the writer blocks, the
        // channel's 16 places fill up, and the rest must be dropped.
        // (Were `send` to wait for the writer, this loop would never end.)
        const SENT: usize = 5_000;
        for i in 0..SENT {
            log.send(finished(i));
        }
        assert!(dropped.get() > 0, "a full channel drops");

        // Drain the pipe; everything taken gets written.
        let drain = std::thread::spawn(move || {
            let mut all = String::new();
            reader.read_to_string(&mut all).unwrap();
            all
        });
        log.flush().await;
        drop(log);
        let all = drain.join().unwrap();
        let lines = all.lines().count() as u64;
        assert_eq!(lines, written.get());
        assert_eq!(
            lines + dropped.get(),
            SENT as u64,
            "every record written or counted"
        );
        std::fs::remove_file(&fifo).unwrap();
    }
}
