//! cutover: a mail front proxy for migrating users between server pools.
//!
//! # Layout
//! Three layers; dependencies point one way.
//!
//! * Pure (no tokio, no sockets, no clock): [`config`] (the validated configuration),
//!   [`route`] (who goes where), [`proto`] (sans-IO IMAP, POP3 and SMTP machines for the
//!   client side before login and for the backend login).
//! * Drivers: [`server`] (listeners, accept loops, drain), [`session`] (one client
//!   connection: TLS, pre-auth machine, login, hand-off), [`backend`] (connect, TLS,
//!   failover, health), [`relay`] (bytes both ways after login), [`tls`], [`stream`].
//! * Process: `main.rs` (the CLI), [`metrics`], [`snapshot`] (config + derived TLS state),
//!   [`demo`] (in-process demo backends, also used by the tests).
//!
//! # Rules
//! * No `unwrap` or panic reachable from network input; protocol errors are answered in
//!   protocol.
//! * Passwords live in [`proto::Secret`], which never prints and is wiped on drop; no
//!   raw pre-auth bytes and no relayed content are ever logged.
//! * Metric labels never carry a user name or a client address.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod backend;
pub mod config;
pub mod control;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod login;
pub mod metrics;
pub mod proto;
pub mod relay;
pub mod reload;
pub mod route;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod stream;
pub mod tls;
