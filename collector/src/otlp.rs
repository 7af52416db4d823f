//! OpenTelemetry logs over HTTP (`POST /v1/logs`), protobuf or JSON, so
//! OpenTelemetry SDKs and collectors ship to logvault unchanged.
//!
//! Each log record becomes a record of source `otlp`: its time (or the
//! time it was observed, or when it arrived), its level from the severity
//! number (or text), its body as the line (a body that is not a string is
//! rendered as JSON), and as fields its attributes, its resource's
//! attributes (`service.name`, `host.name`: claims, since `host` is the
//! token's subject), its scope's name as `otel.scope.name`, its severity
//! text as `severity_text` and its trace and span ids in hex. The answer is
//! sent after the fsync; a full WAL is answered 429 with Retry-After (a
//! request the WAL fills halfway has its first part stored, and stored
//! again when it is resent).
//!
//! The protobuf decoder is our own and reads only what it needs: every
//! length is checked against what is left before anything is taken,
//! nesting and counts are capped, and unknown fields are skipped.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use logvault_storage::record::Level;
use serde_json::Value;

use crate::api::{ApiState, SenderCertificate};
use crate::bulk::{BulkLimits, SenderParams};
use crate::senders::{Admitted, StoreError, admit, cut};
use logvault_storage::WireRecord as Record;

/// The source of every OTLP record.
pub const OTLP_SOURCE: &str = "otlp";
/// Nesting of arrays and maps inside a value, at most.
const MAX_DEPTH: usize = 8;

/// Why a request cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// A protobuf reader over a slice.
struct Wire<'a> {
    bytes: &'a [u8],
}

enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    /// Read past: OTLP's only fixed32 field (a record's flags) is not kept.
    Fixed32,
    Bytes(&'a [u8]),
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self.bytes.split_first().ok_or_else(|| bad("truncated varint"))?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.bytes.len() {
            return Err(bad("a length runs past the end"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next field number and value, or None at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, DecodeError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| bad("length too large"))?;
                Field::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Field::Fixed32
            }
            other => return Err(bad(format!("wire type {other} is not used by OTLP"))),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn text(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| bad("a string is not UTF-8"))
}

/// Bytes of an attribute's dotted name, at most; longer ones are dropped.
const MAX_NAME_BYTES: usize = 512;

/// Attributes as they are read: values cut to the cap at once, at most
/// `max_fields` kept (the rest dropped), names past [`MAX_NAME_BYTES`]
/// dropped; `truncated` says whether anything was cut or dropped.
struct Attributes<'l> {
    limits: &'l BulkLimits,
    pairs: Vec<(String, String)>,
    truncated: bool,
}

impl<'l> Attributes<'l> {
    fn new(limits: &'l BulkLimits) -> Self {
        Attributes { limits, pairs: Vec::new(), truncated: false }
    }

    fn push(&mut self, name: String, mut value: String) {
        if self.pairs.len() >= self.limits.max_fields || name.len() > MAX_NAME_BYTES {
            self.truncated = true;
            return;
        }
        let mut flags = 0;
        cut(&mut value, self.limits.max_field_value_bytes, &mut flags);
        self.truncated |= flags != 0;
        self.pairs.push((name, value));
    }

    fn bytes(&self) -> usize {
        self.pairs.iter().map(|(name, value)| name.len() + value.len()).sum()
    }
}

/// What a request holds, before it becomes records. `budget` is what the
/// records may still take in bytes: resource and scope attributes are
/// repeated on each of their records, so a request cannot make many times
/// its own size.
struct Builder<'l> {
    limits: &'l BulkLimits,
    now_ns: i64,
    budget: usize,
    records: Vec<Record>,
}

/// One log record as read, its fields not yet joined with its resource's.
struct LogRecord<'l> {
    time_ns: u64,
    observed_ns: u64,
    severity_number: u64,
    severity_text: String,
    body: Option<String>,
    fields: Attributes<'l>,
}

