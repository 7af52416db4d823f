//! The Elasticsearch bulk API, so Vector, Fluent Bit, Filebeat, Logstash
//! and the Elasticsearch clients ship to logvault by changing only the
//! address (and the token).
//!
//! `POST /_bulk` and `POST /{index}/_bulk` take NDJSON: an action line
//! (`index` or `create`, with `_index` and `_id`) and a document line per
//! item. The index names the record's source. `@timestamp` (RFC 3339 or
//! epoch milliseconds), `message` and `log.level` (or `level`) become the
//! record's time, line and level; every other member is a field under its
//! dotted name (`host.name` included: a claim, since `host` is the token's
//! subject). A document without `message` keeps its JSON as the line.
//!
//! The answer has the Elasticsearch shape, one item per action in order,
//! each with its own status, so a sender retries only what failed: 201
//! stored, 400 a document that cannot be read (the others are stored), 429
//! not stored because the WAL is full. It is sent only after every stored
//! item is fsynced. `_id` is echoed, not used to find duplicates.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use logvault_storage::record::Level;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::{ApiState, SenderCertificate};
use crate::senders::{Admitted, StoreError, admit, cut};
use logvault_storage::WireRecord as Record;

/// The version this API answers to, for senders that check it.
pub const COMPATIBLE_VERSION: &str = "8.11.0";
/// Depth of nested objects flattened into fields, at most.
const MAX_DEPTH: usize = 16;
/// Bytes of a field's dotted name, at most.
const MAX_NAME_BYTES: usize = 512;
/// Bytes of an index name, at most (Elasticsearch's own cap).
const MAX_INDEX_BYTES: usize = 255;
/// Distinct indices (streams) in one request, at most; items naming more
/// are refused on their own.
pub const MAX_INDICES_PER_REQUEST: usize = 32;

/// Caps on one bulk request's items, checked while reading them.
#[derive(Debug, Clone, Copy)]
pub struct BulkLimits {
    /// Items in one request, at most.
    pub max_items: usize,
    /// Bytes of a message; a longer one is cut and flagged `truncated`.
    pub max_message_bytes: usize,
    /// Fields of one document; more makes the item an error.
    pub max_fields: usize,
    /// Bytes of a field value; a longer one is cut and the record flagged.
    pub max_field_value_bytes: usize,
}

impl Default for BulkLimits {
    fn default() -> Self {
        BulkLimits {
            max_items: 100_000,
            max_message_bytes: 1024 * 1024,
            max_fields: 256,
            max_field_value_bytes: 64 * 1024,
        }
    }
}

/// Why one item was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// HTTP status of the item.
    pub status: u16,
    /// Elasticsearch's error type.
    pub kind: &'static str,
    /// For people.
    pub reason: String,
}

/// One action of a bulk request, read.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkItem {
    /// `index`, `create`, `update` or `delete`.
    pub action: String,
    /// The index (the record's source), possibly empty when none was named.
    pub index: String,
    /// `_id` as sent.
    pub id: Option<String>,
    /// The record, or why it cannot be stored.
    pub outcome: Result<Record, ItemError>,
}

