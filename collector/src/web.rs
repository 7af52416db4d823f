//! The web page at `/`: one HTML file, one script and one stylesheet,
//! embedded in the binary. The page signs in with a pasted token (kept in
//! the tab's session storage, never in a URL) and talks to the query API
//! on the same origin. It renders log text only as text. A client that
//! does not ask for HTML at `/` (an Elasticsearch sender checking what it
//! talks to) gets the Elasticsearch-style description instead.

use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// The page's routes.
pub(crate) fn router() -> axum::Router {
    axum::Router::new()
        .route(
            "/",
            get(|headers: HeaderMap| async move {
                let html = headers
                    .get(header::ACCEPT)
                    .and_then(|accept| accept.to_str().ok())
                    .is_some_and(|accept| accept.contains("text/html"));
                if !html {
                    return crate::bulk::info();
                }
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response()
            }),
        )
        .route(
            "/assets/app.js",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS).into_response()
            }),
        )
        .route(
            "/assets/app.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response() }),
        )
}
