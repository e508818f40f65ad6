//! One module per page.

pub mod map;
pub mod metrics;
pub mod registry;
pub mod service;
pub mod trace;
pub mod traces;