/// Reads a bulk body. `Err` when the request as a whole cannot be read (an
/// action line that is not one, a missing document line, too many items):
/// nothing is stored then.
pub fn parse_bulk(
    body: &[u8],
    default_index: Option<&str>,
    limits: &BulkLimits,
    now_ns: i64,
) -> Result<Vec<BulkItem>, String> {
    if default_index.is_some_and(|index| index.len() > MAX_INDEX_BYTES) {
        return Err(format!("the index in the path is longer than {MAX_INDEX_BYTES} bytes"));
    }
    // The last line's newline ends it; it does not start another.
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut lines = body.split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let mut items = Vec::new();
    let mut number = 0usize;
    while let Some(line) = lines.next() {
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if items.len() == limits.max_items {
            return Err(format!("more than {} items in one request", limits.max_items));
        }
        let action: Map<String, Value> = serde_json::from_slice(line)
            .map_err(|e| format!("line {number}: malformed action/metadata line: {e}"))?;
        let mut entries = action.into_iter();
        let (Some((name, Value::Object(meta))), None) = (entries.next(), entries.next()) else {
            return Err(format!("line {number}: an action line holds one action and its metadata object"));
        };
        let index = match meta.get("_index") {
            Some(Value::String(index)) if index.len() > MAX_INDEX_BYTES => {
                return Err(format!("line {number}: _index is longer than {MAX_INDEX_BYTES} bytes"));
            }
            Some(Value::String(index)) => index.clone(),
            Some(_) => return Err(format!("line {number}: _index is not a string")),
            None => default_index.unwrap_or_default().to_owned(),
        };
        let id = match meta.get("_id") {
            Some(Value::String(id)) => Some(id.clone()),
            Some(Value::Number(id)) => Some(id.to_string()),
            Some(_) => return Err(format!("line {number}: _id is not a string")),
            None => None,
        };
        let outcome = match name.as_str() {
            "index" | "create" => {
                let Some(source) = lines.next() else {
                    return Err(format!("line {number}: the {name} action has no document line"));
                };
                number += 1;
                if index.is_empty() {
                    Err(item_error(400, "action_request_validation_exception", "index is missing".into()))
                } else if index.len() > 255 {
                    Err(item_error(
                        400,
                        "invalid_index_name_exception",
                        "index is longer than 255 bytes".into(),
                    ))
                } else {
                    document(source, limits, now_ns)
                }
            }
            "update" => {
                if lines.next().is_none() {
                    return Err(format!("line {number}: the update action has no document line"));
                }
                number += 1;
                Err(unsupported(&name))
            }
            "delete" => Err(unsupported(&name)),
            other => return Err(format!("line {number}: unknown action [{other}]")),
        };
        items.push(BulkItem { action: name, index, id, outcome });
    }
    Ok(items)
}

fn item_error(status: u16, kind: &'static str, reason: String) -> ItemError {
    ItemError { status, kind, reason }
}

fn unsupported(action: &str) -> ItemError {
    item_error(
        400,
        "illegal_argument_exception",
        format!("the {action} action is not supported: logvault stores records and never changes them"),
    )
}

fn parse_error(reason: String) -> ItemError {
    item_error(400, "mapper_parsing_exception", reason)
}

/// One document line as a record.
fn document(line: &[u8], limits: &BulkLimits, now_ns: i64) -> Result<Record, ItemError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| parse_error(format!("failed to parse the document: {e}")))?;
    let Value::Object(object) = &value else {
        return Err(parse_error("the document is not a JSON object".into()));
    };
    let mut fields = Vec::new();
    // Three names may be taken out below (time, message, level).
    flatten("", object, 0, limits.max_fields + 3, &mut fields).map_err(parse_error)?;
    let mut take = |name: &str| fields.iter().position(|(n, _)| n == name).map(|at| fields.remove(at).1);
    let timestamp_ns = match take("@timestamp") {
        Some(text) => parse_timestamp(&text)
            .ok_or_else(|| parse_error(format!("failed to parse field [@timestamp] of value {text:?}")))?,
        None => now_ns,
    };
    let explicit_message = take("message");
    let level_word = take("log.level").or_else(|| take("level"));
    let mut flags = 0;
    let mut message = explicit_message.unwrap_or_else(|| value.to_string());
    cut(&mut message, limits.max_message_bytes, &mut flags);
    let level = match level_word {
        Some(word) => Level::from_word(word.trim()).unwrap_or_else(|| {
            fields.push(("level".into(), word));
            Level::Unknown
        }),
        None => Level::sniff(&message),
    };
    if fields.len() > limits.max_fields {
        return Err(parse_error(format!(
            "the document has {} fields, over the limit of {}",
            fields.len(),
            limits.max_fields
        )));
    }
    for (_, value) in &mut fields {
        cut(value, limits.max_field_value_bytes, &mut flags);
    }
    Ok(Record { timestamp_ns, level, flags, message, fields })
}

/// Members of `object` as (dotted name, text): strings as they are,
/// numbers and booleans as JSON, arrays as JSON text, nulls left out.
fn flatten(
    prefix: &str,
    object: &Map<String, Value>,
    depth: usize,
    max_fields: usize,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("objects nested deeper than {MAX_DEPTH}"));
    }
    for (key, value) in object {
        if prefix.len() + 1 + key.len() > MAX_NAME_BYTES {
            return Err(format!("a field name is longer than {MAX_NAME_BYTES} bytes"));
        }
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            Value::Null => continue,
            Value::Object(inner) => {
                flatten(&name, inner, depth + 1, max_fields, out)?;
                continue;
            }
            Value::String(text) => out.push((name, text.clone())),
            other => out.push((name, other.to_string())),
        }
        if out.len() > max_fields {
            return Err(format!("the document has more than {} fields", max_fields - 3));
        }
    }
    Ok(())
}

