//! Layer 3 of 8 (after telemetry, before classify): who is asking (tenants
//! and API keys).
//!
//! With `[[key]]`s configured, every request must present one, as
//! `Authorization: Bearer …` or `x-api-key: …`; a missing or wrong key is a
//! 401 in the OpenAI error shape (`invalid_api_key`). Keys are never kept
//! in the config in plain text: each is given as its SHA-256 (hex) or as the
//! name of an environment variable that holds it. The presented key is
//! hashed and looked up by its digest; the hit is confirmed in constant time.
//! The key's name becomes the request's tenant (in its record); its
//! `default_priority` and `max_priority` (the most urgent it may ask for)
//! apply in [`classify`](crate::classify). The client's key is not
//! forwarded: it is anteroom's, not the backend's.
//!
//! With no keys configured anteroom is open (fine on loopback; the server
//! warns when it listens elsewhere without keys).

use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, AUTHORIZATION};
use http::Request;
use tower::{Layer, Service};

use crate::config::KeySetting;
use crate::error::{RateLimited, Unauthorized};
use crate::telemetry::Tap;
use crate::types::tokens::Limiter;
use crate::types::{digest, Allowance, ClientAddr, Priority, Share, Tenant, TokenBudget};
use crate::BoxError;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// One configured key, resolved.
#[derive(Clone, Debug)]
pub struct Key {
    /// Its name: the tenant.
    pub name: Arc<str>,
    /// SHA-256 of the secret.
    pub digest: [u8; 32],
    /// Priority of its requests that name none.
    pub default_priority: Option<Priority>,
    /// The most urgent priority it may ask for; more urgent is clamped.
    pub max_priority: Option<Priority>,
    /// Its requests-per-minute limit (governor's GCRA), if any.
    pub limiter: Option<Arc<Limiter>>,
    /// Its share in fair queuing (weight, cap of requests in flight).
    pub share: Share,
    /// Its tokens-per-minute limit, if any.
    pub tokens: Option<Arc<TokenBudget>>,
    /// Its requests-per-minute limit as configured (for /status).
    pub requests_per_minute: Option<u32>,
    /// Requests refused by either limit, since start.
    pub rate_limited: Arc<std::sync::atomic::AtomicU64>,
}

impl Key {
    /// The key `setting` describes, its limiters new.
    pub fn new(setting: &KeySetting) -> Self {
        Self {
            name: setting.name.clone(),
            digest: setting.digest,
            default_priority: setting.default_priority,
            max_priority: setting.max_priority,
            limiter: setting.requests_per_minute.and_then(Key::limiter),
            share: setting.share.clone(),
            tokens: setting.tokens_per_minute.and_then(TokenBudget::new),
            requests_per_minute: setting.requests_per_minute,
            rate_limited: Default::default(),
        }
    }

    /// Its state for /status: limits, refusals, and the token correction
    /// carried to the next charge. No secret.
    pub fn status(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "name": &*self.name,
            "weight": self.share.weight,
            "max_in_flight": (self.share.max_in_flight > 0).then_some(self.share.max_in_flight),
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens.as_ref().map(|t| t.per_minute().get()),
            "token_credit": self.tokens.as_ref().map(|t| -t.owed()),
            "rate_limited": self.rate_limited.load(Relaxed),
        })
    }

    /// A limiter for `per_minute` requests a minute (0: none).
    pub fn limiter(per_minute: u32) -> Option<Arc<Limiter>> {
        let n = std::num::NonZeroU32::new(per_minute)?;
        Some(Arc::new(crate::types::tokens::limiter(n)))
    }
}

/// Equal, in time independent of where they differ (`subtle`'s
/// comparison, which the optimiser cannot turn into an early exit).
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// The configured keys, found by the digest of the presented secret.
///
/// A lookup is one SHA-256 and one hash-map probe, whatever the number of
/// keys (it used to compare with every key). The map is keyed by digests,
/// so its timing can tell at most something of the digest of a guess, which
/// says nothing of any configured secret; the hit is confirmed with a
/// constant-time comparison all the same.
#[derive(Debug, Default)]
pub struct Keys {
    list: Vec<Key>,
    by_digest: std::collections::HashMap<[u8; 32], usize>,
}

impl Keys {
    /// Index `list` (names and digests are unique: the config refuses
    /// either given twice; were one given twice, the first key would win).
    pub fn new(list: Vec<Key>) -> Self {
        let mut by_digest = std::collections::HashMap::with_capacity(list.len());
        for (i, k) in list.iter().enumerate() {
            by_digest.entry(k.digest).or_insert(i);
        }
        Self { list, by_digest }
    }

