//! Knowing the backend: which model server an upstream is, and what it says
//! about its own capacity and queue.
//!
//! Everything anteroom promises holds only while the queue lives in
//! anteroom. A backend that gets more requests than it has slots queues the
//! rest itself, where no priority reaches them and their wait is counted as
//! the model's time. The backends say how many they serve, if asked:
//!
//! | backend | identified by | slots | running, waiting |
//! |---|---|---|---|
//! | llama.cpp `llama-server` | `GET /props` (`total_slots`) | `total_slots` | `/metrics` `llamacpp:requests_processing`, `llamacpp:requests_deferred` (with `--metrics`), else `/slots` (`is_processing`) |
//! | vLLM | `/metrics` with `vllm:` names | – | `vllm:num_requests_running`, `vllm:num_requests_waiting` |
//! | Ollama | `GET /api/version` | – | – |
//! | LM Studio | `GET /api/v0/models` (`state`) | – | – |
//! | anything else | – (`openai`) | – | – |
//!
//! [`watch`](fn@watch) reads each upstream at start and every `health_interval`
//! (its kind and slots), and its running and waiting counts every
//! [`LOAD_EVERY`] where it reports them ([`LLAMA_LOAD_EVERY`] for
//! llama.cpp, whose disconnect checks frequent reads would starve). A
//! probe never delays or fails a
//! client's request: it runs in a task of its own, on a connection of its
//! own, with a bounded body and a time-out. A probe that fails keeps the
//! last good reading (said once in the log and in `/status`).
//!
//! What was read is in `/status` (each upstream's `backend`) and in the
//! `anteroom_backend_*` metrics; `max_concurrency = "backend"` follows the
//! slots, and `"auto"` never goes above them and shrinks when the backend
//! reports a queue of its own (see [`adaptive`](crate::admission::adaptive)).

pub mod parse;
pub mod probe;
pub mod watch;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::backend::{Kind, Setting};
use crate::types::{BackendLoad, BackendStatus};

pub use watch::{watch, LLAMA_LOAD_EVERY, LOAD_EVERY};

/// What one round of probes read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// What it is (`None`: nothing answered as any kind does).
    pub kind: Option<Kind>,
    /// Slots it serves at once.
    pub slots: Option<usize>,
    /// Requests it is processing.
    pub running: Option<usize>,
    /// Requests waiting inside it for a slot.
    pub waiting: Option<usize>,
    /// Its version, where it says.
    pub version: Option<String>,
    /// The path its running and waiting counts are read from.
    pub load_path: Option<&'static str>,
    /// What went wrong on the way (a probe that timed out, a body too
    /// large), though something answered.
    pub problem: Option<String>,
}

/// What anteroom knows of one upstream's backend: the last good reading,
/// shared by the watcher (writes), the adaptive limit and `/status` (read).
#[derive(Debug)]
pub struct Backend {
    setting: Setting,
    state: Mutex<State>,
    /// Bumped by every good load reading: the limit acts on fresh ones only.
    readings: AtomicU64,
    /// What it was identified as, for the request path to read without a
    /// lock: 0 while unknown, else 1 + [`Kind::ALL`]'s index.
    kind: AtomicU8,
    /// Its own `stream_upgrade`: 0 unset (the top-level one holds), 1 off,
    /// 2 on. Set at start and by a reload.
    stream_upgrade: AtomicU8,
    /// Its `default_max_tokens` and `max_tokens_cap` (0: off), read by
    /// each admitted generation, set at start and by a reload.
    default_max_tokens: AtomicU64,
    max_tokens_cap: AtomicU64,
    /// The names its upstream's `models` map to the backend's own (see
    /// [`rename`](crate::upstream::rename)); `has_aliases` says whether
    /// there are any with one load, for each admitted request.
    aliases: arc_swap::ArcSwapOption<crate::upstream::rename::Aliases>,
    has_aliases: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    reading: Reading,
    /// When the last good reading came.
    read_at: Option<Instant>,
    /// Why the last probe failed, while they fail.
    error: Option<String>,
    /// What the last identification could not read, though it succeeded:
    /// it stands until the next identification.
    partial: Option<String>,
    /// How the limit is decided now (set by the limit's owner).
    limit: &'static str,
}

