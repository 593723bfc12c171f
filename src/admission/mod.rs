//! Admission: the checks a client passes before it reaches the bus, and the one table that maps
//! every refusal to what each transport says (HTTP status, WebSocket close code, WebTransport
//! code). Decisions here are pure functions of request facts and policy; no I/O happens here, so
//! transports stay thin and the policy is unit-tested without sockets.

pub mod client_ip;
pub mod limits;
pub mod origin;
pub mod store;

pub use limits::{Admission, Client, ConnectionTicket, ReplayReservation, SessionTicket};

use std::time::Duration;

use http::StatusCode;

use crate::config::OriginRules;
use crate::protocol::ErrorCode;

/// Why a client was refused. Each transport renders it through the methods below and nowhere
/// else, so a refusal means the same on every wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The `Origin` is not allowed (or missing where it is required).
    Origin,
    /// Over a rate limit; the client may retry after the given time.
    RateLimited { retry_after: Duration },
    /// A request or message is larger than its cap.
    TooLarge,
    /// The node is at its session cap.
    Overloaded,
    /// The node is shutting down.
    Draining,
    /// The bus cannot be reached.
    BusDown,
}

impl Refusal {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::TooLarge => "too_large",
            Refusal::Overloaded => "overloaded",
            Refusal::Draining => "draining",
            Refusal::BusDown => "bus_down",
        }
    }

    /// Before a handshake completes.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Refusal::Origin => StatusCode::FORBIDDEN,
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Overloaded | Refusal::Draining | Refusal::BusDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// `Retry-After` seconds, rounded up, for refusals a client should retry.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited { retry_after } => {
                Some(retry_after.as_millis().div_ceil(1000).max(1) as u64)
            }
            Refusal::Overloaded | Refusal::BusDown | Refusal::Draining => Some(1),
            _ => None,
        }
    }

    /// After a WebSocket handshake (and the WebTransport application error code, which design.md
    /// keeps equal to it).
    pub fn close_code(&self) -> u16 {
        match self {
            Refusal::Origin => close::POLICY,
            Refusal::RateLimited { .. } => close::POLICY,
            Refusal::TooLarge => close::TOO_BIG,
            Refusal::Overloaded | Refusal::BusDown => close::TRY_AGAIN_LATER,
            Refusal::Draining => close::GOING_AWAY,
        }
    }

    /// A refused WebTransport CONNECT: 403 for the origin, 429 for every other refusal. Chosen
    /// when wtransport could answer only 403, 404 or 429, and kept on h3 (which could send the
    /// refusal table's own status) so clients see no change.
    pub fn webtransport_connect_status(&self) -> StatusCode {
        match self {
            Refusal::Origin => StatusCode::FORBIDDEN,
            _ => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The protocol error code for the JSON body of an HTTP refusal.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Refusal::Origin => ErrorCode::Forbidden,
            Refusal::RateLimited { .. } => ErrorCode::RateLimited,
            Refusal::TooLarge => ErrorCode::TooLarge,
            Refusal::Overloaded | Refusal::Draining | Refusal::BusDown => ErrorCode::Unavailable,
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            Refusal::Origin => "origin not allowed",
            Refusal::RateLimited { .. } => "rate limited",
            Refusal::TooLarge => "request too large",
            Refusal::Overloaded => "edge at capacity, try again later",
            Refusal::Draining => "edge is shutting down",
            Refusal::BusDown => "bus unavailable, try again later",
        }
    }
}

/// WebSocket close codes used by the edge (RFC 6455 §7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Checks the `Origin` header of a request against a route's origin rules.
pub fn check_origin(origin: Option<&str>, policy: &OriginRules) -> Result<(), Refusal> {
    match (origin, &policy.allowed_origins) {
        (_, None) => Ok(()),
        (None, Some(_)) if policy.allow_missing_origin => Ok(()),
        (None, Some(_)) => Err(Refusal::Origin),
        (Some(o), Some(rules)) if origin::is_allowed(o, rules) => Ok(()),
        (Some(_), Some(_)) => Err(Refusal::Origin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdmissionConfig;

    #[test]
    fn refusal_table_matches_design() {
        let rl = Refusal::RateLimited {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(Refusal::Origin.http_status(), 403);
        assert_eq!(rl.http_status(), 429);
        assert_eq!(rl.retry_after_secs(), Some(2));
        assert_eq!(Refusal::TooLarge.http_status(), 413);
        assert_eq!(Refusal::Draining.http_status(), 503);
        assert_eq!(Refusal::BusDown.http_status(), 503);
        assert_eq!(Refusal::Origin.close_code(), 1008);
        assert_eq!(Refusal::TooLarge.close_code(), 1009);
        assert_eq!(Refusal::Draining.close_code(), 1001);
        assert_eq!(Refusal::BusDown.close_code(), 1013);
        assert_eq!(Refusal::Draining.webtransport_connect_status(), 429);
        assert_eq!(Refusal::Origin.webtransport_connect_status(), 403);
    }

    #[test]
    fn origin_policy() {
        let strict = OriginRules {
            allowed_origins: Some(vec!["https://a.example".into()]),
            allow_missing_origin: false,
        };
        assert_eq!(check_origin(None, &strict), Err(Refusal::Origin));
        assert_eq!(check_origin(Some("https://a.example"), &strict), Ok(()));
        assert_eq!(
            check_origin(Some("https://b.example"), &strict),
            Err(Refusal::Origin)
        );
        let lenient = OriginRules {
            allow_missing_origin: true,
            ..strict.clone()
        };
        assert_eq!(check_origin(None, &lenient), Ok(()));
        let any = OriginRules {
            allowed_origins: None,
            allow_missing_origin: false,
        };
        assert_eq!(check_origin(Some("https://z"), &any), Ok(()));
        // A route without rules of its own follows [admission]; one with them, its own.
        let mut policy = AdmissionConfig {
            origins: strict,
            ..AdmissionConfig::default()
        };
        policy.routes.insert("publish".into(), any.clone());
        assert_eq!(
            check_origin(Some("https://z"), policy.origin_rules("websocket")),
            Err(Refusal::Origin)
        );
        assert_eq!(
            check_origin(Some("https://z"), policy.origin_rules("publish")),
            Ok(())
        );
    }
}
