//! edgeplex: a real-time edge. Clients speak one channel protocol over WebSocket (SSE and
//! WebTransport to come); every client lands on one pub/sub layer.
//!
//! Where things live (the path of a message, outside in):
//! - [`server`]: listeners, TLS handshakes, HTTP routing, node-wide state and shutdown.
//! - [`admission`]: origin and limit checks, and the refusal table every transport uses.
//! - [`transport`]: one adapter per wire, from wire frames to session calls.
//! - [`session`]: what a client frame means, per-session queue and budget.
//! - [`bus`]: the hub (local fan-out) and the bus backends (embedded; Redis to come).
//! - [`protocol`]: the JSON frames, decoded and encoded; pure and fuzzed.
//! - [`hooks`]: asks the existing service before a step (connect, subscribe, publish), over
//!   [`outbound`], the one HTTP(S) client the edge calls out with.
//! - [`config`], [`tls`], [`metrics`], [`admin`], [`telemetry`]: operator-facing plumbing.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod bus;
pub mod config;
pub mod hooks;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod transport;

pub use config::Config;
pub use server::Edge;
