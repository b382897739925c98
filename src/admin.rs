//! The admin listener, on a port of its own so no upstream path is shadowed:
//! `GET /healthz`, `GET /status`, `GET /status/requests/{id}` and `GET
//! /metrics` (Prometheus).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::auth::{Key, SharedKeys};
use crate::reload::Reloader;
use crate::route::Router;
use crate::telemetry::Recorder;
use crate::types::QueueStatus;
use crate::Body;

/// Serve the admin endpoints until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    recorder: Arc<Recorder>,
    keys: SharedKeys,
    reloader: Arc<Reloader>,
    admin_key: Option<[u8; 32]>,
) {
    crate::server::serve_fn(listener, move |req| {
        let router = router.clone();
        let recorder = recorder.clone();
        let keys = keys.clone();
        let reloader = reloader.clone();
        async move {
            if req.method() == Method::GET {
                if let Some(id) = req.uri().path().strip_prefix(REQUEST_STATUS) {
                    let keys = keys.load();
                    return Ok::<_, Infallible>(request_status(
                        &router,
                        &keys,
                        admin_key.as_ref(),
                        &req,
                        id,
                    ));
                }
            }
            if let Some(refused) = check_admin_key(admin_key.as_ref(), &req) {
                return Ok::<_, Infallible>(refused);
            }
            if req.method() == Method::POST && req.uri().path() == "/reload" {
                return Ok::<_, Infallible>(reload(&reloader));
            }
            Ok::<_, Infallible>(handle(&router, &recorder, keys.load().as_slice(), &req))
        }
    })
    .await
}

/// With an admin key, every endpoint but `GET /healthz` (what liveness
/// probes and the image's HEALTHCHECK ask, with no secret) needs
/// `Authorization: Bearer <key>`: the answer for a request without it, a
/// 401 in the OpenAI shape. Not tower-http's bearer check: that compares
/// the header as it is, in time that tells where it differs, and answers
/// an empty 401; this compares digests in constant time, as the API keys
/// are, and takes the scheme in any case.
fn check_admin_key(key: Option<&[u8; 32]>, req: &Request<Incoming>) -> Option<Response<Body>> {
    let key = key?;
    if req.method() == Method::GET && req.uri().path() == "/healthz" {
        return None;
    }
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(crate::auth::bearer_token);
    if presented.is_some_and(|t| crate::auth::same(&crate::types::digest(t.as_bytes()), key)) {
        return None;
    }
    tracing::info!(
        path = req.uri().path(),
        "admin request refused: 401 (no or wrong admin key)"
    );
    Some(unauthorized(
        "the admin endpoints need the admin key: Authorization: Bearer <key>",
    ))
}

/// Where a waiting request stands: `GET /status/requests/{x-request-id}`.
const REQUEST_STATUS: &str = "/status/requests/";

/// `GET /status/requests/{id}`: where the waiting request `id` stands (its
/// place in line, priority, time waited, predicted start), or a 404 when
/// none by that id waits (unknown, started, finished or gone). Who may
/// see what: with the admin key, any request; else, with API keys, the
/// caller's own only (its key, as it sends it to the proxy: another
/// tenant's request is a 404 like an unknown one); with neither, anyone.
fn request_status(
    router: &Router,
    keys: &crate::auth::Keys,
    admin_key: Option<&[u8; 32]>,
    req: &Request<Incoming>,
    id: &str,
) -> Response<Body> {
    let presented = crate::auth::presented_key(req);
    let admin = admin_key.is_some_and(|k| {
        presented
            .as_deref()
            .is_some_and(|p| crate::auth::same(&crate::types::digest(p.as_bytes()), k))
    });
    let scope = if admin {
        None
    } else if !keys.is_empty() {
        match presented.as_deref().and_then(|p| keys.find(p.as_bytes())) {
            Some(key) => Some(key.name.clone()),
            None => {
                return unauthorized(
                    "a request's status needs its API key (Authorization: Bearer … or x-api-key), or the admin key",
                )
            }
        }
    } else if admin_key.is_some() {
        return unauthorized("the admin endpoints need the admin key: Authorization: Bearer <key>");
    } else {
        None
    };
    let id = percent_decode(id.as_bytes());
    match router.waiting().find(&id, scope.as_deref()) {
        Some(standing) => {
            let mut v = serde_json::to_value(&standing).unwrap_or_default();
            v["id"] = String::from_utf8_lossy(&id).into_owned().into();
            v["state"] = "waiting".into();
            text(StatusCode::OK, "application/json", v.to_string())
        }
        None => client_error(
            StatusCode::NOT_FOUND,
            "request_not_found",
            "no request by this id is waiting (unknown, started, finished or gone)",
        ),
    }
}

