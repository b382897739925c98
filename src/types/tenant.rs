//! Whose request it is: the tenant, its share of the slots, its id.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};

use super::{Priority, TokenBudget};

/// Distinguishes tenants in the queue.
pub type TenantId = u64;

/// Whose request it is, for fair queuing: the tenant's id, its weight
/// among the others at the same priority, and its own cap of requests in
/// flight. Cloning is cheap (the name is a shared header value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// Distinguishes tenants; equal ids share one queue position.
    pub id: TenantId,
    /// Relative share of the slots within a priority (at least 1).
    pub weight: u32,
    /// Most of its requests in flight at once (0: no cap of its own).
    pub max_in_flight: usize,
    /// How /status names it (a key's name, a client address, `x-tenant`).
    pub name: HeaderValue,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            id: 0,
            weight: 1,
            max_in_flight: 0,
            name: HeaderValue::from_static("default"),
        }
    }
}

/// The tenant a request was authenticated as, in its extensions.
#[derive(Clone, Debug)]
pub struct Tenant {
    /// Key name.
    pub name: Arc<str>,
    /// See [`Key`](crate::auth::Key).
    pub default_priority: Option<Priority>,
    /// See [`Key`](crate::auth::Key).
    pub max_priority: Option<Priority>,
    /// See [`Key`](crate::auth::Key).
    pub share: Share,
    /// See [`Key`](crate::auth::Key).
    pub tokens: Option<Arc<TokenBudget>>,
    /// See [`Key`](crate::auth::Key).
    pub rate_limited: Arc<std::sync::atomic::AtomicU64>,
    /// Its `requests_per_minute`, which cluster mode also holds it to
    /// across replicas.
    pub requests_per_minute: Option<u32>,
}

/// The header that names a request's tenant, when the config trusts it.
pub const TENANT_HEADER: HeaderName = HeaderName::from_static("x-tenant");

/// A tenant id for a name that is not a key's: a hash with the top bit set,
/// so it never equals a key's id.
pub(crate) fn hashed_tenant(name: &[u8]) -> u64 {
    hash(name) | 1 << 63
}

/// The tenant id of the API key named `name`: a hash of the name with the
/// top bit clear, the same across reloads whatever the keys' order.
pub fn key_tenant(name: &str) -> u64 {
    hash(name.as_bytes()) & !(1 << 63)
}

fn hash(name: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same id in every worker and run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}
