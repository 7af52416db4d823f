//! The HTTPS query API and the web page.
//!
//! Every `/api/v1` route checks the bearer token first; the tenants a
//! request covers come from the token, never from the request. Each token
//! holder has a request rate; queries run on a bounded pool of blocking
//! slots under a deadline, so one heavy query cannot stall the rest.
//! Errors are `{"error": {"code": ..., "message": ...}}` with the matching
//! status. The OpenAPI document is generated from the handlers below.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::{Bytes, Frame};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::aggregate::{AggregateResponse, HistogramRequest, TermsRequest};
use crate::auth::{AuthError, Claims, Role, Verifier};
use crate::index::{Hit, LogIndex};
use crate::limits::RateLimiter;
use crate::search::{
    Context, Cursor, Deadline, Filter, SearchError, SearchRequest, SearchResponse, SortOrder,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_LIMIT: usize = 100;
/// Most records on each side of a hit that `/api/v1/context` returns.
pub const MAX_CONTEXT: usize = 500;
/// Events a live tail holds for a client that is not reading; past it the
/// client is told it is too slow and dropped.
pub const TAIL_BUFFER_EVENTS: usize = 1024;
/// How often a live tail looks for new records.
const TAIL_POLL: Duration = Duration::from_millis(500);
/// Most records one poll of a live tail sends.
const TAIL_BATCH: usize = 500;
const TAIL_KEEPALIVE: Duration = Duration::from_secs(15);
/// Headers on every answer: nothing is cached, framed, sniffed or leaks
/// a referrer; scripts and styles come only from the collector itself.
const SECURITY_HEADERS: [(&str, &str); 7] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
    ("strict-transport-security", "max-age=31536000"),
    ("cross-origin-opener-policy", "same-origin"),
];

/// What the handlers share.
pub struct ApiState {
    /// The index searched.
    pub index: Arc<LogIndex>,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// Largest `limit`.
    pub max_limit: usize,
    /// What `/metrics` shows.
    pub metrics: crate::metrics::MetricsSource,
    /// How long a query may run.
    pub query_timeout: Duration,
    /// Requests per token holder.
    pub rates: RateLimiter,
    /// Slots for queries running at once.
    pub queries: Arc<Semaphore>,
    /// Live tails open now, and the most allowed.
    pub tails: AtomicUsize,
    /// The cap on `tails`.
    pub max_tails: usize,
    /// Fires on shutdown; live tails end with it.
    pub cancel: CancellationToken,
    /// Where HTTP senders' records go; None answers their routes 404.
    pub senders: Option<Arc<crate::senders::HttpSenders>>,
    /// Caps on a bulk request's items.
    pub bulk_limits: crate::bulk::BulkLimits,
    /// Bytes of one request body from an HTTP sender, at most.
    pub max_body_bytes: usize,
    /// Request bodies from HTTP senders read at once; the next waits.
    pub bodies: Arc<Semaphore>,
}

/// An API error, rendered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code: bad_request, bad_query, unauthorized, forbidden,
    /// not_found, too_many_requests, timeout, unavailable, internal.
    pub code: String,
    /// For people.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// The answer's status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// What went wrong, for people.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message } };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
    }
}

impl From<SearchError> for ApiError {
    fn from(err: SearchError) -> Self {
        match err {
            SearchError::BadQuery(message) => ApiError::new(StatusCode::BAD_REQUEST, "bad_query", message),
            SearchError::Forbidden(message) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            SearchError::Timeout(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", err.to_string())
            },
            SearchError::Internal(message) => {
                tracing::error!(error = %message, "search failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the search failed; see the collector's log",
                )
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "logvault query API",
        description = "Search, aggregate, tail and read around the records a logvault collector stored. \
            Every /api/v1 call needs `Authorization: Bearer <JWT>` (EdDSA, with exp, nbf, iss, aud, sub, \
            tenant or tenants, and role); a token only ever sees its own tenants."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, ErrorDetail, Hit))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build(),
            ),
        );
    }
}

