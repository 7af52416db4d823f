//! Senders that speak Elasticsearch's bulk API or OTLP, with the official
//! Python clients as the real senders (`tests/run` installs them in
//! `target/py`): every line searchable with exact totals, each bulk item
//! answered on its own, the tenant and host from the token, and every
//! refusal with its status.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;
use logvault_storage::Level;

fn python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python");
    assert!(python.exists(), "{} missing: tests/run installs the Python clients", python.display());
    python
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Runs a Python client `script` against `collector` with `auth` (a token,
/// or `cert:CERT:KEY`), shipping `log` under `name`.
fn client(
    script_name: &str,
    collector: &Collector,
    auth: &str,
    log: &str,
    name: &str,
) -> std::process::Output {
    Command::new(python())
        .arg(script(script_name))
        .arg(collector.api_url())
        .arg(&collector.ca)
        .arg(auth)
        .arg(loghub_dir().join(log))
        .arg(name)
        .output()
        .unwrap()
}

type RawTls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection to the API port by hand, with a client certificate
/// when given (its files read once, when called).
fn raw_client(
    collector: &Collector,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> impl Fn() -> RawTls {
    let config = client_tls(&collector.ca, client, &[&rustls::version::TLS13]);
    let api = collector.api;
    move || connect_raw(api, config.clone())
}

fn connect_raw(api: std::net::SocketAddr, config: std::sync::Arc<rustls::ClientConfig>) -> RawTls {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = std::net::TcpStream::connect(api).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    rustls::StreamOwned::new(rustls::ClientConnection::new(config, name).unwrap(), tcp)
}

/// `POST /_bulk` by hand: the head declares `length` bytes, `body` is
/// sent after it; returns the answer's head, lower-cased, its body read.
fn raw_bulk(tls: &mut RawTls, token: Option<&str>, length: usize, body: &[u8]) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("POST /_bulk HTTP/1.1\r\nhost: logvault\r\n{auth}content-length: {length}\r\n\r\n");
    tls.write_all(head.as_bytes())?;
    tls.write_all(body)?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if tls.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        answer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&answer).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut rest = vec![0u8; length];
    tls.read_exact(&mut rest)?;
    Ok(head)
}

/// A raw request to the collector's API with `body` as is.
fn post(collector: &Collector, path: &str, token: Option<&str>, body: &[u8]) -> (u16, serde_json::Value) {
    let url = format!("{}{path}", collector.api_url());
    let answer = runtime()
        .block_on(logvault_collector::client::request(
            "POST",
            &url,
            &collector.ca,
            token,
            Some(body.to_vec()),
        ))
        .unwrap();
    (answer.status, serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null))
}