impl<'l> LogRecord<'l> {
    fn new(limits: &'l BulkLimits) -> Self {
        LogRecord {
            time_ns: 0,
            observed_ns: 0,
            severity_number: 0,
            severity_text: String::new(),
            body: None,
            fields: Attributes::new(limits),
        }
    }
}

impl<'l> Builder<'l> {
    fn new(limits: &'l BulkLimits, now_ns: i64, request_bytes: usize) -> Self {
        Builder {
            limits,
            now_ns,
            budget: request_bytes.saturating_mul(4).saturating_add(1 << 20),
            records: Vec::new(),
        }
    }

    /// Adds a record with its scope's and its resource's attributes.
    fn push(&mut self, record: LogRecord<'_>, shared: [&Attributes<'_>; 2]) -> Result<(), DecodeError> {
        if self.records.len() >= self.limits.max_items {
            return Err(bad(format!("more than {} log records in one request", self.limits.max_items)));
        }
        let time = if record.time_ns != 0 { record.time_ns } else { record.observed_ns };
        let timestamp_ns = if time == 0 { self.now_ns } else { i64::try_from(time).unwrap_or(i64::MAX) };
        let level = level_of(record.severity_number, &record.severity_text);
        let mut flags = 0;
        let mut message = record.body.unwrap_or_default();
        cut(&mut message, self.limits.max_message_bytes, &mut flags);
        let mut fields = record.fields;
        if !record.severity_text.is_empty() {
            fields.push("severity_text".into(), record.severity_text);
        }
        let cost = 64 + message.len() + fields.bytes() + shared.iter().map(|s| s.bytes()).sum::<usize>();
        if cost > self.budget {
            return Err(bad("the request's records would take more than four times its size"));
        }
        self.budget -= cost;
        for attributes in shared {
            for (name, value) in &attributes.pairs {
                fields.push(name.clone(), value.clone());
            }
            fields.truncated |= attributes.truncated;
        }
        if fields.truncated {
            flags |= logvault_storage::record::FLAG_TRUNCATED;
        }
        self.records.push(Record { timestamp_ns, level, flags, message, fields: fields.pairs });
        Ok(())
    }
}

/// The level of an OTLP severity number (1 to 24 in six bands), else of
/// its text.
fn level_of(number: u64, text: &str) -> Level {
    match number {
        1..=4 => Level::Trace,
        5..=8 => Level::Debug,
        9..=12 => Level::Info,
        13..=16 => Level::Warn,
        17..=20 => Level::Error,
        21..=24 => Level::Fatal,
        _ => Level::from_word(text.trim()).unwrap_or(Level::Unknown),
    }
}

/// Reads an `ExportLogsServiceRequest` in protobuf.
pub fn decode_protobuf(bytes: &[u8], limits: &BulkLimits, now_ns: i64) -> Result<Vec<Record>, DecodeError> {
    let mut builder = Builder::new(limits, now_ns, bytes.len());
    let mut request = Wire { bytes };
    while let Some((number, field)) = request.next()? {
        if let (1, Field::Bytes(resource_logs)) = (number, field) {
            resource_logs_pb(resource_logs, &mut builder)?;
        }
    }
    Ok(builder.records)
}