/// RFC 3339, or milliseconds since the epoch (a number or digits).
fn parse_timestamp(text: &str) -> Option<i64> {
    if let Ok(millis) = text.parse::<i64>() {
        return millis.checked_mul(1_000_000);
    }
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(parsed.unix_timestamp_nanos()).ok()
}

/// Query parameters of the HTTP senders' routes.
#[derive(Debug, Deserialize)]
pub(crate) struct SenderParams {
    /// The tenant to store into, for a token that names several.
    pub(crate) tenant: Option<String>,
}

/// An Elasticsearch-shaped error answer.
pub(crate) fn es_error(status: StatusCode, kind: &str, reason: &str) -> Response {
    let body = json!({
        "error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
        "status": status.as_u16(),
    });
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    with_product(response)
}

/// Elasticsearch clients check this header on every answer.
pub(crate) fn with_product(mut response: Response) -> Response {
    response.headers_mut().insert("x-elastic-product", HeaderValue::from_static("Elasticsearch"));
    response
}

/// `GET /` for senders that check what they talk to.
pub(crate) fn info() -> Response {
    with_product(
        axum::Json(json!({
            "name": "logvault",
            "cluster_name": "logvault",
            "cluster_uuid": "logvault",
            "version": {
                "number": COMPATIBLE_VERSION,
                "build_flavor": "default",
                "lucene_version": "9.8.0",
                "minimum_wire_compatibility_version": "7.17.0",
                "minimum_index_compatibility_version": "7.0.0",
            },
            "tagline": "You Know, for Search",
        }))
        .into_response(),
    )
}

/// `GET /_cluster/health`, which some senders (Vector) check first.
pub(crate) async fn cluster_health() -> Response {
    with_product(
        axum::Json(json!({
            "cluster_name": "logvault", "status": "green", "timed_out": false,
            "number_of_nodes": 1, "number_of_data_nodes": 1,
        }))
        .into_response(),
    )
}

/// `GET /_license`, which some senders read before they ship.
pub(crate) async fn license() -> Response {
    with_product(
        axum::Json(json!({"license": {"status": "active", "type": "basic", "uid": "logvault"}}))
            .into_response(),
    )
}

/// `POST /_bulk`.
pub(crate) async fn bulk(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<SenderParams>,
    certificate: Option<Extension<SenderCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    store_bulk(state, None, params, certificate, headers, body).await
}

/// `POST /{index}/_bulk`.
pub(crate) async fn bulk_index(
    State(state): State<Arc<ApiState>>,
    Path(index): Path<String>,
    Query(params): Query<SenderParams>,
    certificate: Option<Extension<SenderCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    store_bulk(state, Some(index), params, certificate, headers, body).await
}

