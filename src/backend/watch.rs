//! The watcher: reads one upstream's backend in a task of its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::time::Instant;

use super::{parse, Backend, Reading, PROBE_MAX_BYTES, PROBE_TIMEOUT};
use crate::config::backend::{Kind, Setting};
use crate::origin::Origin;

/// How often running and waiting counts are read, where the backend reports
/// them: often enough that a queue forming inside it is seen within a
/// couple of requests' time.
pub const LOAD_EVERY: Duration = Duration::from_millis(500);

/// How often a llama.cpp upstream's load is read: less often than once a
/// second. llama-server looks whether a waiting request's client is still
/// there only after a second in which no result of any of its tasks came
/// (`recv_with_timeout` with its `HTTP_POLLING_SECONDS` of 1, which every
/// result restarts), and each read of `/metrics` or `/slots` is a task of
/// its own: read every 500 ms, it never looks, and a non-streamed request
/// whose client left (or that anteroom preempted) is generated to its end
/// for nobody while the next one waits inside it.
pub const LLAMA_LOAD_EVERY: Duration = Duration::from_millis(1500);

/// GET `path`: the body of a 200, `Ok(None)` for another status, `Err` when
/// the backend could not be reached or did not answer in time.
async fn get_ok(origin: &Origin, path: &str) -> Result<Option<Bytes>, String> {
    match crate::upstream::get(origin, path, PROBE_TIMEOUT, PROBE_MAX_BYTES).await {
        Ok((StatusCode::OK, body)) => Ok(Some(body)),
        Ok(_) => Ok(None),
        Err(e) => Err(format!("GET {path}: {e}")),
    }
}

/// The running and waiting counts at `path` (`/metrics` or `/slots`).
async fn read_load(
    origin: &Origin,
    path: &'static str,
) -> Result<(Option<usize>, Option<usize>), String> {
    let body = get_ok(origin, path)
        .await?
        .ok_or_else(|| format!("GET {path}: not 200"))?;
    let parsed = if path == "/slots" {
        parse::slots_busy(&body).map(|(_, busy)| (Some(busy), None))
    } else {
        std::str::from_utf8(&body)
            .ok()
            .and_then(parse::metrics)
            .map(|(_, running, waiting)| (running, waiting))
    };
    parsed.ok_or_else(|| format!("GET {path}: not what this backend answers"))
}

/// The probes of one identification: what answered, and what went wrong.
struct Probes<'a> {
    origin: &'a Origin,
    answered: bool,
    problems: Vec<String>,
}

impl Probes<'_> {
    /// The body of a 200 at `path`; a failure is noted, and the next path
    /// is tried all the same (a body too large at one path says nothing of
    /// the others).
    async fn get(&mut self, path: &str) -> Option<Bytes> {
        if !self.answered && !self.problems.is_empty() {
            // The first probe found nobody there (refused, or no answer in
            // time): the others would not either.
            return None;
        }
        match get_ok(self.origin, path).await {
            Ok(body) => {
                self.answered = true;
                body
            }
            Err(e) => {
                self.problems.push(e);
                None
            }
        }
    }
}

