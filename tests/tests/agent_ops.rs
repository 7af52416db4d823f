//! Operating the agent: reloading its configuration without losing or
//! repeating a line.

use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;

#[test]
fn sighup_reloads_the_configuration_and_a_bad_one_is_refused() {
    let setup = Setup::new("reload");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &["Spark_2k.log", "Apache_2k.log"]);
    let spark = files["Spark_2k.log"].to_string_lossy().into_owned();
    let apache = files["Apache_2k.log"].to_string_lossy().into_owned();
    let config = agent_config(
        &setup,
        "hup-1",
        collector.ingest,
        std::slice::from_ref(&spark),
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "hup-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(30));

    // A broken configuration is refused; the agent keeps running.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("[[sources]]", "[[sauces]]")).unwrap();
    agent.signal("HUP");
    wait_for(Duration::from_secs(10), "the refusal in the log", || {
        agent.log_text().contains("reload refused").then_some(())
    });
    append_lines(
        &files["Spark_2k.log"],
        &["17/06/09 20:11:11 INFO after.Refusal: still shipping".to_owned()],
    );
    collector.wait_total(&token, "*", 2001, Duration::from_secs(30));

    // A good one takes effect: the second file is shipped, the first is
    // not shipped again.
    agent_config(&setup, "hup-1", collector.ingest, &[spark.clone(), apache], &AgentOptions::default());
    agent.signal("HUP");
    collector.wait_total(&token, "*", 4001, Duration::from_secs(30));
    assert_eq!(collector.total(&token, &source_query(&files["Spark_2k.log"])), 2001);
    assert!(agent.log_text().contains("reloading configuration"));
    agent.stop();
    collector.process.stop();
}
