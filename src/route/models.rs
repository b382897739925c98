//! `GET /v1/models` with several upstreams, or names of anteroom's: the
//! names clients may ask for, over all upstreams.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tower::{Service, ServiceExt};

use super::Router;
use crate::classify::ClassifiedBody;
use crate::config::Models;
use crate::types::Route;
use crate::BoxError;

/// Ask every upstream for its models; the names clients may use, merged.
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
        let reported: Vec<serde_json::Value> = match answer {
            Ok(mut v) => match v["data"].take() {
                serde_json::Value::Array(a) => a,
                _ => Vec::new(),
            },
            Err(e) => {
                tracing::warn!(upstream = %replica.name, error = %e, "model list unavailable");
                Vec::new()
            }
        };
        for m in usable(&replica.models, &replica.name, reported) {
            let Some(id) = m["id"].as_str() else { continue };
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
                data.push(m);
            }
        }
    }
    Ok(Bytes::from(serde_json::to_vec(
        &serde_json::json!({"object": "list", "data": data}),
    )?))
}

/// The models clients may ask an upstream for, from what its backend
/// `reported`: each configured name, with the backend's entry for it (its
/// own name for it, if it has one, put back to the client's) or, when
/// the backend does not list it, `{"id", "object": "model", "owned_by"}`
/// (no `created`: it is not known); with `"*"`, what else the backend
/// reports, as it reports it.
fn usable(
    models: &Models,
    upstream: &str,
    mut reported: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for name in models.named() {
        let entry = reported
            .iter()
            .find(|m| m["id"].as_str() == Some(name.backend_name()))
            .cloned();
        out.push(match entry {
            Some(mut m) => {
                m["id"] = name.name.clone().into();
                m
            }
            None => serde_json::json!({"id": name.name, "object": "model", "owned_by": upstream}),
        });
    }
    if models.any() {
        reported.retain(|m| m["id"].as_str().is_some());
        out.append(&mut reported);
    }
    out
}

/// The largest model list read from one upstream for `GET /v1/models`.
const MAX_MODEL_LIST: usize = 8 << 20;