fn resource_logs_pb(bytes: &[u8], builder: &mut Builder<'_>) -> Result<(), DecodeError> {
    let limits = builder.limits;
    // The resource may come after its scopes: read it first.
    let mut resource_attributes = Attributes::new(limits);
    let mut wire = Wire { bytes };
    while let Some((number, field)) = wire.next()? {
        if let (1, Field::Bytes(resource)) = (number, field) {
            let mut inner = Wire { bytes: resource };
            while let Some((number, field)) = inner.next()? {
                if let (1, Field::Bytes(pair)) = (number, field) {
                    key_value_pb(pair, "", 0, &mut resource_attributes)?;
                }
            }
        }
    }
    let mut wire = Wire { bytes };
    while let Some((number, field)) = wire.next()? {
        let (2, Field::Bytes(scope_logs)) = (number, field) else { continue };
        let mut shared = Attributes::new(limits);
        let mut records = Vec::new();
        let mut inner = Wire { bytes: scope_logs };
        while let Some((number, field)) = inner.next()? {
            match (number, field) {
                (1, Field::Bytes(scope)) => {
                    let mut scope = Wire { bytes: scope };
                    while let Some((number, field)) = scope.next()? {
                        if let (1, Field::Bytes(name)) = (number, field)
                            && !name.is_empty()
                        {
                            shared.push("otel.scope.name".into(), text(name)?);
                        }
                    }
                }
                (2, Field::Bytes(record)) => records.push(record),
                _ => {}
            }
        }
        for record in records {
            let record = log_record_pb(record, limits)?;
            builder.push(record, [&shared, &resource_attributes])?;
        }
    }
    Ok(())
}

fn log_record_pb<'l>(bytes: &[u8], limits: &'l BulkLimits) -> Result<LogRecord<'l>, DecodeError> {
    let mut record = LogRecord::new(limits);
    let mut wire = Wire { bytes };
    while let Some((number, field)) = wire.next()? {
        match (number, field) {
            (1, Field::Fixed64(ns)) => record.time_ns = ns,
            (11, Field::Fixed64(ns)) => record.observed_ns = ns,
            (2, Field::Varint(severity)) => record.severity_number = severity,
            (3, Field::Bytes(severity)) => record.severity_text = text(severity)?,
            (5, Field::Bytes(body)) => record.body = Some(body_text(any_value_pb(body, 0)?, limits)?),
            (6, Field::Bytes(pair)) => key_value_pb(pair, "", 0, &mut record.fields)?,
            (9, Field::Bytes(id)) if !id.is_empty() => record.fields.push("trace_id".into(), hex(id)),
            (10, Field::Bytes(id)) if !id.is_empty() => record.fields.push("span_id".into(), hex(id)),
            _ => {}
        }
    }
    Ok(record)
}

/// An attribute, flattened: a map's members under `key.member`.
fn key_value_pb(
    bytes: &[u8],
    prefix: &str,
    depth: usize,
    out: &mut Attributes<'_>,
) -> Result<(), DecodeError> {
    let (mut key, mut value) = (String::new(), None);
    let mut wire = Wire { bytes };
    while let Some((number, field)) = wire.next()? {
        match (number, field) {
            (1, Field::Bytes(k)) => key = text(k)?,
            (2, Field::Bytes(v)) => value = Some(v),
            _ => {}
        }
    }
    let name = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
    if name.len() > MAX_NAME_BYTES {
        out.truncated = true;
        return Ok(());
    }
    let Some(value) = value else { return Ok(()) };
    match any_value_pb(value, depth)? {
        Any::Map(pairs) => {
            for pair in pairs {
                key_value_pb(pair, &name, depth + 1, out)?;
            }
        }
        Any::Value(Value::Null) => {}
        Any::Value(value) => out.push(name, value_text(value)),
    }
    Ok(())
}

/// An `AnyValue`: a scalar or an array as a JSON value, a map kept for
/// flattening.
enum Any<'a> {
    Value(Value),
    Map(Vec<&'a [u8]>),
}

/// A JSON value as a field's text: a string as it is, anything else as
/// JSON.
fn value_text(value: Value) -> String {
    match value {
        Value::String(text) => text,
        other => other.to_string(),
    }
}

/// A record's body as its line: a map's members as one JSON object.
fn body_text(body: Any<'_>, limits: &BulkLimits) -> Result<String, DecodeError> {
    Ok(match body {
        Any::Value(Value::Null) => String::new(),
        Any::Value(value) => value_text(value),
        Any::Map(pairs) => {
            let mut members = Attributes::new(limits);
            for pair in pairs {
                key_value_pb(pair, "", 1, &mut members)?;
            }
            Value::Object(members.pairs.into_iter().map(|(k, v)| (k, Value::String(v))).collect()).to_string()
        }
    })
}

