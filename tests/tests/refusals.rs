//! Bad input gets a clear, specific refusal and changes nothing, while a
//! good agent keeps shipping.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use logvault_certs::{Issued, Pki, Role as CertRole};
use logvault_collector::auth::Role;
use logvault_e2e::*;
use logvault_storage::frame::RefuseCode;
use logvault_storage::{AckStatus, Frame};

/// Connects with `tls`, sends a hello, and returns the first error seen
/// (handshake, write or read), or `None` if the collector answered nothing
/// and closed cleanly.
fn probe(addr: std::net::SocketAddr, tls: std::sync::Arc<rustls::ClientConfig>) -> String {
    runtime().block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = match tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await {
            Ok(stream) => stream,
            Err(err) => return format!("handshake: {err}"),
        };
        let hello = Frame::Hello { version: 1 }.encode();
        if let Err(err) = stream.write_all(&hello).await {
            return format!("write: {err}");
        }
        let _ = stream.flush().await;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) => "closed".to_owned(),
            Ok(Ok(n)) => format!("answered {n} bytes"),
            Ok(Err(err)) => format!("read: {err}"),
            Err(_) => "no answer".to_owned(),
        }
    })
}

#[test]
fn every_bad_input_is_refused_while_a_good_agent_keeps_shipping() {
    let setup = Setup::new("refusals");
    let options = CollectorOptions {
        max_frame_bytes: Some(64 * 1024),
        handshake_timeout_ms: Some(1000),
        ..Default::default()
    };
    let collector = Collector::start(&setup, &options);
    let token = setup.token(&["default"], Role::Reader);

    // The good agent ships a file that grows throughout the test.
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let good_log = logs.join("good.log");
    let lines = sample_lines("Hadoop_2k.log");
    append_lines(&good_log, &lines[..200]);
    // Its batches stay under the collector's 64 KiB frame cap.
    let small_batches = AgentOptions { extra_toml: "max_bytes = 16384".into(), ..AgentOptions::default() };
    let config = agent_config(
        &setup,
        "good-1",
        collector.ingest,
        &[good_log.to_string_lossy().into_owned()],
        &small_batches,
    );
    let good = start_agent(&setup, "good-1", &config);
    collector.wait_total(&token, "*", 200, Duration::from_secs(30));
    let mut written = 200;
    let mut write_more = |n: usize| {
        append_lines(&good_log, &lines[written..written + n]);
        written += n;
    };

    let ca = setup.pki.ca_cert();
    let agent = setup.agent_cert("probe-1");

    // An agent certificate from another CA.
    let other = Pki::init(setup.path().join("other-pki")).unwrap();
    let stranger = other.issue(CertRole::Agent, "stranger", &[]).unwrap();
    let outcome = probe(
        collector.ingest,
        client_tls(&ca, Some((&stranger.cert, &stranger.key)), &[&rustls::version::TLS13]),
    );
    // Both CAs are named "logvault CA": the chain is found by name and its
    // signature fails (DecryptError); a differently named CA gives UnknownCA.
    assert!(
        ["UnknownCA", "BadCertificate", "DecryptError"].iter().any(|alert| outcome.contains(alert)),
        "other CA: {outcome}"
    );
    write_more(100);

    // No client certificate.
    let outcome = probe(collector.ingest, client_tls(&ca, None, &[&rustls::version::TLS13]));
    assert!(outcome.contains("CertificateRequired"), "no client certificate: {outcome}");
    write_more(100);

    // TLS 1.2, even with a good certificate.
    let outcome =
        probe(collector.ingest, client_tls(&ca, Some((&agent.cert, &agent.key)), &[&rustls::version::TLS12]));
    assert!(outcome.contains("ProtocolVersion"), "TLS 1.2: {outcome}");
    write_more(100);

    // Garbage bytes on the ingest port.
    let mut garbage = std::net::TcpStream::connect(collector.ingest).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x13garbage").unwrap();
    garbage.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = garbage.read_to_end(&mut answer);
    assert!(answer.len() < 64, "garbage got a real answer: {answer:?}");
    write_more(100);

    // A slow handshake is cut after the timeout (1 s here).
    let started = Instant::now();
    let mut silent = std::net::TcpStream::connect(collector.ingest).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = silent.read(&mut [0u8; 16]);
    assert!(started.elapsed() < Duration::from_secs(5), "silent peer held on for {:?}", started.elapsed());
    write_more(100);

    // A frame over the cap is refused before its body is read.
    let mut raw = RawAgent::connect(&setup, "probe-1", collector.ingest);
    let mut oversized = (64 * 1024 + 2u32).to_be_bytes().to_vec();
    oversized.push(0x02);
    match raw.send_raw(&oversized) {
        Some(Frame::Refused { code: RefuseCode::TooLarge, message }) => {
            assert!(message.contains("65538"), "{message}")
        }
        other => panic!("oversized frame: {other:?}"),
    }
    write_more(100);

    // An agent claiming another agent's name (a forged host).
    let mut forger = RawAgent::connect(&setup, "probe-1", collector.ingest);
    let forged = forger.batch("good-1", "/var/log/forged.log", 0, 3, "forged");
    match forger.send_batch(forged) {
        Some(Frame::Refused { code: RefuseCode::Identity, message }) => {
            assert!(message.contains("good-1") && message.contains("probe-1"), "{message}")
        }
        other => panic!("forged agent id: {other:?}"),
    }

    // A batch signed with a key that is not the certificate's.
    let mut impostor = RawAgent::connect(&setup, "probe-1", collector.ingest);
    impostor.key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[42; 32]).unwrap();
    let unsigned = impostor.batch("probe-1", "/var/log/impostor.log", 0, 3, "impostor");
    match impostor.send_batch(unsigned) {
        Some(Frame::Refused { code: RefuseCode::Identity, message }) => {
            assert!(message.contains("signature"), "{message}")
        }
        other => panic!("batch signed by another key: {other:?}"),
    }

    // Garbage inside a well-formed frame.
    let mut mangler = RawAgent::connect(&setup, "probe-1", collector.ingest);
    match mangler.send_batch(b"LVB\x01not a batch".to_vec()) {
        Some(Frame::Refused { code: RefuseCode::Malformed, message }) => {
            assert!(message.contains("truncated"), "{message}")
        }
        other => panic!("malformed batch: {other:?}"),
    }
    // A decompression bomb: 1 GiB of zeros in a few tens of kilobytes,
    // signed by the right key. Declared honestly it is over the cap and
    // never inflated; declared small, zstd stops at the declared size.
    let rss_before = peak_rss_mib(collector.process.pid());
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 30], 3).unwrap();
    assert!(bomb.len() < 60 * 1024, "{}", bomb.len());
    let mut bomber = RawAgent::connect(&setup, "probe-1", collector.ingest);
    let honest = bomber.forge_batch("probe-1", 1, 1 << 30, &bomb);
    match bomber.send_batch(honest) {
        Some(Frame::Refused { code: RefuseCode::TooLarge, message }) => {
            assert!(
                message.contains("decoded record section") && message.contains("over the limit"),
                "{message}"
            )
        }
        other => panic!("declared bomb: {other:?}"),
    }
    let mut bomber = RawAgent::connect(&setup, "probe-1", collector.ingest);
    let lying = bomber.forge_batch("probe-1", 1, 4096, &bomb);
    match bomber.send_batch(lying) {
        Some(Frame::Refused { code: RefuseCode::Malformed, message }) => {
            assert!(message.contains("does not decompress"), "{message}")
        }
        other => panic!("lying bomb: {other:?}"),
    }
    write_more(200);
    // Neither bomb moved the collector's memory past the caps: the peak
    // grew by less than the 32 MiB decoded-size cap.
    let rss_after = peak_rss_mib(collector.process.pid());
    assert!(rss_after < rss_before + 32, "peak RSS went from {rss_before} to {rss_after} MiB");

    // Nothing from the bad peers was stored; every good line was.
    collector.wait_total(&token, "*", written as u64, Duration::from_secs(30));
    assert_eq!(collector.total(&token, "forged OR impostor"), 0);
    let log = collector.process.log_text();
    for expected in [
        "invalid peer certificate",
        "peer sent no certificates",
        "tls handshake failed",
        "tls handshake timed out",
        "frame over the cap",
        "forged agent id",
        "bad batch signature",
    ] {
        assert!(log.contains(expected), "collector log lacks {expected:?}:\n{}", tail(&log, 40));
    }
    // Every refusal is counted by its reason; /metrics is for admins only.
    let refusals =
        |reason: &str| collector.metric(&setup, &format!("logvault_refusals_total{{reason=\"{reason}\"}}"));
    assert_eq!(refusals("forged_agent"), 1);
    assert_eq!(refusals("signature"), 1);
    assert_eq!(refusals("too_large"), 2, "the oversized frame and the declared bomb");
    assert_eq!(refusals("malformed"), 2, "garbage in a frame and the lying bomb");
    assert!(collector.metric(&setup, "logvault_handshake_failures_total") >= 4);
    assert!(collector.metric(&setup, "logvault_ingest_records_total{tenant=\"default\"}") >= written as u64);
    assert_eq!(collector.metrics_raw(&token).0, 403, "a reader token");
    good.stop();
    collector.process.stop();
}