impl Backend {
    /// Nothing known yet.
    pub fn new(setting: Setting) -> Self {
        Self {
            setting,
            state: Mutex::new(State {
                limit: "fixed",
                ..State::default()
            }),
            readings: AtomicU64::new(0),
            // The user's word stands until the backend says otherwise.
            kind: AtomicU8::new(match setting {
                Setting::Is(k) => Self::index(Some(k)),
                Setting::Auto => 0,
            }),
            stream_upgrade: AtomicU8::new(0),
            default_max_tokens: AtomicU64::new(0),
            max_tokens_cap: AtomicU64::new(0),
            aliases: arc_swap::ArcSwapOption::empty(),
            has_aliases: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Take the aliases among `models` (set at start and by a reload).
    pub(crate) fn set_aliases(&self, models: &crate::config::Models) {
        let aliases = crate::upstream::rename::Aliases::of(models);
        self.has_aliases.store(aliases.is_some(), Ordering::Release);
        self.aliases.store(aliases);
    }

    /// For a request for `model`: the backend's name for it, as a JSON
    /// string, and the rewriting of the answer; `None` when it is not an
    /// alias.
    pub fn alias(&self, model: &str) -> Option<(bytes::Bytes, crate::upstream::rename::Rename)> {
        if !self.has_aliases.load(Ordering::Acquire) {
            return None;
        }
        self.aliases.load().as_ref()?.find(model)
    }

    /// What its generations may ask for.
    pub fn max_tokens(&self) -> crate::types::TokenBounds {
        let read = |a: &AtomicU64| Some(a.load(Ordering::Relaxed)).filter(|&n| n > 0);
        crate::types::TokenBounds {
            default: read(&self.default_max_tokens),
            cap: read(&self.max_tokens_cap),
        }
    }

    /// Set what its generations may ask for.
    pub(crate) fn set_max_tokens(&self, b: crate::types::TokenBounds) {
        self.default_max_tokens
            .store(b.default.unwrap_or(0), Ordering::Relaxed);
        self.max_tokens_cap
            .store(b.cap.unwrap_or(0), Ordering::Relaxed);
    }

    /// Its own `stream_upgrade` (its `[[upstream]]` table's), if set.
    pub fn stream_upgrade(&self) -> Option<bool> {
        match self.stream_upgrade.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n == 2),
        }
    }

