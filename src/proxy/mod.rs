//! The data plane: accept, route, forward, stream, record.

pub mod body;
pub mod client;
pub mod faults;
pub mod headers;
pub mod outcome;
pub mod server;
pub mod service;
