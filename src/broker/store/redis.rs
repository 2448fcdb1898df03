//! The store on Redis (redis-rs): one server, the master Redis Sentinel names, or a Redis Cluster
//! (`servers.rs`); one pub/sub connection per subscription; and four Lua scripts that make
//! taking (or taking over) a lease, renewing it, releasing it and the fenced write atomic on the
//! server.
//!
//! Must never: wait on Redis without a bound (every command is cut off after
//! [`COMMAND_TIMEOUT`]), put a token or password into an error or a log line, or block start
//! while Redis is down (the connection is made on first use and remade by itself).

mod servers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{Client, RedisError, Script, Value};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::super::repeats::Repeats;
use super::StoreMetrics;
use super::{
    events_channel, lease_key, open_record, parse_event, record_key, seal_record, Lease,
    LeaseHolder, Record, StoreError, StoreEvent, StoredTokens, TokenStore, WriteOutcome,
};
use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::seal::SealKeys;

/// Every command, including the wait for a (re)connection, ends within this.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);
/// With Sentinel, how long a write waits for a replica to have it (`WAIT 1`).
const REPLICA_WAIT: Duration = Duration::from_millis(250);
/// One TCP (and TLS) connection attempt ends within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pub/sub reconnect backoff.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);
/// The subscription pings this often, so that a silent (black-holed) Redis is noticed.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(3);
/// Events waiting for the broker; a full queue holds the subscription back (Redis buffers).
const EVENT_QUEUE: usize = 256;

/// Takes a lease. KEYS[1] lease; ARGV[1] owner, ARGV[2] ms, ARGV[3] the holder the caller has
/// seen hold it past twice the lease ('' for none). Free: taken. Held without a TTL, with a TTL
/// no replica gives (over twice the lease), or still by that holder: abandoned, taken over.
/// Returns {1, ''} taken, {2, holder} taken over (no or overlong TTL), {3, holder} taken over
/// (held too long), {0, holder} busy.
const TAKE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, ''}
end
local holder = redis.pcall('GET', KEYS[1])
if type(holder) ~= 'string' then
  holder = ''
end
local ttl = redis.call('PTTL', KEYS[1])
local abandoned = 0
if ttl == -1 or ttl > 2 * tonumber(ARGV[2]) then
  abandoned = 2
elseif ARGV[3] ~= '' and holder == ARGV[3] then
  abandoned = 3
end
if abandoned > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return {abandoned, holder}";

/// Renews a lease only if this owner still holds it. KEYS[1] lease; ARGV[1] owner, ARGV[2] ms.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Deletes a lease only if this owner still holds it. KEYS[1] lease; ARGV[1] owner.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// The fenced write. KEYS[1] record, KEYS[2] lease; ARGV[1] owner, ARGV[2] expected generation
/// (0: absent), ARGV[3] sealed payload (sealed for expected + 1), ARGV[4] channel, ARGV[5] caller.
/// Returns {0, 0} lease lost, {1, current} stale, {2, new} written (and published).
const WRITE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return {0, 0}
end
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then
  return redis.error_reply('TBFOREIGN the record key holds a ' .. kind)
end
local current = 0
local raw = redis.call('HGET', KEYS[1], 'generation')
if raw then
  current = tonumber(raw)
  if not current or current < 1 or current % 1 ~= 0 then
    return redis.error_reply('TBFOREIGN the record generation is not a positive integer')
  end
end
if current ~= tonumber(ARGV[2]) then
  return {1, current}
end
local new = current + 1
redis.call('HSET', KEYS[1], 'generation', new, 'sealed', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. '\n' .. new)
return {2, new}";

/// The shared store on Redis. Cheap to clone; the subscription ends when the last clone is
/// dropped or [`RedisStore::shutdown`] is called.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    servers: Arc<servers::Servers>,
    prefix: String,
    /// The first seals; every one opens.
    seal_keys: SealKeys,
    /// The lease owner value: `<replica>/<random>`, unique to this store.
    owner: String,
    replica: String,
    lease_ttl: Duration,
    metrics: Arc<StoreMetrics>,
    shutdown: watch::Sender<bool>,
    take: Script,
    renew: Script,
    release: Script,
    write: Script,
}

impl Inner {
    /// A caller's record key; in a cluster the caller's name is its hash tag, so that the
    /// record and the lease (which the fenced write reads together) live in one slot.
    fn record_key(&self, caller: &str) -> String {
        match self.servers.hash_tagged() {
            true => record_key(&self.prefix, &format!("{{{caller}}}")),
            false => record_key(&self.prefix, caller),
        }
    }