/// A client's error in the OpenAI shape (`invalid_request_error`).
fn client_error(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let d = crate::error::Described {
        status,
        kind: "invalid_request_error",
        code,
        retry_after: None,
    };
    crate::error::error_response(&d, message)
        .map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

/// A 401 in the OpenAI shape, saying `why`.
fn unauthorized(why: &str) -> Response<Body> {
    let mut resp = client_error(StatusCode::UNAUTHORIZED, "invalid_api_key", why);
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// `%XX` escapes of a path segment decoded (an id may hold `/`, `?` or
/// `%`); anything else as it is.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// One upstream's state, for `/status` and `/metrics`.
struct Upstream {
    name: String,
    snapshot: QueueStatus,
    retired: bool,
    backend: crate::types::BackendStatus,
}

/// Each upstream's state, in config order; then those a reload removed
/// while they still run or hold requests (their limits no longer count).
fn upstreams(router: &Router) -> Vec<Upstream> {
    let table = router.table();
    let mut out: Vec<Upstream> = table
        .active()
        .map(|(_, s)| Upstream {
            name: s.config.name.clone(),
            snapshot: s.scheduler.snapshot(),
            retired: false,
            backend: s.backend.status(),
        })
        .collect();
    for s in table.rows.iter().filter(|s| s.retired) {
        let mut snap = s.scheduler.snapshot();
        if snap.running + snap.waiting > 0 {
            snap.max_concurrency = 0;
            snap.max_queue = 0;
            out.push(Upstream {
                name: s.config.name.clone(),
                snapshot: snap,
                retired: true,
                backend: s.backend.status(),
            });
        }
    }
    out
}

/// The whole proxy's state: every upstream's summed.
fn total(upstreams: &[Upstream]) -> QueueStatus {
    let mut all = upstreams[0].snapshot.clone();
    for u in &upstreams[1..] {
        all.merge(&u.snapshot);
    }
    all
}

fn handle(
    router: &Router,
    recorder: &Recorder,
    keys: &[Key],
    req: &Request<Incoming>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/status") => {
            let each = upstreams(router);
            let mut status = serde_json::to_value(total(&each)).unwrap_or_default();
            if each.len() > 1 {
                status["upstreams"] = each
                    .iter()
                    .map(|u| {
                        let mut v = serde_json::to_value(&u.snapshot).unwrap_or_default();
                        v["name"] = u.name.as_str().into();
                        v["backend"] = serde_json::to_value(&u.backend).unwrap_or_default();
                        if u.retired {
                            v["retired"] = true.into();
                        }
                        v
                    })
                    .collect();
            } else {
                status["backend"] = serde_json::to_value(&each[0].backend).unwrap_or_default();
            }
            if !keys.is_empty() {
                status["keys"] = keys.iter().map(Key::status).collect();
            }
            if let Some(c) = router.cluster() {
                status["cluster"] = c.status();
            }
            let body = serde_json::to_string_pretty(&status)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            text(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/metrics") => {
            let each = upstreams(router);
            let backends: Vec<(&str, &crate::types::BackendStatus)> = each
                .iter()
                .filter(|u| !u.retired)
                .map(|u| (u.name.as_str(), &u.backend))
                .collect();
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                recorder.metrics.encode(&total(&each), &backends),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the admin listener serves GET /healthz, GET /status, GET /status/requests/{id}, GET /metrics and POST /reload\n"
                .into(),
        ),
    }
}

/// `POST /reload`: 200 and what changed, or 400 in the OpenAI error shape
/// saying why nothing was applied.
fn reload(reloader: &Reloader) -> Response<Body> {
    match reloader.reload() {
        Ok(what) => {
            tracing::info!(%what, "config reloaded (POST /reload)");
            let body = serde_json::json!({ "reloaded": true, "message": what });
            text(StatusCode::OK, "application/json", body.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload refused; the running config stays");
            let body = serde_json::json!({
                "error": {
                    "message": e.to_string(),
                    "type": "invalid_request_error",
                    "code": "reload_refused",
                }
            });
            text(
                StatusCode::BAD_REQUEST,
                "application/json",
                body.to_string(),
            )
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static headers are valid")
}
