//! Invariants of the config loader (`edgeplex::config`) on one input. Shared by the fuzz target
//! `config_load` and `tests/fuzz_regressions.rs`. The input is the text of a config file.

use edgeplex::config::{Config, ConfigError};

pub fn check_config(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    match Config::from_toml_str(text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.summary();
            // What check-config prints as the effective config loads to the same config.
            let printed = toml::to_string(&config.effective).expect("the effective config prints");
            let again = Config::from_toml_str(&printed, "printed.toml")
                .unwrap_or_else(|e| panic!("the printed config does not load: {e}\n{printed}"));
            assert_eq!(
                again.effective, config.effective,
                "round trip changed the config"
            );
        }
        Err(ConfigError::Invalid {
            origin,
            key,
            reason,
        }) => {
            // A refusal names the file (saying so when the key was left at its default) and a
            // key, and says what is allowed.
            assert!(
                origin == "fuzz.toml" || origin == "fuzz.toml (key not set, default used)",
                "origin {origin:?}"
            );
            assert!(key.contains('.'), "key {key:?} is not section.key");
            assert!(!reason.is_empty());
        }
        Err(e) => {
            // Every error says which file it is about.
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz.toml"),
                "the error does not name the file: {msg}"
            );
        }
    }
}