    /// A caller's lease key, tagged like [`Inner::record_key`].
    fn lease_key(&self, caller: &str) -> String {
        match self.servers.hash_tagged() {
            true => lease_key(&self.prefix, &format!("{{{caller}}}")),
            false => lease_key(&self.prefix, caller),
        }
    }
}

impl RedisStore {
    /// Sets up the store without waiting for Redis: a Redis that is down at start is connected
    /// to on first use. Fails only on settings that can never work (a bad URL or CA file).
    /// Needs a Tokio runtime.
    pub fn connect(config: &RedisConfig, metrics: Arc<Metrics>) -> Result<RedisStore, StoreError> {
        let servers = Arc::new(servers::Servers::connect(config)?);
        let metrics = metrics.set::<StoreMetrics>();
        metrics.seed();
        let replica = replica_id();
        let owner = format!("{replica}/{:032x}", rand::random::<u128>());
        let (shutdown, _) = watch::channel(false);
        Ok(RedisStore {
            inner: Arc::new(Inner {
                servers,
                prefix: config.key_prefix.clone(),
                seal_keys: config.seal_keys.clone(),
                owner,
                replica,
                lease_ttl: config.lease,
                metrics,
                shutdown,
                take: Script::new(TAKE),
                renew: Script::new(RENEW),
                release: Script::new(RELEASE),
                write: Script::new(WRITE),
            }),
        })
    }

    /// This replica's readable id, `<hostname>-<pid>`.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    fn decode(
        &self,
        caller: &str,
        key: &str,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Option<Record>, StoreError> {
        if fields.is_empty() {
            return Ok(None);
        }
        let foreign = |what: &str| StoreError::Foreign {
            key: key.to_string(),
            what: what.to_string(),
        };
        let mut generation = None;
        let mut sealed = None;
        for (field, value) in fields {
            match &field[..] {
                b"generation" => generation = Some(value),
                b"sealed" => sealed = Some(value),
                _ => return Err(foreign("it has fields other than generation and sealed")),
            }
        }
        let generation = generation
            .and_then(|g| std::str::from_utf8(&g).ok()?.parse::<u64>().ok())
            .filter(|g| *g >= 1)
            .ok_or_else(|| foreign("its generation is not a positive integer"))?;
        let sealed = sealed.ok_or_else(|| foreign("it has no sealed payload"))?;
        let tokens = open_record(
            &self.inner.seal_keys,
            &self.inner.prefix,
            caller,
            generation,
            &sealed,
        )?;
        let sealed_with = crate::seal::key_id_of(&sealed)
            .unwrap_or_default()
            .to_string();
        let first = self.seal_key_id();
        if sealed_with != first {
            tracing::info!(
                key,
                generation,
                sealed_with,
                seal_key = first,
                "record sealed with an older seal key; its next write seals it with the first"
            );
        }
        Ok(Some(Record {
            generation,
            tokens,
            sealed_with,
        }))
    }

    /// Extends a lease by its ttl if this store still holds it; `false`: it was lost.
    pub async fn renew(&self, lease: &Lease) -> Result<bool, StoreError> {
        let sent = Instant::now();
        let mut invocation = self.inner.renew.key(&lease.key);
        invocation
            .arg(&lease.owner)
            .arg(lease.ttl.as_millis().max(1) as u64);
        let held = self
            .timed("renew", || async {
                let mut conn = self.inner.servers.conn().await?;
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await?
            == 1;
        self.inner
            .metrics
            .record("renew", if held { "ok" } else { "lost" });
        if held {
            lease.extend(sent);
        }
        Ok(held)
    }

    /// Who holds a caller's lease, if anyone.
    pub async fn lease_holder(&self, caller: &str) -> Result<Option<LeaseHolder>, StoreError> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.inner.lease_key(caller));
        let owner = self.command::<Option<String>>("lease_holder", &cmd).await?;
        self.inner.metrics.record("lease_holder", "ok");
        Ok(owner.map(|owner| LeaseHolder {
            this_replica: owner == self.inner.owner,
            replica: owner
                .rsplit_once('/')
                .map_or(owner.as_str(), |(replica, _)| replica)
                .to_string(),
        }))
    }

