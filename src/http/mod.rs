//! The HTTP layer: thin handlers that parse a ruma request, call one service method
//! and return the ruma response. Routes come from ruma's endpoint metadata.

pub mod client;
pub mod client_ip;
pub mod federation;
pub mod ruma;
pub mod transport;
pub mod xmatrix;

use std::{any::Any, sync::Arc, time::Duration};

use ::ruma::api::{Metadata, path_builder::PathBuilder};
use axum::{
    Json, Router,
    extract::State,
    handler::Handler,
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{MethodFilter, get, on},
};
use serde_json::json;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{Any as AnyOrigin, CorsLayer},
    trace::TraceLayer,
};

use crate::{
    error::{Error, RETRY_AFTER_UNAVAILABLE},
    service::Services,
};

/// What every handler gets through axum's `State`.
pub type AppState = Arc<Services>;

/// Registers `handler` on every path (stable and unstable) of endpoint `T`.
pub(crate) fn route<T, H, M>(router: Router<AppState>, handler: H) -> Router<AppState>
where
    T: Metadata,
    H: Handler<M, AppState> + Clone,
    M: 'static,
{
    let filter = MethodFilter::try_from(T::METHOD).expect("ruma endpoints use standard methods");
    T::PATH_BUILDER.all_paths().fold(router, |mut router, path| {
        // An empty state key is written as `/state/{type}/` or `/state/{type}`; the
        // extractor fills in the missing argument.
        if let Some(prefix) = path.strip_suffix("/{state_key}") {
            router = router.route(prefix, on(filter, handler.clone()));
            router = router.route(&format!("{prefix}/"), on(filter, handler.clone()));
        }
        router.route(path, on(filter, handler.clone()))
    })
}

/// The client-server API router, with `/health`, CORS, the Matrix fallbacks and the
/// catch-panic layer.
pub fn router(state: AppState) -> Router {
    let router = client::routes(Router::new()).route("/health", get(health));
    with_common_layers(router).with_state(state)
}

/// The server-server API router (the federation listener): `/_matrix/federation/*`
/// and `/_matrix/key/*` only, with the same fallbacks and layers.
pub fn federation_router(state: AppState) -> Router {
    with_common_layers(federation::routes(Router::new())).with_state(state)
}

/// What every route gets: `404`/`405` as Matrix errors, CORS headers, and a panic in a
/// handler answered as a logged `500 M_UNKNOWN` (instead of a dropped connection).
fn with_common_layers<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    let cors = CorsLayer::new()
        .allow_origin(AnyOrigin)
        .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::ORIGIN,
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            "x-requested-with".parse().unwrap(),
        ]);
    // One debug line per request (`logging.level = "convo::http=debug"`): method, path
    // and status, never the query string, which may carry an access token.
    let trace = TraceLayer::new_for_http()
        .make_span_with(|request: &axum::extract::Request| {
            tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
        })
        .on_request(())
        .on_response(|response: &Response, latency: Duration, _: &tracing::Span| {
            tracing::debug!(status = response.status().as_u16(), latency_ms = latency.as_millis() as u64, "answered");
        })
        .on_failure(());
    router
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(cors)
        .layer(trace)
}

/// A handler panicked: log what it said, answer `500 M_UNKNOWN`.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    Error::internal(format!("a request handler panicked: {message}")).into_response()
}

/// # `GET /health`
/// Whether Convo and its database answer, for load balancers and monitoring: `200`
/// `{"status": "ok"}`, or `503` (with `Retry-After`) `{"status": "unavailable", "database": ...}`.
async fn health(State(services): State<AppState>) -> Response {
    let limit = Duration::from_millis(services.config.database.acquire_timeout_ms) + Duration::from_secs(1);
    let problem = match tokio::time::timeout(limit, services.store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {} ms", limit.as_millis())),
    };
    match problem {
        None => Json(json!({"status": "ok", "database": "ok"})).into_response(),
        Some(problem) => {
            tracing::debug!(%problem, "/health: the database does not answer");
            let mut response =
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "database": "unavailable"})))
                    .into_response();
            response.headers_mut().insert(header::RETRY_AFTER, RETRY_AFTER_UNAVAILABLE.as_secs().into());
            response
        }
    }
}

async fn unrecognized() -> impl IntoResponse {
    Error::unrecognized(StatusCode::NOT_FOUND, "Unrecognized request")
}

async fn method_not_allowed() -> impl IntoResponse {
    Error::unrecognized(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed on this endpoint")
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request, routing::get};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_m_unknown() {
        async fn boom() -> &'static str {
            panic!("boom")
        }
        let app = with_common_layers(Router::new().route("/boom", get(boom)).route("/fine", get(|| async { "ok" })));
        let response = app.clone().oneshot(Request::get("/boom").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
        // The router keeps serving.
        let response = app.oneshot(Request::get("/fine").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
