//! The login pipeline: where a login is decided, and everything it can come to.
//!
//! A client machine has read credentials; [`log_in`] takes them and runs the operator's
//! model of a login top to bottom:
//!
//! 1. **hold**: a held user waits (a mailbox is being copied), up to `admin.hold_max_wait`;
//! 2. **throttle**: an address or user name over its failed-login budget is refused
//!    without asking a backend;
//! 3. **route**: the pure routing decision ([`crate::route`]) picks the pool, its servers
//!    in try order and the fallback pool; a rule that reads the provider's database asks
//!    its lookup ([`crate::lookup`], cached) and routing goes on with the answer;
//! 4. **pools**: the pool's servers are tried in order, failing over on unavailability
//!    only ([`crate::backend`]); the fallback pool follows when the route says so;
//! 5. **after**: a success is written to the history (stragglers, the pop-before-smtp
//!    window) and clears the user's failures; a rejection is counted and tarpitted.
//!
//! It returns one [`LoginDone`], and records `cutover_logins_total` and the login
//! latencies once, from that value.
//!
//! # Which configuration
//! Steps 1 and 2 use the session's own snapshot (taken when the connection was accepted).
//! Step 3 takes the snapshot in force at that moment, once: after any hold, so a release
//! lands the login on the routes in force then (the mailbox move recipe: hold, kick, copy,
//! change the routes, release). Steps 4 and 5 use that same snapshot, and a served session
//! keeps it ([`Served::snap`]) to its end. Holds, throttles and the history live behind
//! [`SharedState`](crate::control::state::SharedState), so a fleet of proxies can share
//! them without changing anything here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Connected, PoolLogin, PoolResult};
use crate::config::{self, rfc3339, Listener};
use crate::control::holds::HoldOutcome;
use crate::control::state::Login;
use crate::control::Control;
use crate::metrics::{self as m, handles::LoginLabel};
use crate::proto::{ClientInfo, Credentials, LoginOutcome};
use crate::route::{self, Decision};
use crate::snapshot::Snapshot;

/// Where a login happens: the session's snapshot, its listener, the process state.
#[derive(Clone, Copy)]
pub struct Place<'a> {
    /// The session's configuration, taken at accept (holds and throttle read it).
    pub snap: &'a Snapshot,
    /// The listener that accepted the connection.
    pub listener: &'a Listener,
    /// Live state: backends, shared state.
    pub control: &'a Control,
}

/// One login to decide.
pub struct LoginRequest<'a> {
    /// What the client presented.
    pub credentials: Credentials,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client speaks TLS.
    pub client_tls: bool,
    /// The client's own name (SMTP EHLO), for the backend's EHLO.
    pub helo: Option<&'a str>,
}

/// Who is at fault when a login does not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client: the backend rejected its credentials.
    Client,
    /// The backends: no server of the pool (or the fallback) could serve.
    Backend,
    /// The proxy's own policy or configuration: throttled, no route.
    Proxy,
    /// The operator: the user was held longer than `admin.hold_max_wait`.
    Operator,
}

/// Why the proxy refused a login without a backend's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed logins from this address or for this user.
    Throttled,
    /// No route matches the user (the configuration has no default route).
    NoRoute,
    /// Held by the operator past `admin.hold_max_wait`.
    HeldTooLong,
    /// A route lookup could not answer (its database is down and nothing usable is
    /// cached), or answered a pool or server the configuration does not have: a
    /// temporary failure, never an authentication failure and never another pool.
    LookupFailed,
    /// An OAuth login for a pool that cannot take tokens (an SMTP pool that verifies
    /// passwords with POP3), and no fallback pool that can.
    TokenNotAccepted,
    /// An OAuth token cutover verified and refused (signature, expiry, issuer,
    /// audience), or whose identity differs from the one the SASL message claims, or a
    /// token login that names no user when nothing verifies the token.
    TokenInvalid,
}

/// A login that succeeded: the backend connection, ready for the relay.
pub struct Served {
    /// The configuration it was routed with: the session's from now on.
    pub snap: Arc<Snapshot>,
    /// The normalized user name.
    pub user: String,
    /// The pool that serves the session.
    pub pool: String,
    /// The logged-in backend connection.
    pub backend: Connected,
}

