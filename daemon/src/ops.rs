//! The ops endpoint: read-only `/metrics` (Prometheus text) and `/healthz`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use shoal_registry_shim::serve::Body;

use crate::metrics;
use crate::store::Store;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("valid response")
}

/// Refreshes the gauges that are sampled rather than counted.
pub fn sample(store: &Store) {
    let (used, _) = store.usage();
    let m = metrics::global();
    m.store_bytes.set(used as i64);
    m.store_quota_bytes.set(store.quota() as i64);
}

/// Handles one ops request.
pub async fn handle(store: Store, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "read-only endpoint\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            sample(&store);
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::global().encode(),
            )
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
    })
}
