//! cutover: a mail front proxy for migrating users between server pools.
//!
//! # Layout
//! Follow one login from the client's bytes to the backend and back:
//!
//! * [`server`]: listeners (one socket per worker thread, `SO_REUSEPORT`), accept loops,
//!   admission (connection limits), reloads and the drain. Each accepted connection
//!   becomes a [`session`] with the configuration snapshot in force at accept; on a
//!   listener behind a load balancer, [`front`] first reads the PROXY protocol header
//!   (parsed by [`proto::proxy`]) that names the client.
//! * [`session`]: the driver of one connection: TLS ([`tls`], [`stream`]), pumping
//!   bytes through the protocol's pre-auth machine, the hand-off and the relay
//!   ([`relay`]). It decides nothing about logins.
//! * [`proto`]: sans-IO protocol machines, no tokio, no clock, no sockets. Per protocol a
//!   client-facing `ServerMachine` (up to the login) and a backend-facing
//!   `BackendMachine` (greeting, STARTTLS, capabilities, credential replay). Shared kit:
//!   [`proto::line`] (framing), [`proto::text`] (the sanitiser), [`proto::sasl`] (the one
//!   SASL exchange and its failure-counting rule), [`proto::drive`] (the model driver that
//!   unit tests and fuzzing use).
//! * [`login`]: the login pipeline, where a login is decided: hold, throttle, route, the
//!   pool and fallback loop, history, tarpit; it returns one [`login::LoginDone`] and
//!   records the login metrics once.
//! * [`route`]: routing, a pure function of (configuration, user, protocol, time) to a
//!   [`route::Decision`] that `cutover route` prints.
//! * [`backend`]: connections to backend servers: DNS, connect, TLS, driving a backend
//!   machine, failover inside a pool ([`backend::PoolLogin`]), pop-before-smtp checks,
//!   active and passive health.
//! * [`control`]: the process's live state: the snapshot in force, backend health,
//!   admission, moving users, and the [`control::state::SharedState`] a fleet shares
//!   (holds, throttle, login history, relayed sessions), kept in memory by
//!   [`control::memory::MemoryState`] or in Redis by [`control::redis::RedisState`].
//! * [`config`]: the validated configuration (types in `config`, one validation function
//!   per section in `config/validate.rs`, the YAML shape in [`config::file`], user-name
//!   normalization and the stable hash); [`snapshot`]: a configuration with its derived
//!   TLS state; [`reload`]: watching the files.
//! * Endpoints: [`admin`] (kick, hold, release, sessions, stragglers) over [`http`], and
//!   [`metrics`] (Prometheus text; [`metrics::handles`] caches the hot-path series).
//! * [`demo`]: in-process demo backends (`cutover demo`, also used by tests);
//!   [`fuzzing`]: fuzz entry points (hidden); `main.rs`: the command line.
//!
//! Dependencies point one way: [`proto`], [`route`] and [`config`] use no tokio and no
//! sockets (`scripts/test.sh` checks), `config` does not depend on `route`, and
//! [`session`] reaches backends and state only through [`login`] and [`control`].
//!
//! # Rules
//! * No `unwrap` or panic reachable from network input; protocol errors are answered in
//!   protocol.
//! * Passwords live in [`proto::Secret`], which never prints and is wiped on drop; no
//!   raw pre-auth bytes and no relayed content are ever logged.
//! * Metric labels never carry a user name or a client address.
//! * No `unsafe`, except where a descriptor number handed over by another process (systemd
//!   socket activation, the upgrade hand-over) becomes an owned socket: one marked line in
//!   [`systemd`] and one in [`upgrade`].
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod backend;
pub mod config;
pub mod control;
pub mod demo;
pub mod front;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod login;
pub mod lookup;
pub mod metrics;
pub mod oauth;
pub mod proto;
pub mod relay;
pub mod reload;
pub mod route;
pub mod server;
pub mod server_tls;
pub mod session;
pub mod snapshot;
pub mod stream;
pub mod systemd;
pub mod tls;
pub mod tls_records;
pub mod upgrade;
