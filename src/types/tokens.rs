//! Token budgets: what a key may spend and what a request was charged.

use std::sync::Arc;
use std::time::Duration;

/// A key's tokens-per-minute limit: governor's GCRA over tokens, charged an
/// estimate when a request is admitted and corrected from the response's
/// real `usage` when it ends.
///
/// governor can neither refund nor go into debt, so corrections are kept
/// aside: a request that used fewer tokens than charged leaves a credit that
/// the next charges use first, one that used more leaves a debt added to the
/// next charge. Both are bounded by one minute's tokens, so a long quiet
/// spell of over-estimates cannot bank a burst bigger than the limit itself.
#[derive(Debug)]
pub struct TokenBudget {
    limiter: Limiter,
    per_minute: std::num::NonZeroU32,
    /// Tokens owed (positive) or credited (negative) by corrections.
    adjust: std::sync::atomic::AtomicI64,
    /// The same, for the cluster's shared budget (cluster mode): corrections
    /// of charges made in Redis, due there with this replica's next charge
    /// for the key or its next heartbeat.
    shared: std::sync::atomic::AtomicI64,
}

impl TokenBudget {
    /// A budget of `per_minute` tokens a minute (0: none).
    pub fn new(per_minute: u32) -> Option<Arc<Self>> {
        let per_minute = std::num::NonZeroU32::new(per_minute)?;
        Some(Arc::new(Self {
            limiter: limiter(per_minute),
            per_minute,
            adjust: std::sync::atomic::AtomicI64::new(0),
            shared: std::sync::atomic::AtomicI64::new(0),
        }))
    }

    /// Charge `estimate` tokens (plus any debt, less any credit); `Ok`
    /// holds the tokens left after it (credit counted). Over the limit: the
    /// limiter's answer of how long until the charge would pass. A charge
    /// larger than a whole minute's tokens is cut to one minute's, so a
    /// huge request waits for a full bucket rather than forever.
    pub fn charge(&self, estimate: u64) -> Result<u32, Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        let adjust = self.adjust.swap(0, Relaxed);
        let due = i64::try_from(estimate)
            .unwrap_or(i64::MAX)
            .saturating_add(adjust);
        if due <= 0 {
            // Paid from credit; what is left stays. governor cannot be
            // read without a charge: one token is taken to see what the
            // bucket holds, and given back as credit.
            let left = match self.limiter.check() {
                Ok(state) => {
                    self.add(due - 1);
                    state.remaining_burst_capacity()
                }
                Err(_) => {
                    self.add(due);
                    0
                }
            };
            return Ok(self.with_credit(left));
        }
        let cap = self.per_minute.get();
        let n = u32::try_from(due).unwrap_or(cap).min(cap);
        let n = std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        match self.limiter.check_n(n) {
            Ok(Ok(state)) => Ok(self.with_credit(state.remaining_burst_capacity())),
            Ok(Err(not_until)) => {
                // Nothing was charged: the adjustment stays due.
                self.add(adjust);
                Err(wait_until(&not_until))
            }
            // Cannot happen (n is at most the burst); treat it as a minute.
            Err(_) => {
                self.add(adjust);
                Err(Duration::from_secs(60))
            }
        }
    }

    /// `left` in the bucket, plus the credit (less the debt) the next
    /// charge uses, within a minute's tokens.
    fn with_credit(&self, left: u32) -> u32 {
        let total = i64::from(left) - self.owed();
        total.clamp(0, i64::from(self.per_minute.get())) as u32
    }

    /// Its limit: tokens a minute.
    pub fn per_minute(&self) -> std::num::NonZeroU32 {
        self.per_minute
    }

    /// Tokens owed by corrections (negative: credited), due with the next
    /// charge.
    pub fn owed(&self) -> i64 {
        self.adjust.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most one charge counts: a minute's tokens (see [`charge`](Self::charge)).
    pub(crate) fn largest_charge(&self) -> u64 {
        u64::from(self.per_minute.get())
    }

    /// A request charged `charged` tokens turned out to use `used`; with
    /// `shared`, the cluster's budget was charged too and is corrected
    /// alike.
    pub(crate) fn correct(&self, charged: u64, used: u64, shared: bool) {
        let diff = i64::try_from(used)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(charged).unwrap_or(i64::MAX));
        self.add(diff);
        if shared {
            self.owe_shared(diff);
        }
    }

    /// Take the correction due to the cluster's budget (it is sent now).
    pub(crate) fn take_shared(&self) -> i64 {
        self.shared.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// `n` more owed to the cluster's budget (a correction, or one taken
    /// that could not be sent).
    pub(crate) fn owe_shared(&self, n: i64) {
        Self::bounded_add(&self.shared, n, self.per_minute);
    }

    fn add(&self, n: i64) {
        Self::bounded_add(&self.adjust, n, self.per_minute);
    }

    fn bounded_add(to: &std::sync::atomic::AtomicI64, n: i64, per_minute: std::num::NonZeroU32) {
        use std::sync::atomic::Ordering::Relaxed;
        let bound = i64::from(per_minute.get());
        let _ = to.fetch_update(Relaxed, Relaxed, |a| {
            Some(a.saturating_add(n).clamp(-bound, bound))
        });
    }
}

