//! The admin commands as an operator runs them.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};

use logvault_e2e::*;

fn run(binary: &str, args: &[&str]) -> Output {
    Command::new(bin(binary)).args(args).output().unwrap()
}

fn ok(binary: &str, args: &[&str]) -> String {
    let out = run(binary, args);
    assert!(out.status.success(), "{binary} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(binary: &str, args: &[&str]) -> String {
    let out = run(binary, args);
    assert!(!out.status.success(), "{binary} {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn certs_token_and_agent_check_work_from_the_command_line() {
    let dir = TempDir::new("cli");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().unwrap();
    ok("logvault", &["certs", "init", "--dir", pki]);
    assert!(fails("logvault", &["certs", "init", "--dir", pki]).contains("already exists"));
    ok(
        "logvault",
        &[
            "certs",
            "issue",
            "--dir",
            pki,
            "--collector",
            "c1",
            "--san",
            "127.0.0.1",
            "--san",
            "c1.example.org",
        ],
    );
    let issued = ok("logvault", &["certs", "issue", "--dir", pki, "--agent", "web-7"]);
    assert!(issued.contains("agents/web-7.crt") && issued.contains("agents/web-7.key"), "{issued}");
    assert!(
        fails("logvault", &["certs", "issue", "--dir", pki, "--agent", "../../etc/passwd"])
            .contains("invalid name")
    );
    for key in ["ca.key", "agents/web-7.key", "collectors/c1.key"] {
        let mode = std::fs::metadata(dir.path().join("pki").join(key)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }

    // A token minted by the CLI verifies with the matching public key.
    let key = dir.path().join("jwt.key");
    let public = std::path::PathBuf::from(ok("logvault", &["keygen", "--out", key.to_str().unwrap()]).trim());
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    let token = ok(
        "logvault",
        &[
            "token",
            "--key",
            key.to_str().unwrap(),
            "--sub",
            "alice",
            "--tenant",
            "ops",
            "--role",
            "auditor",
            "--ttl",
            "2h",
        ],
    );
    let verifier =
        logvault_collector::auth::Verifier::from_public_pem(&public, "logvault", "logvault").unwrap();
    let claims = verifier.verify(token.trim()).unwrap();
    assert_eq!((claims.sub.as_str(), claims.all_tenants()), ("alice", vec!["ops".to_owned()]));
    assert!(claims.exp >= claims.nbf + 7199);
    assert!(
        fails(
            "logvault",
            &["token", "--key", key.to_str().unwrap(), "--sub", "a", "--tenant", "x", "--role", "root"]
        )
        .contains("root")
    );

    // The agent's check names a bad key in its configuration.
    let agent_toml = dir.path().join("agent.toml");
    let config = format!(
        "state_dir = \"{state}\"\n[collector]\naddress = \"127.0.0.1:6000\"\nca = \"{pki}/ca.crt\"\ncert = \"{pki}/agents/web-7.crt\"\nkey = \"{pki}/agents/web-7.key\"\n[[sources]]\ninclude = [\"/var/log/*.log\"]\n",
        state = dir.path().join("state").display()
    );
    std::fs::write(&agent_toml, &config).unwrap();
    assert!(
        ok("logvault-agent", &["check", "--config", agent_toml.to_str().unwrap()]).contains("agent web-7")
    );
    std::fs::write(&agent_toml, config.replace("[[sources]]", "[[sourcez]]")).unwrap();
    assert!(
        fails("logvault-agent", &["check", "--config", agent_toml.to_str().unwrap()]).contains("sourcez")
    );

    // A collector certificate cannot stand in for an agent's.
    std::fs::write(&agent_toml, config.replace("agents/web-7", "collectors/c1")).unwrap();
    assert!(
        fails("logvault-agent", &["check", "--config", agent_toml.to_str().unwrap()]).contains("Ed25519")
    );

    for (binary, args) in [
        ("logvault", vec!["--help"]),
        ("logvault", vec!["quickstart", "--help"]),
        ("logvault", vec!["serve", "--help"]),
        ("logvault", vec!["certs", "issue", "--help"]),
        ("logvault", vec!["token", "--help"]),
        ("logvault", vec!["search", "--help"]),
        ("logvault-agent", vec!["--help"]),
    ] {
        assert!(ok(binary, &args).contains("Usage"), "{binary} {args:?}");
    }
}

/// The shipped systemd unit is valid as systemd reads it.
#[test]
fn the_systemd_unit_verifies() {
    let dir = TempDir::new("unit");
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/dist/logvault-agent.service"))
            .unwrap();
    let unit = unit.replace("/usr/local/bin/logvault-agent", bin("logvault-agent").to_str().unwrap());
    let path = dir.path().join("logvault-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed by tests/run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze: {stderr}");
}
