//! The proxy's live state, shared by every session: the configuration snapshot in force,
//! backend health, connection admission, and the [`SharedState`] (holds, the failed-login
//! throttle, the login history, the sessions being relayed) that a fleet of proxies
//! shares.

pub mod history;
pub mod holds;
pub mod limits;
pub mod memory;
pub mod redis;
pub mod sessions;
pub mod state;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::Backends;
use crate::config::{rfc3339, Config, Protocol};
use crate::lookup::Lookups;
use crate::metrics as m;
use crate::route::{route_with, Answers, RouteError};
use crate::snapshot::Snapshot;
use sessions::KickReason;
use state::SharedState;

/// Whether `cfg` at `now` sends `user` somewhere else than `pool`, with the lookup
/// answers cached (none is asked). A user whose route needs an answer that is not cached,
/// or whose lookup cannot answer, stays where they are: only a known answer moves anyone.
fn routed_elsewhere(
    cfg: &Config,
    lookups: &Lookups,
    user: &str,
    protocol: Protocol,
    pool: &str,
    now: i64,
) -> bool {
    let mut answers = Answers::default();
    for _ in 0..=cfg.lookups.len() {
        match route_with(cfg, user, protocol, now, &answers) {
            Ok(d) => return d.pool != pool,
            Err(RouteError::NeedsLookup(name)) => {
                let cached = lookups.get(&name).and_then(|l| l.peek(user, protocol));
                match cached {
                    Some(looked) => answers.insert(looked),
                    None => return false,
                }
            }
            Err(e) => return !e.is_temporary(),
        }
    }
    false
}

/// Everything a session may need beyond its own connection.
#[derive(Debug)]
pub struct Control {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Backend health and DNS.
    pub backends: Backends,
    /// Holds, throttle, history and relayed sessions.
    pub state: Arc<dyn SharedState>,
    /// Route lookups in the provider's databases, with their caches.
    pub lookups: Lookups,
    /// OAuth token verification with its key set (None: tokens are not verified here).
    oauth: RwLock<Option<crate::oauth::Verifier>>,
    /// Open connections.
    pub admission: Arc<limits::Admission>,
    /// Backend death detector.
    pub disconnects: limits::Disconnects,
    /// Cancelled when the proxy starts draining.
    pub drain: CancellationToken,
    /// Cancelled when the listeners stop accepting: at a drain, or when another process
    /// took the listening sockets over (then sessions that have not logged in yet may
    /// still do so).
    pub accepting: CancellationToken,
    /// Cancelled when the drain grace period is over.
    pub hard_stop: CancellationToken,
    /// Wakes the stage clock when a new snapshot is installed (it may add stages).
    installed: tokio::sync::Notify,
    /// Whether the last reload succeeded.
    last_reload_ok: std::sync::atomic::AtomicBool,
    /// Listeners bound and the first health round done.
    started: std::sync::atomic::AtomicBool,
    /// Keys changed in the file that take effect only at the next start.
    restart_required: std::sync::Mutex<Vec<&'static str>>,
    /// The snapshot the process started with: what is in force for the settings a
    /// reload cannot change.
    started_with: Arc<Snapshot>,
}

impl Control {
    /// State for a first snapshot: shared state in Redis with `state.redis` (connected in
    /// the background; a runtime is needed), else in this process.
    pub fn new(snap: Arc<Snapshot>, backends: Backends) -> Arc<Control> {
        let cfg = &snap.config;
        let (name, max_users) = (cfg.instance_name.as_str(), cfg.stragglers_max_users);
        let state: Arc<dyn SharedState> = match &cfg.redis {
            Some(settings) => redis::RedisState::start(settings, name, max_users),
            None => Arc::new(memory::MemoryState::new(name, max_users)),
        };
        Control::with_state(snap, backends, state)
    }

