//! The load a backend reports of itself.

/// What the adaptive limit needs of the backend: its own count of slots,
/// of requests running and of requests waiting inside it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendLoad {
    /// Slots it reports.
    pub slots: Option<usize>,
    /// Requests it is processing.
    pub running: Option<usize>,
    /// Requests waiting inside it.
    pub waiting: Option<usize>,
    /// How many good load readings there have been (a new number: a fresh one).
    pub readings: u64,
}
