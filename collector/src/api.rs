//! The HTTPS query API.
//!
//! Every `/api/v1` route checks the bearer token first; the tenants a
//! search covers come from the token, never from the request. Errors are
//! `{"error": {"code": ..., "message": ...}}` with the matching status.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Claims, Verifier};
use crate::index::{LogIndex, SearchError, SearchRequest, SortOrder};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_LIMIT: usize = 100;

/// What the handlers share.
pub struct ApiState {
    /// The index searched.
    pub index: Arc<LogIndex>,
    /// Token verification.
    pub verifier: Verifier,
    /// Largest `limit`.
    pub max_limit: usize,
    /// What `/metrics` shows.
    pub metrics: crate::metrics::MetricsSource,
}

/// An API error, rendered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
    }
}

/// The routes.
pub fn router(state: Arc<ApiState>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/search", get(search_get).post(search_post))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(state)
}

fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(AuthError::Missing)?;
    let token =
        value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(AuthError::Missing)?;
    Ok(state.verifier.verify(token.trim())?)
}

/// Prometheus text, for admin tokens only: the counters name tenants.
async fn metrics(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let claims = authenticate(&state, &headers)?;
    if claims.role != crate::auth::Role::Admin {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "/metrics needs an admin token"));
    }
    let body = state.metrics.render();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response())
}

/// Search parameters, from the query string (GET) or a JSON body (POST).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// Query text in tantivy's grammar; `*` or empty matches all.
    #[serde(default)]
    q: String,
    /// RFC 3339 or relative (`-15m`); unbounded when absent.
    from: Option<String>,
    /// RFC 3339 or relative; unbounded when absent.
    to: Option<String>,
    /// Hits to return (default 100, capped by configuration).
    limit: Option<usize>,
    /// `desc` (newest first, default) or `asc`.
    order: Option<SortOrder>,
}

async fn search_get(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let claims = authenticate(&state, &headers)?;
    let Query(params) =
        params.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    search(state, claims, params).await
}

async fn search_post(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<SearchParams>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let claims = authenticate(&state, &headers)?;
    let Json(params) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    search(state, claims, params).await
}

async fn search(state: Arc<ApiState>, claims: Claims, params: SearchParams) -> Result<Response, ApiError> {
    let now = crate::time::now_ns();
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message);
    let from_ns = params.from.as_deref().map(|t| crate::time::parse_time(t, now)).transpose().map_err(bad)?;
    let to_ns = params.to.as_deref().map(|t| crate::time::parse_time(t, now)).transpose().map_err(bad)?;
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit > state.max_limit {
        return Err(bad(format!("limit {limit} is over the maximum of {}", state.max_limit)));
    }
    let request = SearchRequest {
        tenants: claims.all_tenants(),
        query: params.q,
        from_ns,
        to_ns,
        limit,
        order: params.order.unwrap_or_default(),
    };
    let index = state.index.clone();
    let result = tokio::task::spawn_blocking(move || index.search(&request))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match result {
        Ok(response) => Ok(Json(response).into_response()),
        Err(SearchError::BadQuery(message)) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_query", message))
        }
        Err(err) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", err.to_string())),
    }
}

/// Serves HTTPS on `listener` until `cancel` fires, then lets open
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    acceptor: Arc<crate::reload::ReloadingAcceptor>,
    app: axum::Router,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.acceptor();
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "api tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}