    /// The key whose secret is `secret`.
    pub fn find(&self, secret: &[u8]) -> Option<&Key> {
        let d = digest(secret);
        let k = &self.list[*self.by_digest.get(&d)?];
        same(&k.digest, &d).then_some(k)
    }

    /// No keys: anteroom is open.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every key, in config order.
    pub fn as_slice(&self) -> &[Key] {
        &self.list
    }
}

/// The keys, replaceable while serving (a config reload): each request
/// reads the current set, lock-free.
pub type SharedKeys = Arc<arc_swap::ArcSwap<Keys>>;

/// The reloaded keys, with the state of every key that stays the same
/// carried over from `old`: its refusal count, and its limiters when its
/// limits did not change, so a reload neither resets a key's rate limit
/// nor forgets its token credit.
pub fn carry_over(old: &[Key], mut new: Vec<Key>) -> Vec<Key> {
    for k in &mut new {
        let Some(o) = old.iter().find(|o| o.name == k.name) else {
            continue;
        };
        k.rate_limited = o.rate_limited.clone();
        if k.requests_per_minute == o.requests_per_minute {
            k.limiter = o.limiter.clone();
        }
        let per_minute = |t: &Option<Arc<TokenBudget>>| t.as_ref().map(|t| t.per_minute());
        if per_minute(&k.tokens) == per_minute(&o.tokens) {
            k.tokens = o.tokens.clone();
        }
    }
    new
}

/// Builds [`Auth`] services.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    keys: SharedKeys,
}

impl AuthLayer {
    /// Check requests against `keys` (none: everything passes).
    pub fn new(keys: Vec<Key>) -> Self {
        Self::shared(Arc::new(arc_swap::ArcSwap::from_pointee(Keys::new(keys))))
    }

    /// Check requests against whatever keys `keys` holds at each request.
    pub fn shared(keys: SharedKeys) -> Self {
        Self { keys }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// Checks API keys: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    keys: SharedKeys,
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let keys = self.keys.load();
        if keys.is_empty() {
            return ResponseFuture::inner(self.inner.call(req));
        }
        let presented = presented_key(&req);
        let found = presented
            .as_ref()
            .and_then(|secret| keys.find(secret.as_bytes()));
        let Some(key) = found else {
            let why = if presented.is_some() {
                "the API key is not valid"
            } else {
                "an API key is required (Authorization: Bearer … or x-api-key)"
            };
            // Seen by an operator (info): a wrong key is a client's
            // mistake or a probe; never the key itself.
            tracing::info!(
                client = ?req.extensions().get::<ClientAddr>().map(|c| c.addr().ip()),
                path = req.uri().path(),
                why,
                "request refused: 401"
            );
            return ResponseFuture::refused(Unauthorized::new(why));
        };
        let tap = req.extensions().get::<Tap>();
        if let Some(tap) = tap {
            tap.set_tenant(key.name.clone());
            if let Some(t) = &key.tokens {
                tap.set_tokens_limit(t.per_minute().get());
            }
        }
        if let Some(limiter) = &key.limiter {
            match limiter.check() {
                Ok(state) => {
                    if let (Some(tap), Some(rpm)) = (tap, key.requests_per_minute) {
                        let left = state.remaining_burst_capacity();
                        tap.set_key_allowance(Allowance::per_minute(rpm, left));
                    }
                }
                Err(not_until) => {
                    // The limiter's own answer of when this request would pass.
                    let wait = crate::types::tokens::wait_until(&not_until);
                    key.rate_limited
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let (Some(tap), Some(rpm)) = (tap, key.requests_per_minute) {
                        tap.set_key_allowance(Allowance::exhausted(rpm, wait));
                    }
                    return ResponseFuture::refused(RateLimited::requests(wait));
                }
            }
        }
        // The key is anteroom's: it does not go on to the backend.
        req.headers_mut().remove(AUTHORIZATION);
        req.headers_mut().remove(X_API_KEY);
        req.extensions_mut().insert(Tenant {
            name: key.name.clone(),
            default_priority: key.default_priority,
            max_priority: key.max_priority,
            share: key.share.clone(),
            tokens: key.tokens.clone(),
            rate_limited: key.rate_limited.clone(),
            requests_per_minute: key.requests_per_minute,
        });
        ResponseFuture::inner(self.inner.call(req))
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme in any
/// case (RFC 9110 §11.1: `BEARER` is `Bearer`).
pub(crate) fn bearer_token(v: &http::HeaderValue) -> Option<&str> {
    let v = v.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pub(crate) fn presented_key<B>(req: &Request<B>) -> Option<String> {
    if let Some(v) = req.headers().get(AUTHORIZATION) {
        return bearer_token(v).map(str::to_owned);
    }
    let v = req.headers().get(X_API_KEY)?.to_str().ok()?;
    Some(v.trim().to_owned())
}

pin_project_lite::pin_project! {
    /// Response future of [`Auth`]: the inner service's, or a refusal
    /// (401, 429) decided before it was called. Our own, as
    /// `tower::util::Either`'s future needs both sides to have one output
    /// type, and the inner error is not yet a `BoxError`.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Inner { #[pin] inner: F },
        Refused { #[pin] refused: std::future::Ready<Result<T, BoxError>> },
    }
}

impl<F, T> ResponseFuture<F, T> {
    fn inner(inner: F) -> Self {
        Self {
            kind: Kind::Inner { inner },
        }
    }

    fn refused(e: impl Into<BoxError>) -> Self {
        Self {
            kind: Kind::Refused {
                refused: std::future::ready(Err(e.into())),
            },
        }
    }
}

impl<F, T, E> std::future::Future for ResponseFuture<F, T>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { inner } => inner.poll(cx).map_err(Into::into),
            KindProj::Refused { refused } => refused.poll(cx),
        }
    }
}

