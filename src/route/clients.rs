//! The table's clients: one pooled [`Upstream`] client per row of the
//! [`Router`]'s table, in each runtime, kept in step with reloads.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::Service;

use super::{Router, Row};
use crate::config::ClientSettings;
use crate::drain::Drain;
use crate::upstream::{PooledBody, Replay, ResponseFuture, StreamGuard, Upstream};
use crate::BoxError;

/// The upstreams of the [`Router`]'s table: each request goes to the one
/// its [`Route`](crate::types::Route) names, over this runtime's own pool
/// of connections to it. When a reload adds or re-addresses an upstream the
/// table's generation moves on, and the next request (or the housekeeping
/// tick) opens pools for the new addresses and lets go of those of removed
/// ones (requests still running on them keep them until they end).
/// Cloning shares the pools.
pub struct Clients<B>
where
    B: Body + 'static,
{
    pools: Arc<arc_swap::ArcSwap<Pools<B>>>,
    /// Serialises rebuilding the pools (after a reload only).
    rebuild: Arc<parking_lot::Mutex<()>>,
    settings: ClientSettings,
    drain: Option<Drain>,
    /// Told whether each request reached its upstream.
    router: Arc<Router>,
}

/// One runtime's clients, by the table's index.
struct Pools<B>
where
    B: Body + 'static,
{
    generation: u64,
    /// Per index: the row's id and its client (none once retired).
    clients: Vec<Option<(u64, Upstream<B>)>>,
}

impl<B> std::fmt::Debug for Clients<B>
where
    B: Body + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").finish_non_exhaustive()
    }
}

impl<B> Clone for Clients<B>
where
    B: Body + 'static,
{
    fn clone(&self) -> Self {
        Self {
            pools: self.pools.clone(),
            rebuild: self.rebuild.clone(),
            settings: self.settings.clone(),
            drain: self.drain.clone(),
            router: self.router.clone(),
        }
    }
}

impl<B> Clients<B>
where
    B: Body<Data = Bytes> + Send + Unpin + Replay + 'static,
    B::Error: Into<BoxError>,
{
    /// Clients for `router`'s upstreams, reporting to it whether requests
    /// reach them (passive health); streams end at `drain`'s deadline.
    pub fn new(router: Arc<Router>, settings: &ClientSettings, drain: Option<Drain>) -> Self {
        let this = Self {
            pools: Arc::new(arc_swap::ArcSwap::from_pointee(Pools {
                generation: u64::MAX,
                clients: Vec::new(),
            })),
            rebuild: Arc::default(),
            settings: settings.clone(),
            drain,
            router,
        };
        this.refresh();
        this
    }

    /// The client of upstream `i` (the first in service for `None`).
    pub fn client(&self, i: Option<usize>) -> Option<Upstream<B>> {
        let i = i.unwrap_or_else(|| self.router.table().first());
        self.current()
            .clients
            .get(i)?
            .as_ref()
            .map(|(_, c)| c.clone())
    }

    /// The pools for the router's table as it is now.
    fn current(&self) -> arc_swap::Guard<Arc<Pools<B>>> {
        let pools = self.pools.load();
        if pools.generation == self.router.table().generation {
            return pools;
        }
        drop(pools);
        self.refresh();
        self.pools.load()
    }

    /// A client for `row`: its address, name and backend, ending its
    /// streams at the drain deadline.
    fn client_for(&self, row: &Row) -> Upstream<B> {
        let client = Upstream::new(row.config.origin.clone(), &self.settings)
            .named(&row.config.name)
            .of_backend(row.backend.clone());
        match &self.drain {
            Some(drain) => client.with_drain(drain.clone()),
            None => client,
        }
    }

    /// Match the pools to the table: keep those whose address stays, open
    /// new ones, drop those of removed upstreams.
    fn refresh(&self) {
        let _one_at_a_time = self.rebuild.lock();
        let table = self.router.table();
        let old = self.pools.load_full();
        if old.generation == table.generation {
            return;
        }
        let clients = table
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                if row.retired {
                    return None;
                }
                if let Some(Some((id, c))) = old.clients.get(i) {
                    if *id == row.id {
                        return Some((*id, c.clone()));
                    }
                }
                Some((row.id, self.client_for(row)))
            })
            .collect();
        self.pools.store(Arc::new(Pools {
            generation: table.generation,
            clients,
        }));
    }

    /// Housekeeping, until dropped: once a second, close the idle
    /// connections the upstreams have closed or that idled too long, and
    /// follow a reload between requests.
    ///
    /// The tick also keeps tokio's timer armed within the second, so a
    /// request's own far-off timeout (`upstream_timeout`) is never the
    /// earliest timer: registering it then costs no wake-up of the I/O
    /// driver (strace showed one `eventfd` write per request without it).
    pub async fn housekeeping(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (_, c) in self.current().clients.iter().flatten() {
                let idle = c.reap();
                tracing::trace!(idle, "upstream pool reaped");
            }
        }
    }
}

impl<B> Service<Request<B>> for Clients<B>
where
    B: Body<Data = Bytes> + Send + Unpin + Replay + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<StreamGuard<PooledBody<B>>>;
    type Error = BoxError;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pools are always ready: they open connections on demand.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let i = crate::types::route_of(&req);
        let pools = self.current();
        // A request routed to an upstream that a reload removed a moment
        // ago still goes there, on a connection of its own.
        let mut fut = match pools.clients.get(i) {
            Some(Some((_, client))) => client.send(req),
            _ => {
                let row = self.router.table().row(i).clone();
                self.client_for(&row).send(req)
            }
        };
        if pools.clients.len() > 1 {
            fut = fut.reporting_to(self.router.clone(), i);
        }
        fut
    }
}

/// Passive health: each request tells the router whether its upstream
/// answered.
impl crate::upstream::Reports for Router {
    fn report(&self, i: usize, reached: bool) {
        Router::report(self, i, reached)
    }
}