fn any_value_pb(bytes: &[u8], depth: usize) -> Result<Any<'_>, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(bad(format!("values nested deeper than {MAX_DEPTH}")));
    }
    let mut out = Any::Value(Value::Null);
    let mut wire = Wire { bytes };
    while let Some((number, field)) = wire.next()? {
        out = match (number, field) {
            (1, Field::Bytes(s)) => Any::Value(Value::String(text(s)?)),
            (2, Field::Varint(b)) => Any::Value(Value::Bool(b != 0)),
            (3, Field::Varint(i)) => Any::Value(Value::from(i as i64)),
            (4, Field::Fixed64(d)) => Any::Value(
                serde_json::Number::from_f64(f64::from_bits(d))
                    .map_or_else(|| Value::String(f64::from_bits(d).to_string()), Value::Number),
            ),
            (5, Field::Bytes(array)) => {
                let mut items = Vec::new();
                let mut inner = Wire { bytes: array };
                while let Some((number, field)) = inner.next()? {
                    if let (1, Field::Bytes(item)) = (number, field) {
                        items.push(match any_value_pb(item, depth + 1)? {
                            Any::Value(value) => value,
                            // A map inside an array: its members' names, as
                            // an object of their texts.
                            Any::Map(pairs) => {
                                let mut members = Vec::new();
                                for pair in pairs {
                                    let mut wire = Wire { bytes: pair };
                                    let (mut key, mut value) = (String::new(), Value::Null);
                                    while let Some((number, field)) = wire.next()? {
                                        match (number, field) {
                                            (1, Field::Bytes(k)) => key = text(k)?,
                                            (2, Field::Bytes(v)) => {
                                                value = match any_value_pb(v, depth + 2)? {
                                                    Any::Value(value) => value,
                                                    Any::Map(_) => Value::String("{...}".into()),
                                                }
                                            }
                                            _ => {}
                                        }
                                    }
                                    members.push((key, value));
                                }
                                Value::Object(members.into_iter().collect())
                            }
                        });
                    }
                }
                Any::Value(Value::Array(items))
            }
            (6, Field::Bytes(list)) => {
                let mut pairs = Vec::new();
                let mut inner = Wire { bytes: list };
                while let Some((number, field)) = inner.next()? {
                    if let (1, Field::Bytes(pair)) = (number, field) {
                        pairs.push(pair);
                    }
                }
                Any::Map(pairs)
            }
            (7, Field::Bytes(b)) => Any::Value(Value::String(hex(b))),
            _ => continue,
        };
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads an `ExportLogsServiceRequest` in OTLP's JSON encoding.
pub fn decode_json(bytes: &[u8], limits: &BulkLimits, now_ns: i64) -> Result<Vec<Record>, DecodeError> {
    let request: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let mut builder = Builder::new(limits, now_ns, bytes.len());
    for resource_logs in array(&request, "resourceLogs") {
        let mut resource_attributes = Attributes::new(limits);
        for pair in array(&resource_logs["resource"], "attributes") {
            key_value_json(pair, "", 0, &mut resource_attributes)?;
        }
        for scope_logs in array(resource_logs, "scopeLogs") {
            let mut shared = Attributes::new(limits);
            if let Some(name) = scope_logs["scope"]["name"].as_str().filter(|n| !n.is_empty()) {
                shared.push("otel.scope.name".into(), name.to_owned());
            }
            for log in array(scope_logs, "logRecords") {
                let mut record = LogRecord {
                    time_ns: json_u64(&log["timeUnixNano"]),
                    observed_ns: json_u64(&log["observedTimeUnixNano"]),
                    severity_number: json_u64(&log["severityNumber"]),
                    severity_text: log["severityText"].as_str().unwrap_or_default().to_owned(),
                    ..LogRecord::new(limits)
                };
                if !log["body"].is_null() {
                    record.body = Some(match any_value_json(&log["body"], 0)? {
                        Value::Null => String::new(),
                        value => value_text(value),
                    });
                }
                for pair in array(log, "attributes") {
                    key_value_json(pair, "", 0, &mut record.fields)?;
                }
                for (key, name) in [("traceId", "trace_id"), ("spanId", "span_id")] {
                    if let Some(id) = log[key].as_str().filter(|id| !id.is_empty()) {
                        record.fields.push(name.into(), id.to_ascii_lowercase());
                    }
                }
                builder.push(record, [&shared, &resource_attributes])?;
            }
        }
    }
    Ok(builder.records)
}

fn array<'v>(value: &'v Value, key: &str) -> impl Iterator<Item = &'v Value> {
    value[key].as_array().into_iter().flatten()
}

