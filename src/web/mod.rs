//! The HTTP pieces every public route shares, whichever listener or HTTP version brought the
//! request: the response body type and its constructors ([`response`]), what is known of the
//! connection a request came on and the guards that keep it counted ([`conn`]), and the steps
//! of admitting a request as a client's session ([`request`]).
//!
//! It sits below `server` (which routes requests here) and `transport` (which answers them):
//! both import from it, and it imports neither. It holds no state of its own beyond the task
//! local of [`conn::stream_kill`]; node-wide state is [`crate::state::EdgeState`].

pub mod conn;
pub mod request;
pub mod response;

pub use conn::{Activity, ConnInfo, ConnSlot, InFlight};
pub use response::{Body, full_body, json, json_error, text};
