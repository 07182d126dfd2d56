//! The control plane: the admin listener (apart from traffic) and `rollgate check`.

pub mod admin;
pub mod check;