/// OTLP JSON carries 64-bit integers as strings or numbers.
fn json_u64(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.parse().unwrap_or(0),
        other => other.as_u64().unwrap_or(0),
    }
}

fn key_value_json(
    pair: &Value,
    prefix: &str,
    depth: usize,
    out: &mut Attributes<'_>,
) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(bad(format!("values nested deeper than {MAX_DEPTH}")));
    }
    let key = pair["key"].as_str().unwrap_or_default();
    let name = if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") };
    if name.len() > MAX_NAME_BYTES {
        out.truncated = true;
        return Ok(());
    }
    let value = &pair["value"];
    if let Some(list) = value.get("kvlistValue") {
        for inner in array(list, "values") {
            key_value_json(inner, &name, depth + 1, out)?;
        }
    } else {
        match any_value_json(value, depth)? {
            Value::Null => {}
            value => out.push(name, value_text(value)),
        }
    }
    Ok(())
}

/// An OTLP JSON `AnyValue` as a JSON value (arrays and maps kept as JSON,
/// never as text inside text).
fn any_value_json(value: &Value, depth: usize) -> Result<Value, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(bad(format!("values nested deeper than {MAX_DEPTH}")));
    }
    Ok(if let Some(text) = value.get("stringValue").and_then(Value::as_str) {
        Value::String(text.to_owned())
    } else if let Some(b) = value.get("boolValue").and_then(Value::as_bool) {
        Value::Bool(b)
    } else if let Some(i) = value.get("intValue") {
        match i {
            Value::String(text) => Value::String(text.clone()),
            other => other.clone(),
        }
    } else if let Some(d) = value.get("doubleValue") {
        d.clone()
    } else if let Some(b) = value.get("bytesValue").and_then(Value::as_str) {
        Value::String(b.to_owned())
    } else if let Some(list) = value.get("arrayValue") {
        let items: Result<Vec<Value>, DecodeError> =
            array(list, "values").map(|v| any_value_json(v, depth + 1)).collect();
        Value::Array(items?)
    } else if let Some(list) = value.get("kvlistValue") {
        let mut members = serde_json::Map::new();
        for inner in array(list, "values") {
            let key = inner["key"].as_str().unwrap_or_default().to_owned();
            members.insert(key, any_value_json(&inner["value"], depth + 1)?);
        }
        Value::Object(members)
    } else {
        Value::Null
    })
}

fn answer(status: StatusCode, message: &str) -> Response {
    let mut response = (status, axum::Json(serde_json::json!({"code": status.as_u16(), "message": message})))
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    response
}

