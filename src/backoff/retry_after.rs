//! Reading an upstream's advice: `retry-after-ms` (milliseconds, as OpenAI
//! and anteroom send), else `Retry-After` in seconds or as an HTTP date.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};

/// The delay the upstream advises, if it says one.
pub fn parse(headers: &HeaderMap) -> Option<Duration> {
    if let Some(d) = headers.get("retry-after-ms").and_then(millis) {
        return Some(d);
    }
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(seconds_or_date)
}

/// A `retry-after-ms` value: milliseconds, finite and not negative.
pub fn millis(v: &HeaderValue) -> Option<Duration> {
    let ms = v.to_str().ok()?.trim().parse::<f64>().ok()?;
    if !ms.is_finite() || ms < 0.0 {
        return None;
    }
    // Any size the header can spell (`1e30`): past what a Duration holds
    // it is "longer than anyone waits", not a panic.
    Some(Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX))
}

/// A `Retry-After` value: whole seconds, or an HTTP date.
pub fn seconds_or_date(v: &HeaderValue) -> Option<Duration> {
    let v = v.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn milliseconds_win_over_seconds() {
        let m = h(&[("retry-after-ms", "1500"), ("retry-after", "7")]);
        assert_eq!(parse(&m), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse(&h(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse(&h(&[("retry-after", "soon")])), None);
        assert_eq!(parse(&HeaderMap::new()), None);
    }

    #[test]
    fn http_dates_are_read() {
        let later = SystemTime::now() + Duration::from_secs(30);
        let m = h(&[("retry-after", &httpdate::fmt_http_date(later))]);
        let d = parse(&m).unwrap();
        assert!(
            d > Duration::from_secs(28) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        let past = h(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(parse(&past), Some(Duration::ZERO));
    }

    #[test]
    fn advice_of_any_size_is_read_without_a_panic() {
        for huge in ["1e30", "1e300", "18446744073709551616000"] {
            assert_eq!(
                parse(&h(&[("retry-after-ms", huge)])),
                Some(Duration::MAX),
                "{huge}"
            );
        }
        // Not numbers: no advice, the seconds header is read instead.
        let m = h(&[("retry-after-ms", "inf"), ("retry-after", "2")]);
        assert_eq!(parse(&m), Some(Duration::from_secs(2)));
        assert_eq!(parse(&h(&[("retry-after-ms", "NaN")])), None);
        assert_eq!(parse(&h(&[("retry-after-ms", "-5")])), None);
    }
}
