//! [`SharedState`] for a fleet of proxies, in Redis (or Valkey; one server or a Redis
//! Cluster). The second implementation of the interface: nothing above it changed.
//!
//! # What lives where
//! * **Holds**: a set of the held users; every proxy keeps a local
//!   mirror, updated by a message on the control channel (pub/sub) and re-read whole
//!   whenever the subscription (re)connects, so a login checks its hold without a round
//!   trip and a proxy that was cut off catches up.
//! * **Failed-login throttle**: fleet-wide counters (`INCR` with the window as TTL), so K
//!   failures spread over N proxies block at K. The block itself is mirrored like a hold:
//!   the proxy that counts the K-th failure publishes it (and records it in a hash for
//!   proxies that reconnect), so checking a login costs no round trip either. The K-th
//!   failure is answered after its tarpit delay, long after every proxy has the block.
//! * **The pop-before-smtp window**: a key per client address, written after each POP3 or
//!   IMAP login (without delaying it) and read by the bridge listener.
//! * **Stragglers**: a sorted set of (user, pool, protocol, listener, TLS, proxy) by last
//!   login, bounded.
//! * **Sessions**: each proxy's relayed sessions in a hash of its own, listed together
//!   with those of every proxy whose heartbeat is alive. A kick is a control message.
//!
//! Keys about one user (or client address) carry it as a hash tag (`cutover:{bob}:fails`,
//! `cutover:{ip:192.0.2.7}:bridge`), keys about the fleet share the tag `{fleet}`: a Redis
//! Cluster spreads users over its shards, and no command or pipeline spans two.
//!
//! # Failures
//! Every call has the configured deadline. A call that fails or is late is answered from
//! local state (the in-memory implementation underneath), so a slow or dead Redis never
//! refuses a login; `cutover_state_backend_up` says so, and the proxy reconnects and
//! resumes sharing by itself. Writes that need no answer (history, session listing,
//! clearing a user's failures) go through a bounded queue and are dropped, counted, when
//! it is full.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tokio::sync::mpsc;

use crate::config::{rfc3339, Protocol, RedisState as Settings, Throttle};
use crate::metrics as m;

use super::history::Straggler;
use super::holds::HoldOutcome;
use super::limits::tarpit;
use super::memory::{session_row, MemoryState};
use super::sessions::{KickReason, Sessions};
use super::state::{Login, Pending, SessionRow, SharedState};

/// Writes waiting to be sent; past this they are dropped (and counted).
const QUEUE: usize = 10_000;
/// How often a proxy says it is alive (and re-checks the store).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A proxy whose heartbeat is older than this is left out of listings.
const HEARTBEAT_TTL_MS: u64 = 10_000;
/// How long a pop-before-smtp window key lives (the listener's `window` is checked on read).
const BRIDGE_TTL_MS: u64 = 24 * 3600 * 1000;

/// A connection to the store: one server (reconnecting by itself) or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A write that needs no answer: one command, and the hash tag of its key (`None`: a
/// fleet key), so that a batch bound for a cluster is split by shard.
struct Write {
    tag: Option<String>,
    cmds: Vec<redis::Cmd>,
    merge: Merge,
}

/// How writes waiting in the same batch combine.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Merge {
    /// Sent as it is.
    No,
    /// Replaces an earlier write with the same name (the last value wins).
    Last(String),
    /// A session's entry in the listing; a session that starts and ends within one batch
    /// sends nothing.
    SessionStarted(u64),
    /// A session's removal from the listing.
    SessionEnded(u64),
    /// The whole listing rewritten: no session start or end in its batch is dropped.
    Snapshot,
}

/// Most writes taken into one batch.
const BATCH: usize = 2048;
/// How long a write waits for others to join its batch.
const BATCH_DELAY: Duration = Duration::from_millis(10);

/// Shared state in Redis, with this process's state underneath as mirror and fallback.
pub struct RedisState {
    local: MemoryState,
    instance: String,
    settings: Settings,
    conn: RwLock<Option<Conn>>,
    up: AtomicBool,
    queue: mpsc::Sender<Write>,
    /// Users with failed logins counted in the fleet lately: only their successes need
    /// to clear a counter in Redis.
    failing: Failing,
    /// Makes a user's cached lookup answers stale here (set by the proxy's control).
    forget_hook: std::sync::OnceLock<super::state::ForgetHook>,
}