#[test]
fn the_elasticsearch_clients_bulk_helper_ships_hadoop_and_every_line_is_searchable() {
    let setup = Setup::new("es-bulk");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let writer = setup.token(&["default"], Role::Writer);
    let reader = setup.token(&["default"], Role::Reader);
    let output = client("es_bulk.py", &collector, &writer, "Hadoop_2k.log", "hadoop");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(seen["shipped"], 2000, "{seen}");
    assert_eq!(seen["errors"], 0, "{seen}");
    assert_eq!(seen["mixed_errors"], true, "{seen}");
    assert_eq!(seen["mixed_statuses"], serde_json::json!([201, 400]), "the bad item alone fails: {seen}");

    // Every line, once, plus the good item of the mixed request.
    collector.wait_total(&reader, "source:hadoop", 2001, Duration::from_secs(60));
    let lines = sample_lines("Hadoop_2k.log");
    for word in ["info", "warn", "error", "mapreduce", "task", "container"] {
        let want = lines_with_term(&lines, word);
        assert!(want > 0, "{word} is in the sample");
        assert_eq!(collector.total(&reader, &format!("source:hadoop AND {word}")), want, "{word}");
    }
    for level in [Level::Info, Level::Warn, Level::Error] {
        let want = lines.iter().filter(|line| Level::sniff(line) == level).count() as u64;
        assert_eq!(
            collector.total(&reader, &format!("source:hadoop AND level:{}", level.as_str())),
            want,
            "{level:?}"
        );
    }
    // The host is the token's subject; the payload's is a field.
    let (status, body) =
        collector.search_raw(Some(&reader), &[("q", "fields.line_number:7"), ("limit", "5")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 1, "{body}");
    let hit = &body["hits"][0];
    assert_eq!(hit["host"], "e2e", "{hit}");
    assert_eq!(hit["fields"]["host.name"], "claimed-by-payload", "{hit}");
    assert_eq!(hit["message"], lines[7].as_str(), "{hit}");
    assert_eq!(collector.total(&reader, "fields.host.name:\"claimed-by-payload\""), 2000);
    assert_eq!(collector.metric(&setup, "logvault_ingest_records_total{tenant=\"default\"}"), 2001);
}

#[test]
fn the_opentelemetry_sdks_otlp_exporter_ships_spark_and_every_line_is_searchable() {
    let setup = Setup::new("otlp");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let writer = setup.token(&["default"], Role::Writer);
    let reader = setup.token(&["default"], Role::Reader);
    let output = client("otlp_logs.py", &collector, &writer, "Spark_2k.log", "spark-app");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the exporter failed: {stderr}");
    // The SDK logs an export it could not make instead of failing.
    assert!(!stderr.contains("Failed to export"), "{stderr}");

    collector.wait_total(&reader, "source:otlp", 2000, Duration::from_secs(60));
    let lines = sample_lines("Spark_2k.log");
    for word in ["info", "executor", "storage", "blockmanager", "memory"] {
        let want = lines_with_term(&lines, word);
        assert!(want > 0, "{word} is in the sample");
        assert_eq!(collector.total(&reader, &format!("source:otlp AND {word}")), want, "{word}");
    }
    assert_eq!(collector.total(&reader, "source:otlp AND level:info"), 2000, "the severity is the level");
    assert_eq!(collector.total(&reader, "fields.service.name:\"spark-app\""), 2000);
    let (status, body) = collector.search_raw(Some(&reader), &[("q", "source:otlp"), ("limit", "1")]);
    assert_eq!(status, 200, "{body}");
    let hit = &body["hits"][0];
    assert_eq!(hit["host"], "e2e", "the token's subject: {hit}");
    assert_eq!(hit["fields"]["host.name"], "claimed-by-payload", "{hit}");
    assert!(hit["fields"]["otel.scope.name"].as_str().is_some_and(|s| !s.is_empty()), "the scope: {hit}");
    assert_eq!(hit["fields"]["telemetry.sdk.language"], "python", "the resource's attributes: {hit}");
    assert!(lines.contains(&hit["message"].as_str().unwrap().to_owned()), "{hit}");

    // OTLP's JSON encoding, and the refusals.
    let json = serde_json::json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [
        {"timeUnixNano": "1700000000000000000", "severityNumber": 17, "body": {"stringValue": "json says hello"}}
    ]}]}]});
    let url = format!("{}/v1/logs", collector.api_url());
    let answer = runtime()
        .block_on(logvault_collector::client::request(
            "POST",
            &url,
            &collector.ca,
            Some(&writer),
            Some(json.to_string().into_bytes()),
        ))
        .unwrap();
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    collector.wait_total(&reader, "source:otlp AND level:error AND json", 1, Duration::from_secs(30));
    let (status, _) = post(&collector, "/v1/logs", None, b"");
    assert_eq!(status, 401, "no token");
    let (status, _) = post(&collector, "/v1/logs", Some(&reader), b"");
    assert_eq!(status, 403, "a reader token");
    let (status, _) = post(&collector, "/v1/logs", Some(&writer), &[0x0a, 0xff, 0xff]);
    assert_eq!(status, 400, "a damaged request");
}