/// The routes, the generated OpenAPI document and the page.
pub fn router(state: Arc<ApiState>) -> axum::Router {
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(search_get, search_post))
        .routes(routes!(aggregate))
        .routes(routes!(tail))
        .routes(routes!(context))
        .routes(routes!(metrics))
        .with_state(state.clone())
        .split_for_parts();
    let senders = axum::Router::new()
        .route("/_bulk", axum::routing::post(crate::bulk::bulk).put(crate::bulk::bulk))
        .route("/{index}/_bulk", axum::routing::post(crate::bulk::bulk_index).put(crate::bulk::bulk_index))
        .route("/_license", get(crate::bulk::license))
        .route("/_cluster/health", get(crate::bulk::cluster_health))
        .route("/v1/logs", axum::routing::post(crate::otlp::logs))
        .with_state(state);
    let openapi = openapi.to_pretty_json().expect("the OpenAPI document serialises");
    api.route(
        "/api/v1/openapi.json",
        get(move || {
            let body = openapi.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    )
    .merge(senders)
    .merge(crate::web::router())
    .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
    .layer(tower::util::MapResponseLayer::new(with_security_headers))
}

fn with_security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.entry(HeaderName::from_static(name)).or_insert(HeaderValue::from_static(value));
    }
    response
}

/// The caller's claims, after the token checks and the holder's rate.
fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(AuthError::Missing)?;
    let token =
        value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(AuthError::Missing)?;
    let claims = state.verifier.verify(token.trim())?;
    let holder = format!("{}\u{0}{}", claims.iss, claims.sub);
    if let Err(wait) = state.rates.try_take(&holder, 1) {
        return Err(ApiError {
            retry_after: Some(wait.as_secs().max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "over this token's request rate",
            )
        });
    }
    Ok(claims)
}

/// As [`authenticate`], for the routes that read: a writer token does not.
fn authenticate_reader(state: &ApiState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let claims = authenticate(state, headers)?;
    if claims.role == Role::Writer {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "a writer token cannot read"));
    }
    Ok(claims)
}

/// The verified client certificate of a request's connection, when the
/// API asks for one (`api.client_certificates`).
#[derive(Debug, Clone)]
pub struct SenderCertificate {
    /// The certificate's name.
    pub name: String,
    /// Its tenant, by the tenant mappings.
    pub tenant: String,
}

/// Who writes through the HTTP senders' routes, and where.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    /// The record's `host`: the token's subject or the certificate's name.
    pub(crate) host: String,
    /// The tenant the records go to.
    pub(crate) tenant: String,
}

/// The writer of an HTTP senders' request: a bearer token with the
/// `writer` or `admin` role, or else the connection's client certificate.
/// The tenant is the token's (or one of its tenants, `named`) or the
/// certificate's; a tenant neither covers is refused.
pub(crate) fn authenticate_writer(
    state: &ApiState,
    headers: &HeaderMap,
    certificate: Option<&SenderCertificate>,
    named: Option<&str>,
) -> Result<Writer, ApiError> {
    let writer = writer_of(state, headers, certificate, named)?;
    // Both name the archive's objects: refused here, not after the records
    // are acked and their segment cannot be named.
    for (what, part) in
        [("host (the token's sub or the certificate's name)", &writer.host), ("tenant", &writer.tenant)]
    {
        if !logvault_storage::archive::valid_part(part) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the {what} {part:?} is not 1 to 128 letters, digits, dots and dashes"),
            ));
        }
    }
    Ok(writer)
}

fn writer_of(
    state: &ApiState,
    headers: &HeaderMap,
    certificate: Option<&SenderCertificate>,
    named: Option<&str>,
) -> Result<Writer, ApiError> {
    if let Some(sender) = certificate.filter(|_| !headers.contains_key(header::AUTHORIZATION)) {
        if named.is_some_and(|named| named != sender.tenant) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this certificate writes to tenant {:?} only", sender.tenant),
            ));
        }
        if let Err(wait) = state.rates.try_take(&format!("certificate\u{0}{}", sender.name), 1) {
            return Err(ApiError {
                retry_after: Some(wait.as_secs().max(1)),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "over this sender's request rate",
                )
            });
        }
        return Ok(Writer { host: sender.name.clone(), tenant: sender.tenant.clone() });
    }
    let claims = authenticate(state, headers)?;
    if !matches!(claims.role, Role::Writer | Role::Admin) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "shipping records needs a writer token",
        ));
    }
    let tenants = claims.all_tenants();
    let tenant = match named {
        Some(named) if tenants.iter().any(|t| t == named) => named.to_owned(),
        Some(named) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this token cannot write to tenant {named:?}"),
            ));
        }
        None if tenants.len() == 1 => tenants[0].clone(),
        None => {
            return Err(ApiError::bad_request(
                "this token names several tenants (or none): name one with ?tenant=",
            ));
        }
    };
    Ok(Writer { host: claims.sub, tenant })
}