    /// With Sentinel: waits (at most [`REPLICA_WAIT`]) until a replica has the write, so that a
    /// failover right after it does not take the new tokens away while the old API token is
    /// already dead. Best effort: a write no replica acknowledged is warned about, not undone.
    async fn await_replica(&self, caller: &str) {
        let mut cmd = ::redis::cmd("WAIT");
        cmd.arg(1).arg(REPLICA_WAIT.as_millis() as u64);
        let acknowledged = async {
            let mut conn = self.inner.servers.conn().await?;
            cmd.query_async::<i64>(&mut conn).await
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, acknowledged).await {
            Ok(Ok(n)) if n >= 1 => {}
            Ok(Ok(_)) => tracing::warn!(
                caller,
                "no replica acknowledged the record within {REPLICA_WAIT:?}: a failover now \
                 would lose this write"
            ),
            Ok(Err(e)) => tracing::debug!(caller, error = %describe(&e), "WAIT failed"),
            Err(_) => tracing::debug!(caller, "WAIT timed out"),
        }
    }

    /// Runs one plain command with the bound, records failures, maps errors.
    async fn command<T: ::redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &::redis::Cmd,
    ) -> Result<T, StoreError> {
        self.timed(op, || async {
            let mut conn = self.inner.servers.conn().await?;
            cmd.query_async::<T>(&mut conn).await
        })
        .await
    }

    /// Bounds a command; failures are counted here, successes by the caller (which knows the
    /// outcome), and `store_up` follows whether Redis answered. A command that failed at once
    /// on a dropped connection (Redis restarted; the manager reconnects) is sent once more
    /// within the same bound: every command here is safe to repeat (the fenced write refuses a
    /// second application as stale).
    async fn timed<T, F, Fut>(&self, op: &'static str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let servers = &self.inner.servers;
        let twice = async {
            match attempt().await {
                Err(e) if servers.failed(&e) => {
                    let second = attempt().await;
                    if let Err(e) = &second {
                        servers.failed(e);
                    }
                    second
                }
                other => other,
            }
        };
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, twice).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(map_error(&e)),
            Err(_) => Err(StoreError::Timeout(COMMAND_TIMEOUT)),
        };
        match &result {
            Ok(_) => {
                self.inner.metrics.set_up(true);
            }
            Err(e) => {
                if e.is_unavailable() || matches!(e, StoreError::Auth(_)) {
                    self.inner.metrics.set_up(false);
                } else {
                    // Redis answered (with an error): it is up.
                    self.inner.metrics.set_up(true);
                }
                if !matches!(e, StoreError::Redis(m) if m.contains("TBFOREIGN")) {
                    self.inner.metrics.record(op, e.outcome());
                }
                tracing::debug!(op, error = %e, "store command failed");
            }
        }
        result
    }
}

