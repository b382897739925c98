//! `GET /v1/models` with several upstreams: the union of their lists.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tower::{Service, ServiceExt};

use super::Router;
use crate::classify::ClassifiedBody;
use crate::types::Route;
use crate::BoxError;

/// Ask every upstream for its models and merge the lists.
pub(super) async fn models_union<S, B, ResB>(
    svc: S,
    shared: Arc<Router>,
    req: Request<ClassifiedBody<B>>,
) -> Result<Bytes, BoxError>
where
    S: Service<Request<ClassifiedBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (parts, _body) = req.into_parts();
    let mut data: Vec<serde_json::Value> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let table = shared.table();
    for (i, row) in table.active() {
        let replica = &row.config;
        let mut ask = Request::builder()
            .method(Method::GET)
            .uri(parts.uri.clone())
            .body(Either::Left(Full::new(Bytes::new())))?;
        *ask.headers_mut() = parts.headers.clone();
        ask.extensions_mut().insert(Route(i));
        let one = svc.clone();
        let answer = async move {
            let resp = one.oneshot(ask).await.map_err(Into::into)?;
            if resp.status() != StatusCode::OK {
                return Err(format!("status {}", resp.status()).into());
            }
            // Bounded: an upstream's list is not a way to fill our memory.
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_MODEL_LIST)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, BoxError>(serde_json::from_slice::<serde_json::Value>(&bytes)?)
        }
        .await;
        let list = match answer {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(upstream = %replica.name, error = %e, "model list unavailable");
                continue;
            }
        };
        for m in list["data"].as_array().into_iter().flatten() {
            let Some(id) = m["id"].as_str() else { continue };
            if replica.models.serves(id) && !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
                data.push(m.clone());
            }
        }
    }
    Ok(Bytes::from(serde_json::to_vec(
        &serde_json::json!({"object": "list", "data": data}),
    )?))
}

/// The largest model list read from one upstream for `GET /v1/models`.
const MAX_MODEL_LIST: usize = 8 << 20;
