//! Transport adapters: each file adapts one wire to a [`crate::session::Session`] and nothing
//! else (`publish.rs` adapts one HTTP request to one publish). Admission and the bus never know
//! which transport a client used.

pub mod publish;
pub mod sse;
pub mod websocket;
pub mod webtransport;
mod ws_wire;