/// With `api.client_certificates`, a sender's certificate from the ingest
/// CA stands in for a token: its name is every record's host and its
/// tenant mapping their tenant. Another CA's certificate fails the
/// handshake; token holders and the page connect without one.
#[test]
fn a_client_certificate_ships_without_a_token_and_names_host_and_tenant() {
    let setup = Setup::new("es-cert");
    let options = CollectorOptions {
        api_toml: "client_certificates = true\n".into(),
        extra_toml: "[tenants]\n[[tenants.map]]\nagents = [\"shipper-*\"]\ntenant = \"shippers\"\n".into(),
        ..Default::default()
    };
    let collector = Collector::start(&setup, &options);
    let sender = setup.pki.ensure(logvault_certs::Role::Sender, "shipper-1", &[]).unwrap();
    let ship = |auth: &str| client("es_bulk.py", &collector, auth, "OpenSSH_2k.log", "openssh");
    let output = ship(&format!("cert:{}:{}", sender.cert.display(), sender.key.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reader = setup.token(&["shippers"], Role::Reader);
    collector.wait_total(&reader, "source:openssh AND host:\"shipper-1\"", 2001, Duration::from_secs(60));
    assert_eq!(
        collector.total(&setup.token(&["default"], Role::Reader), "source:openssh"),
        0,
        "another tenant"
    );

    let other = logvault_certs::Pki::init(setup.path().join("other-pki")).unwrap();
    let stranger = other.ensure(logvault_certs::Role::Sender, "shipper-2", &[]).unwrap();
    let output = ship(&format!("cert:{}:{}", stranger.cert.display(), stranger.key.display()));
    assert!(!output.status.success(), "another CA's certificate got in");
    assert_eq!(collector.total(&reader, "host:\"shipper-2\""), 0);
    // A token still works on this port, without a certificate.
    let writer = setup.token(&["default"], Role::Writer);
    let (status, body) =
        post(&collector, "/_bulk", Some(&writer), b"{\"index\":{\"_index\":\"t\"}}\n{\"message\":\"m\"}\n");
    assert_eq!((status, body["errors"].as_bool()), (200, Some(false)), "{body}");
}

#[test]
fn bad_tokens_other_tenants_and_oversized_bodies_are_refused_with_their_status() {
    let setup = Setup::new("es-refusals");
    let options = CollectorOptions { api_toml: "max_body_bytes = 65536\n".into(), ..Default::default() };
    let collector = Collector::start(&setup, &options);
    let item = b"{\"index\":{\"_index\":\"app\"}}\n{\"message\":\"one line\"}\n";
    let writer = setup.token(&["default"], Role::Writer);

    let (status, body) = post(&collector, "/_bulk", None, item);
    assert_eq!(status, 401, "no token: {body}");
    let (status, body) = post(&collector, "/_bulk", Some("not.a.token"), item);
    assert_eq!(status, 401, "a bad token: {body}");
    let (status, body) = post(&collector, "/_bulk", Some(&setup.token(&["default"], Role::Reader)), item);
    assert_eq!(status, 403, "a reader token: {body}");
    let (status, body) = post(&collector, "/_bulk?tenant=other", Some(&writer), item);
    assert_eq!(status, 403, "another tenant: {body}");
    let (status, body) = post(&collector, "/_bulk", Some(&setup.token(&["a", "b"], Role::Writer)), item);
    assert_eq!(status, 400, "two tenants and none named: {body}");
    let (status, body) = collector.search_raw(Some(&writer), &[("q", "*")]);
    assert_eq!(status, 403, "a writer token cannot read: {body}");
    // A body declared over the cap is refused before any of it is sent.
    let head = raw_bulk(&mut raw_client(&collector, None)(), Some(&writer), 70_000, b"").unwrap();
    assert!(head.starts_with("http/1.1 413"), "a body over the cap: {head}");
    let (status, body) = post(&collector, "/_bulk", Some(&writer), b"{\"index\":{\"_index\":\"app\"}}\n");
    assert_eq!(status, 400, "an action without its document: {body}");
    // A subject that cannot name the archive's objects is refused before
    // anything is stored.
    let claims = logvault_collector::auth::Claims {
        sub: "fluent_bit@prod".into(),
        ..setup.claims(&["default"], Role::Writer, logvault_collector::auth::now_secs())
    };
    let odd = logvault_collector::auth::mint(&setup.jwt_key, &claims).unwrap();
    let (status, body) = post(&collector, "/_bulk", Some(&odd), item);
    assert_eq!(status, 403, "a sub that cannot be a host: {body}");
    // Items naming more indices than one request may hold fail on their own.
    let mut many = String::new();
    for i in 0..40 {
        many.push_str(&format!("{{\"index\":{{\"_index\":\"i{i}\"}}}}\n{{\"message\":\"m\"}}\n"));
    }
    let (status, body) = post(&collector, "/_bulk", Some(&writer), many.as_bytes());
    assert_eq!(status, 200, "{body}");
    let statuses: Vec<u64> =
        body["items"].as_array().unwrap().iter().map(|i| i["index"]["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 32, "{body}");
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 8, "{body}");
    let (status, body) = collector.call("GET", "/_cluster/health", None, None);
    assert_eq!((status, body["status"].as_str()), (200, Some("green")), "Vector's health check");

    // A token for two tenants names one of them; the records are there only.
    let two = setup.token(&["default", "other"], Role::Writer);
    let (status, body) = post(&collector, "/_bulk?tenant=other", Some(&two), item);
    assert_eq!((status, body["errors"].as_bool()), (200, Some(false)), "{body}");
    let (status, body) = post(&collector, "/_bulk", Some(&writer), item);
    assert_eq!((status, body["errors"].as_bool()), (200, Some(false)), "{body}");
    collector.wait_total(&setup.token(&["other"], Role::Reader), "source:app", 1, Duration::from_secs(30));
    collector.wait_total(&setup.token(&["default"], Role::Reader), "source:app", 1, Duration::from_secs(30));
}

/// Under backpressure nothing is silently dropped: every item answered 201
/// is stored, none answered 429 is, and a request that finds the WAL full
/// is answered 429 with Retry-After.
#[test]
fn a_full_wal_answers_429_and_every_201_is_stored() {
    let setup = Setup::new("es-busy");
    let options = CollectorOptions { extra_toml: "[wal]\nmax_bytes = 300000\n".into(), ..Default::default() };
    let collector = Collector::start(&setup, &options);
    let writer = setup.token(&["default"], Role::Writer);
    let lines = incompressible_lines(10_000);
    let (mut created, mut rejected, mut refused_whole) = (0u64, 0u64, false);
    for chunk in lines.chunks(250) {
        let mut body = String::new();
        for line in chunk {
            body.push_str("{\"index\":{\"_index\":\"busy\"}}\n");
            body.push_str(&serde_json::json!({ "message": line }).to_string());
            body.push('\n');
        }
        let url = format!("{}/_bulk", collector.api_url());
        let answer = runtime()
            .block_on(logvault_collector::client::request(
                "POST",
                &url,
                &collector.ca,
                Some(&writer),
                Some(body.into_bytes()),
            ))
            .unwrap();
        if answer.status == 429 {
            assert!(
                answer.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("retry-after")),
                "429 without Retry-After"
            );
            refused_whole = true;
            continue;
        }
        assert_eq!(answer.status, 200);
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        for item in body["items"].as_array().unwrap() {
            match item["index"]["status"].as_u64() {
                Some(201) => created += 1,
                Some(429) => rejected += 1,
                other => panic!("unexpected item status {other:?}: {item}"),
            }
        }
    }
    assert!(refused_whole || rejected > 0, "the WAL never filled: {created} created");
    assert!(created > 0, "nothing fit under the cap");
    let reader = setup.token(&["default"], Role::Reader);
    collector.wait_total(&reader, "source:busy", created, Duration::from_secs(30));
}

/// A sender's certificate revoked while its keep-alive connection to the
/// API port is open: the connection is closed at once and the next
/// handshake refused.
#[test]
fn a_revoked_sender_certificate_closes_its_api_connection() {
    let setup = Setup::new("es-revoke");
    let crl = setup.pki.write_crl().unwrap();
    let options = CollectorOptions {
        crl: Some(crl),
        api_toml: "client_certificates = true\n".into(),
        ..Default::default()
    };
    let collector = Collector::start(&setup, &options);
    let sender = setup.pki.ensure(logvault_certs::Role::Sender, "shipper-9", &[]).unwrap();
    let connect = raw_client(&collector, Some((&sender.cert, &sender.key)));
    let body = b"{\"index\":{\"_index\":\"kept\"}}\n{\"message\":\"over a kept-alive connection\"}\n";
    let request = |tls: &mut RawTls| raw_bulk(tls, None, body.len(), body);
    let mut tls = connect();
    let head = request(&mut tls).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");

    let out = Command::new(bin("logvault"))
        .args(["certs", "revoke", "--dir"])
        .arg(setup.pki.dir())
        .arg("shipper-9")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(10), "the connection to be closed", || {
        collector.process.log_text().contains("client certificate no longer accepted").then_some(())
    });
    // The same connection takes nothing more; a new one is refused.
    assert!(request(&mut tls).is_err(), "the revoked sender's connection still took a request");
    let mut again = connect();
    assert!(request(&mut again).is_err(), "a revoked certificate completed a handshake");
    let reader = setup.token(&["default"], Role::Reader);
    collector.wait_total(&reader, "source:kept", 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(collector.total(&reader, "source:kept"), 1, "only the request before the revocation");
}