/// Users with failures counted in the fleet, each forgotten after an hour (longer than
/// any sensible counting window: a stale entry only costs one needless `DEL`).
#[derive(Default)]
struct Failing {
    users: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

/// How long a user stays in [`Failing`].
const FAILING_FOR: Duration = Duration::from_secs(3600);

impl Failing {
    fn add(&self, user: &str) {
        if let Ok(mut m) = self.users.lock() {
            let now = Instant::now();
            if m.len() >= 100_000 {
                m.retain(|_, until| *until > now);
            }
            m.insert(user.to_string(), now + FAILING_FOR);
        }
    }

    /// Whether `user` had failures (and forgets them).
    fn remove(&self, user: &str) -> bool {
        let Ok(mut m) = self.users.lock() else {
            return true;
        };
        if m.is_empty() {
            return false;
        }
        m.remove(user).is_some_and(|until| until > Instant::now())
    }
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("instance", &self.instance)
            .field("settings", &self.settings)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisState {
    /// Starts sharing state through `settings` as the proxy named `instance`: connects in
    /// the background (the proxy serves meanwhile, on local state), subscribes to the
    /// control channel, and keeps its heartbeat. Needs a tokio runtime.
    pub fn start(settings: &Settings, instance: &str, max_users: usize) -> Arc<RedisState> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let me = Arc::new(RedisState {
            local: MemoryState::new(instance, max_users),
            instance: instance.to_string(),
            settings: settings.clone(),
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            queue,
            failing: Failing::default(),
            forget_hook: std::sync::OnceLock::new(),
        });
        let observer = Arc::downgrade(&me);
        me.local.sessions().observe(Box::new(move |id, entry| {
            if let Some(me) = observer.upgrade() {
                me.session_changed(id, entry);
            }
        }));
        tokio::spawn(connect(Arc::downgrade(&me)));
        tokio::spawn(write_queue(Arc::downgrade(&me), rx));
        tokio::spawn(subscribe(Arc::downgrade(&me)));
        tokio::spawn(heartbeat(Arc::downgrade(&me)));
        me
    }

    fn key(&self, tag: &str, what: &str) -> String {
        format!("{}{{{tag}}}:{what}", self.settings.key_prefix)
    }

    fn ip_tag(ip: IpAddr) -> String {
        format!("ip:{ip}")
    }

    /// A key about the whole fleet. They share one hash tag, so that a Redis Cluster
    /// keeps them on one shard and a pipeline over them never spans two.
    fn global(&self, what: &str) -> String {
        format!("{}{{fleet}}:{what}", self.settings.key_prefix)
    }

    /// The control channel (pub/sub messages reach every node of a cluster).
    fn channel(&self) -> String {
        format!("{}control", self.settings.key_prefix)
    }

    fn conn(&self) -> Option<Conn> {
        self.conn.read().ok().and_then(|c| c.clone())
    }

    /// Runs `f` on the store within the deadline; `None` (and the store marked down) on
    /// any error or delay.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn()?;
        match tokio::time::timeout(self.settings.timeout, f(conn)).await {
            Ok(Ok(v)) => {
                self.up.store(true, Ordering::Relaxed);
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed_call(op, &e.to_string());
                None
            }
            Err(_) => {
                self.failed_call(op, "timed out");
                None
            }
        }
    }

