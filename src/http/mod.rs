//! The HTTP layer: thin handlers that parse a ruma request, call one service method
//! and return the ruma response. Routes come from ruma's endpoint metadata.

pub mod client;
pub mod client_ip;
pub mod ruma;

use std::sync::Arc;

use ::ruma::api::{Metadata, path_builder::PathBuilder};
use axum::{
    Router,
    handler::Handler,
    http::{Method, StatusCode, header},
    response::IntoResponse,
    routing::{MethodFilter, on},
};
use tower_http::cors::{Any, CorsLayer};

use crate::{error::Error, service::Services};

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

/// The client-server API router, with CORS and the Matrix fallbacks.
pub fn router(state: AppState) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::ORIGIN,
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            "x-requested-with".parse().unwrap(),
        ]);
    let router = client::routes(Router::new());
    router.fallback(unrecognized).method_not_allowed_fallback(method_not_allowed).layer(cors).with_state(state)
}

async fn unrecognized() -> impl IntoResponse {
    Error::unrecognized(StatusCode::NOT_FOUND, "Unrecognized request")
}

async fn method_not_allowed() -> impl IntoResponse {
    Error::unrecognized(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed on this endpoint")
}
