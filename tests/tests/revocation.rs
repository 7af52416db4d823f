//! `logvault certs revoke` takes effect without a restart: the revoked
//! agent's live connection is closed and its next ones refused, while the
//! others go on.

use std::process::Command;
use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;

#[test]
fn a_revoked_agent_is_cut_off_at_once_and_refused_after_while_the_others_go_on() {
    let setup = Setup::new("revoke");
    let crl = setup.pki.write_crl().unwrap();
    let collector = Collector::start(&setup, &CollectorOptions { crl: Some(crl), ..Default::default() });
    let token = setup.token(&["default"], Role::Reader);
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let keep_log = logs.join("keep.log");
    let gone_log = logs.join("gone.log");
    let lines =
        |tag: &str, from: usize| (from..from + 100).map(|i| format!("{tag} line {i}")).collect::<Vec<_>>();
    append_lines(&keep_log, &lines("keepword", 0));
    append_lines(&gone_log, &lines("goneword", 0));
    let keep_config = agent_config(
        &setup,
        "keep-1",
        collector.ingest,
        &[keep_log.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let gone_config = agent_config(
        &setup,
        "gone-1",
        collector.ingest,
        &[gone_log.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    // The agent's host keeps its own copy of its certificate and key.
    let issued = setup.agent_cert("gone-1");
    let host = setup.path().join("gone-host");
    std::fs::create_dir_all(&host).unwrap();
    for (from, name) in [(&issued.cert, "gone-1.crt"), (&issued.key, "gone-1.key")] {
        std::fs::copy(from, host.join(name)).unwrap();
    }
    let text = std::fs::read_to_string(&gone_config)
        .unwrap()
        .replace(&issued.cert.display().to_string(), &host.join("gone-1.crt").display().to_string())
        .replace(&issued.key.display().to_string(), &host.join("gone-1.key").display().to_string());
    std::fs::write(&gone_config, text).unwrap();
    let keep = start_agent(&setup, "keep-1", &keep_config);
    let gone = start_agent(&setup, "gone-1", &gone_config);
    collector.wait_total(&token, "*", 200, Duration::from_secs(30));

    let out = Command::new(bin("logvault"))
        .args(["certs", "revoke", "--dir"])
        .arg(setup.pki.dir())
        .arg("gone-1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(10), "the collector to load the new CRL", || {
        collector.process.log_text().contains("tls files changed").then_some(())
    });

    // Its live connection is closed at once (the other agent's is not),
    // and its reconnections are refused.
    wait_for(Duration::from_secs(10), "the revoked agent's connection to be closed", || {
        collector.process.log_text().contains("client certificate no longer accepted").then_some(())
    });
    append_lines(&gone_log, &lines("goneword", 100));
    wait_for(Duration::from_secs(20), "the revoked certificate to be refused", || {
        let log = collector.process.log_text();
        (log.contains("tls handshake failed") && log.contains("Revoked")).then_some(())
    });
    // The others go on.
    append_lines(&keep_log, &lines("keepword", 100));
    collector.wait_total(&token, "keepword", 200, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(collector.total(&token, "goneword"), 100, "nothing from the revoked agent after revocation");
    let closed = collector.process.log_text().matches("client certificate no longer accepted").count();
    assert_eq!(closed, 1, "only the revoked agent's connection was closed");
    gone.stop();
    keep.stop();
    collector.process.stop();
}

/// A renewed server certificate is served to the next handshake while a
/// live agent connection goes on untouched.
#[test]
fn a_renewed_server_certificate_is_picked_up_without_dropping_live_connections() {
    let setup = Setup::new("cert-reload");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let token = setup.token(&["default"], Role::Reader);
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("live.log");
    append_lines(&log, &(0..100).map(|i| format!("liveword {i}")).collect::<Vec<_>>());
    let config = agent_config(
        &setup,
        "live-1",
        collector.ingest,
        &[log.to_string_lossy().into_owned()],
        &AgentOptions { metrics: true, ..AgentOptions::default() },
    );
    let agent = start_agent(&setup, "live-1", &config);
    collector.wait_total(&token, "liveword", 100, Duration::from_secs(30));
    let fingerprint = || {
        let tls = client_tls(&setup.pki.ca_cert(), None, &[&rustls::version::TLS13]);
        let runtime = runtime();
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(collector.api).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
            stream.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
        })
    };
    let before = fingerprint();

    // Renew: a new key and certificate under the same paths.
    let paths = setup.pki.paths(logvault_certs::Role::Collector, "collector");
    std::fs::remove_file(&paths.cert).unwrap();
    std::fs::remove_file(&paths.key).unwrap();
    setup
        .pki
        .issue(logvault_certs::Role::Collector, "collector", &["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    wait_for(Duration::from_secs(10), "the collector to load the renewed certificate", || {
        (collector.process.log_text().matches("tls files changed").count() >= 2).then_some(())
    });
    assert_ne!(fingerprint(), before, "new handshakes see the renewed certificate");

    // The agent's connection made before the renewal carries on.
    append_lines(&log, &(100..200).map(|i| format!("liveword {i}")).collect::<Vec<_>>());
    collector.wait_total(&token, "liveword", 200, Duration::from_secs(30));
    let connects = metric(&http_get(metrics_addr(&agent), "/metrics").1, "logvault_agent_connects_total");
    assert_eq!(connects, Some(1), "the live connection was not dropped");
    agent.stop();
    collector.process.stop();
}
