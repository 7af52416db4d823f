//! A token only ever sees its own tenants' records.

use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;

#[test]
fn a_token_for_tenant_a_never_sees_tenant_b() {
    let setup = Setup::new("tenants");
    let tenants = r#"
[tenants]
default = "default"
[[tenants.map]]
tenant = "alpha"
agents = ["alpha-*"]
[[tenants.map]]
tenant = "beta"
agents = ["beta-*"]
"#;
    let collector =
        Collector::start(&setup, &CollectorOptions { extra_toml: tenants.into(), ..Default::default() });
    let alpha_logs = setup.path().join("alpha");
    let beta_logs = setup.path().join("beta");
    copy_samples(&alpha_logs, &["HDFS_2k.log"]);
    copy_samples(&beta_logs, &["OpenSSH_2k.log"]);
    let alpha_config = agent_config(
        &setup,
        "alpha-1",
        collector.ingest,
        &[alpha_logs.join("*.log").to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let beta_config = agent_config(
        &setup,
        "beta-1",
        collector.ingest,
        &[beta_logs.join("*.log").to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let alpha_agent = start_agent(&setup, "alpha-1", &alpha_config);
    let beta_agent = start_agent(&setup, "beta-1", &beta_config);

    let alpha = setup.token(&["alpha"], Role::Reader);
    let beta = setup.token(&["beta"], Role::Reader);
    let both = setup.token(&["alpha", "beta"], Role::Reader);
    let nobody = setup.token(&["gamma"], Role::Reader);
    collector.wait_total(&both, "*", 4000, Duration::from_secs(60));

    assert_eq!(collector.total(&alpha, "*"), 2000);
    assert_eq!(collector.total(&beta, "*"), 2000);
    assert_eq!(collector.total(&nobody, "*"), 0);
    // Words only the other tenant's logs hold find nothing.
    assert_eq!(collector.total(&alpha, "sshd"), 0);
    assert_eq!(collector.total(&beta, "PacketResponder"), 0);
    assert!(collector.total(&both, "sshd") > 0 && collector.total(&both, "PacketResponder") > 0);
    // Naming another tenant in the query text is refused; naming the other
    // tenant's host finds nothing: the tenant filter is applied in code,
    // outside the query.
    for query in ["tenant:beta", "* OR tenant:beta", "tenant:alpha OR tenant:beta"] {
        let (status, body) = collector.search_raw(Some(&alpha), &[("q", query)]);
        assert_eq!(status, 403, "{query}: {body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    assert_eq!(collector.total(&alpha, "tenant:alpha"), 2000);
    assert_eq!(collector.total(&both, "tenant:beta"), 2000);
    assert_eq!(collector.total(&alpha, "host:\"beta-1\""), 0);

    // Aggregations count only the token's tenants.
    let (status, body) = collector.aggregate(
        &alpha,
        serde_json::json!({ "histogram": {}, "terms": [{ "field": "host" }, { "field": "source" }] }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 2000);
    assert_eq!(body["terms"][0]["buckets"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["terms"][0]["buckets"][0]["value"], "alpha-1");
    let (status, _) = collector.aggregate(&alpha, serde_json::json!({ "q": "tenant:beta" }));
    assert_eq!(status, 403);

    // Context of the other tenant's record is not found; of one's own, it is.
    let (_, beta_hits) = collector.search_raw(Some(&beta), &[("q", "*"), ("limit", "1")]);
    let beta_id = beta_hits["hits"][0]["id"].as_str().unwrap().to_owned();
    let (status, _) = collector.call("GET", &format!("/api/v1/context?id={beta_id}"), Some(&alpha), None);
    assert_eq!(status, 404, "alpha reads around beta's record");
    let (status, context) =
        collector.call("GET", &format!("/api/v1/context?id={beta_id}"), Some(&beta), None);
    assert_eq!(status, 200);
    assert!(context["after"].as_array().unwrap().iter().all(|hit| hit["tenant"] == "beta"));

    // A live tail shows only the token's tenants: beta writes, alpha's
    // tail stays empty while beta's shows the line.
    let alpha_tail = LiveTail::open(&collector, &alpha, "tailmarker");
    let beta_tail = LiveTail::open(&collector, &beta, "tailmarker");
    std::thread::sleep(Duration::from_secs(1));
    append_lines(
        &beta_logs.join("OpenSSH_2k.log"),
        &["Dec 10 11:11:11 LabSZ sshd[1]: tailmarker for beta".into()],
    );
    let seen = beta_tail.next_hit(Duration::from_secs(20)).expect("beta's tail shows beta's line");
    assert_eq!(seen["tenant"], "beta");
    assert!(alpha_tail.next_hit(Duration::from_secs(2)).is_none(), "alpha's tail showed beta's line");
    let (status, body) = collector.search_raw(Some(&alpha), &[("q", "*"), ("limit", "1000")]);
    assert_eq!(status, 200);
    assert!(
        body["hits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|hit| hit["tenant"] == "alpha" && hit["host"] == "alpha-1")
    );

    alpha_agent.stop();
    beta_agent.stop();
    collector.process.stop();
}

/// A mapping by CA: every certificate another CA issued belongs to its
/// tenant, whatever the agent's name says.
#[test]
fn an_agent_certificate_maps_to_its_tenant_by_its_issuing_ca() {
    let setup = Setup::new("tenant-ca");
    let gamma_pki = logvault_certs::Pki::init(setup.path().join("gamma-pki")).unwrap();
    let bundle = setup.path().join("cas.crt");
    let mut cas = std::fs::read(setup.pki.ca_cert()).unwrap();
    cas.extend(std::fs::read(gamma_pki.ca_cert()).unwrap());
    std::fs::write(&bundle, cas).unwrap();
    let tenants = format!(
        "[tenants]\n[[tenants.map]]\ntenant = \"gamma\"\nca = {:?}\n[[tenants.map]]\ntenant = \"beta\"\nagents = [\"beta-*\"]\n",
        gamma_pki.ca_cert().display().to_string()
    );
    let options = CollectorOptions { extra_toml: tenants, ingest_ca: Some(bundle), ..Default::default() };
    let collector = Collector::start(&setup, &options);
    let logs = setup.path().join("logs");
    copy_samples(&logs, &["HDFS_2k.log", "OpenSSH_2k.log"]);
    // beta-7's certificate comes from the gamma CA: gamma, not beta.
    let config = agent_config(
        &setup,
        "beta-7",
        collector.ingest,
        &[logs.join("HDFS_2k.log").to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let own = setup.agent_cert("beta-7");
    let gamma = gamma_pki.issue(logvault_certs::Role::Agent, "beta-7", &[]).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&own.cert.display().to_string(), &gamma.cert.display().to_string())
        .replace(&own.key.display().to_string(), &gamma.key.display().to_string());
    std::fs::write(&config, text).unwrap();
    let gamma_agent = start_agent(&setup, "beta-7", &config);
    // beta-1 from the collector's own CA: beta, by its name.
    let beta_config = agent_config(
        &setup,
        "beta-1",
        collector.ingest,
        &[logs.join("OpenSSH_2k.log").to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let beta_agent = start_agent(&setup, "beta-1", &beta_config);

    let gamma_token = setup.token(&["gamma"], Role::Reader);
    let beta_token = setup.token(&["beta"], Role::Reader);
    collector.wait_total(&gamma_token, "*", 2000, Duration::from_secs(60));
    collector.wait_total(&beta_token, "*", 2000, Duration::from_secs(60));
    assert_eq!(collector.total(&gamma_token, "host:\"beta-7\""), 2000);
    assert_eq!(collector.total(&beta_token, "host:\"beta-7\""), 0);
    assert_eq!(collector.total(&gamma_token, "sshd"), 0);
    gamma_agent.stop();
    beta_agent.stop();
    collector.process.stop();
}
