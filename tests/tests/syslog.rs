//! Syslog over TLS with Debian's rsyslog as the real sender: imfile reads
//! three loghub samples and omfwd ships them with a client certificate: as
//! RFC 5424 with octet counting, as RFC 3164 one per line, and in
//! rsyslog's forward format (RFC 3164 with an RFC 3339 time).

use std::path::Path;
use std::time::Duration;

use logvault_certs::{Pki, Role as CertRole};
use logvault_collector::auth::Role;
use logvault_e2e::*;

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// An rsyslog configuration shipping `inputs` (file, tag, template,
/// framing) to `addr` with `cert`.
fn rsyslog_conf(
    work: &Path,
    ca: &Path,
    cert: &logvault_certs::Issued,
    addr: std::net::SocketAddr,
    inputs: &[(&Path, &str, &str, &str)],
) -> String {
    let mut conf = format!(
        r#"global(workDirectory="{work}" maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}")
module(load="imfile" mode="inotify")
"#,
        work = work.display(),
        ca = ca.display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
    );
    for (i, (file, tag, template, framing)) in inputs.iter().enumerate() {
        conf.push_str(&format!(
            r#"input(type="imfile" file="{file}" tag="{tag}:" ruleset="r{i}")
ruleset(name="r{i}") {{
  action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp" template="{template}"
    tcp_framing="{framing}" streamDriver="gtls" streamDriverMode="1"
    streamDriverAuthMode="x509/name" streamDriverPermittedPeers="collector"
    action.resumeRetryCount="-1" action.resumeInterval="1")
}}
"#,
            file = file.display(),
            port = addr.port(),
        ));
    }
    conf
}

fn start_rsyslog(setup: &Setup, label: &str, conf: &str) -> Process {
    assert!(Path::new(RSYSLOGD).exists(), "rsyslogd missing: tests/run installs rsyslog and rsyslog-gnutls");
    let dir = setup.path().join(label);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rsyslog.conf");
    std::fs::write(&path, conf).unwrap();
    let pid = dir.join("rsyslogd.pid");
    Process::spawn_named(
        label,
        Path::new(RSYSLOGD),
        &["-n", "-f", path.to_str().unwrap(), "-i", pid.to_str().unwrap()],
        dir.join("rsyslog.log"),
    )
}

#[test]
fn rsyslog_ships_three_samples_with_its_certificate_host_and_another_ca_is_refused() {
    let setup = Setup::new("rsyslog");
    let collector = Collector::start(
        &setup,
        &CollectorOptions { extra_toml: "[syslog]\nlisten = \"127.0.0.1:0\"\n".into(), ..Default::default() },
    );
    let addr = collector.syslog.expect("the collector printed its syslog address");
    let token = setup.token(&["default"], Role::Reader);
    let logs = copy_samples(&setup.path().join("logs"), &["OpenSSH_2k.log", "Linux_2k.log", "Apache_2k.log"]);
    // imfile sends a line only once its newline is written; the samples end
    // without one.
    for path in logs.values() {
        let mut bytes = std::fs::read(path).unwrap();
        if bytes.last() != Some(&b'\n') {
            bytes.push(b'\n');
            std::fs::write(path, bytes).unwrap();
        }
    }
    let sender = setup.pki.ensure(CertRole::Sender, "rsys-1", &[]).unwrap();
    let work = setup.path().join("rsyslog-work");
    std::fs::create_dir_all(&work).unwrap();
    let conf = rsyslog_conf(
        &work,
        &setup.pki.ca_cert(),
        &sender,
        addr,
        &[
            (&logs["OpenSSH_2k.log"], "openssh", "RSYSLOG_SyslogProtocol23Format", "octet-counted"),
            (&logs["Linux_2k.log"], "linux", "RSYSLOG_TraditionalForwardFormat", "traditional"),
            (&logs["Apache_2k.log"], "apache", "RSYSLOG_ForwardFormat", "traditional"),
        ],
    );
    let rsyslog = start_rsyslog(&setup, "rsyslog-good", &conf);

    collector.wait_total(&token, "host:\"rsys-1\"", 6000, Duration::from_secs(90));
    assert_eq!(collector.total(&token, "source:syslog"), 6000);
    // The header fields of each body format.
    for app in ["openssh", "linux", "apache"] {
        assert_eq!(collector.total(&token, &format!("fields.appname:{app}")), 2000, "{app}");
    }
    // Every line is there as text: word counts match the samples.
    let mut lines = sample_lines("OpenSSH_2k.log");
    lines.extend(sample_lines("Linux_2k.log"));
    lines.extend(sample_lines("Apache_2k.log"));
    for word in ["sshd", "authentication", "failure", "kernel", "workerenv"] {
        assert_eq!(collector.total(&token, word), lines_with_term(&lines, word), "{word}");
    }
    // The level comes from the PRI severity (imfile's default, notice).
    assert_eq!(collector.total(&token, "level:info"), 6000);

    // A sender whose certificate comes from another CA gets nothing in.
    let other = Pki::init(setup.path().join("other-pki")).unwrap();
    let stranger = other.ensure(CertRole::Sender, "stranger", &[]).unwrap();
    let stranger_log = setup.path().join("logs/stranger.log");
    std::fs::write(&stranger_log, "Dec 10 06:55:46 host app: strangerword one\n").unwrap();
    let stranger_work = setup.path().join("stranger-work");
    std::fs::create_dir_all(&stranger_work).unwrap();
    let conf = rsyslog_conf(
        &stranger_work,
        &setup.pki.ca_cert(),
        &stranger,
        addr,
        &[(&stranger_log, "stranger", "RSYSLOG_ForwardFormat", "traditional")],
    );
    let stranger_rsyslog = start_rsyslog(&setup, "rsyslog-stranger", &conf);
    wait_for(Duration::from_secs(30), "the stranger's handshake to fail", || {
        collector.process.log_text().contains("tls handshake failed").then_some(())
    });
    assert_eq!(collector.total(&token, "strangerword"), 0);
    assert_eq!(collector.total(&token, "*"), 6000);
    stranger_rsyslog.stop();
    rsyslog.stop();
    collector.process.stop();
}