/// Everything a login can come to.
pub enum LoginDone {
    /// Logged in.
    Served(Served),
    /// The backend rejected the credentials: never failed over.
    AuthFailed {
        /// The normalized user name.
        user: String,
        /// The pool whose server said so.
        pool: String,
        /// The server that said so.
        server: String,
        /// Its text, response code included.
        response: String,
        /// The OAuth error challenge it sent first (RFC 7628), for the client.
        challenge: Option<String>,
    },
    /// No server could serve: failover and fallback exhausted.
    Unavailable {
        /// The normalized user name.
        user: String,
        /// The last pool tried.
        pool: String,
    },
    /// The proxy said no.
    Refused {
        /// The normalized user name.
        user: String,
        /// Why.
        refusal: Refusal,
    },
}

impl LoginDone {
    /// Who is at fault; `None` for a success.
    pub fn fault(&self) -> Option<Fault> {
        match self {
            LoginDone::Served(_) => None,
            LoginDone::AuthFailed { .. } => Some(Fault::Client),
            LoginDone::Unavailable { .. } => Some(Fault::Backend),
            LoginDone::Refused {
                refusal: Refusal::HeldTooLong,
                ..
            } => Some(Fault::Operator),
            LoginDone::Refused {
                refusal: Refusal::LookupFailed,
                ..
            } => Some(Fault::Backend),
            LoginDone::Refused {
                refusal: Refusal::TokenInvalid,
                ..
            } => Some(Fault::Client),
            LoginDone::Refused { .. } => Some(Fault::Proxy),
        }
    }

    /// The normalized user name.
    pub fn user(&self) -> &str {
        match self {
            LoginDone::Served(s) => &s.user,
            LoginDone::AuthFailed { user, .. }
            | LoginDone::Unavailable { user, .. }
            | LoginDone::Refused { user, .. } => user,
        }
    }

    /// The pool that served or refused, once routing ran.
    pub fn pool(&self) -> Option<&str> {
        match self {
            LoginDone::Served(s) => Some(&s.pool),
            LoginDone::AuthFailed { pool, .. } | LoginDone::Unavailable { pool, .. } => Some(pool),
            LoginDone::Refused { .. } => None,
        }
    }

    /// The server that served or rejected.
    pub fn server(&self) -> Option<&str> {
        match self {
            LoginDone::Served(s) => Some(&s.backend.server),
            LoginDone::AuthFailed { server, .. } => Some(server),
            _ => None,
        }
    }

    /// What the client machine is told.
    pub fn outcome(&self) -> LoginOutcome {
        match self {
            LoginDone::Served(s) => LoginOutcome::Ok {
                capabilities: s.backend.capabilities.clone(),
            },
            LoginDone::AuthFailed {
                response,
                challenge: Some(challenge),
                ..
            } => LoginOutcome::Challenged {
                challenge: challenge.clone(),
                response: Some(response.clone()),
            },
            LoginDone::AuthFailed { response, .. } => LoginOutcome::AuthFailed {
                response: Some(response.clone()),
            },
            LoginDone::Refused {
                refusal: Refusal::Throttled,
                ..
            } => LoginOutcome::Refused {
                reason: "Too many failed logins, try again later",
            },
            LoginDone::Refused {
                refusal: Refusal::TokenInvalid,
                ..
            } => LoginOutcome::AuthFailed {
                response: Some("[AUTHENTICATIONFAILED] Invalid or expired token".into()),
            },
            LoginDone::Refused {
                refusal: Refusal::TokenNotAccepted,
                ..
            } => LoginOutcome::Refused {
                reason: "OAuth is not accepted for this account here: log in with a password",
            },
            LoginDone::Unavailable { .. } | LoginDone::Refused { .. } => LoginOutcome::Unavailable,
        }
    }

    /// The `result` label of `cutover_logins_total` under the pool's own series; `None`
    /// for refusals, which are counted under a pseudo-pool (`held`, `throttled`, `none`)
    /// where they happen.
    pub fn label(&self) -> Option<LoginLabel> {
        match self {
            LoginDone::Served(_) => Some(LoginLabel::Ok),
            LoginDone::AuthFailed { .. } => Some(LoginLabel::AuthFailed),
            LoginDone::Unavailable { .. } => Some(LoginLabel::BackendUnavailable),
            LoginDone::Refused { .. } => None,
        }
    }
}

/// Decides one login. See the module documentation for the steps.
pub async fn log_in(at: Place<'_>, req: LoginRequest<'_>) -> LoginDone {
    let mechanism = req.credentials.mechanism();
    let protocol = at.listener.protocol.as_str();
    let done = decide_login(at, req).await;
    let result = match done.fault() {
        None => "ok",
        Some(Fault::Client) => "auth_failed",
        Some(Fault::Backend) => "unavailable",
        Some(Fault::Proxy | Fault::Operator) => "refused",
    };
    metrics::counter!(m::LOGINS_BY_MECHANISM, "protocol" => protocol, "mechanism" => mechanism, "result" => result)
        .increment(1);
    done
}

