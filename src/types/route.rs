//! Where a request goes, once routed.

use http::Request;

/// Which upstream a request goes to: an index into the configured list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route(pub usize);

/// The index a request is routed to (0 when it was not routed).
pub fn route_of<B>(req: &Request<B>) -> usize {
    req.extensions().get::<Route>().map_or(0, |r| r.0)
}
