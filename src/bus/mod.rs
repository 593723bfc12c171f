//! The pub/sub layer: the [`hub::Hub`] fans messages out to local sessions, and a [`Bus`] carries
//! publishes between nodes (or, for the embedded bus, straight back to the hub).
//!
//! Every publish takes one path whichever node or backend made it: bus → hub → subscribers, the
//! publisher's own node included. Transports never see which bus is in use.

pub mod history;
pub mod hub;
pub mod memory;
pub mod redis;

pub use hub::Hub;

/// The bus backends. An enum rather than a trait object: there are few backends, and the publish
/// path stays free of dynamic dispatch and boxed futures.
#[derive(Debug)]
pub enum Bus {
    Memory(memory::MemoryBus),
    Redis(std::sync::Arc<redis::RedisBus>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The bus cannot take the publish now; the client is told `unavailable` and may retry.
    #[error("bus unavailable: {0}")]
    Unavailable(&'static str),
}

impl Bus {
    pub fn name(&self) -> &'static str {
        match self {
            Bus::Memory(_) => "memory",
            Bus::Redis(_) => "redis",
        }
    }

    /// Whether publishes can go through now (`/readyz`).
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Memory(_) => true,
            Bus::Redis(r) => r.is_ready(),
        }
    }
}
