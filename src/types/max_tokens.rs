//! The bounds an upstream sets on what a generation may ask for.

/// `default_max_tokens` and `max_tokens_cap` of one upstream (both off by
/// default): a generation that names no `max_tokens` is given the
/// default; one that asks for more than the cap is clamped to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBounds {
    /// Set on a generation that names none.
    pub default: Option<u64>,
    /// The most a generation may ask for.
    pub cap: Option<u64>,
}

impl TokenBounds {
    /// Whether either is on.
    pub fn is_on(&self) -> bool {
        self.default.is_some() || self.cap.is_some()
    }

    /// What a generation that asked for `asked` is sent with, if anything
    /// changes: `None` when it stands as asked.
    pub fn apply(&self, asked: Option<u64>) -> Option<u64> {
        match (asked, self.cap) {
            (Some(n), Some(cap)) if n > cap => Some(cap),
            (Some(_), _) => None,
            (None, cap) => self.default.or(cap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_fills_in_and_the_cap_clamps() {
        let both = TokenBounds {
            default: Some(256),
            cap: Some(1024),
        };
        assert_eq!(both.apply(None), Some(256));
        assert_eq!(both.apply(Some(100)), None);
        assert_eq!(both.apply(Some(1024)), None);
        assert_eq!(both.apply(Some(5000)), Some(1024));
        // A cap alone bounds a request that names nothing, too.
        let cap = TokenBounds {
            default: None,
            cap: Some(512),
        };
        assert_eq!(cap.apply(None), Some(512));
        assert_eq!(TokenBounds::default().apply(None), None);
        assert!(!TokenBounds::default().is_on());
    }
}