async fn store_bulk(
    state: Arc<ApiState>,
    index: Option<String>,
    params: SenderParams,
    certificate: Option<Extension<SenderCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = std::time::Instant::now();
    let certificate = certificate.as_ref().map(|c| &c.0);
    let Admitted { writer, senders, body: bytes, slot } =
        match admit(&state, &headers, certificate, params.tenant.as_deref(), body).await {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let mut response = es_error(refusal.status, refusal.kind, &refusal.reason);
                if refusal.status == StatusCode::TOO_MANY_REQUESTS {
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                }
                return response;
            }
        };
    let limits = state.bulk_limits;
    let parsed = tokio::task::spawn_blocking(move || {
        parse_bulk(&bytes, index.as_deref(), &limits, crate::time::now_ns())
    })
    .await;
    drop(slot);
    let mut items = match parsed {
        Ok(Ok(items)) => items,
        Ok(Err(reason)) => return es_error(StatusCode::BAD_REQUEST, "illegal_argument_exception", &reason),
        Err(_) => {
            return es_error(StatusCode::INTERNAL_SERVER_ERROR, "exception", "reading the request failed");
        }
    };
    // Each index is a stream: its records in the order sent.
    let mut order: Vec<String> = Vec::new();
    for item in &mut items {
        if item.outcome.is_err() || order.contains(&item.index) {
            continue;
        }
        if order.len() == MAX_INDICES_PER_REQUEST {
            item.outcome = Err(item_error(
                400,
                "illegal_argument_exception",
                format!("more than {MAX_INDICES_PER_REQUEST} indices in one request"),
            ));
            continue;
        }
        order.push(item.index.clone());
    }
    for source in &order {
        let at: Vec<usize> =
            (0..items.len()).filter(|&i| items[i].index == *source && items[i].outcome.is_ok()).collect();
        let records: Vec<Record> =
            at.iter().filter_map(|&i| items[i].outcome.as_ref().ok().cloned()).collect();
        if let Err((stored, err)) = senders.store(&writer.tenant, &writer.host, source, &records).await {
            let failed = match err {
                StoreError::Busy => item_error(429, "es_rejected_execution_exception", err.to_string()),
                StoreError::Failed(_) => item_error(500, "exception", err.to_string()),
            };
            for &i in &at[stored..] {
                items[i].outcome = Err(failed.clone());
            }
        }
    }
    let stamp = crate::time::now_ns();
    let mut errors = false;
    let answers: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(n, item)| {
            let id = item.id.clone().unwrap_or_else(|| format!("{stamp:x}-{n}"));
            let mut answer = json!({"_index": item.index, "_id": id});
            match &item.outcome {
                Ok(_) => {
                    answer["status"] = 201.into();
                    answer["result"] = "created".into();
                    answer["_version"] = 1.into();
                    answer["_seq_no"] = n.into();
                    answer["_primary_term"] = 1.into();
                    answer["_shards"] = json!({"total": 1, "successful": 1, "failed": 0});
                }
                Err(err) => {
                    errors = true;
                    answer["status"] = err.status.into();
                    answer["error"] = json!({"type": err.kind, "reason": err.reason});
                }
            }
            json!({ item.action.as_str(): answer })
        })
        .collect();
    let body = json!({"took": started.elapsed().as_millis() as u64, "errors": errors, "items": answers});
    with_product(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use logvault_storage::record::FLAG_TRUNCATED;
    use proptest::prelude::*;

    const NOW: i64 = 1_700_000_000_000_000_000;

    fn parse(body: &str, index: Option<&str>) -> Result<Vec<BulkItem>, String> {
        parse_bulk(body.as_bytes(), index, &BulkLimits::default(), NOW)
    }

    #[test]
    fn documents_map_to_records_and_fields() {
        let body = concat!(
            "{\"index\":{\"_index\":\"hadoop\",\"_id\":\"7\"}}\n",
            "{\"@timestamp\":\"2015-10-18T18:01:47.978Z\",\"message\":\"a line\",\"log\":{\"level\":\"WARN\"},",
            "\"host\":{\"name\":\"web-1\"},\"pid\":42,\"ok\":true,\"tags\":[\"a\",\"b\"],\"gone\":null}\n",
            "{\"create\":{}}\n",
            "{\"level\":\"loud\",\"msg\":\"no message\"}\n",
        );
        let items = parse(body, Some("default")).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            (items[0].action.as_str(), items[0].index.as_str(), items[0].id.as_deref()),
            ("index", "hadoop", Some("7"))
        );
        let first = items[0].outcome.as_ref().unwrap();
        assert_eq!(first.timestamp_ns, 1_445_191_307_978_000_000);
        assert_eq!(first.message, "a line");
        assert_eq!(first.level, Level::Warn);
        let field = |record: &Record, name: &str| {
            record.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        };
        assert_eq!(field(first, "host.name").as_deref(), Some("web-1"), "a claimed host is a field");
        assert_eq!(field(first, "pid").as_deref(), Some("42"));
        assert_eq!(field(first, "ok").as_deref(), Some("true"));
        assert_eq!(field(first, "tags").as_deref(), Some("[\"a\",\"b\"]"));
        assert_eq!(field(first, "gone"), None);
        assert_eq!(first.fields.len(), 4);
        let second = items[1].outcome.as_ref().unwrap();
        assert_eq!(items[1].index, "default", "the path's index");
        assert_eq!(second.timestamp_ns, NOW, "no @timestamp: the time it arrived");
        assert_eq!(second.message, "{\"level\":\"loud\",\"msg\":\"no message\"}", "no message: the document");
        assert_eq!((second.level, field(second, "level").as_deref()), (Level::Unknown, Some("loud")));
    }

    #[test]
    fn a_bad_document_is_its_own_error_and_the_rest_are_read() {
        let body = "{\"index\":{}}\n{\"message\":\"good\"}\n{\"index\":{}}\n{not json\n{\"index\":{}}\n[1,2]\n\
            {\"index\":{}}\n{\"@timestamp\":\"yesterday\"}\n{\"delete\":{\"_id\":\"1\"}}\n{\"index\":{\"_index\":\"\"}}\n{}\n";
        let items = parse(body, Some("i")).unwrap();
        let statuses: Vec<Option<&str>> =
            items.iter().map(|item| item.outcome.as_ref().err().map(|e| e.kind)).collect();
        assert_eq!(
            statuses,
            vec![
                None,
                Some("mapper_parsing_exception"),
                Some("mapper_parsing_exception"),
                Some("mapper_parsing_exception"),
                Some("illegal_argument_exception"),
                Some("action_request_validation_exception"),
            ]
        );
    }

    #[test]
    fn a_request_that_cannot_be_read_is_refused_whole() {
        assert!(parse("{\"index\":{}}", Some("i")).is_err(), "no document line");
        assert!(parse("not json\n{}\n", Some("i")).is_err());
        assert!(parse("{\"index\":{},\"create\":{}}\n{}\n", Some("i")).is_err());
        assert!(parse("{\"upsert\":{}}\n{}\n", Some("i")).is_err());
        let limits = BulkLimits { max_items: 1, ..BulkLimits::default() };
        assert!(parse_bulk(b"{\"index\":{}}\n{}\n{\"index\":{}}\n{}\n", Some("i"), &limits, NOW).is_err());
        assert_eq!(parse("\n\r\n", Some("i")).unwrap(), Vec::new());
    }

    #[test]
    fn caps_cut_and_flag_or_refuse() {
        let limits = BulkLimits {
            max_message_bytes: 4,
            max_fields: 2,
            max_field_value_bytes: 3,
            ..BulkLimits::default()
        };
        let items = parse_bulk(
            "{\"index\":{}}\n{\"message\":\"héllo\",\"a\":\"abcdef\"}\n{\"index\":{}}\n{\"a\":1,\"b\":2,\"c\":3}\n".as_bytes(),
            Some("i"),
            &limits,
            NOW,
        )
        .unwrap();
        let first = items[0].outcome.as_ref().unwrap();
        assert_eq!((first.message.as_str(), first.flags), ("hél", FLAG_TRUNCATED));
        assert_eq!(first.fields, vec![("a".to_owned(), "abc".to_owned())]);
        assert!(items[1].outcome.is_err(), "three fields over a cap of two");
    }

    proptest! {
        /// No body panics the reader, and every item it reads keeps to
        /// the caps.
        #[test]
        fn any_body_is_read_or_refused_within_the_caps(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let limits = BulkLimits { max_items: 8, max_message_bytes: 16, max_fields: 4, max_field_value_bytes: 8 };
            if let Ok(items) = parse_bulk(&body, Some("i"), &limits, NOW) {
                prop_assert!(items.len() <= 8);
                for record in items.iter().filter_map(|item| item.outcome.as_ref().ok()) {
                    prop_assert!(record.message.len() <= 16);
                    prop_assert!(record.fields.len() <= 4);
                    prop_assert!(record.fields.iter().all(|(_, v)| v.len() <= 8));
                }
            }
        }

        /// Documents made of arbitrary strings read back as sent.
        #[test]
        fn any_message_and_field_read_back(message in ".{0,40}", name in "[a-z]{1,8}", value in ".{0,20}") {
            let document = json!({"message": message, name.clone(): value});
            let body = format!("{{\"index\":{{}}}}\n{document}\n");
            let items = parse(&body, Some("i")).unwrap();
            let record = items[0].outcome.as_ref().unwrap();
            prop_assert_eq!(&record.message, &message);
            if !["@timestamp", "message", "level"].contains(&name.as_str()) {
                prop_assert_eq!(&record.fields, &vec![(name, value)]);
            }
        }
    }
}
