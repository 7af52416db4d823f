//! A small HTTPS client for the query API, used by `logvault search`.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a request failed before an HTTP answer came back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not `https://host:port/...`.
    #[error("bad url {0:?}: expected https://host:port/...")]
    BadUrl(String),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] logvault_certs::TlsError),
    /// Connecting, the handshake or the exchange failed.
    #[error("{url}: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        message: String,
    },
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
    /// The headers, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Answer {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn header_list(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
        })
        .collect()
}

/// Percent-encodes a query-string value.
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Sends one request to `url` over HTTPS, trusting `ca`, and reads the
/// whole answer.
pub async fn request(
    method: &str,
    url: &str,
    ca: &Path,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Answer, ClientError> {
    let (response, driver) = send(method, url, ca, token, body).await?;
    let status = response.status().as_u16();
    let headers = header_list(response.headers());
    let transport = |message: String| ClientError::Transport { url: url.to_owned(), message };
    let body =
        response.into_body().collect().await.map_err(|e| transport(e.to_string()))?.to_bytes().to_vec();
    driver.abort();
    Ok(Answer { status, body, headers })
}

/// Sends a GET to `url` and hands each chunk of the answer's body to
/// `on_chunk` as it arrives, until the server closes or `on_chunk`
/// returns false. Returns the status; a non-200 answer's body is read
/// whole and returned instead of streamed.
pub async fn stream(
    url: &str,
    ca: &Path,
    token: Option<&str>,
    mut on_chunk: impl FnMut(&[u8]) -> bool,
) -> Result<Answer, ClientError> {
    let (response, driver) = send("GET", url, ca, token, None).await?;
    let status = response.status().as_u16();
    let headers = header_list(response.headers());
    let transport = |message: String| ClientError::Transport { url: url.to_owned(), message };
    let mut body = response.into_body();
    if status != 200 {
        let bytes = body.collect().await.map_err(|e| transport(e.to_string()))?.to_bytes().to_vec();
        driver.abort();
        return Ok(Answer { status, body: bytes, headers });
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| transport(e.to_string()))?;
        if let Some(data) = frame.data_ref()
            && !on_chunk(data)
        {
            break;
        }
    }
    driver.abort();
    Ok(Answer { status, body: Vec::new(), headers })
}

async fn send(
    method: &str,
    url: &str,
    ca: &Path,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(hyper::Response<hyper::body::Incoming>, tokio::task::JoinHandle<()>), ClientError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| ClientError::BadUrl(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let address = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:443") };
    let transport = |message: String| ClientError::Transport { url: url.to_owned(), message };
    let name = ServerName::try_from(host.clone()).map_err(|e| transport(e.to_string()))?;
    let connector = TlsConnector::from(Arc::clone(&logvault_certs::https_client_config(ca)?));
    let tcp = TcpStream::connect(&address).await.map_err(|e| transport(e.to_string()))?;
    let tls = connector.connect(name, tcp).await.map_err(|e| transport(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| transport(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json");
    if let Some(token) = token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| transport(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| transport(e.to_string()))?;
    Ok((response, driver))
}