impl<F, T> std::fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("auth::ResponseFuture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::parse_hex_digest;

    #[test]
    fn digests_parse_and_compare() {
        let d = digest(b"sk-test");
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_hex_digest(&hex), Some(d));
        assert_eq!(parse_hex_digest("abc"), None);
        assert!(same(&d, &d));
        assert!(!same(&d, &digest(b"sk-tesT")));
    }

    #[test]
    fn keys_are_found_by_digest_and_only_by_their_secret() {
        let keys = Keys::new((0..100).map(|i| key(&format!("k{i}"), 0, 0)).collect());
        // key() uses the name as the secret.
        assert_eq!(keys.find(b"k0").map(|k| &*k.name), Some("k0"));
        assert_eq!(keys.find(b"k57").map(|k| &*k.name), Some("k57"));
        assert_eq!(keys.find(b"k99").map(|k| &*k.name), Some("k99"));
        assert!(keys.find(b"k100").is_none());
        assert!(keys.find(b"K5").is_none());
        assert!(keys.find(b"").is_none());
        assert!(Keys::default().find(b"k0").is_none());
        // A digest given twice resolves to the first key in config order.
        let twice = Keys::new(vec![
            key("a", 0, 0),
            Key {
                name: "b".into(),
                ..key("a", 0, 0)
            },
        ]);
        assert_eq!(twice.find(b"a").map(|k| &*k.name), Some("a"));
    }

    fn key(name: &str, rpm: u32, tpm: u32) -> Key {
        Key::new(&KeySetting {
            name: name.into(),
            digest: digest(name.as_bytes()),
            default_priority: None,
            max_priority: None,
            requests_per_minute: Some(rpm),
            tokens_per_minute: Some(tpm),
            share: Share::default(),
        })
    }

    #[test]
    fn a_reload_keeps_the_limiter_state_of_keys_that_stay() {
        let old = vec![key("a", 10, 1000), key("b", 10, 1000)];
        let new = carry_over(
            &old,
            vec![key("a", 10, 1000), key("b", 20, 1000), key("c", 1, 1)],
        );
        let same = |x: &Option<Arc<Limiter>>, y: &Option<Arc<Limiter>>| {
            Arc::ptr_eq(x.as_ref().unwrap(), y.as_ref().unwrap())
        };
        assert!(same(&new[0].limiter, &old[0].limiter), "unchanged: kept");
        assert!(
            !same(&new[1].limiter, &old[1].limiter),
            "new rate: a new limiter"
        );
        assert!(Arc::ptr_eq(
            new[1].tokens.as_ref().unwrap(),
            old[1].tokens.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(&new[1].rate_limited, &old[1].rate_limited));
    }

    #[test]
    fn keys_are_read_from_either_header() {
        let r = Request::builder()
            .header("authorization", "Bearer sk-1")
            .body(())
            .unwrap();
        assert_eq!(presented_key(&r).as_deref(), Some("sk-1"));
        let r = Request::builder()
            .header("x-api-key", "sk-2")
            .body(())
            .unwrap();
        assert_eq!(presented_key(&r).as_deref(), Some("sk-2"));
        let r = Request::builder()
            .header("authorization", "Basic x")
            .body(())
            .unwrap();
        assert_eq!(presented_key(&r), None);
    }
}