    /// Set (or unset) its own `stream_upgrade`.
    pub(crate) fn set_stream_upgrade(&self, on: Option<bool>) {
        let n = match on {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.stream_upgrade.store(n, Ordering::Relaxed);
    }

    fn index(kind: Option<Kind>) -> u8 {
        kind.and_then(|k| Kind::ALL.iter().position(|&x| x == k))
            .map_or(0, |i| i as u8 + 1)
    }

    /// Whether this backend may answer a stream with a refusal dressed as
    /// one (vLLM's 200 with a lone error event; see
    /// [`guard`](crate::upstream::guard)): vLLM, a server of no known kind,
    /// or one not identified yet. llama.cpp, Ollama and LM Studio refuse
    /// with a status, so their streams are not read ahead.
    pub(crate) fn may_dress_refusals(&self) -> bool {
        !matches!(
            self.kind(),
            Some(Kind::LlamaCpp | Kind::Ollama | Kind::LmStudio)
        )
    }

    /// What it is, as far as known (configured, or identified).
    pub fn kind(&self) -> Option<Kind> {
        match self.kind.load(Ordering::Relaxed) {
            0 => None,
            n => Kind::ALL.get(usize::from(n) - 1).copied(),
        }
    }

    /// `backend` as configured.
    pub fn setting(&self) -> Setting {
        self.setting
    }

    /// What the limit needs.
    pub fn view(&self) -> BackendLoad {
        let st = self.state.lock();
        BackendLoad {
            slots: st.reading.slots,
            running: st.reading.running,
            waiting: st.reading.waiting,
            readings: self.readings.load(Ordering::Acquire),
        }
    }

    /// Say how the limit is decided now.
    pub(crate) fn set_limit(&self, how: &'static str) {
        self.state.lock().limit = how;
    }

    /// For `/status`.
    pub fn status(&self) -> BackendStatus {
        let st = self.state.lock();
        BackendStatus {
            setting: self.setting.to_string(),
            kind: st.reading.kind.map(Kind::as_str),
            slots: st.reading.slots,
            running: st.reading.running,
            waiting: st.reading.waiting,
            version: st.reading.version.clone(),
            read_ms_ago: st.read_at.map(|t| t.elapsed().as_millis() as u64),
            error: st.error.clone(),
            limit: st.limit,
        }
    }

    /// A full reading (kind and slots, with the load if read): taken as it
    /// is, logged where it differs from the last.
    pub(crate) fn identified(&self, name: &str, next: Reading) {
        let mut st = self.state.lock();
        let was = std::mem::take(&mut st.reading);
        if was.kind != next.kind || was.slots != next.slots {
            match (was.kind, next.kind) {
                (None, Some(kind)) => tracing::info!(
                    upstream = name,
                    %kind,
                    slots = ?next.slots,
                    version = ?next.version,
                    "backend identified"
                ),
                (Some(a), Some(b)) if a != b => tracing::warn!(
                    upstream = name,
                    was = %a,
                    now = %b,
                    slots = ?next.slots,
                    "the backend changed kind"
                ),
                _ => tracing::info!(
                    upstream = name,
                    was = ?was.slots,
                    now = ?next.slots,
                    "the backend's slot count changed"
                ),
            }
        }
        self.kind.store(Self::index(next.kind), Ordering::Relaxed);
        st.partial = next.problem.clone();
        st.reading = next;
        let problem = st.partial.clone();
        self.good(&mut st, name, problem);
    }

    /// A load reading (running and waiting).
    pub(crate) fn loaded(&self, name: &str, running: Option<usize>, waiting: Option<usize>) {
        let mut st = self.state.lock();
        st.reading.running = running;
        st.reading.waiting = waiting;
        let problem = st.partial.clone();
        self.good(&mut st, name, problem);
    }

    /// A good reading, though `problem` may say some probes failed: a
    /// change between failing and not is logged, once.
    fn good(&self, st: &mut State, name: &str, problem: Option<String>) {
        st.read_at = Some(Instant::now());
        match (&st.error, &problem) {
            (Some(_), None) => {
                tracing::info!(upstream = name, "the backend answers its probes again")
            }
            (None, Some(why)) => {
                tracing::warn!(upstream = name, error = %why, "some backend probes failed")
            }
            _ => {}
        }
        st.error = problem;
        self.readings.fetch_add(1, Ordering::Release);
    }

    /// A probe failed: the last good reading stays; said once until one
    /// succeeds again.
    pub(crate) fn failed(&self, name: &str, why: String) {
        let mut st = self.state.lock();
        if st.error.is_none() {
            tracing::warn!(
                upstream = name,
                error = %why,
                kept = ?st.reading.slots,
                "backend probe failed; keeping the last good reading"
            );
        }
        // The load it said before is stale: do not act on it.
        st.reading.running = None;
        st.reading.waiting = None;
        st.error = Some(why);
    }
}

/// Each probe's time-out: short, so that a hung backend is seen as one.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest probe body read (`/slots` of many slots, vLLM's `/metrics`).
pub(crate) const PROBE_MAX_BYTES: usize = 1 << 20;

/// What the upstream's client needs of it, as known so far.
impl crate::upstream::Peer for Backend {
    fn honours_stream_usage(&self) -> bool {
        self.kind() == Some(Kind::Vllm)
    }

    fn answers_alike_streamed(&self) -> bool {
        self.kind() == Some(Kind::LlamaCpp)
    }

    fn stream_upgrade(&self) -> Option<bool> {
        Backend::stream_upgrade(self)
    }

    fn may_dress_refusals(&self) -> bool {
        Backend::may_dress_refusals(self)
    }

    fn max_tokens(&self) -> crate::types::TokenBounds {
        Backend::max_tokens(self)
    }

    fn alias(&self, model: &str) -> Option<(bytes::Bytes, crate::upstream::rename::Rename)> {
        Backend::alias(self, model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_backends_that_may_dress_a_refusal_have_streams_read_ahead() {
        let b = Backend::new(Setting::Auto);
        // Not identified yet: read ahead, to be safe; unless the config
        // says what it is.
        assert!(b.may_dress_refusals());
        assert!(!Backend::new(Setting::Is(Kind::LlamaCpp)).may_dress_refusals());
        for (kind, reads) in [
            (Kind::Vllm, true),
            (Kind::OpenAi, true),
            (Kind::LlamaCpp, false),
            (Kind::Ollama, false),
            (Kind::LmStudio, false),
        ] {
            b.identified(
                "u",
                Reading {
                    kind: Some(kind),
                    ..Reading::default()
                },
            );
            assert_eq!(b.may_dress_refusals(), reads, "{kind}");
            assert_eq!(b.status().kind, Some(kind.as_str()));
        }
    }
}
