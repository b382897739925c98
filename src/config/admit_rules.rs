//! Which requests are admitted, and how their bodies are read.

use crate::types::Priority;

/// Which requests are admitted and how their bodies are read: the slice of
/// the config this step needs.
#[derive(Clone, Debug)]
pub struct AdmitRules {
    /// Paths of the generation endpoints (POST only).
    pub admit_paths: Vec<String>,
    /// Largest request body buffered.
    pub max_body_bytes: usize,
    /// Priority of a request that names none.
    pub default_priority: Priority,
    /// Keep the body's `model` in the extensions (for routing).
    pub keep_model: bool,
    /// Without API keys, take the tenant from `x-tenant` (else the client's
    /// address). Only for clients that cannot lie about it.
    pub trust_tenant_header: bool,
    /// Most time between two pieces of a request body (then 408).
    pub body_read_timeout: std::time::Duration,
    /// Most bytes of admitted bodies held at once, all requests together
    /// (0: no bound); past it, 503 `buffers_full`.
    pub max_buffered_bytes: usize,
    /// Most requests passing without admission at once (0: no bound);
    /// past it, 503 `passthrough_full` (see
    /// [`passing`](crate::admission::passing)).
    pub max_passthrough: usize,
}