#[async_trait::async_trait]
impl TokenStore for RedisStore {
    /// The configured lease lifetime (`[store] lease`).
    fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl
    }

    /// The id of the seal key this store seals with (the first of `seal_keys`).
    fn seal_key_id(&self) -> &str {
        self.inner.seal_keys.first().id()
    }

    /// Reads a caller's record: `None` if there is none, else its generation, tokens and the key
    /// it was sealed with.
    async fn read(&self, caller: &str) -> Result<Option<Record>, StoreError> {
        let key = self.inner.record_key(caller);
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(&key);
        // Field names as bytes: a conversion error would quote the reply, whatever it holds.
        let fields = match self.command::<Vec<(Vec<u8>, Vec<u8>)>>("read", &cmd).await {
            Ok(fields) => fields,
            Err(StoreError::Foreign { what, .. }) => return Err(StoreError::Foreign { key, what }),
            Err(e) => return Err(e),
        };
        let outcome = self.decode(caller, &key, fields);
        let label = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.inner.metrics.record("read", label);
        outcome
    }

    /// Like [`RedisStore::try_lease`]; `held_too_long`: the holder the caller has seen hold the
    /// lease for over twice `ttl`, taken over if it still holds it. `Err(holder)`: busy, held by
    /// `holder` (the lease key's value).
    async fn take_lease(
        &self,
        caller: &str,
        ttl: Duration,
        held_too_long: Option<&str>,
    ) -> Result<Result<Lease, String>, StoreError> {
        let key = self.inner.lease_key(caller);
        let mut invocation = self.inner.take.key(&key);
        invocation
            .arg(&self.inner.owner)
            .arg(ttl.as_millis().max(1) as u64)
            .arg(held_too_long.unwrap_or(""));
        let sent = Instant::now();
        let (code, holder) = self
            .timed("try_lease", || async {
                let mut conn = self.inner.servers.conn().await?;
                invocation.invoke_async::<(i64, String)>(&mut conn).await
            })
            .await?;
        self.inner.metrics.record("try_lease", "ok");
        let outcome = match code {
            0 => "busy",
            1 => "acquired",
            _ => "taken_over",
        };
        self.inner.metrics.record_lease(outcome);
        if code == 0 {
            return Ok(Err(holder));
        }
        if code > 1 {
            let why = if code == 2 {
                "it had no TTL, or a TTL over twice the lease"
            } else {
                "its holder kept it for over twice the lease"
            };
            tracing::warn!(
                caller,
                lease = %key,
                "took over an abandoned renewal lease: {why}"
            );
        }
        Ok(Ok(Lease {
            caller: caller.to_string(),
            key,
            owner: self.inner.owner.clone(),
            ttl,
            valid_until: std::sync::Mutex::new(sent + ttl),
        }))
    }

    /// Keeps a lease held, renewing it every third of its ttl, for as long as the caller awaits
    /// this (run it next to the renewal it protects, e.g. in `tokio::select!`). Returns only
    /// when the lease is gone: lost to another owner, or not renewable before it ran out.
    async fn keep_alive(&self, lease: &Lease) -> StoreError {
        let step = lease.ttl / 3;
        loop {
            tokio::time::sleep(step).await;
            match self.renew(lease).await {
                Ok(true) => {}
                Ok(false) => return StoreError::LeaseLost(lease.caller.clone()),
                Err(e) if Instant::now() + step >= lease.valid_until() => return e,
                Err(_) => {}
            }
        }
    }

    /// Gives a lease up if this store still holds it (compare-and-delete); `false` if it had
    /// already expired or passed to another owner.
    async fn release(&self, lease: Lease) -> Result<bool, StoreError> {
        let mut invocation = self.inner.release.key(&lease.key);
        invocation.arg(&lease.owner);
        let released = self
            .timed("release", || async {
                let mut conn = self.inner.servers.conn().await?;
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await?
            == 1;
        self.inner.metrics.record("release", "ok");
        Ok(released)
    }

    /// Writes a caller's new tokens if `lease` is still held by this store and the stored
    /// generation is `expected` (0: no record yet). On success the record has generation
    /// `expected + 1` and the change is published on `<key_prefix>events`.
    async fn write(
        &self,
        caller: &str,
        lease: &Lease,
        expected: u64,
        tokens: &StoredTokens,
    ) -> Result<WriteOutcome, StoreError> {
        lease.check_caller(caller)?;
        let key = self.inner.record_key(caller);
        let sealed = seal_record(
            self.inner.seal_keys.first(),
            &self.inner.prefix,
            caller,
            expected + 1,
            tokens,
        );
        let mut invocation = self.inner.write.key(&key);
        invocation
            .key(&lease.key)
            .arg(&lease.owner)
            .arg(expected)
            .arg(sealed)
            .arg(events_channel(&self.inner.prefix))
            .arg(caller);
        let answer = self
            .timed("write", || async {
                let mut conn = self.inner.servers.conn().await?;
                invocation.invoke_async::<(i64, i64)>(&mut conn).await
            })
            .await
            .map_err(|e| match e {
                StoreError::Redis(what) if what.contains("TBFOREIGN") => {
                    let what = what
                        .split_once("TBFOREIGN ")
                        .map_or(what.as_str(), |p| p.1)
                        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                        .to_string();
                    self.inner.metrics.record("write", "invalid");
                    StoreError::Foreign {
                        key: key.clone(),
                        what,
                    }
                }
                // WRONGTYPE (counted already): the lease key holds another type.
                StoreError::Foreign { what, .. } => StoreError::Foreign {
                    key: lease.key.clone(),
                    what,
                },
                other => other,
            })?;
        let outcome = match answer {
            (2, generation) => WriteOutcome::Written(generation as u64),
            (1, current) => WriteOutcome::Stale(current as u64),
            _ => WriteOutcome::LeaseLost,
        };
        let label = match outcome {
            WriteOutcome::Written(_) => "written",
            WriteOutcome::Stale(_) => "stale",
            WriteOutcome::LeaseLost => "lease_lost",
        };
        self.inner.metrics.record("write", label);
        if matches!(outcome, WriteOutcome::Written(_)) && self.inner.servers.replicated() {
            self.await_replica(caller).await;
        }
        Ok(outcome)
    }

    /// Starts the subscription to record changes. The receiver gets [`StoreEvent::Resync`]
    /// after every (re)connection and [`StoreEvent::Changed`] for every write of any replica
    /// (this one's included). The task reconnects with backoff while Redis is away and ends
    /// when the store is shut down or dropped, or the receiver is dropped.
    fn subscribe(&self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let task = Subscriber {
            servers: Arc::clone(&self.inner.servers),
            channel: events_channel(&self.inner.prefix),
            metrics: Arc::clone(&self.inner.metrics),
            shutdown: self.inner.shutdown.subscribe(),
            tx,
        };
        tokio::spawn(task.run());
        rx
    }

    /// Ends the subscriptions now (they also end when the last clone is dropped).
    fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
    }
}

