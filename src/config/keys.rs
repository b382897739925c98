//! `[[key]]`s, resolved: each key's digest, priorities, limits and share.

use std::sync::Arc;

use crate::types::{Priority, Share};

/// One configured key, resolved to its digest (the secret is not kept).
/// [`auth::Key`](crate::auth::Key) adds its limiters' state.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySetting {
    /// Its name: the tenant.
    pub name: Arc<str>,
    /// SHA-256 of the secret.
    pub digest: [u8; 32],
    /// Priority of its requests that name none.
    pub default_priority: Option<Priority>,
    /// The most urgent priority it may ask for; more urgent is clamped.
    pub max_priority: Option<Priority>,
    /// Most requests a minute, if limited.
    pub requests_per_minute: Option<u32>,
    /// Most tokens a minute, if limited.
    pub tokens_per_minute: Option<u32>,
    /// Its share in fair queuing (weight, cap of requests in flight).
    pub share: Share,
}