/// Runs `query` on a blocking slot under the query deadline. Waiting for
/// a slot counts against the deadline too.
async fn run_query<T: Send + 'static>(
    state: &ApiState,
    query: impl FnOnce(&LogIndex, &Deadline) -> Result<T, SearchError> + Send + 'static,
) -> Result<T, ApiError> {
    let deadline = Deadline::after_ms(state.query_timeout.as_millis() as u64);
    let permit = tokio::time::timeout(state.query_timeout, state.queries.clone().acquire_owned())
        .await
        .map_err(|_| ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "every query slot is busy; try again",
            )
        })?
        .expect("the query semaphore is never closed");
    let index = state.index.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        query(&index, &deadline)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(result?)
}

fn parse_filter(
    claims: &Claims,
    q: String,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Filter, ApiError> {
    let now = crate::time::now_ns();
    let from_ns = from.map(|t| crate::time::parse_time(t, now)).transpose().map_err(ApiError::bad_request)?;
    let to_ns = to.map(|t| crate::time::parse_time(t, now)).transpose().map_err(ApiError::bad_request)?;
    Ok(Filter { tenants: claims.all_tenants(), query: q, from_ns, to_ns })
}

/// Liveness: answers while the collector serves.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "serving", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Prometheus text, for admin tokens only: the counters name tenants.
#[utoipa::path(
    get,
    path = "/metrics",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format", body = String),
        (status = 401, body = ErrorBody), (status = 403, description = "not an admin token", body = ErrorBody),
    )
)]
async fn metrics(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let claims = authenticate(&state, &headers)?;
    if claims.role != Role::Admin {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "/metrics needs an admin token"));
    }
    let body = state.metrics.render();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response())
}

/// Search parameters, from the query string (GET) or a JSON body (POST).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// Query in tantivy's grammar over message (the default field), level,
    /// host, source, flags and fields.NAME; empty or `*` matches all.
    #[serde(default)]
    q: String,
    /// Start (inclusive): RFC 3339 or relative such as `-15m`; unbounded
    /// when absent.
    from: Option<String>,
    /// End (exclusive): RFC 3339 or relative; unbounded when absent.
    to: Option<String>,
    /// Hits to return (default 100, at most the configured maximum).
    limit: Option<usize>,
    /// `desc` (newest first, the default) or `asc`.
    order: Option<SortOrder>,
    /// The `cursor` of the previous page, with the same q, from, to and
    /// order: the next page, each hit exactly once.
    cursor: Option<String>,
}

/// Search: the exact total, a page of hits, and a cursor to the next.
#[utoipa::path(
    get,
    path = "/api/v1/search",
    params(SearchParams),
    security(("bearer" = [])),
    responses(
        (status = 200, body = SearchResponse),
        (status = 400, description = "bad query or parameter", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, description = "over the token's rate; see Retry-After", body = ErrorBody),
        (status = 503, description = "timed out or busy", body = ErrorBody),
    )
)]
async fn search_get(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let claims = authenticate_reader(&state, &headers)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    search(state, claims, params).await
}

