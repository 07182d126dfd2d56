//! The control plane: the admin listener (apart from traffic), persisted state, the audit
//! log, alerts, and `rollgate check`.

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod check;
pub mod reload;
pub mod state;
