//! cutover: a mail front proxy for migrating users between server pools.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod proto;
pub mod route;
