//! A small header value built on the stack: numbers and durations written
//! by hand, since `format!` costs more than the rest of a layer.

use std::time::Duration;

use http::HeaderValue;

/// Up to 64 bytes of a header value; what would go past them is dropped.
#[derive(Debug)]
pub struct HeaderBuf {
    bytes: [u8; 64],
    len: usize,
}

impl Default for HeaderBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderBuf {
    /// An empty one.
    pub fn new() -> Self {
        Self {
            bytes: [0; 64],
            len: 0,
        }
    }

    /// Append `b` (as much of it as fits).
    pub fn push(&mut self, b: &[u8]) {
        let end = (self.len + b.len()).min(self.bytes.len());
        self.bytes[self.len..end].copy_from_slice(&b[..end - self.len]);
        self.len = end;
    }

    /// Append `n` in decimal.
    pub fn number(&mut self, n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = n;
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

    /// Append `d` as milliseconds with three decimals, e.g. `12.345`.
    pub fn millis(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.number(us / 1000);
        let frac = us % 1000;
        self.push(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    /// What is written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// It as a header value (`None` only if a byte pushed is not allowed
    /// in one).
    pub fn value(&self) -> Option<HeaderValue> {
        HeaderValue::from_bytes(self.as_bytes()).ok()
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
            let mut b = HeaderBuf::new();
            b.millis(Duration::from_micros(us));
            assert_eq!(std::str::from_utf8(b.as_bytes()).unwrap(), want);
        }
        let mut b = HeaderBuf::new();
        b.number(u64::MAX);
        assert_eq!(b.as_bytes(), u64::MAX.to_string().as_bytes());
        let mut b = HeaderBuf::new();
        b.push(&[b'x'; 100]);
        assert_eq!(b.as_bytes().len(), 64, "never past the buffer");
    }
}
