//! What `/status` and the metrics report of an upstream's backend.

/// `/status`'s view of a backend.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackendStatus {
    /// `backend` as configured.
    pub setting: String,
    /// What it was identified as (`null` until something answered).
    pub kind: Option<&'static str>,
    /// Slots it reports.
    pub slots: Option<usize>,
    /// Requests it is processing (as of `read_ms_ago`).
    pub running: Option<usize>,
    /// Requests waiting inside it.
    pub waiting: Option<usize>,
    /// Its version, where it says.
    pub version: Option<String>,
    /// Milliseconds since the last good reading.
    pub read_ms_ago: Option<u64>,
    /// Why the last probe failed (the last good reading stays in use).
    pub error: Option<String>,
    /// How the concurrency limit is decided: `fixed`, `backend`, `auto`, or
    /// `auto (the backend reports no slots)`.
    pub limit: &'static str,
}