    fn failed_call(&self, op: &'static str, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                op,
                error = why,
                "shared state unreachable: going on with local state"
            );
        }
        metrics::counter!(m::STATE_ERRORS, "op" => op).increment(1);
    }

    /// Queues a write that needs no answer.
    fn send(&self, tag: Option<&str>, cmd: redis::Cmd) {
        self.send_merging(tag, cmd, Merge::No);
    }

    fn send_merging(&self, tag: Option<&str>, cmd: redis::Cmd, merge: Merge) {
        self.enqueue(Write {
            tag: tag.map(str::to_string),
            cmds: vec![cmd],
            merge,
        });
    }

    fn enqueue(&self, write: Write) {
        if self.queue.try_send(write).is_err() {
            metrics::counter!(m::STATE_ERRORS, "op" => "queue_full").increment(1);
        }
    }

    /// Publishes a control message to every proxy (this one skips its own).
    async fn publish(&self, op: &'static str, args: &[&str]) {
        let mut msg = vec![self.instance.as_str(), op];
        msg.extend_from_slice(args);
        let payload = msg.join("\t");
        let channel = self.channel();
        self.call(op, |mut c| async move {
            c.publish::<_, _, i64>(channel, payload).await
        })
        .await;
    }

    fn session_changed(&self, id: u64, entry: Option<&super::sessions::Entry>) {
        let key = self.global(&format!("sessions:{}", self.instance));
        let (cmd, merge) = match entry {
            Some(e) => {
                let row = session_row(&self.instance, id, e);
                let json = serde_json::to_string(&row).unwrap_or_default();
                (redis::Cmd::hset(&key, id, json), Merge::SessionStarted(id))
            }
            None => (redis::Cmd::hdel(&key, id), Merge::SessionEnded(id)),
        };
        self.send_merging(None, cmd, merge);
    }

    /// Applies a control message from another proxy to the local mirror.
    fn apply(&self, payload: &str) {
        let mut parts = payload.split('\t');
        let (Some(origin), Some(op)) = (parts.next(), parts.next()) else {
            return;
        };
        if origin == self.instance {
            return;
        }
        let arg = parts.next().unwrap_or_default();
        match op {
            "hold" => {
                self.local.holds_table().hold(arg);
            }
            "release" => {
                self.local.holds_table().release(arg);
            }
            "kick" => {
                let reason = match parts.next() {
                    Some("moved") => KickReason::Moved,
                    _ => KickReason::Admin,
                };
                let n = self.local.sessions().kick_user(arg, reason);
                tracing::info!(
                    user = arg,
                    sessions = n,
                    from = origin,
                    "kick from the fleet"
                );
            }
            "block" => self.apply_block(arg, parts.next()),
            "forget" => {
                if let Some(hook) = self.forget_hook.get() {
                    hook(arg);
                    tracing::info!(user = arg, from = origin, "forget from the fleet");
                }
            }
            "failed" => self.failing.add(arg),
            "cleared" => {
                self.failing.remove(arg);
            }
            _ => {}
        }
    }

    /// `block`: `ip:ADDR` or `user:NAME`, until a Unix time in milliseconds.
    fn apply_block(&self, what: &str, until_ms: Option<&str>) {
        let Some(until_ms) = until_ms.and_then(|u| u.parse::<i64>().ok()) else {
            return;
        };
        let left = until_ms - rfc3339::now_ms();
        if left <= 0 {
            return;
        }
        let until = Instant::now() + Duration::from_millis(left as u64);
        let throttle = self.local.throttle();
        if let Some(ip) = what.strip_prefix("ip:").and_then(|i| i.parse().ok()) {
            throttle.block(Some(ip), None, until);
        } else if let Some(user) = what.strip_prefix("user:") {
            throttle.block(None, Some(user), until);
        }
    }

    /// Rewrites this proxy's entries in the session listing from its registry: after the
    /// store was unreachable (or restarted empty) the listing is whole again. Taken and
    /// queued under the registry's lock, so that a session starting or ending meanwhile
    /// is written after it, in order.
    fn resync_sessions(&self) {
        let key = self.global(&format!("sessions:{}", self.instance));
        self.local.sessions().with_entries(|entries| {
            let mut cmds = vec![redis::Cmd::del(&key)];
            for (id, e) in entries {
                let row = session_row(&self.instance, *id, e);
                let json = serde_json::to_string(&row).unwrap_or_default();
                cmds.push(redis::Cmd::hset(&key, id, json));
            }
            self.enqueue(Write {
                tag: None,
                cmds,
                merge: Merge::Snapshot,
            });
        });
    }

    /// After a (re)connection: the holds and blocks in force fleet-wide.
    async fn resync(&self) -> bool {
        let holds_key = self.global("holds");
        let held: Option<Vec<String>> = self
            .call("resync", |mut c| async move { c.smembers(holds_key).await })
            .await;
        let synced = held.is_some();
        if let Some(held) = held {
            let table = self.local.holds_table();
            for user in table.list() {
                if !held.contains(&user) {
                    table.release(&user);
                }
            }
            for user in &held {
                table.hold(user);
            }
        }
        let blocks_key = self.global("blocks");
        let blocks: Option<Vec<(String, i64)>> = self
            .call("resync", |mut c| async move { c.hgetall(blocks_key).await })
            .await;
        for (what, until) in blocks.unwrap_or_default() {
            self.apply_block(&what, Some(&until.to_string()));
        }
        synced
    }

    /// Counts one failure under `key` (fleet-wide); its count, or `None` if the store
    /// could not be asked.
    async fn count_failure(&self, key: String, window: Duration) -> Option<u32> {
        let window_ms = window.as_millis().max(1) as u64;
        self.call("throttle", |mut c| async move {
            let (count,): (u32,) = redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(0)
                .arg("PX")
                .arg(window_ms)
                .arg("NX")
                .ignore()
                .incr(&key, 1)
                .query_async(&mut c)
                .await?;
            Ok(count)
        })
        .await
    }

    /// Blocks `what` (`ip:..` or `user:..`) fleet-wide for `block`.
    async fn block(&self, what: String, block: Duration) {
        let until_ms = rfc3339::now_ms() + block.as_millis() as i64;
        self.apply_block(&what, Some(&until_ms.to_string()));
        let blocks = self.global("blocks");
        let field = what.clone();
        self.call("throttle", |mut c| async move {
            c.hset::<_, _, _, i64>(blocks, field, until_ms).await
        })
        .await;
        self.publish("block", &[&what, &until_ms.to_string()]).await;
    }
}

