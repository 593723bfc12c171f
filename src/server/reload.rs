//! Config reload while serving: on SIGHUP (the binary forwards it) and when the file's contents
//! change (polled every `server.config_watch`).
//!
//! The new file is loaded and validated whole first (environment overrides applied, as at start).
//! When it is invalid, nothing changes and the error names the key and the file. When it is
//! valid, `[admission]`, `[limits]` and `[[channels]]` take effect at once for every later
//! decision; live sessions are never dropped (a session that lost a permission leaves that
//! channel, with a `forbidden` notice), and a limit whose quota did not change keeps its state.
//! With certificate files (`tls.cert`, `tls.key`), every reload also reads them again, so a
//! renewed certificate is served to new TCP and QUIC connections alike after a SIGHUP; open
//! connections keep theirs. Certificates that do not load do not hold the policy back: an
//! operator tightening limits during an attack while a renewal is half written still gets the
//! limits; the old certificate stays in force and the outcome, log line and metric say so. Other
//! sections are read at start only: a reload that changes them says which need a restart.
//! This module owns the watching and the reporting; what a policy means is `admission`'s.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, ConfigError, FileConfig};
use crate::metrics::ReasonLabels;
use crate::state::EdgeState;
use crate::tls;

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new policy is in force. `reset`: limits whose state started afresh because their
    /// quota changed. `needs_restart`: changed sections that are read only at start.
    Applied {
        reset: Vec<&'static str>,
        /// The `[[channels]]` rules changed: sessions dropped what they may no longer hold.
        channels: bool,
        needs_restart: Vec<&'static str>,
        /// The certificate files were read again and are in force for new connections.
        certificates: bool,
        /// Why the certificate files were not put in force (the old ones stay), when they
        /// did not load.
        certificate_error: Option<String>,
    },
    /// The file did not change since the last look.
    Unchanged,
}

/// Watches one config file for an edge.
#[derive(Debug)]
pub struct ConfigWatch {
    path: PathBuf,
    state: Arc<EdgeState>,
    /// The file's bytes when last read, valid or not, so a bad file is reported once.
    seen: Option<Vec<u8>>,
    /// The last config put in force (the one the edge started with, at first).
    applied: FileConfig,
}

impl ConfigWatch {
    pub fn new(path: PathBuf, state: Arc<EdgeState>) -> ConfigWatch {
        let seen = std::fs::read(&path).ok();
        let applied = state.config.effective.clone();
        ConfigWatch {
            path,
            state,
            seen,
            applied,
        }
    }

    /// Reloads now, whether or not the file changed (SIGHUP). Logs and counts the outcome.
    pub fn reload(&mut self, why: &'static str) -> Result<ReloadOutcome, ConfigError> {
        self.seen = std::fs::read(&self.path).ok();
        let result = self.apply();
        self.report(why, &result);
        result
    }

    /// Reloads if the file's contents changed since the last look.
    pub fn poll(&mut self) -> Result<ReloadOutcome, ConfigError> {
        let now = std::fs::read(&self.path).ok();
        if now == self.seen {
            return Ok(ReloadOutcome::Unchanged);
        }
        self.seen = now;
        let result = self.apply();
        self.report("file changed", &result);
        result
    }