/// A redis-rs error as text. Its messages name kinds, codes and server answers, never the
/// configured password (the server does not echo it either).
fn describe(e: &RedisError) -> String {
    e.to_string()
}

fn map_error(e: &RedisError) -> StoreError {
    use ::redis::ErrorKind;
    let text = describe(e);
    if matches!(e.kind(), ErrorKind::AuthenticationFailed)
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    {
        StoreError::Auth(text)
    } else if e.is_timeout() {
        StoreError::Timeout(COMMAND_TIMEOUT)
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
        StoreError::Unavailable(text)
    } else if e.code() == Some("WRONGTYPE") {
        StoreError::Foreign {
            key: String::new(),
            what: "the key holds another type than a hash".to_string(),
        }
    } else {
        StoreError::Redis(text)
    }
}

/// `<hostname>-<pid>`, for operators to see which replica holds a lease.
fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    let host = if host.is_empty() { "unknown" } else { &host };
    format!("{host}-{}", std::process::id())
}

/// The subscription task: holds its own pub/sub connection, never a clone of the store (so
/// that dropping the store ends it).
struct Subscriber {
    servers: Arc<servers::Servers>,
    channel: String,
    metrics: Arc<StoreMetrics>,
    shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<StoreEvent>,
}

impl Subscriber {
    async fn run(mut self) {
        let mut backoff = RESUBSCRIBE_MIN;
        // while Redis stays away, its warning once per interval
        let mut failures = Repeats::default();
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            let connected = tokio::select! {
                r = subscribe_to(&self.servers, &self.channel) => r,
                _ = self.shutdown.changed() => return,
                _ = self.tx.closed() => return,
            };
            match connected {
                Ok(pubsub) => {
                    self.metrics.record("subscribe", "ok");
                    self.metrics.set_up(true);
                    backoff = RESUBSCRIBE_MIN;
                    tracing::info!(channel = %self.channel, "subscribed to store changes");
                    if self.send(StoreEvent::Resync).await.is_err() {
                        return;
                    }
                    match self.pump(pubsub).await {
                        Pumped::Stop => return,
                        Pumped::Lost(why) => {
                            self.metrics.set_up(false);
                            tracing::warn!(reason = %why, "store subscription lost; reconnecting");
                        }
                    }
                }
                Err(e) => {
                    self.metrics.record("subscribe", e.outcome());
                    self.metrics.set_up(false);
                    if let Some(repeated) = failures.admit(tokio::time::Instant::now()) {
                        tracing::warn!(error = %e, retry_in = ?backoff, repeated,
                            "cannot subscribe to store changes");
                    }
                    let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                    tokio::select! {
                        _ = tokio::time::sleep(jittered) => {}
                        _ = self.shutdown.changed() => return,
                        _ = self.tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
                }
            }
        }
    }

    async fn send(&mut self, event: StoreEvent) -> Result<(), ()> {
        tokio::select! {
            r = self.tx.send(event) => r.map_err(|_| ()),
            _ = self.shutdown.changed() => Err(()),
        }
    }

    async fn pump(&mut self, pubsub: ::redis::aio::PubSub) -> Pumped {
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return Pumped::Lost("connection closed".to_string());
                    };
                    match parse_event(message.get_payload_bytes()) {
                        Some(event) => {
                            if self.send(event).await.is_err() {
                                return Pumped::Stop;
                            }
                        }
                        None => tracing::warn!(channel = %self.channel, "ignored a malformed store event"),
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Pumped::Lost(describe(&e)),
                        Err(_) => return Pumped::Lost(format!("no answer to a ping within {COMMAND_TIMEOUT:?}")),
                    }
                }
                _ = self.shutdown.changed() => return Pumped::Stop,
                _ = self.tx.closed() => return Pumped::Stop,
            }
        }
    }
}

/// A pub/sub connection subscribed to `channel`, within the command bound.
async fn subscribe_to(
    servers: &servers::Servers,
    channel: &str,
) -> Result<::redis::aio::PubSub, StoreError> {
    let attempt = async {
        let client: Client = servers.subscription_client().await?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, RedisError>(pubsub)
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(e)) => Err(map_error(&e)),
        Err(_) => Err(StoreError::Timeout(COMMAND_TIMEOUT)),
    }
}

enum Pumped {
    Stop,
    Lost(String),
}