/// Search, with the parameters as a JSON body.
#[utoipa::path(
    post,
    path = "/api/v1/search",
    request_body = SearchParams,
    security(("bearer" = [])),
    responses(
        (status = 200, body = SearchResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
async fn search_post(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<SearchParams>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let claims = authenticate_reader(&state, &headers)?;
    let Json(params) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    search(state, claims, params).await
}

async fn search(state: Arc<ApiState>, claims: Claims, params: SearchParams) -> Result<Response, ApiError> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > state.max_limit {
        return Err(ApiError::bad_request(format!("limit must be 1 to {}", state.max_limit)));
    }
    let cursor = params.cursor.as_deref().map(Cursor::decode).transpose()?;
    let filter = parse_filter(&claims, params.q, params.from.as_deref(), params.to.as_deref())?;
    let request = SearchRequest { filter, limit, order: params.order.unwrap_or_default(), cursor };
    let response = run_query(&state, move |index, deadline| index.search(&request, deadline)).await?;
    Ok(Json(response).into_response())
}

/// What to aggregate, under the same filter as a search.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateParams {
    /// As in search.
    #[serde(default)]
    q: String,
    /// As in search.
    from: Option<String>,
    /// As in search.
    to: Option<String>,
    /// A date histogram of the matches.
    histogram: Option<HistogramRequest>,
    /// Top values of level, host, source or fields.NAME.
    #[serde(default)]
    terms: Vec<TermsRequest>,
}

/// Counts: the exact total, a date histogram whose buckets add up to it,
/// and the top values of fields.
#[utoipa::path(
    post,
    path = "/api/v1/aggregate",
    request_body = AggregateParams,
    security(("bearer" = [])),
    responses(
        (status = 200, body = AggregateResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
async fn aggregate(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<AggregateParams>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let claims = authenticate_reader(&state, &headers)?;
    let Json(params) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = parse_filter(&claims, params.q, params.from.as_deref(), params.to.as_deref())?;
    let (histogram, terms) = (params.histogram, params.terms);
    let response = run_query(&state, move |index, deadline| {
        index.aggregate(&filter, histogram.as_ref(), &terms, deadline)
    })
    .await?;
    Ok(Json(response).into_response())
}

/// Which record, and how many around it.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ContextParams {
    /// The record's id, as a hit gives it.
    id: String,
    /// Records before it (default 10, at most 500).
    before: Option<usize>,
    /// Records after it (default 10, at most 500).
    after: Option<usize>,
}

/// A hit and the records around it in the same stream (host and source).
#[utoipa::path(
    get,
    path = "/api/v1/context",
    params(ContextParams),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Context),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "no such record among the token's tenants", body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
async fn context(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    params: Result<Query<ContextParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let claims = authenticate_reader(&state, &headers)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id: u64 = params.id.parse().map_err(|_| ApiError::bad_request(format!("bad id {:?}", params.id)))?;
    let (before, after) = (params.before.unwrap_or(10), params.after.unwrap_or(10));
    if before > MAX_CONTEXT || after > MAX_CONTEXT {
        return Err(ApiError::bad_request(format!("before and after are at most {MAX_CONTEXT}")));
    }
    let tenants = claims.all_tenants();
    let found =
        run_query(&state, move |index, deadline| index.context(&tenants, id, before, after, deadline))
            .await?;
    match found {
        Some(context) => Ok(Json(context).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no record {id}"))),
    }
}

/// What to follow.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TailParams {
    /// As in search; empty or `*` follows everything.
    #[serde(default)]
    q: String,
}

/// Live tail: server-sent events. Each new matching record is an event
/// `hit` whose data is the hit's JSON, oldest first; `: keepalive`
/// comments come every 15 s. A client that falls 1,024 events behind gets
/// an `error` event and is dropped.
#[utoipa::path(
    get,
    path = "/api/v1/tail",
    params(TailParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "text/event-stream of `hit` events", content_type = "text/event-stream", body = String),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, description = "over the rate or too many tails open", body = ErrorBody),
    )
)]
async fn tail(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    params: Result<Query<TailParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let claims = authenticate_reader(&state, &headers)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let slot = TailSlot::take(&state)?;
    let filter = parse_filter(&claims, params.q, None, None)?;
    // Checks the query and finds where the tail starts: after the newest.
    let start = {
        let filter = filter.clone();
        run_query(&state, move |index, deadline| index.since(&filter, None, 0, deadline)).await?
    };
    let (events, receiver) = mpsc::channel::<Bytes>(TAIL_BUFFER_EVENTS);
    tokio::spawn(follow(state.clone(), filter, start.next_id, events, slot));
    let mut response = Response::new(axum::body::Body::new(EventBody { receiver }));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    Ok(response)
}

