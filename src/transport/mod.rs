//! Transport adapters: each file adapts one wire to a [`crate::session::Session`] and nothing
//! else. Admission and the bus never know which transport a client used.

pub mod sse;
pub mod websocket;