async fn decide_login(at: Place<'_>, mut req: LoginRequest<'_>) -> LoginDone {
    let started = Instant::now();
    if let Err(user) = token_identity(at, &mut req).await {
        let (protocol, tls) = (at.listener.protocol.as_str(), tls_label(req.client_tls));
        metrics::counter!(m::LOGINS, "protocol" => protocol, "pool" => "none", "rule" => "none", "result" => "auth_failed", "tls" => tls).increment(1);
        let delay = at
            .control
            .state
            .failed(req.peer.ip(), &user, &at.snap.config.throttle);
        tokio::time::sleep(delay.await).await;
        return LoginDone::Refused {
            user,
            refusal: Refusal::TokenInvalid,
        };
    }
    let user = config::normalize(&at.snap.config.users, &req.credentials.user);
    let waited = match wait_if_held(at, &user, req.client_tls).await {
        Ok(waited) => waited,
        Err(refusal) => return LoginDone::Refused { user, refusal },
    };
    if throttled(at, &user, &req).await {
        return LoginDone::Refused {
            user,
            refusal: Refusal::Throttled,
        };
    }
    // The configuration in force now routes this login (see the module documentation).
    let snap = at.control.snapshot();
    let at = Place { snap: &snap, ..at };
    let protocol = at.listener.protocol;
    let decision = match decide(at, &req.credentials.user, &user).await {
        Ok(d) => d,
        Err(e) => {
            let refusal = if e.is_temporary() {
                tracing::warn!(error = %e, "login refused: the route lookup cannot decide");
                Refusal::LookupFailed
            } else {
                tracing::error!(error = %e, "no route");
                Refusal::NoRoute
            };
            metrics::counter!(m::LOGINS, "protocol" => protocol.as_str(), "pool" => "none", "rule" => "none", "result" => "refused", "tls" => tls_label(req.client_tls)).increment(1);
            return LoginDone::Refused { user, refusal };
        }
    };
    tracing::Span::current().record("user", decision.user.as_str());
    let (result, pool, at_backend) = try_pools(at, &decision, &req).await;
    let done = after_backend(at, &req, decision.user.clone(), pool, result, &snap).await;
    if let LoginDone::Refused { .. } = &done {
        metrics::counter!(m::LOGINS, "protocol" => protocol.as_str(), "pool" => decision.pool.clone(), "rule" => decision.rule_id.clone(), "result" => "refused", "tls" => tls_label(req.client_tls)).increment(1);
    }
    let at_proxy = started
        .elapsed()
        .saturating_sub(waited)
        .saturating_sub(at_backend);
    record(at, &done, &decision, req.client_tls, at_backend, at_proxy);
    done
}

/// Step 0, for OAuth logins: who the token is for. With `oauth:` configured the token is
/// verified here (signature, expiry, issuer, audience) and its claim is the user: a SASL
/// message that claims someone else is refused, one that claims no one takes the claim.
/// Without it the identity the message claims routes the login and the backend judges the
/// token. `Err(user)`: refused (the user name for the failure count).
async fn token_identity(at: Place<'_>, req: &mut LoginRequest<'_>) -> Result<(), String> {
    let Some((payload, mechanism)) = req.credentials.token_payload() else {
        return Ok(());
    };
    let claimed = req.credentials.user.clone();
    let Some(verifier) = at.control.oauth() else {
        if claimed.is_empty() {
            tracing::info!(
                mechanism = mechanism.as_str(),
                "OAuth login names no user and tokens are not verified here"
            );
            return Err(claimed);
        }
        return Ok(());
    };
    let token = match crate::proto::sasl::parse_oauth(mechanism, payload.expose()) {
        Ok(m) => String::from_utf8_lossy(m.token).into_owned(),
        Err(_) => return Err(claimed),
    };
    let verified = verifier.verify(&token, rfc3339::now()).await;
    let mut token = token.into_bytes();
    crate::proto::wipe(&mut token);
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(user = %claimed, mechanism = mechanism.as_str(), reason = %e, "OAuth token refused");
            return Err(claimed);
        }
    };
    let users = &at.snap.config.users;
    if !claimed.is_empty()
        && config::normalize(users, &claimed) != config::normalize(users, &verified.identity)
    {
        tracing::info!(user = %claimed, token_for = %verified.identity, "OAuth token is for another user");
        return Err(claimed);
    }
    if claimed.is_empty() {
        // The backend gets the verified identity in the message too.
        if let Some(msg) =
            crate::proto::sasl::with_identity(mechanism, payload.expose(), &verified.identity)
        {
            req.credentials = crate::proto::Credentials::token(String::new(), msg, mechanism);
        }
        req.credentials.user = verified.identity;
    }
    Ok(())
}