/// `POST /v1/logs`.
pub(crate) async fn logs(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<SenderParams>,
    certificate: Option<Extension<SenderCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let certificate = certificate.as_ref().map(|c| &c.0);
    let Admitted { writer, senders, body: bytes, slot } =
        match admit(&state, &headers, certificate, params.tenant.as_deref(), body).await {
            Ok(admitted) => admitted,
            Err(refusal) => return answer(refusal.status, &refusal.reason),
        };
    let limits = state.bulk_limits;
    let decoded = tokio::task::spawn_blocking(move || {
        let now = crate::time::now_ns();
        if json { decode_json(&bytes, &limits, now) } else { decode_protobuf(&bytes, &limits, now) }
    })
    .await;
    drop(slot);
    let Ok(decoded) = decoded else {
        return answer(StatusCode::INTERNAL_SERVER_ERROR, "reading the request failed");
    };
    let records = match decoded {
        Ok(records) => records,
        Err(err) => return answer(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    match senders.store(&writer.tenant, &writer.host, OTLP_SOURCE, &records).await {
        Ok(()) if json => ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
        // An empty ExportLogsServiceResponse.
        Ok(()) => ([(header::CONTENT_TYPE, "application/x-protobuf")], Vec::new()).into_response(),
        Err((_, StoreError::Busy)) => {
            answer(StatusCode::TOO_MANY_REQUESTS, "the collector is busy (its WAL is full); retry later")
        }
        Err((_, err @ StoreError::Failed(_))) => answer(StatusCode::SERVICE_UNAVAILABLE, &err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logvault_storage::record::FLAG_TRUNCATED;
    use proptest::prelude::*;

    const NOW: i64 = 1_700_000_000_000_000_000;

    fn put_varint(out: &mut Vec<u8>, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes_field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        put_varint(out, number << 3 | 2);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    fn string_value(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        bytes_field(&mut out, 1, text.as_bytes());
        out
    }

    fn key_value(key: &str, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        bytes_field(&mut out, 1, key.as_bytes());
        bytes_field(&mut out, 2, value);
        out
    }

    fn log_record(time: u64, severity: u64, body: &str, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, 1 << 3 | 1);
        out.extend_from_slice(&time.to_le_bytes());
        put_varint(&mut out, 2 << 3);
        put_varint(&mut out, severity);
        bytes_field(&mut out, 5, &string_value(body));
        for attribute in attributes {
            bytes_field(&mut out, 6, attribute);
        }
        bytes_field(&mut out, 9, &[0xab; 16]);
        // An unknown field, skipped.
        put_varint(&mut out, 99 << 3 | 5);
        out.extend_from_slice(&[1, 2, 3, 4]);
        out
    }

    fn request(resource: &[Vec<u8>], scope: &str, records: &[Vec<u8>]) -> Vec<u8> {
        let mut resource_msg = Vec::new();
        for attribute in resource {
            bytes_field(&mut resource_msg, 1, attribute);
        }
        let mut scope_msg = Vec::new();
        bytes_field(&mut scope_msg, 1, scope.as_bytes());
        let mut scope_logs = Vec::new();
        bytes_field(&mut scope_logs, 1, &scope_msg);
        for record in records {
            bytes_field(&mut scope_logs, 2, record);
        }
        let mut resource_logs = Vec::new();
        // Scopes first, the resource after: both orders are read.
        bytes_field(&mut resource_logs, 2, &scope_logs);
        bytes_field(&mut resource_logs, 1, &resource_msg);
        let mut out = Vec::new();
        bytes_field(&mut out, 1, &resource_logs);
        out
    }

    #[test]
    fn a_protobuf_request_becomes_records_with_their_resource() {
        let mut nested = Vec::new();
        bytes_field(&mut nested, 1, &key_value("inner", &string_value("x")));
        let mut map_value = Vec::new();
        bytes_field(&mut map_value, 6, &nested);
        let mut int_value = Vec::new();
        put_varint(&mut int_value, 3 << 3);
        put_varint(&mut int_value, (-5i64) as u64);
        let body = request(
            &[key_value("service.name", &string_value("spark")), key_value("host.name", &string_value("h1"))],
            "app.logger",
            &[
                log_record(1_600_000_000_000_000_000, 13, "a warning", &[key_value("n", &int_value)]),
                log_record(0, 0, "no time", &[key_value("m", &map_value)]),
            ],
        );
        let records = decode_protobuf(&body, &BulkLimits::default(), NOW).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].timestamp_ns, 1_600_000_000_000_000_000);
        assert_eq!(records[0].level, Level::Warn);
        assert_eq!(records[0].message, "a warning");
        let field = |r: &Record, name: &str| r.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(field(&records[0], "n").as_deref(), Some("-5"));
        assert_eq!(field(&records[0], "service.name").as_deref(), Some("spark"));
        assert_eq!(field(&records[0], "host.name").as_deref(), Some("h1"));
        assert_eq!(field(&records[0], "otel.scope.name").as_deref(), Some("app.logger"));
        assert_eq!(field(&records[0], "trace_id").as_deref(), Some("ab".repeat(16).as_str()));
        assert_eq!((records[1].timestamp_ns, records[1].level), (NOW, Level::Unknown));
        assert_eq!(field(&records[1], "m.inner").as_deref(), Some("x"), "a map's members are flattened");
    }

    #[test]
    fn a_json_request_becomes_the_same_records() {
        let body = serde_json::json!({"resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "spark"}}]},
            "scopeLogs": [{"scope": {"name": "app.logger"}, "logRecords": [{
                "timeUnixNano": "1600000000000000000", "severityNumber": 17, "severityText": "ERROR",
                "body": {"stringValue": "it broke"},
                "attributes": [{"key": "n", "value": {"intValue": "7"}},
                               {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"boolValue": true}]}}}],
                "traceId": "ABCD"
            }]}]
        }]});
        let records = decode_json(body.to_string().as_bytes(), &BulkLimits::default(), NOW).unwrap();
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(
            (record.timestamp_ns, record.level, record.message.as_str()),
            (1_600_000_000_000_000_000, Level::Error, "it broke")
        );
        let mut fields = record.fields.clone();
        fields.sort();
        assert_eq!(
            fields,
            vec![
                ("n".to_owned(), "7".to_owned()),
                ("otel.scope.name".to_owned(), "app.logger".to_owned()),
                ("service.name".to_owned(), "spark".to_owned()),
                ("severity_text".to_owned(), "ERROR".to_owned()),
                ("tags".to_owned(), "[\"a\",true]".to_owned()),
                ("trace_id".to_owned(), "abcd".to_owned()),
            ]
        );
    }

    #[test]
    fn caps_and_damage_are_refused() {
        let limits = BulkLimits { max_items: 1, ..BulkLimits::default() };
        let two = request(&[], "s", &[log_record(1, 9, "a", &[]), log_record(2, 9, "b", &[])]);
        assert!(decode_protobuf(&two, &limits, NOW).is_err(), "over the record cap");
        let one = request(&[], "s", &[log_record(1, 9, "a", &[])]);
        for cut in 1..one.len() {
            // A cut request is refused or reads fewer records; never more.
            if let Ok(records) = decode_protobuf(&one[..cut], &BulkLimits::default(), NOW) {
                assert!(records.len() <= 1);
            }
        }
        let mut deep = string_value("leaf");
        for _ in 0..20 {
            let mut array = Vec::new();
            bytes_field(&mut array, 1, &deep);
            let mut value = Vec::new();
            bytes_field(&mut value, 5, &array);
            deep = value;
        }
        let nested = request(&[], "s", &[log_record(1, 9, "a", &[key_value("deep", &deep)])]);
        assert!(decode_protobuf(&nested, &BulkLimits::default(), NOW).is_err(), "nested past the cap");
        let limits = BulkLimits { max_message_bytes: 3, ..BulkLimits::default() };
        let long = request(&[], "s", &[log_record(1, 9, "abcdef", &[])]);
        let records = decode_protobuf(&long, &limits, NOW).unwrap();
        assert_eq!((records[0].message.as_str(), records[0].flags), ("abc", FLAG_TRUNCATED));
    }

    /// A request cannot make many times its size: resource attributes
    /// repeated on many records stop at the budget; attributes past the
    /// cap are dropped and the record flagged, not the request refused;
    /// nested arrays and map bodies stay JSON, never text inside text.
    #[test]
    fn amplification_is_bounded_and_extra_attributes_are_dropped() {
        let big = string_value(&"v".repeat(60_000));
        let resource: Vec<Vec<u8>> = (0..200).map(|i| key_value(&format!("k{i}"), &big)).collect();
        let records: Vec<Vec<u8>> = (0..2_000).map(|_| Vec::new()).collect();
        let request_bytes = request(&resource, "s", &records);
        assert!(decode_protobuf(&request_bytes, &BulkLimits::default(), NOW).is_err(), "past the budget");

        let many: Vec<Vec<u8>> = (0..300).map(|i| key_value(&format!("a{i}"), &string_value("x"))).collect();
        let records =
            decode_protobuf(&request(&[], "s", &[log_record(1, 9, "m", &many)]), &BulkLimits::default(), NOW)
                .unwrap();
        assert_eq!(records[0].fields.len(), 256);
        assert_eq!(records[0].flags, FLAG_TRUNCATED);

        let mut nested = string_value("\"q\"");
        for _ in 0..6 {
            let mut array = Vec::new();
            bytes_field(&mut array, 1, &nested);
            let mut value = Vec::new();
            bytes_field(&mut value, 5, &array);
            nested = value;
        }
        let records = decode_protobuf(
            &request(&[], "s", &[log_record(1, 9, "m", &[key_value("deep", &nested)])]),
            &BulkLimits::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(records[0].fields[0].1, "[[[[[[\"\\\"q\\\"\"]]]]]]", "escaped once");

        let mut inner = Vec::new();
        bytes_field(&mut inner, 1, &key_value("id", &string_value("7")));
        let mut user = Vec::new();
        bytes_field(&mut user, 6, &inner);
        let mut members = Vec::new();
        bytes_field(&mut members, 1, &key_value("user", &user));
        let mut body = Vec::new();
        bytes_field(&mut body, 6, &members);
        let mut record = Vec::new();
        bytes_field(&mut record, 5, &body);
        let records = decode_protobuf(&request(&[], "s", &[record]), &BulkLimits::default(), NOW).unwrap();
        assert_eq!(records[0].message, "{\"user.id\":\"7\"}", "a map body keeps its nested members");
    }

    #[test]
    fn the_fuzz_seeds_read_as_one_record_each() {
        for (target, seed) in crate::fuzzing::http_seeds().into_iter().filter(|(t, _)| *t == "otlp") {
            let records = decode_json(&seed, &BulkLimits::default(), NOW)
                .or_else(|_| decode_protobuf(&seed, &BulkLimits::default(), NOW))
                .unwrap();
            assert_eq!(records.len(), 1, "{target}");
            assert_eq!(records[0].message, "hello");
            assert_eq!(records[0].level, Level::Info);
        }
    }

    proptest! {
        /// No input panics either decoder, and what they read keeps to
        /// the caps.
        #[test]
        fn any_bytes_decode_within_the_caps_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let limits = BulkLimits { max_items: 4, max_message_bytes: 16, max_fields: 4, max_field_value_bytes: 8 };
            let decoded = [decode_protobuf(&bytes, &limits, NOW), decode_json(&bytes, &limits, NOW)];
            for records in decoded.into_iter().flatten() {
                prop_assert!(records.len() <= 4);
                for record in records {
                    prop_assert!(record.message.len() <= 16);
                    prop_assert!(record.fields.len() <= 4);
                }
            }
        }

        /// Any body and attribute written in protobuf reads back.
        #[test]
        fn any_record_round_trips(body in ".{0,40}", key in "[a-z.]{1,10}", value in ".{0,20}", severity in 0u64..30) {
            let encoded = request(&[], "", &[log_record(5, severity, &body, &[key_value(&key, &string_value(&value))])]);
            let records = decode_protobuf(&encoded, &BulkLimits::default(), NOW).unwrap();
            prop_assert_eq!(records.len(), 1);
            prop_assert_eq!(&records[0].message, &body);
            prop_assert_eq!(records[0].timestamp_ns, 5);
            prop_assert_eq!(&records[0].fields[0], &(key, value));
        }
    }
}
