//! The headers telemetry adds to admitted responses, and the stack buffer
//! their values are built in.

use std::time::Duration;

use http::header::HeaderName;

/// The W3C Server-Timing header.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// On an admitted response whose priority the key's `max_priority` clamped:
/// the priority it ran at.
pub const CLAMPED_HEADER: HeaderName = HeaderName::from_static("x-anteroom-priority-clamped");
/// The OpenAI SDKs' retry counter: above 0 on a client's own retry.
pub(super) const CLIENT_RETRY: HeaderName = HeaderName::from_static("x-stainless-retry-count");
/// Milliseconds the request spent queued (arrival → dispatch), on admitted
/// responses.
pub const QUEUE_MS_HEADER: HeaderName = HeaderName::from_static("x-anteroom-queue-ms");

/// A small header value built on the stack.
pub(super) struct Buf {
    bytes: [u8; 64],
    len: usize,
}

impl Buf {
    pub(super) fn new() -> Self {
        Self {
            bytes: [0; 64],
            len: 0,
        }
    }

    pub(super) fn push(&mut self, b: &[u8]) {
        let end = (self.len + b.len()).min(self.bytes.len());
        self.bytes[self.len..end].copy_from_slice(&b[..end - self.len]);
        self.len = end;
    }

    /// `d` as milliseconds with three decimals, e.g. `12.345`.
    pub(super) fn push_millis(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut digits = [0u8; 24];
        let mut i = digits.len();
        let mut n = us;
        for _ in 0..3 {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        i -= 1;
        digits[i] = b'.';
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_are_written_with_three_decimals() {
        for (us, want) in [
            (0, "0.000"),
            (7, "0.007"),
            (999, "0.999"),
            (12_345, "12.345"),
            (1_234_567_891, "1234567.891"),
        ] {
            let mut b = Buf::new();
            b.push_millis(Duration::from_micros(us));
            assert_eq!(std::str::from_utf8(b.as_bytes()).unwrap(), want);
        }
        let mut b = Buf::new();
        b.push(&[b'x'; 100]);
        assert_eq!(b.as_bytes().len(), 64, "never past the buffer");
    }
}
