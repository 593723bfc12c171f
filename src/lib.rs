//! edgeplex: a real-time edge. Clients speak one channel protocol over WebSocket, Server-Sent
//! Events and WebTransport; every client lands on one pub/sub layer.
//!
//! Where things live, in the path of a message from the outside in. Each layer imports only the
//! ones below it (`server` → `transport` → `web`/`state` → `session` → `bus` → `outbox`), so a
//! reader can follow a message down without a way back up:
//! - [`server`]: listeners (TCP and the QUIC endpoint), TLS handshakes, HTTP routing, the edge's
//!   start, drain and shutdown; [`admin`] is its admin API.
//! - [`transport`]: one adapter per wire (WebSocket, SSE, WebTransport, `POST /publish`), from
//!   wire frames to session calls.
//! - [`web`]: the HTTP pieces server and transports share (responses, connection facts, the
//!   admission of a request); [`state`]: node-wide state ([`state::EdgeState`]).
//! - [`session`]: what a client frame means, a session's subscriptions and budget.
//! - [`bus`]: the hub (local fan-out) and the bus backends (embedded, Redis, Redis Cluster).
//! - [`outbox`]: a session's bounded outbound queue, shared by the session and the hub.
//! - Beside the path, asked by it: [`admission`] (origins, limits, the refusal table), [`auth`]
//!   (tokens, channel rules, backend hooks), [`protocol`] (the JSON frames; pure and fuzzed),
//!   [`outbound`] (the one HTTP(S) client the edge calls out with).
//! - [`config`], [`tls`], [`metrics`], [`telemetry`]: operator-facing plumbing. `config` reads
//!   the file into the types of the modules it configures (it compiles `[[channels]]` into
//!   [`auth::Rules`], for one), so those modules and it know each other.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod bus;
pub mod config;
pub mod metrics;
pub mod outbound;
pub mod outbox;
pub mod protocol;
pub mod server;
pub mod session;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod web;

pub use config::Config;
pub use server::Edge;
