//! OpenAI's rate-limit headers: what a client may still send before it is
//! refused, so clients that pace themselves by them (curator, LiteLLM)
//! pace to what anteroom takes.
//!
//! Two allowances, each told as `limit`, `remaining` and `reset`:
//! **requests** (a key's `requests_per_minute`, and the room of the queue
//! the request stood in) and **tokens** (a key's `tokens_per_minute`).

use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

use super::HeaderBuf;

/// `x-ratelimit-limit-requests`.
pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
/// `x-ratelimit-remaining-requests`.
pub const REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-reset-requests`.
pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
/// `x-ratelimit-limit-tokens`.
pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
/// `x-ratelimit-remaining-tokens`.
pub const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `x-ratelimit-reset-tokens`.
pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// One allowance: how much it holds when whole, how much is left, and how
/// long until it is whole again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    /// What it holds when whole.
    pub limit: u32,
    /// What is left now.
    pub remaining: u32,
    /// Until it is whole again.
    pub reset: Duration,
}

impl Allowance {
    /// A per-minute allowance (governor's GCRA: whole, it takes `limit` at
    /// once, and it refills one every minute ÷ `limit`) with `remaining`
    /// left: whole again after the missing ones have refilled.
    pub fn per_minute(limit: u32, remaining: u32) -> Self {
        let remaining = remaining.min(limit);
        let missing = u64::from(limit - remaining);
        let reset = match limit {
            0 => Duration::ZERO,
            n => Duration::from_nanos(missing * 60_000_000_000 / u64::from(n)),
        };
        Self {
            limit,
            remaining,
            reset,
        }
    }

    /// Nothing left until `wait` has passed (a refusal by this allowance).
    pub fn exhausted(limit: u32, wait: Duration) -> Self {
        let whole = Self::per_minute(limit, 0).reset;
        Self {
            limit,
            remaining: 0,
            reset: wait.max(whole),
        }
    }

    /// This allowance, and no more than `other` leaves (a key's requests
    /// within the queue's room): the key's limit, the smaller remaining,
    /// and whole again when both are.
    pub fn within(self, other: Allowance) -> Self {
        Self {
            limit: self.limit,
            remaining: self.remaining.min(other.remaining),
            reset: self.reset.max(other.reset),
        }
    }
}

/// The rate-limit headers of a response. `tokens_limit` alone (a key with
/// a tokens budget whose request was never charged): only
/// `x-ratelimit-limit-tokens`.
pub fn write(
    headers: &mut HeaderMap,
    requests: Option<Allowance>,
    tokens: Option<Allowance>,
    tokens_limit: Option<u32>,
) {
    if let Some(a) = requests {
        put(
            headers,
            [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS],
            a,
        );
    }
    match (tokens, tokens_limit) {
        (Some(a), _) => put(headers, [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS], a),
        (None, Some(limit)) => {
            headers.insert(LIMIT_TOKENS, HeaderValue::from(limit));
        }
        (None, None) => {}
    }
}

fn put(headers: &mut HeaderMap, [limit, remaining, reset]: [HeaderName; 3], a: Allowance) {
    headers.insert(limit, HeaderValue::from(a.limit));
    headers.insert(remaining, HeaderValue::from(a.remaining));
    if let Some(v) = go_duration(a.reset).value() {
        headers.insert(reset, v);
    }
}

/// `d` as OpenAI writes its resets (Go's duration format: `0s`, `250ms`,
/// `1.5s`, `6m0s`, `1h2m3s`), rounded up to the millisecond so a client
/// that waits it is never early.
fn go_duration(d: Duration) -> HeaderBuf {
    let ms = d.as_nanos().div_ceil(1_000_000).min(u128::from(u64::MAX)) as u64;
    let mut w = HeaderBuf::new();
    if ms == 0 {
        w.push(b"0s");
    } else if ms < 1000 {
        w.number(ms);
        w.push(b"ms");
    } else {
        let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        if h > 0 {
            w.number(h);
            w.push(b"h");
        }
        if h > 0 || m > 0 {
            w.number(m);
            w.push(b"m");
        }
        w.number(s);
        if frac > 0 {
            let digits = [
                b'0' + (frac / 100) as u8,
                b'0' + (frac / 10 % 10) as u8,
                b'0' + (frac % 10) as u8,
            ];
            let keep = 3 - digits.iter().rev().take_while(|&&c| c == b'0').count();
            w.push(b".");
            w.push(&digits[..keep]);
        }
        w.push(b"s");
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(d: Duration) -> String {
        String::from_utf8(go_duration(d).as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn resets_are_written_as_openai_writes_them() {
        for (d, want) in [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1), "1ms"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1000), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(7660), "7.66s"),
            (Duration::from_millis(67_500), "1m7.5s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_secs(3600 + 120 + 3), "1h2m3s"),
            (Duration::from_secs(7200), "2h0m0s"),
        ] {
            assert_eq!(go(d), want, "{d:?}");
        }
        // Never shorter than the wait: 1.0001 s is 1.001 s.
        assert_eq!(go(Duration::from_micros(1_000_100)), "1.001s");
        assert!(go(Duration::MAX).ends_with('s'));
    }

    #[test]
    fn a_per_minute_allowance_refills_what_is_missing() {
        let a = Allowance::per_minute(60, 45);
        assert_eq!((a.limit, a.remaining), (60, 45));
        assert_eq!(a.reset, Duration::from_secs(15));
        assert_eq!(Allowance::per_minute(60, 60).reset, Duration::ZERO);
        // More left than the limit (a credit) is the limit.
        assert_eq!(Allowance::per_minute(10, 99).remaining, 10);
        assert_eq!(Allowance::per_minute(0, 0).reset, Duration::ZERO);
        let refused = Allowance::exhausted(60, Duration::from_millis(400));
        assert_eq!(refused.remaining, 0);
        assert_eq!(
            refused.reset,
            Duration::from_secs(60),
            "whole again in a minute"
        );
        // The queue's room bounds a key's allowance.
        let room = Allowance {
            limit: 5,
            remaining: 2,
            reset: Duration::from_secs(90),
        };
        let both = a.within(room);
        assert_eq!((both.limit, both.remaining), (60, 2));
        assert_eq!(both.reset, Duration::from_secs(90));
    }

    #[test]
    fn headers_carry_both_allowances() {
        let mut h = HeaderMap::new();
        write(
            &mut h,
            Some(Allowance::per_minute(60, 59)),
            None,
            Some(1000),
        );
        assert_eq!(h[&LIMIT_REQUESTS], "60");
        assert_eq!(h[&REMAINING_REQUESTS], "59");
        assert_eq!(h[&RESET_REQUESTS], "1s");
        assert_eq!(h[&LIMIT_TOKENS], "1000");
        assert!(h.get(&REMAINING_TOKENS).is_none());
        write(&mut h, None, Some(Allowance::per_minute(1000, 250)), None);
        assert_eq!(h[&REMAINING_TOKENS], "250");
        assert_eq!(h[&RESET_TOKENS], "45s");
    }
}