    /// State for a first snapshot, with the given shared state.
    pub fn with_state(
        snap: Arc<Snapshot>,
        backends: Backends,
        state: Arc<dyn SharedState>,
    ) -> Arc<Control> {
        let lookups = Lookups::new(&snap.config);
        let drain = CancellationToken::new();
        let oauth = snap.config.oauth.clone().map(crate::oauth::Verifier::new);
        let control = Arc::new(Control {
            started_with: snap.clone(),
            oauth: RwLock::new(oauth),
            snapshot: RwLock::new(snap),
            backends,
            state,
            lookups,
            admission: Arc::new(limits::Admission::default()),
            disconnects: limits::Disconnects::default(),
            drain: drain.clone(),
            accepting: drain.child_token(),
            hard_stop: CancellationToken::new(),
            installed: tokio::sync::Notify::new(),
            last_reload_ok: std::sync::atomic::AtomicBool::new(true),
            started: std::sync::atomic::AtomicBool::new(false),
            restart_required: std::sync::Mutex::new(Vec::new()),
        });
        // `forget` from another proxy of the fleet.
        let me = Arc::downgrade(&control);
        control.state.on_forget(Box::new(move |user| {
            if let Some(me) = me.upgrade() {
                me.lookups.forget(user);
            }
        }));
        control
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts a new snapshot in force (sessions already running keep theirs) and schedules
    /// the move of users whose pool changed. Returns how many sessions will be moved.
    pub fn install(self: &Arc<Self>, snap: Arc<Snapshot>) -> usize {
        self.lookups.sync(&snap.config);
        self.sync_oauth(&snap.config);
        match self.snapshot.write() {
            Ok(mut s) => *s = snap,
            Err(poisoned) => *poisoned.into_inner() = snap,
        }
        self.installed.notify_one();
        self.move_users()
    }

    /// The token verifier in force (a clone shares its key set).
    pub fn oauth(&self) -> Option<crate::oauth::Verifier> {
        match self.oauth.read() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Follows a new configuration: the verifier (and its cached keys) stays while its
    /// settings do.
    fn sync_oauth(&self, cfg: &Config) {
        let mut v = match self.oauth.write() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        let same = match (&*v, &cfg.oauth) {
            (Some(old), Some(new)) => old.settings() == new,
            (None, None) => true,
            _ => false,
        };
        if !same {
            *v = cfg.oauth.clone().map(crate::oauth::Verifier::new);
        }
    }

    /// The configuration in force, as `cutover config dump` shows it: the settings a
    /// reload cannot change as the process started with them.
    pub fn effective_config(&self) -> serde_json::Value {
        let snap = self.snapshot();
        let mut v = crate::config::dump::to_value(&snap.config);
        let started = crate::config::dump::to_value(&self.started_with.config);
        if let Some(obj) = v.as_object_mut() {
            for key in crate::config::dump::RESTART_KEYS {
                match started.get(key) {
                    Some(x) => obj.insert(key.to_string(), x.clone()),
                    None => obj.remove(*key),
                };
            }
        }
        v
    }

    /// The keys of the last reload that wait for the next start.
    pub fn set_restart_required(&self, keys: &[&'static str]) {
        if let Ok(mut k) = self.restart_required.lock() {
            *k = keys.to_vec();
        }
    }

    /// Keys changed in the file that take effect only at the next start (or upgrade).
    pub fn restart_required(&self) -> Vec<&'static str> {
        self.restart_required
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    /// Every listener is bound and the first health round is done.
    pub fn set_started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Ready for clients: started and not draining (`GET /ready`, `cutover healthcheck`).
    pub fn is_ready(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire) && !self.accepting.is_cancelled()
    }

    /// Records how the last reload went (`cutover_config_last_reload_successful`).
    pub fn reload_result(&self, ok: bool) {
        self.last_reload_ok
            .store(ok, std::sync::atomic::Ordering::Release);
    }

    /// Writes the scrape-time metrics: backend health and routing state of the
    /// configuration in force, certificates, and the process.
    pub fn collect(&self, out: &mut String) {
        let mut t = m::Text(out);
        let snap = self.snapshot();
        let cfg = &snap.config;
        t.family(m::BACKEND_UP);
        for (name, pool) in &cfg.pools {
            for (proto, pp) in &pool.protocols {
                for s in &pp.servers {
                    let server = s.to_string();
                    let up = self.backends.registry.get(name, *proto, &server).is_up();
                    t.sample(
                        m::BACKEND_UP,
                        &[
                            ("pool", name),
                            ("protocol", proto.as_str()),
                            ("server", &server),
                        ],
                        f64::from(u8::from(up)),
                    );
                }
            }
        }
        let (active, _) = cfg.routes_at(rfc3339::now());
        t.family(m::STAGE_ACTIVE);
        let stages = cfg
            .stages
            .iter()
            .map(|s| s.name.as_str())
            .chain(["(initial)"]);
        for name in stages {
            let on = active.unwrap_or("(initial)") == name;
            t.sample(m::STAGE_ACTIVE, &[("stage", name)], f64::from(u8::from(on)));
        }
        t.family(m::POOL_INFO);
        for (name, pool) in &cfg.pools {
            t.sample(
                m::POOL_INFO,
                &[
                    ("pool", name),
                    ("legacy", if pool.legacy { "true" } else { "false" }),
                ],
                1.0,
            );
        }
        if !snap.cert_not_after.is_empty() {
            t.family(m::CERT_NOT_AFTER);
            for (name, not_after) in &snap.cert_not_after {
                t.sample(
                    m::CERT_NOT_AFTER,
                    &[("certificate", name)],
                    *not_after as f64,
                );
            }
        }
        if let Some(up) = self.state.store_up() {
            t.family(m::STATE_UP);
            let labels = [("instance_name", cfg.instance_name.as_str())];
            t.sample(m::STATE_UP, &labels, f64::from(u8::from(up)));
        }
        self.lookups.collect(&mut t);
        t.family(m::RESTART_REQUIRED);
        let pending = self.restart_required();
        for key in crate::config::dump::RESTART_KEYS {
            let v = f64::from(u8::from(pending.contains(key)));
            t.sample(m::RESTART_REQUIRED, &[("key", key)], v);
        }
        t.family(m::RELOAD_SUCCESS);
        let ok = self
            .last_reload_ok
            .load(std::sync::atomic::Ordering::Acquire);
        t.sample(m::RELOAD_SUCCESS, &[], f64::from(u8::from(ok)));
        m::collect_process(&mut t);
    }

    /// Finds relayed sessions whose user the current routes send to another pool and, with
    /// `on_move: kick`, ends them after the grace period. Returns how many.
    pub fn move_users(self: &Arc<Self>) -> usize {
        let snap = self.snapshot();
        let cfg = &snap.config;
        if !cfg.on_move.kick {
            return 0;
        }
        let now = rfc3339::now();
        let moved: Vec<u64> = self
            .state
            .sessions()
            .snapshot()
            .into_iter()
            .filter(|(_, e)| {
                routed_elsewhere(cfg, &self.lookups, &e.user, e.protocol, &e.pool, now)
            })
            .map(|(id, _)| id)
            .collect();
        if moved.is_empty() {
            return 0;
        }
        let n = moved.len();
        tracing::info!(
            sessions = n,
            grace_ms = cfg.on_move.grace.as_millis() as u64,
            "users moved to another pool; ending their sessions"
        );
        self.kick_later(moved, cfg.on_move.grace);
        n
    }

    /// A session that just logged in, routed with the configuration `used`, and
    /// registered itself: if the configuration in force now is another one, or another
    /// stage has started, and it routes the user to another pool, the session is moved
    /// like every session of a moved user (`on_move`). A reload or a stage that lands
    /// between a login's routing and its registration thus never leaves it on the old
    /// pool.
    pub fn settle(
        self: &Arc<Self>,
        id: u64,
        user: &str,
        protocol: Protocol,
        pool: &str,
        used: &Arc<Snapshot>,
    ) {
        let now_snap = self.snapshot();
        let cfg = &now_snap.config;
        let now = rfc3339::now();
        let unchanged =
            Arc::ptr_eq(&now_snap, used) && cfg.routes_at(now).0 == used.config.routes_at(now).0;
        if unchanged
            || !cfg.on_move.kick
            || !routed_elsewhere(cfg, &self.lookups, user, protocol, pool, now)
        {
            return;
        }
        tracing::info!(%user, "the configuration changed during the login; moving the session");
        self.kick_later(vec![id], cfg.on_move.grace);
    }

    /// A lookup answered something new for `user`: their relayed sessions that the
    /// answer sends elsewhere are moved (`on_move`). Returns how many.
    pub fn lookup_changed(&self, user: &str) -> usize {
        let snap = self.snapshot();
        let cfg = &snap.config;
        if !cfg.on_move.kick {
            return 0;
        }
        let now = rfc3339::now();
        let moved: Vec<u64> = (self.state.sessions().snapshot().into_iter())
            .filter(|(_, e)| e.user == user)
            .filter(|(_, e)| routed_elsewhere(cfg, &self.lookups, user, e.protocol, &e.pool, now))
            .map(|(id, _)| id)
            .collect();
        if moved.is_empty() {
            return 0;
        }
        tracing::info!(%user, sessions = moved.len(), "the lookup moved the user to another pool; ending their sessions");
        let n = moved.len();
        self.kick_later(moved, cfg.on_move.grace);
        n
    }

    /// Makes `user`'s cached lookup answers stale here and, with shared state, on every
    /// proxy of the fleet. Returns how many of this proxy's lookups had an answer.
    pub async fn forget(&self, user: &str) -> usize {
        let n = self.lookups.forget(user);
        self.state.forget(user).await;
        n
    }

    fn kick_later(&self, ids: Vec<u64>, grace: Duration) {
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            state.sessions().kick_ids(&ids, KickReason::Moved);
        });
    }

    /// Runs the stage clock until drain: at each stage start, moves users whose pool
    /// changed. Re-reads the snapshot after every wake-up, so reloads are honoured.
    pub async fn run_stage_clock(self: Arc<Self>) {
        loop {
            let snap = self.snapshot();
            let now = rfc3339::now();
            // Wake at the next stage start, or at least every minute (a reload may have
            // added stages).
            let wait = match snap.config.next_stage_after(now) {
                Some(stage) => Duration::from_secs((stage.from - now).clamp(0, 60) as u64),
                None => Duration::from_secs(60),
            };
            let before = snap.config.routes_at(now).0.map(str::to_string);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.installed.notified() => continue, // recompute with the new stages
                _ = self.drain.cancelled() => return,
            }
            // Sleep granularity: make sure the boundary has passed.
            let snap = self.snapshot();
            let now = rfc3339::now();
            let after = snap.config.routes_at(now).0.map(str::to_string);
            if before != after {
                tracing::info!(
                    stage = after.as_deref().unwrap_or("(initial)"),
                    "stage starts"
                );
                self.move_users();
            }
        }
    }
}