/// Step 3: the routing decision, asking each lookup a rule reads (in rule order, only
/// when the login reaches the rule). A lookup whose answer changed for the user moves
/// their open sessions (`on_move`).
async fn decide(at: Place<'_>, login: &str, user: &str) -> Result<Decision, route::RouteError> {
    let cfg = &at.snap.config;
    if cfg.lookups.is_empty() {
        return route::route(cfg, login, at.listener.protocol, rfc3339::now());
    }
    let lookups = &at.control.lookups;
    let protocol = at.listener.protocol;
    let routed = crate::lookup::route(lookups, cfg, login, user, protocol, rfc3339::now()).await;
    if routed.changed {
        // The new answer is cached: the user's sessions are routed with it.
        at.control.lookup_changed(user);
    }
    if let Err(route::RouteError::BadRow { lookup, kind, .. }) = &routed.result {
        metrics::counter!(m::LOOKUP_BAD_ROWS, "lookup" => lookup.clone(), "reason" => *kind)
            .increment(1);
    }
    routed.result
}

/// Step 1: waits while the user is held. `Ok(how long)`, or the refusal when the wait
/// outlasted `admin.hold_max_wait`. The route is taken after the wait, so a release lands
/// the login on the route in force then.
async fn wait_if_held(at: Place<'_>, user: &str, client_tls: bool) -> Result<Duration, Refusal> {
    let cfg = &at.snap.config;
    let max = cfg
        .admin
        .as_ref()
        .map_or(Duration::from_secs(120), |a| a.hold_max_wait);
    let state = &at.control.state;
    if !state.is_held(user).await {
        return Ok(Duration::ZERO);
    }
    tracing::info!(%user, "login held");
    let started = Instant::now();
    let released = state.wait_release(user, max).await == HoldOutcome::Proceed;
    let label = if released { "released" } else { "timed_out" };
    metrics::counter!(m::HELD_LOGINS, "result" => label).increment(1);
    if released {
        return Ok(started.elapsed());
    }
    metrics::counter!(m::LOGINS, "protocol" => at.listener.protocol.as_str(), "pool" => "held", "rule" => "none", "result" => "backend_unavailable", "tls" => tls_label(client_tls)).increment(1);
    Err(Refusal::HeldTooLong)
}

/// Step 2: password spraying. True when the address or the user name is blocked: the
/// refusal is counted, and answered only after the longest tarpit delay.
async fn throttled(at: Place<'_>, user: &str, req: &LoginRequest<'_>) -> bool {
    let Some(left) = at.control.state.blocked(req.peer.ip(), user).await else {
        return false;
    };
    tracing::info!(%user, retry_in_s = left.as_secs(), "login refused: too many failures");
    let (name, protocol) = (at.listener.name.clone(), at.listener.protocol.as_str());
    metrics::counter!(m::REFUSED, "listener" => name, "protocol" => protocol, "reason" => "rate_limited").increment(1);
    metrics::counter!(m::LOGINS, "protocol" => protocol, "pool" => "throttled", "rule" => "none", "result" => "refused", "tls" => tls_label(req.client_tls)).increment(1);
    tokio::time::sleep(at.snap.config.throttle.max_delay).await;
    true
}

