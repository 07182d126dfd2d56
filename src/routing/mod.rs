//! Routing: the immutable compiled table, version selection, and the atomic store.

pub mod select;
pub mod store;
pub mod table;
