//! Token signing keys rotate without a restart: the collector trusts every
//! `*.pub` in `api.jwt_keys_dir`, read again when the directory changes,
//! and picks the key by the token's `kid`.

use std::time::Duration;

use logvault_collector::auth::{self, Role};
use logvault_e2e::*;

#[test]
fn a_new_token_key_is_trusted_and_a_retired_one_refused_without_a_restart() {
    let setup = Setup::new("token-keys");
    let keys_dir = setup.path().join("jwt-keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    let collector = Collector::start(
        &setup,
        &CollectorOptions {
            api_toml: format!("jwt_keys_dir = {:?}\n", keys_dir.display().to_string()),
            ..Default::default()
        },
    );
    let old_token = setup.token(&["default"], Role::Reader);
    let new_key = setup.path().join("new-jwt.key");
    let new_public = auth::ensure_key_pair(&new_key).unwrap();
    let now = auth::now_secs();
    let new_token = auth::mint(&new_key, &setup.claims(&["default"], Role::Reader, now)).unwrap();
    let status = |token: &str| collector.search_raw(Some(token), &[("q", "*")]);

    // Not trusted yet: its kid is unknown.
    let (code, body) = status(&new_token);
    assert_eq!(code, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("unknown key id"), "{body}");

    // Dropped into the directory, it is trusted within a few seconds; the
    // old key keeps working beside it.
    std::fs::copy(&new_public, keys_dir.join("2026-11.pub")).unwrap();
    wait_for(Duration::from_secs(10), "the new key to be trusted", || {
        (status(&new_token).0 == 200).then_some(())
    });
    assert_eq!(status(&old_token).0, 200);

    // Retired: removed from the directory, its tokens are refused again.
    std::fs::remove_file(keys_dir.join("2026-11.pub")).unwrap();
    wait_for(Duration::from_secs(10), "the retired key to be refused", || {
        (status(&new_token).0 == 401).then_some(())
    });
    assert_eq!(status(&old_token).0, 200);

    // A broken key file leaves the trusted keys as they were.
    std::fs::write(keys_dir.join("broken.pub"), "not a key").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status(&old_token).0, 200);
    assert!(collector.process.log_text().contains("token verification keys not reloaded"));
    collector.process.stop();
}
