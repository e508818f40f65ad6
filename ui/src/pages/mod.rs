//! One module per page.

pub mod trace;
pub mod traces;
