//! Keeps the key set of an `auth.jwks` URL in force: fetched at start, then every
//! `auth.jwks_refresh`. A fetch that fails or does not parse changes nothing: the last good set
//! stays, the log says why, and `edgeplex_jwks_fetches_total` counts it; a failed fetch is tried
//! again sooner (from 1 s, doubling, never later than the refresh period), so a provider that
//! was down at start is picked up within seconds of coming back.
//!
//! It owns the fetching and its timing only; what a key set means is [`super::token`]'s, and
//! the HTTP is [`crate::outbound`]'s.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::token::{KeyError, MAX_JWKS_BYTES, Verifier, parse_jwks};
use crate::metrics::Metrics;
use crate::outbound::Outbound;

/// One fetch's whole budget.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Runs until `stop`: fetches `url` and puts each good set in force on `verifier`.
pub async fn refresh(
    url: String,
    every: Duration,
    verifier: Arc<Verifier>,
    outbound: Outbound,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            // Validation parsed it already; this is not reached.
            tracing::error!(%url, error = %e, "auth.jwks is not a URL; no key set will be fetched");
            return;
        }
    };
    let mut retry = FIRST_RETRY;
    loop {
        let wait = match fetch(&uri, &url, &outbound).await {
            Ok(keys) => {
                tracing::info!(%url, keys = keys.len(), skipped = keys.skipped(), "JWKS in force");
                verifier.set_jwks(keys);
                metrics.jwks_fetch("ok");
                retry = FIRST_RETRY;
                every
            }
            Err((result, why)) => {
                tracing::warn!(%url, error = %why, retry_in = ?retry.min(every), "JWKS fetch failed; the last good key set stays in force");
                metrics.jwks_fetch(result);
                let wait = retry.min(every);
                retry = (retry * 2).min(every);
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One fetch: `Err` holds the metric label and what went wrong.
async fn fetch(
    uri: &http::Uri,
    url: &str,
    outbound: &Outbound,
) -> Result<super::token::KeySet, (&'static str, String)> {
    let (status, body) = outbound
        .get(uri, FETCH_TIMEOUT, MAX_JWKS_BYTES)
        .await
        .map_err(|e| ("failed", e.to_string()))?;
    if !status.is_success() {
        return Err(("failed", format!("the server answered {status}")));
    }
    parse_jwks(&body).map_err(|e: KeyError| ("invalid", e.with_origin(url).to_string()))
}