    fn apply(&mut self) -> Result<ReloadOutcome, ConfigError> {
        let config = Config::load(&self.path)?;
        // Checked against the running session config: the new file's [session] is not applied.
        let running = &self.state.config.session;
        if (config.limits.ip_bytes.burst as usize) < running.close_message_bytes {
            return Err(ConfigError::Invalid {
                origin: self.path.display().to_string(),
                key: "limits.ip_bytes.burst",
                reason: format!(
                    "{} is less than the running session.close_message_bytes ({}); a frame that \
                     size could never pass",
                    config.limits.ip_bytes.burst, running.close_message_bytes
                ),
            });
        }
        // Certificate files are read again on every reload (a renewal keeps the same paths).
        let mut certificate_error = None;
        let certificates = match &config.tls {
            crate::config::TlsConfig::Files { .. } => {
                match crate::tls::server_config(&config.tls) {
                    Ok(setup) => Some(setup),
                    Err(e) => {
                        certificate_error = Some(format!("tls.cert/tls.key: {e}"));
                        None
                    }
                }
            }
            crate::config::TlsConfig::Dev { .. } => None,
        };
        let new = &config.effective;
        let old = &self.applied;
        let mut needs_restart = Vec::new();
        for (name, changed) in [
            ("server", new.server != old.server),
            (
                "tls",
                new.tls != old.tls && certificates.is_none() && certificate_error.is_none(),
            ),
            ("bus", new.bus != old.bus),
            ("admin", new.admin != old.admin),
            ("session", new.session != old.session),
            ("log", new.log != old.log),
            // Keys and hooks are read at start: a key rotation goes through the JWKS URL,
            // which is refetched on its own.
            ("auth", new.auth != old.auth),
            ("hooks", new.hooks != old.hooks),
            ("demo", new.demo != old.demo),
        ] {
            if changed {
                needs_restart.push(name);
            }
        }
        let report = self.state.admission.reload(
            config.admission.clone(),
            config.limits_under(&self.state.config.server),
        );
        // Sessions check what they hold against the new rules as soon as they are in force.
        let channels = self.state.gate.reload(config.channels.clone());
        let certificates = match certificates {
            Some(setup) => match reload_tls(&self.state, setup) {
                Ok(()) => true,
                Err(e) => {
                    certificate_error =
                        Some(format!("certificates loaded but not put in force: {e}"));
                    false
                }
            },
            None => false,
        };
        // Sections that need a restart keep comparing against what runs.
        self.applied.admission = new.admission.clone();
        self.applied.limits = new.limits.clone();
        self.applied.channels = new.channels.clone();
        if certificates {
            self.applied.tls = new.tls.clone();
        }
        Ok(ReloadOutcome::Applied {
            reset: report.reset,
            channels,
            needs_restart,
            certificates,
            certificate_error,
        })
    }

    fn report(&self, why: &'static str, result: &Result<ReloadOutcome, ConfigError>) {
        let count = |reason| {
            self.state
                .metrics
                .config_reloads
                .get_or_create(&ReasonLabels { reason })
                .inc();
        };
        match result {
            Ok(ReloadOutcome::Applied {
                reset,
                channels,
                needs_restart,
                certificates,
                certificate_error,
            }) => {
                if let Some(error) = certificate_error {
                    count("certificates_rejected");
                    tracing::error!(
                        file = %self.path.display(),
                        why,
                        reset = ?reset,
                        channels,
                        error,
                        "config reloaded: [admission], [limits] and [[channels]] in force; the \
                         certificate files did NOT load, new connections keep the old certificate"
                    );
                } else {
                    count("applied");
                    tracing::info!(
                        file = %self.path.display(),
                        why,
                        reset = ?reset,
                        channels,
                        certificates,
                        "config reloaded: [admission], [limits] and [[channels]] in force"
                    );
                }
                if !needs_restart.is_empty() {
                    tracing::warn!(
                        sections = ?needs_restart,
                        "config sections changed that are read only at start; restart to apply them"
                    );
                }
            }
            Ok(ReloadOutcome::Unchanged) => {}
            Err(e) => {
                count("rejected");
                tracing::error!(
                    file = %self.path.display(),
                    why,
                    error = %e,
                    "config reload rejected; the running policy stays"
                );
            }
        }
    }
}

/// Puts reloaded certificates in force for new connections, TCP and QUIC together; open
/// connections keep the certificate they were made with.
fn reload_tls(state: &EdgeState, setup: tls::TlsSetup) -> std::io::Result<()> {
    if let Some(endpoint) = state.quic.get() {
        let config = super::quic::server_config(setup.quic, &state.config.session)?;
        // The socket stays; only the config of new connections changes.
        endpoint.set_server_config(Some(config));
    }
    *state.tcp_tls.write() = setup.tcp;
    Ok(())
}