/// A requests- or tokens-per-minute limiter that tells what it has left
/// when it lets one through (governor's state-information middleware: the
/// same GCRA, with a snapshot of the bucket on each positive decision).
pub type Limiter = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
    governor::middleware::StateInformationMiddleware,
>;

/// How long from now until a limiter's refusal `not_until` would pass:
/// the limiter's own answer.
pub fn wait_until(not_until: &governor::NotUntil<governor::clock::QuantaInstant>) -> Duration {
    use governor::clock::Clock;
    not_until.wait_time_from(governor::clock::DefaultClock::default().now())
}

/// A limiter of `per_minute` a minute: bursts up to it, then one every
/// minute ÷ `per_minute`.
pub fn limiter(per_minute: std::num::NonZeroU32) -> Limiter {
    governor::RateLimiter::direct(governor::Quota::per_minute(per_minute))
        .with_middleware::<governor::middleware::StateInformationMiddleware>()
}

/// The tokens a request was charged, kept in its
/// [`Tap`](crate::telemetry::Tap) until it ends.
#[derive(Debug)]
pub struct TokenCharge {
    /// The key's budget.
    pub budget: Arc<TokenBudget>,
    /// Tokens charged on admission.
    pub charged: u64,
    /// Of which, the prompt's estimate (used when `usage` has no prompt count).
    pub prompt: u64,
    /// The tokens the budget had left after the charge.
    pub left: u32,
    /// Charged to the cluster's shared budget too (cluster mode, Redis
    /// answering): then its correction is due there as well.
    pub shared: std::sync::atomic::AtomicBool,
}

/// Tokens assumed for the answer of a request that names no `max_tokens`:
/// a typical chat answer. Corrected from `usage` when the answer ends.
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// A prompt's tokens estimated from its body's size: about four bytes a
/// token for English text and JSON, the usual rule of thumb.
pub fn prompt_estimate(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_credits_and_debts_carry_to_the_next_charge() {
        let b = TokenBudget::new(1000).unwrap();
        assert_eq!(b.charge(900), Ok(100), "100 left");
        // Without correction 200 more would not fit.
        assert!(b.charge(200).is_err());
        // The 900 used only 100: 800 credited, so 200 is paid from it;
        // 700 are left: 99 in the bucket and 601 of credit (the token taken
        // to read the bucket is credited back).
        b.correct(900, 100, false);
        assert_eq!(b.charge(200), Ok(700));
        assert_eq!(b.owed(), -601);
        // Used more than charged: a debt the next charge pays.
        b.correct(0, 701, false);
        assert_eq!(b.owed(), 100);
        // A refused charge leaves the debt due.
        assert!(b.charge(950).is_err());
        assert_eq!(b.owed(), 100);
    }

    #[test]
    fn token_credit_is_bounded_by_a_minute_of_tokens() {
        let b = TokenBudget::new(1000).unwrap();
        for _ in 0..10 {
            b.correct(5000, 0, false);
        }
        assert_eq!(b.owed(), -1000);
        // A charge above the bucket is cut to a full bucket, not refused forever.
        let b = TokenBudget::new(1000).unwrap();
        b.charge(50_000).unwrap();
        let wait = b.charge(1).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(61),
            "{wait:?}"
        );
    }
}