/// The highest resident memory `pid` has used, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn bad_tokens_get_401_and_bad_queries_400_never_500() {
    let setup = Setup::new("tokens");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let now = logvault_collector::auth::now_secs();
    let q = [("q", "*")];

    let expect = |token: Option<&str>, params: &[(&str, &str)], status: u16, code: &str, mention: &str| {
        let (got, body) = collector.search_raw(token, params);
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(mention), "{message:?} does not mention {mention:?}");
    };

    expect(None, &q, 401, "unauthorized", "missing bearer token");

    let mut expired = setup.claims(&["default"], Role::Reader, now);
    expired.exp = now - 3600;
    expired.nbf = now - 7200;
    let expired = logvault_collector::auth::mint(&setup.jwt_key, &expired).unwrap();
    expect(Some(&expired), &q, 401, "unauthorized", "ExpiredSignature");

    let other_key = setup.path().join("other-jwt.key");
    logvault_collector::auth::ensure_key_pair(&other_key).unwrap();
    let wrong_key =
        logvault_collector::auth::mint(&other_key, &setup.claims(&["default"], Role::Reader, now)).unwrap();
    expect(Some(&wrong_key), &q, 401, "unauthorized", "unknown key id");
    // Another key's signature under the trusted key's id.
    let good_kid = jsonwebtoken::decode_header(setup.token(&["default"], Role::Reader)).unwrap().kid;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = good_kid;
    let other = jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(&other_key).unwrap()).unwrap();
    let forged =
        jsonwebtoken::encode(&header, &setup.claims(&["default"], Role::Reader, now), &other).unwrap();
    expect(Some(&forged), &q, 401, "unauthorized", "InvalidSignature");

    let mut audience = setup.claims(&["default"], Role::Reader, now);
    audience.aud = "someone-else".into();
    let audience = logvault_collector::auth::mint(&setup.jwt_key, &audience).unwrap();
    expect(Some(&audience), &q, 401, "unauthorized", "InvalidAudience");

    // alg "none" with no signature, carrying otherwise valid claims.
    use base64_free::encode;
    let claims = serde_json::to_vec(&setup.claims(&["default"], Role::Reader, now)).unwrap();
    let none = format!("{}.{}.", encode(br#"{"alg":"none","typ":"JWT"}"#), encode(&claims));
    let (status, _) = collector.search_raw(Some(&none), &q);
    assert_eq!(status, 401, "alg none");

    // A token without nbf (a required claim).
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(&setup.jwt_key).unwrap()).unwrap();
    let no_nbf = serde_json::json!({"sub": "e2e", "iss": "logvault", "aud": "logvault", "exp": now + 600, "tenant": "default", "role": "reader"});
    let no_nbf =
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA), &no_nbf, &key)
            .unwrap();
    expect(Some(&no_nbf), &q, 401, "unauthorized", "nbf");

    let good = setup.token(&["default"], Role::Reader);
    expect(Some(&good), &[("q", "message:(unclosed")], 400, "bad_query", "");
    expect(Some(&good), &[("q", "nosuchfield:x")], 400, "bad_query", "nosuchfield");
    expect(Some(&good), &[("q", "*"), ("from", "last tuesday")], 400, "bad_request", "last tuesday");
    expect(Some(&good), &[("q", "*"), ("limit", "1000000")], 400, "bad_request", "limit");
    let (status, body) = collector.search_raw(Some(&good), &[("q", "*"), ("from", "-15m")]);
    assert_eq!((status, body["total"].as_u64()), (200, Some(0)), "{body}");
    collector.process.stop();
}