impl SharedState for RedisState {
    fn hold<'a>(&'a self, user: &'a str) -> Pending<'a, bool> {
        Box::pin(async move {
            let fresh = self.local.holds_table().hold(user);
            let set = self.global("holds");
            let added: Option<i64> = self
                .call("hold", |mut c| async move { c.sadd(set, user).await })
                .await;
            if added.is_some() {
                self.publish("hold", &[user]).await;
            }
            fresh && added != Some(0)
        })
    }

    fn release<'a>(&'a self, user: &'a str) -> Pending<'a, bool> {
        Box::pin(async move {
            let was = self.local.holds_table().release(user);
            let set = self.global("holds");
            let removed: Option<i64> = self
                .call("release", |mut c| async move { c.srem(set, user).await })
                .await;
            self.publish("release", &[user]).await;
            was || removed.is_some_and(|n| n > 0)
        })
    }

    fn holds(&self) -> Pending<'_, Vec<String>> {
        Box::pin(async move {
            let set = self.global("holds");
            let fleet: Option<Vec<String>> = self
                .call("holds", |mut c| async move { c.smembers(set).await })
                .await;
            let mut list = fleet.unwrap_or_else(|| self.local.holds_table().list());
            list.sort();
            list
        })
    }

    fn holds_enforced(&self) -> Vec<String> {
        self.local.holds_table().list()
    }

    fn is_held<'a>(&'a self, user: &'a str) -> Pending<'a, bool> {
        self.local.is_held(user)
    }

    fn wait_release<'a>(&'a self, user: &'a str, max: Duration) -> Pending<'a, HoldOutcome> {
        self.local.wait_release(user, max)
    }

    fn blocked<'a>(&'a self, ip: IpAddr, user: &'a str) -> Pending<'a, Option<Duration>> {
        self.local.blocked(ip, user)
    }

    fn failed<'a>(&'a self, ip: IpAddr, user: &'a str, cfg: &'a Throttle) -> Pending<'a, Duration> {
        Box::pin(async move {
            let keys = [
                (Self::ip_tag(ip), format!("ip:{ip}"), cfg.ip_failures),
                (user.to_string(), format!("user:{user}"), cfg.user_failures),
            ];
            let mut worst = 0;
            for (tag, what, limit) in keys {
                if limit == 0 {
                    continue;
                }
                if let Some(user) = what.strip_prefix("user:") {
                    // Every proxy learns the user has a counter: a success anywhere clears it.
                    self.failing.add(user);
                    let payload = [self.instance.as_str(), "failed", user].join("\t");
                    self.send(None, redis::Cmd::publish(self.channel(), payload));
                }
                let Some(count) = self
                    .count_failure(self.key(&tag, "fails"), cfg.window)
                    .await
                else {
                    // The store is out of reach: count here, as a single proxy would.
                    return self.local.failed(ip, user, cfg).await;
                };
                if count == limit {
                    self.block(what, cfg.block).await;
                }
                worst = worst.max(count);
            }
            tarpit(cfg, worst)
        })
    }

    fn succeeded<'a>(&'a self, user: &'a str) -> Pending<'a, ()> {
        // Only a user with failures counted somewhere in the fleet has a counter to clear:
        // most logins send nothing.
        if self.failing.remove(user) {
            self.send(Some(user), redis::Cmd::del(self.key(user, "fails")));
            let payload = [self.instance.as_str(), "cleared", user].join("\t");
            self.send(None, redis::Cmd::publish(self.channel(), payload));
        }
        self.local.succeeded(user)
    }

    fn logged_in<'a>(&'a self, login: Login<'a>) -> Pending<'a, ()> {
        if login.protocol != Protocol::Smtp {
            let tag = Self::ip_tag(login.ip);
            let value = format!("{}\t{}", login.user, login.now_ms);
            let key = self.key(&tag, "bridge");
            let mut set = redis::cmd("SET");
            set.arg(&key).arg(value).arg("PX").arg(BRIDGE_TTL_MS);
            self.send_merging(Some(&tag), set, Merge::Last(key));
        }
        // Only what the stragglers report can list: a legacy pool, or no TLS.
        if login.legacy || !login.tls {
            let seen = [
                login.user,
                login.pool,
                login.protocol.as_str(),
                login.listener,
                if login.tls { "tls" } else { "plain" },
                &self.instance,
            ]
            .join("\t");
            let zadd = redis::Cmd::zadd(self.global("seen"), &seen, login.now_ms);
            self.send_merging(None, zadd, Merge::Last(seen));
        }
        self.local.logged_in(login)
    }

    fn bridge_user(&self, ip: IpAddr, window: Duration) -> Pending<'_, Option<String>> {
        Box::pin(async move {
            let key = self.key(&Self::ip_tag(ip), "bridge");
            let value: Option<Option<String>> = self
                .call("bridge", |mut c| async move { c.get(key).await })
                .await;
            let Some(value) = value else {
                return self.local.bridge_user(ip, window).await;
            };
            let (user, when) = value.as_deref()?.split_once('\t')?;
            let when: i64 = when.parse().ok()?;
            let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
            (rfc3339::now_ms() - when <= window_ms).then(|| user.to_string())
        })
    }

    fn stragglers<'a>(
        &'a self,
        since_ms: i64,
        is_legacy: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> Pending<'a, Vec<Straggler>> {
        Box::pin(async move {
            let key = self.global("seen");
            let rows: Option<Vec<(String, i64)>> = self
                .call("stragglers", |mut c| async move {
                    c.zrangebyscore_withscores(key, since_ms, "+inf").await
                })
                .await;
            let Some(rows) = rows else {
                return self.local.stragglers(since_ms, is_legacy).await;
            };
            let mut out: Vec<Straggler> = rows
                .iter()
                .filter_map(|(member, last)| straggler(member, *last, is_legacy))
                .collect();
            out.sort_by(|a, b| {
                (&a.user, a.protocol, &a.listener, &a.instance).cmp(&(
                    &b.user,
                    b.protocol,
                    &b.listener,
                    &b.instance,
                ))
            });
            out
        })
    }

    fn sessions(&self) -> &Sessions {
        self.local.sessions()
    }

    fn kick<'a>(&'a self, user: &'a str, reason: KickReason) -> Pending<'a, usize> {
        Box::pin(async move {
            let n = self.local.sessions().kick_user(user, reason);
            self.publish("kick", &[user, reason.as_str()]).await;
            n
        })
    }

    fn session_list(&self) -> Pending<'_, Vec<SessionRow>> {
        Box::pin(async move {
            match self.fleet_sessions().await {
                Some(rows) => rows,
                None => self.local.session_list().await,
            }
        })
    }

    fn forget<'a>(&'a self, user: &'a str) -> Pending<'a, ()> {
        Box::pin(async move {
            self.publish("forget", &[user]).await;
        })
    }

    fn on_forget(&self, hook: super::state::ForgetHook) {
        let _ = self.forget_hook.set(hook);
    }

    fn store_up(&self) -> Option<bool> {
        Some(self.up.load(Ordering::Relaxed))
    }

    fn is_shared(&self) -> bool {
        true
    }
}