/// One open live tail; the count goes down when it is dropped.
struct TailSlot(Arc<ApiState>);

impl TailSlot {
    fn take(state: &Arc<ApiState>) -> Result<TailSlot, ApiError> {
        let open = state.tails.fetch_add(1, Ordering::AcqRel);
        let slot = TailSlot(state.clone());
        if open >= state.max_tails {
            return Err(ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    format!("{} live tails are open, the most allowed", state.max_tails),
                )
            });
        }
        Ok(slot)
    }
}

impl Drop for TailSlot {
    fn drop(&mut self) {
        self.0.tails.fetch_sub(1, Ordering::AcqRel);
    }
}

fn sse_event(name: &str, data: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(data).expect("events serialise");
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

fn sse_error(code: &str, message: &str) -> Bytes {
    sse_event(
        "error",
        &ErrorBody { error: ErrorDetail { code: code.to_owned(), message: message.to_owned() } },
    )
}

/// Polls for new records and queues them as events, until the client
/// goes, falls too far behind, or the collector stops.
async fn follow(
    state: Arc<ApiState>,
    filter: Filter,
    mut next_id: u64,
    events: mpsc::Sender<Bytes>,
    _slot: TailSlot,
) {
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = state.cancel.cancelled() => {
                let _ = events.try_send(sse_error("unavailable", "the collector is shutting down"));
                return;
            }
            _ = events.closed() => return,
            _ = tokio::time::sleep(TAIL_POLL) => {}
        }
        let polled = {
            let filter = filter.clone();
            run_query(&state, move |index, deadline| {
                index.since(&filter, Some(next_id), TAIL_BATCH, deadline)
            })
            .await
        };
        let found = match polled {
            Ok(found) => found,
            Err(err) => {
                let _ = events.try_send(sse_error(err.code, &err.message));
                return;
            }
        };
        // One slot stays free for the message that drops a slow client.
        if events.capacity() <= found.hits.len() {
            tracing::info!(
                queued = TAIL_BUFFER_EVENTS - events.capacity(),
                "live tail client too slow; dropped"
            );
            let _ = events.try_send(sse_error(
                "too_slow",
                "the client fell too far behind the live tail and was dropped; narrow the query or reconnect",
            ));
            return;
        }
        if found.hits.is_empty() && quiet_since.elapsed() >= TAIL_KEEPALIVE {
            let _ = events.try_send(Bytes::from_static(b": keepalive\n\n"));
            quiet_since = tokio::time::Instant::now();
        }
        for hit in &found.hits {
            let _ = events.try_send(sse_event("hit", hit));
            quiet_since = tokio::time::Instant::now();
        }
        next_id = found.next_id;
    }
}

/// A response body fed by a bounded channel of events.
struct EventBody {
    receiver: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.receiver.poll_recv(cx).map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// Serves HTTPS on `listener` until `cancel` fires, then lets open
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    acceptor: Arc<crate::reload::ReloadingAcceptor>,
    app: axum::Router,
    certificates: Option<Arc<crate::config::TenantResolver>>,
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
        let reloading = acceptor.clone();
        let acceptor = acceptor.acceptor();
        let (app, certificates) = (app.clone(), certificates.clone());
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
            // A connection with a client certificate is checked again when
            // the CA or CRL changes, and closed once its certificate is no
            // longer accepted (revoked, say).
            let closed = cancel.child_token();
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default().to_vec();
            let _live = (!chain.is_empty()).then(|| reloading.register(peer, &chain, closed.clone()));
            // A client certificate (verified by the handshake) names a
            // sender for every request on this connection.
            let sender = certificates.and_then(|tenants| {
                let cert = tls.get_ref().1.peer_certificates()?.first()?;
                let name = logvault_certs::peer_name(cert).ok()?;
                let tenant = tenants.resolve(&name, crate::ingest::authority_key(&tls).as_deref()).to_owned();
                Some(SenderCertificate { name, tenant })
            });
            let service = tower::ServiceBuilder::new()
                .map_request(move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    if let Some(sender) = &sender {
                        request.extensions_mut().insert(sender.clone());
                    }
                    request
                })
                .service(app);
            let service = TowerToHyperService::new(service);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = closed.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}