/// Unpadded base64url, enough to hand-craft a token.
mod base64_free {
    pub(crate) fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

/// A gap, batches out of order, a replay of stored records under another
/// hash, and a batch chained to the wrong predecessor: each refused with
/// its reason and counted, and nothing of them stored.
#[test]
fn sequence_faults_are_refused_with_their_reason_and_counted() {
    use logvault_storage::batch::encoded_batch_hash;
    let setup = Setup::new("sequence");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let token = setup.token(&["default"], Role::Reader);
    let source = "/var/log/chain.log";
    let connect = || RawAgent::connect(&setup, "chain-1", collector.ingest);
    let stored = |answer: Option<Frame>| matches!(answer, Some(Frame::Ack { status: AckStatus::Stored, .. }));
    let refused = |answer: Option<Frame>, want: &str| match answer {
        Some(Frame::Refused { code, message }) => {
            let expected = if want == "missing" { RefuseCode::Gap } else { RefuseCode::Sequence };
            assert_eq!(code, expected, "{message}");
            assert!(message.contains(want), "{message:?} lacks {want:?}")
        }
        other => panic!("expected a sequence refusal ({want}), got {other:?}"),
    };
    let mut raw = connect();
    let b1 = raw.batch("chain-1", source, 0, 10, "chain");
    let h1 = encoded_batch_hash(&b1).unwrap();
    assert!(stored(raw.send_batch(b1)));
    let b2 = raw.batch_after("chain-1", source, 10, 10, "chain", h1);
    let h2 = encoded_batch_hash(&b2).unwrap();
    assert!(stored(raw.send_batch(b2)));

    // A gap: 20..30 never sent.
    refused(raw.send_batch(raw.batch_after("chain-1", source, 30, 10, "chain", [5; 32])), "missing");
    // Out of order: the batch after next arrives first.
    let mut raw = connect();
    let b3 = raw.batch_after("chain-1", source, 20, 10, "chain", h2);
    let h3 = encoded_batch_hash(&b3).unwrap();
    let b4 = raw.batch_after("chain-1", source, 30, 10, "chain", h3);
    refused(raw.send_batch(b4.clone()), "missing");
    let mut raw = connect();
    assert!(stored(raw.send_batch(b3)));
    assert!(stored(raw.send_batch(b4)));
    // A replay: stored records under a batch that is not a resend of them.
    refused(raw.send_batch(raw.batch_after("chain-1", source, 5, 5, "replayed", [7; 32])), "not a resend");
    // A fork: the next records, chained to the wrong batch.
    let mut raw = connect();
    refused(raw.send_batch(raw.batch_after("chain-1", source, 40, 5, "forked", h1)), "previous batch");

    collector.wait_total(&token, "chain", 40, Duration::from_secs(30));
    assert_eq!(collector.total(&token, "replayed OR forked"), 0);
    let count =
        |reason: &str| collector.metric(&setup, &format!("logvault_refusals_total{{reason=\"{reason}\"}}"));
    assert_eq!(count("gap"), 2, "the gap and the reordering");
    assert_eq!(count("replay"), 1);
    assert_eq!(count("chain"), 1);
    let log = collector.process.log_text();
    assert!(log.contains("out of sequence"), "refusals are logged:\n{}", tail(&log, 20));
    collector.process.stop();
}

/// An agent certificate from the test CA, valid or expired, for client or
/// for server authentication: what `logvault certs` never issues.
fn crafted_cert(setup: &Setup, name: &str, expired: bool, purpose: rcgen::ExtendedKeyUsagePurpose) -> Issued {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(setup.path().join("pki/ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(setup.pki.ca_cert()).unwrap(), ca_key)
            .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(format!("logvault://agent/{name}").try_into().unwrap()));
    params.extended_key_usages = vec![purpose];
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, &issuer).unwrap();
    let issued = Issued {
        cert: setup.path().join(format!("{name}.crt")),
        key: setup.path().join(format!("{name}.key")),
    };
    std::fs::write(&issued.cert, cert.pem()).unwrap();
    std::fs::write(&issued.key, key.serialize_pem()).unwrap();
    issued
}

/// The TLS checks of the ingest port against a running collector: an
/// expired client certificate and one made for server authentication are
/// refused with the matching alert, TLS 1.2 is taken only where
/// `allow_tls12` says so, and a good agent ships throughout.
#[test]
fn expired_and_wrong_purpose_certificates_are_refused_and_tls12_only_when_configured() {
    let setup = Setup::new("tls-checks");
    let collector = Collector::start(
        &setup,
        &CollectorOptions { ingest_toml: "allow_tls12 = true".into(), ..Default::default() },
    );
    let token = setup.token(&["default"], Role::Reader);
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let good_log = logs.join("good.log");
    let lines = sample_lines("Zookeeper_2k.log");
    append_lines(&good_log, &lines[..500]);
    let config = agent_config(
        &setup,
        "good-2",
        collector.ingest,
        &[good_log.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let good = start_agent(&setup, "good-2", &config);
    let ca = setup.pki.ca_cert();
    let tls13 = [&rustls::version::TLS13];

    let expired = crafted_cert(&setup, "expired-1", true, rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let outcome = probe(collector.ingest, client_tls(&ca, Some((&expired.cert, &expired.key)), &tls13));
    assert!(outcome.contains("CertificateExpired"), "expired certificate: {outcome}");
    append_lines(&good_log, &lines[500..1000]);

    let server_only = crafted_cert(&setup, "server-1", false, rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let outcome =
        probe(collector.ingest, client_tls(&ca, Some((&server_only.cert, &server_only.key)), &tls13));
    assert!(outcome.contains("UnsupportedCertificate"), "server-auth certificate: {outcome}");
    append_lines(&good_log, &lines[1000..1500]);

    // The control: the same crafting, valid and for client authentication,
    // gets through.
    let fine = crafted_cert(&setup, "fine-1", false, rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(probe(collector.ingest, client_tls(&ca, Some((&fine.cert, &fine.key)), &tls13)), "no answer");

    // Configured: TLS 1.2 with a good certificate is taken, and without a
    // certificate it is still refused.
    let agent = setup.agent_cert("probe-2");
    let tls12 = [&rustls::version::TLS12];
    assert_eq!(
        probe(collector.ingest, client_tls(&ca, Some((&agent.cert, &agent.key)), &tls12)),
        "no answer"
    );
    let outcome = probe(collector.ingest, client_tls(&ca, None, &tls12));
    assert!(outcome.contains("handshake"), "TLS 1.2 without a certificate: {outcome}");
    append_lines(&good_log, &lines[1500..2000]);

    collector.wait_total(&token, "*", 2000, Duration::from_secs(60));
    let log = collector.process.log_text();
    for expected in ["certificate expired", "does not allow extended key usage for client authentication"] {
        assert!(log.contains(expected), "collector log lacks {expected:?}:\n{}", tail(&log, 40));
    }
    good.stop();
    collector.process.stop();
}

/// A connection that sends nothing for `idle_timeout_ms` is closed (its
/// slot freed for others); one that keeps sending stays open.
#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let setup = Setup::new("idle");
    let collector = Collector::start(
        &setup,
        &CollectorOptions { ingest_toml: "idle_timeout_ms = 1000".into(), ..Default::default() },
    );
    let mut busy = RawAgent::connect(&setup, "busy-1", collector.ingest);
    let mut idle = RawAgent::connect(&setup, "idle-1", collector.ingest);
    let first = idle.batch("idle-1", "/var/log/idle.log", 0, 3, "idleword");
    assert!(matches!(idle.send_batch(first), Some(Frame::Ack { status: AckStatus::Stored, .. })));
    let mut prev = [0u8; 32];
    for round in 0..6u64 {
        let batch = busy.batch_after("busy-1", "/var/log/busy.log", round * 3, 3, "busyword", prev);
        prev = logvault_storage::batch::encoded_batch_hash(&batch).unwrap();
        match busy.send_batch(batch) {
            Some(Frame::Ack { status: AckStatus::Stored, .. }) => {}
            other => panic!("round {round}: the busy connection got {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    // 2.4 s went by: the idle connection was closed after 1 s of silence.
    let late = idle.batch_after("idle-1", "/var/log/idle.log", 3, 3, "idleword", [0; 32]);
    assert_eq!(idle.send_batch(late), None, "the idle connection is closed");
    let log = collector.process.log_text();
    assert!(log.contains("closing idle connection") && log.contains("idle-1"), "{}", tail(&log, 20));
    assert!(!log.contains("agent=busy-1 idle_ms"), "the busy connection was left alone");
    collector.process.stop();
}