impl RedisState {
    /// Every live proxy's sessions.
    async fn fleet_sessions(&self) -> Option<Vec<SessionRow>> {
        let instances_key = self.global("instances");
        let instances: Vec<String> = self
            .call("sessions", |mut c| async move {
                c.smembers(instances_key).await
            })
            .await?;
        let mut rows = Vec::new();
        for instance in instances {
            let alive = self.global(&format!("alive:{instance}"));
            let live: bool = self
                .call("sessions", |mut c| async move { c.exists(alive).await })
                .await?;
            if !live {
                continue;
            }
            let key = self.global(&format!("sessions:{instance}"));
            let entries: Vec<(u64, String)> = self
                .call("sessions", |mut c| async move { c.hgetall(key).await })
                .await?;
            rows.extend(
                entries
                    .iter()
                    .filter_map(|(_, json)| serde_json::from_str::<SessionRow>(json).ok()),
            );
        }
        rows.sort_by(|a, b| (&a.instance, a.id).cmp(&(&b.instance, b.id)));
        Some(rows)
    }
}

/// A stragglers row from its stored form, if it is one (legacy pool or no TLS).
fn straggler(member: &str, last_ms: i64, is_legacy: &dyn Fn(&str) -> bool) -> Option<Straggler> {
    let mut f = member.split('\t');
    let (user, pool, protocol, listener, tls, instance) = (
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
    );
    let tls = tls == "tls";
    let mut why = Vec::new();
    if is_legacy(pool) {
        why.push("legacy_pool");
    }
    if !tls {
        why.push("no_tls");
    }
    if why.is_empty() {
        return None;
    }
    let protocol = protocol.parse::<Protocol>().ok()?.as_str();
    Some(Straggler {
        instance: instance.to_string(),
        user: user.to_string(),
        pool: pool.to_string(),
        protocol,
        listener: listener.to_string(),
        tls,
        last_seen: rfc3339::format(last_ms / 1000),
        why,
    })
}

