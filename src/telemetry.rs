//! Logging setup: `tracing` to stderr, a human format by default or JSON lines, filtered by
//! `log.level` (or `RUST_LOG`, which wins when set, for one-off debugging).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // Logs on stderr; stdout carries only the start banner (listen address, dev certificate
    // hash) that scripts read.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    // `try_init` so a second call (tests, embedders) keeps the first subscriber.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