/// Identify the backend (as `setting` allows) and read what it reports.
/// `Err` when nothing answered at all; a reading's `problem` says what went
/// wrong on the way.
pub async fn identify(origin: &Origin, setting: Setting) -> Result<Reading, String> {
    let may = |k: Kind| setting == Setting::Auto || setting == Setting::Is(k);
    if setting == Setting::Is(Kind::OpenAi) {
        return Ok(Reading {
            kind: Some(Kind::OpenAi),
            ..Reading::default()
        });
    }
    let mut p = Probes {
        origin,
        answered: false,
        problems: Vec::new(),
    };
    let found = 'found: {
        // llama.cpp: /props names its slots; its load is in /metrics (with
        // --metrics) or /slots.
        if may(Kind::LlamaCpp) {
            if let Some(slots) = p
                .get("/props")
                .await
                .as_deref()
                .and_then(parse::props_slots)
            {
                let mut r = Reading {
                    kind: Some(Kind::LlamaCpp),
                    slots: Some(slots),
                    ..Reading::default()
                };
                for path in ["/metrics", "/slots"] {
                    if let Ok((running, waiting)) = read_load(origin, path).await {
                        (r.running, r.waiting, r.load_path) = (running, waiting, Some(path));
                        break;
                    }
                }
                break 'found Some(r);
            }
        }
        if may(Kind::Vllm) || may(Kind::LlamaCpp) {
            let body = p.get("/metrics").await;
            let read = body
                .as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(parse::metrics)
                .filter(|(kind, ..)| may(*kind));
            if let Some((kind, running, waiting)) = read {
                break 'found Some(Reading {
                    kind: Some(kind),
                    running,
                    waiting,
                    load_path: Some("/metrics"),
                    ..Reading::default()
                });
            }
        }
        if may(Kind::Ollama) {
            if let Some(version) = p
                .get("/api/version")
                .await
                .as_deref()
                .and_then(parse::ollama_version)
            {
                break 'found Some(Reading {
                    kind: Some(Kind::Ollama),
                    version: Some(version),
                    ..Reading::default()
                });
            }
        }
        if may(Kind::LmStudio)
            && p.get("/api/v0/models")
                .await
                .as_deref()
                .and_then(parse::lmstudio_loaded)
                .is_some()
        {
            break 'found Some(Reading {
                kind: Some(Kind::LmStudio),
                ..Reading::default()
            });
        }
        None
    };
    let problem = (!p.problems.is_empty()).then(|| p.problems.join("; "));
    match (found, setting) {
        (Some(r), _) => Ok(Reading { problem, ..r }),
        (None, _) if !p.answered => Err(problem.unwrap_or_else(|| "no answer".into())),
        // It answered, as none of the kinds that say more do.
        (None, Setting::Auto) => Ok(Reading {
            kind: Some(Kind::OpenAi),
            problem,
            ..Reading::default()
        }),
        (None, Setting::Is(kind)) => Err(format!(
            "configured as {kind}, but it does not answer as {kind} does{}",
            problem.map(|p| format!(" ({p})")).unwrap_or_default()
        )),
    }
}

/// The upstream a watcher reads, while it is in service: its address, its
/// backend and its name. `None` once it left the table (a reload that
/// removes or re-addresses it starts a new watcher for the new address) or
/// the table closed.
pub type Find = dyn Fn() -> Option<(Origin, Arc<Backend>, String)> + Send + Sync;

/// Read an upstream's backend while `find` finds it: identify it now and
/// every `every`, read its load every [`LOAD_EVERY`] in between where it
/// reports one.
pub async fn watch(find: Box<Find>, every: Duration) {
    let mut identified_at: Option<Instant> = None;
    let mut load_path: Option<&'static str> = None;
    let mine = match find() {
        Some((_, backend, _)) => Arc::downgrade(&backend),
        None => return,
    };
    loop {
        let Some((origin, backend, name)) = find() else {
            return;
        };
        if !std::ptr::eq(mine.as_ptr(), Arc::as_ptr(&backend)) {
            // A reload gave the upstream a new backend to read (a new
            // `backend` setting): its own watcher reads it.
            return;
        }
        if backend.setting() == Setting::Is(Kind::OpenAi) && identified_at.is_some() {
            // Nothing to read, ever.
            return;
        }
        let due = identified_at.is_none_or(|t| t.elapsed() >= every);
        if due {
            match identify(&origin, backend.setting()).await {
                Ok(reading) => {
                    load_path = reading.load_path;
                    backend.identified(&name, reading);
                    identified_at = Some(Instant::now());
                }
                Err(why) => {
                    backend.failed(&name, why);
                    // Try again at the next load tick rather than wait a
                    // whole interval: a backend still starting up.
                    identified_at = None;
                }
            }
        } else if let Some(path) = load_path {
            match read_load(&origin, path).await {
                Ok((running, waiting)) => backend.loaded(&name, running, waiting),
                Err(why) => backend.failed(&name, why),
            }
        }
        let llama = backend.kind() == Some(Kind::LlamaCpp);
        drop(backend);
        let pause = match (load_path, identified_at) {
            (Some(_), _) if llama => LLAMA_LOAD_EVERY,
            (Some(_), _) | (None, None) => LOAD_EVERY,
            (None, Some(_)) => every,
        };
        tokio::time::sleep(pause).await;
    }
}
