//! Where a waiting request stands, for `GET /status/requests/{id}` on the
//! admin listener: its place in line, priority, time waited and predicted
//! start, found by its `x-request-id`.
//!
//! Only queued requests are listed (one that starts at once never is), and
//! only while they wait: a request that started, finished or left is not
//! found. Each entry knows its tenant (its key's name), so with keys a
//! tenant finds only its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::queue::Place;
use super::scheduler::Scheduler;
use super::ticket::Ticket;
use crate::types::Priority;

/// The requests waiting now, by id.
#[derive(Debug, Default)]
pub struct Waiting {
    by_id: Mutex<HashMap<Bytes, Vec<Entry>>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    token: u64,
    tenant: Option<Arc<str>>,
    scheduler: Arc<Scheduler>,
    place: Place,
    arrived: Instant,
}

/// A request's listing: it is taken out when this is dropped (the request
/// started, left or was refused).
#[derive(Debug)]
pub struct Listed {
    waiting: Arc<Waiting>,
    id: Bytes,
    token: u64,
}

/// Where a waiting request stands.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Standing {
    /// Its place in line: 1 is next.
    pub position: usize,
    /// The priority it waits at.
    pub priority: Priority,
    /// How long it has waited (milliseconds).
    pub waited_ms: u64,
    /// When it is predicted to start, from now (milliseconds; the same
    /// estimate as the 429 advice); null before anything was measured.
    pub estimated_start_ms: Option<u64>,
}

impl Waiting {
    /// List the request `id` of `tenant`, queued as `ticket` since
    /// `arrived`.
    pub fn list(
        self: &Arc<Self>,
        id: Bytes,
        tenant: Option<Arc<str>>,
        ticket: &Ticket,
        arrived: Instant,
    ) -> Listed {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_id
            .lock()
            .entry(id.clone())
            .or_default()
            .push(Entry {
                token,
                tenant,
                scheduler: ticket.scheduler().clone(),
                place: ticket.place(),
                arrived,
            });
        Listed {
            waiting: self.clone(),
            id,
            token,
        }
    }

    /// Where the request `id` stands, if it waits; with `tenant`, only one
    /// of that tenant's (`None`: anyone's, as with no keys or the admin
    /// key).
    pub fn find(&self, id: &[u8], tenant: Option<&str>) -> Option<Standing> {
        let found: Vec<(Arc<Scheduler>, Place, Instant)> = {
            let map = self.by_id.lock();
            map.get(id)?
                .iter()
                .filter(|e| tenant.is_none_or(|t| e.tenant.as_deref() == Some(t)))
                .map(|e| (e.scheduler.clone(), e.place, e.arrived))
                .collect()
        };
        // The scheduler's lock is taken with the list's let go: the two
        // are never held together.
        let now = Instant::now();
        found.into_iter().find_map(|(scheduler, place, arrived)| {
            let (position, start) = scheduler.standing(&place)?;
            Some(Standing {
                position,
                priority: place.priority(),
                waited_ms: millis(now.saturating_duration_since(arrived)),
                estimated_start_ms: start.map(millis),
            })
        })
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Listed {
    /// It waits elsewhere now (queued again at another upstream).
    pub fn moved(&self, ticket: &Ticket) {
        let mut map = self.waiting.by_id.lock();
        if let Some(e) = map
            .get_mut(&self.id)
            .and_then(|v| v.iter_mut().find(|e| e.token == self.token))
        {
            e.scheduler = ticket.scheduler().clone();
            e.place = ticket.place();
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut map = self.waiting.by_id.lock();
        if let Some(v) = map.get_mut(&self.id) {
            v.retain(|e| e.token != self.token);
            if v.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}