/// Step 4: the decision's pool, then its fallback when the route says so. Returns the
/// last result, the pool it came from, and the time spent at backends.
async fn try_pools<'d>(
    at: Place<'_>,
    decision: &'d Decision,
    req: &LoginRequest<'_>,
) -> (PoolResult, &'d str, Duration) {
    let cfg = &at.snap.config;
    let client = ClientInfo {
        ip: req.peer.ip(),
        port: req.peer.port(),
    };
    let helo = req.helo.unwrap_or(&cfg.hostname);
    let pools = [
        Some((decision.pool.as_str(), decision.servers.as_slice())),
        decision
            .fallback
            .as_ref()
            .map(|f| (f.pool.as_str(), f.servers.as_slice())),
    ];
    let mut result = PoolResult::Unavailable;
    let mut pool = decision.pool.as_str();
    let mut at_backend = Duration::ZERO;
    let mut token_refused = false;
    for (i, (pool_name, servers)) in pools.into_iter().flatten().enumerate() {
        if i > 0 {
            let reason = match &result {
                PoolResult::Rejected { .. } => "auth_failed",
                _ => "unavailable",
            };
            tracing::info!(from = %decision.pool, to = %pool_name, reason, "trying the fallback pool");
            metrics::counter!(m::FALLBACKS, "from" => decision.pool.clone(), "to" => pool_name.to_string(), "reason" => reason).increment(1);
        }
        pool = pool_name;
        let Some(target) = PoolLogin::new(
            &at.control.backends,
            at.snap,
            pool_name,
            at.listener.protocol,
            Some(client.clone()),
            helo,
        ) else {
            result = PoolResult::Unavailable;
            continue;
        };
        if req.credentials.token_payload().is_some() && target.checks_by_pop3() {
            // The legacy hosts know passwords only: a token cannot be checked there.
            tracing::info!(pool = %pool_name, "an OAuth login cannot be served by a pop-before-smtp pool");
            token_refused = true;
            result = PoolResult::Unavailable;
            continue;
        }
        // The backend gets the normalized name unless the pool asks for the original.
        let name = if target.pool.login_original_name {
            req.credentials.user.trim().to_string()
        } else {
            decision.user.clone()
        };
        let backend_started = Instant::now();
        result = target
            .login(servers, &req.credentials.with_user(name))
            .await;
        at_backend += backend_started.elapsed();
        let try_next = match &result {
            PoolResult::LoggedIn(_) => false,
            PoolResult::Rejected { .. } => decision
                .fallback
                .as_ref()
                .is_some_and(|f| f.on_auth_failure),
            PoolResult::Unavailable | PoolResult::TokenNotAccepted => true,
        };
        if !try_next {
            break;
        }
    }
    if token_refused && matches!(result, PoolResult::Unavailable) {
        return (PoolResult::TokenNotAccepted, pool, at_backend);
    }
    (result, pool, at_backend)
}

/// Step 5: what follows a backend's answer: history and a clean slate on success, the
/// tarpit on a rejection.
async fn after_backend(
    at: Place<'_>,
    req: &LoginRequest<'_>,
    user: String,
    pool: &str,
    result: PoolResult,
    snap: &Arc<Snapshot>,
) -> LoginDone {
    let span = tracing::Span::current();
    span.record("pool", pool);
    let state = &at.control.state;
    match result {
        PoolResult::LoggedIn(backend) => {
            span.record("backend", backend.server.as_str());
            tracing::debug!(server = %backend.server, tls = req.client_tls, "login ok");
            let login = Login {
                user: &user,
                pool,
                protocol: at.listener.protocol,
                listener: &at.listener.name,
                tls: req.client_tls,
                legacy: snap.config.pools.get(pool).is_none_or(|p| p.legacy),
                ip: req.peer.ip(),
                now_ms: rfc3339::now_ms(),
            };
            state.logged_in(login).await;
            state.succeeded(&user).await;
            LoginDone::Served(Served {
                snap: Arc::clone(snap),
                user,
                pool: pool.to_string(),
                backend,
            })
        }
        PoolResult::Rejected {
            response,
            server,
            challenge,
        } => {
            tracing::info!(%server, "login rejected by backend");
            // Tarpit: the answer to a failed login comes later and later.
            let throttle = &at.snap.config.throttle;
            let delay = state.failed(req.peer.ip(), &user, throttle).await;
            tokio::time::sleep(delay).await;
            LoginDone::AuthFailed {
                user,
                pool: pool.to_string(),
                server,
                response,
                challenge,
            }
        }
        PoolResult::Unavailable => {
            tracing::warn!("no server of the pool is available");
            LoginDone::Unavailable {
                user,
                pool: pool.to_string(),
            }
        }
        PoolResult::TokenNotAccepted => LoginDone::Refused {
            user,
            refusal: Refusal::TokenNotAccepted,
        },
    }
}

/// Step 6: the login metrics, once, from the typed result.
fn record(
    at: Place<'_>,
    done: &LoginDone,
    decision: &Decision,
    client_tls: bool,
    at_backend: Duration,
    at_proxy: Duration,
) {
    let protocol = at.listener.protocol;
    let (Some(label), Some(pool)) = (done.label(), done.pool()) else {
        return;
    };
    let handles = m::handles::pool(pool, protocol);
    handles
        .login_backend_seconds
        .record(at_backend.as_secs_f64());
    m::handles::login_proxy_seconds(protocol).record(at_proxy.as_secs_f64());
    handles
        .logins(&decision.rule_id, label, client_tls)
        .increment(1);
}

fn tls_label(tls: bool) -> &'static str {
    if tls {
        "true"
    } else {
        "false"
    }
}