/// Opens the connection: a single server's manager at once (it connects and reconnects
/// by itself); a cluster's connection as soon as a node answers, retried until then.
async fn connect(me: std::sync::Weak<RedisState>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(state) = me.upgrade() else { return };
        let settings = &state.settings;
        let conn = if settings.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(settings.urls.clone())
                .connection_timeout(settings.timeout.max(Duration::from_millis(500)))
                .response_timeout(settings.timeout.max(Duration::from_millis(500)))
                .build();
            match client {
                Ok(c) => c.get_async_connection().await.map(Conn::Cluster),
                Err(e) => Err(e),
            }
        } else {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(settings.timeout.max(Duration::from_millis(500))))
                .set_number_of_retries(1);
            redis::Client::open(settings.urls[0].as_str()).and_then(|client| {
                ConnectionManager::new_lazy_with_config(client, config).map(Conn::Single)
            })
        };
        match conn {
            Ok(conn) => {
                if let Ok(mut c) = state.conn.write() {
                    *c = Some(conn);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared state: cannot connect yet");
                drop(state);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Sends the writes that need no answer, in order, each within the deadline.
async fn write_queue(me: std::sync::Weak<RedisState>, mut rx: mpsc::Receiver<Write>) {
    while let Some(first) = rx.recv().await {
        // A moment for more to come: they go in the same round trip, and a session that
        // ends meanwhile, or a value written again, costs Redis nothing.
        tokio::time::sleep(BATCH_DELAY).await;
        let Some(state) = me.upgrade() else { return };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // One pipeline per shard for a cluster (its pipelines may not span two).
        let mut pipes: std::collections::BTreeMap<Option<String>, redis::Pipeline> =
            std::collections::BTreeMap::new();
        for w in merged(batch) {
            let tag = if state.settings.cluster { w.tag } else { None };
            let pipe = pipes.entry(tag).or_default();
            for cmd in w.cmds {
                pipe.add_command(cmd).ignore();
            }
        }
        for pipe in pipes.into_values() {
            state
                .call("write", |mut c| async move {
                    pipe.query_async::<()>(&mut c).await
                })
                .await;
        }
    }
}

/// The writes of a batch that still matter, in order: a value overwritten later in the
/// batch is not sent, nor a session that started and ended within it.
fn merged(batch: Vec<Write>) -> Vec<Write> {
    use std::collections::{HashMap, HashSet};
    let ended: HashSet<u64> = batch
        .iter()
        .filter_map(|w| match w.merge {
            Merge::SessionEnded(id) => Some(id),
            _ => None,
        })
        .collect();
    // A snapshot in the batch lists what was alive when it was taken: keep every start
    // and end around it.
    let snapshot = batch.iter().any(|w| w.merge == Merge::Snapshot);
    let started: HashSet<u64> = batch
        .iter()
        .filter_map(|w| match w.merge {
            Merge::SessionStarted(id) if ended.contains(&id) && !snapshot => Some(id),
            _ => None,
        })
        .collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, w) in batch.iter().enumerate() {
        if let Merge::Last(name) = &w.merge {
            last.insert(name, i);
        }
    }
    let keep: Vec<bool> = batch
        .iter()
        .enumerate()
        .map(|(i, w)| match &w.merge {
            Merge::No | Merge::Snapshot => true,
            Merge::Last(name) => last.get(name.as_str()) == Some(&i),
            Merge::SessionStarted(id) | Merge::SessionEnded(id) => !started.contains(id),
        })
        .collect();
    batch
        .into_iter()
        .zip(keep)
        .filter_map(|(w, k)| k.then_some(w))
        .collect()
}

/// Listens to the control channel, on one server (cluster: on any node, since a
/// cluster's messages reach every node), reconnecting when it drops; after every
/// (re)subscription the holds and blocks in force are read again.
async fn subscribe(me: std::sync::Weak<RedisState>) {
    let mut attempt = 0usize;
    loop {
        let Some(state) = me.upgrade() else { return };
        let url = state.settings.urls[attempt % state.settings.urls.len()].clone();
        let channel = state.channel();
        drop(state);
        attempt += 1;
        let pubsub = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let Ok(Ok(pubsub)) = tokio::time::timeout(Duration::from_secs(2), pubsub).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let Some(state) = me.upgrade() else { return };
        tracing::info!(server = %crate::config::redact_url(&url), "shared state: subscribed to the control channel");
        state.resync().await;
        drop(state);
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Some(state) = me.upgrade() else { return };
            if let Ok(payload) = msg.get_payload::<String>() {
                state.apply(&payload);
            }
        }
        if let Some(state) = me.upgrade() {
            state.failed_call("subscribe", "the control channel dropped");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Says this proxy is alive (its sessions are listed), and checks the store. Whenever the
/// store answers again after it did not (or for the first time), this proxy's view and
/// the store's are made whole: the holds and blocks are read again, and its session
/// listing is rewritten (a Redis that restarted empty has none).
async fn heartbeat(me: std::sync::Weak<RedisState>) {
    let mut synced = false;
    loop {
        let Some(state) = me.upgrade() else { return };
        let (instances, alive) = (
            state.global("instances"),
            state.global(&format!("alive:{}", state.instance)),
        );
        let instance = state.instance.clone();
        let (seen, keep) = (state.global("seen"), state.local.max_users() as isize);
        let ok = state
            .call("heartbeat", |mut c| async move {
                redis::pipe()
                    .sadd(instances, &instance)
                    .ignore()
                    .cmd("SET")
                    .arg(alive)
                    .arg(1)
                    .arg("PX")
                    .arg(HEARTBEAT_TTL_MS)
                    .ignore()
                    // The stragglers set stays bounded: the oldest beyond the limit go.
                    .zremrangebyrank(seen, 0, -keep - 1)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .is_some();
        if !ok {
            synced = false;
        } else if !synced {
            state.resync_sessions();
            synced = state.resync().await;
        }
        drop(state);
        tokio::time::sleep(if ok && synced {
            HEARTBEAT
        } else {
            HEARTBEAT / 4
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(merge: Merge, n: i64) -> Write {
        Write {
            tag: None,
            cmds: vec![redis::Cmd::set("k", n)],
            merge,
        }
    }

    fn values(batch: Vec<Write>) -> Vec<String> {
        merged(batch)
            .into_iter()
            .map(|w| String::from_utf8_lossy(&w.cmds[0].get_packed_command()).into_owned())
            .map(|c| c.rsplit("\r\n").nth(1).unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn a_batch_sends_what_still_matters() {
        let batch = vec![
            w(Merge::SessionStarted(1), 1),
            w(Merge::Last("bridge:a".into()), 2),
            w(Merge::SessionStarted(2), 3),
            w(Merge::No, 4),
            w(Merge::Last("bridge:a".into()), 5),
            w(Merge::SessionEnded(1), 6),
            w(Merge::SessionEnded(3), 7),
        ];
        // Session 1 came and went: nothing; bridge:a: its last value; session 2 starts,
        // session 3 (started in an earlier batch) ends.
        assert_eq!(values(batch), ["3", "4", "5", "7"]);
    }
}
