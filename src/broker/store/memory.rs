//! The store in this process: the same contract as Redis (fenced writes on the generation,
//! leases with an owner and a TTL on tokio's clock, announcements to every replica), shared by
//! the [`MemoryStore`] handles of one test's replicas. [`MemoryStore::set_down`] makes it
//! unreachable, as Redis going away; coming back announces a resync, as a reconnection does.
//! Records are kept opened: sealing is the Redis store's concern.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Lease, Record, StoreError, StoreEvent, StoredTokens, TokenStore, WriteOutcome};

/// One replica's handle on a shared in-memory store. [`MemoryStore::replica`] makes another.
pub struct MemoryStore {
    shared: Arc<Mutex<Space>>,
    owner: String,
    lease_ttl: Duration,
    seal_key_id: String,
}

#[derive(Default)]
struct Space {
    records: HashMap<String, Record>,
    /// Lease holder and expiry, by caller.
    leases: HashMap<String, (String, Instant)>,
    /// Subscriptions, by the owner of the handle that made them.
    subscribers: Vec<(String, mpsc::UnboundedSender<StoreEvent>)>,
    down: bool,
    /// Handles (by owner) that miss announcements of changes, as a lost pub/sub message.
    deaf: Vec<String>,
    replicas: u64,
}

impl Space {
    fn announce(&mut self, event: StoreEvent) {
        let deaf = &self.deaf;
        self.subscribers.retain(|(owner, tx)| {
            let missed = matches!(event, StoreEvent::Changed { .. }) && deaf.contains(owner);
            missed || tx.send(event.clone()).is_ok()
        });
    }

    fn held_by(&self, caller: &str, owner: &str, now: Instant) -> bool {
        self.leases
            .get(caller)
            .is_some_and(|(holder, until)| holder == owner && *until > now)
    }
}

fn unreachable() -> StoreError {
    StoreError::Unavailable("the in-memory store is down".into())
}

impl MemoryStore {
    /// A new, empty store and the first replica's handle on it.
    pub fn new(lease_ttl: Duration) -> Arc<MemoryStore> {
        let shared = Arc::new(Mutex::new(Space::default()));
        Self::handle(shared, lease_ttl)
    }

    fn handle(shared: Arc<Mutex<Space>>, lease_ttl: Duration) -> Arc<MemoryStore> {
        let n = {
            let mut space = shared.lock().unwrap_or_else(|e| e.into_inner());
            space.replicas += 1;
            space.replicas
        };
        Arc::new(MemoryStore {
            shared,
            owner: format!("replica-{n}"),
            lease_ttl,
            seal_key_id: "memory".into(),
        })
    }

    /// Another replica's handle on the same store (its own lease owner).
    pub fn replica(&self) -> Arc<MemoryStore> {
        Self::handle(Arc::clone(&self.shared), self.lease_ttl)
    }

    /// This handle's lease owner value.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Makes the store unreachable (`true`) or reachable again; coming back announces a resync.
    pub fn set_down(&self, down: bool) {
        let mut space = self.space();
        let was = std::mem::replace(&mut space.down, down);
        if was && !down {
            space.announce(StoreEvent::Resync);
        }
    }

    /// This handle misses (`true`) or hears again the announcements of changes.
    pub fn set_deaf(&self, deaf: bool) {
        let mut space = self.space();
        space.deaf.retain(|owner| *owner != self.owner);
        if deaf {
            space.deaf.push(self.owner.clone());
        }
    }

    /// The caller's record as stored.
    pub fn record(&self, caller: &str) -> Option<Record> {
        self.space().records.get(caller).cloned()
    }

    fn space(&self) -> std::sync::MutexGuard<'_, Space> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The space while the store is reachable.
    fn up(&self) -> Result<std::sync::MutexGuard<'_, Space>, StoreError> {
        let space = self.space();
        if space.down {
            return Err(unreachable());
        }
        Ok(space)
    }

    /// Extends the lease if this handle still holds it; `Err`: the store is down.
    fn renew(&self, lease: &Lease) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut space = self.up()?;
        if !space.held_by(&lease.caller, &self.owner, now) {
            return Ok(false);
        }
        space
            .leases
            .insert(lease.caller.clone(), (self.owner.clone(), now + lease.ttl));
        lease.extend(std::time::Instant::now());
        Ok(true)
    }
}

#[async_trait::async_trait]
impl TokenStore for MemoryStore {
    fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn seal_key_id(&self) -> &str {
        &self.seal_key_id
    }

    async fn read(&self, caller: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.up()?.records.get(caller).cloned())
    }

    async fn take_lease(
        &self,
        caller: &str,
        ttl: Duration,
        held_too_long: Option<&str>,
    ) -> Result<Result<Lease, String>, StoreError> {
        let now = Instant::now();
        let mut space = self.up()?;
        if let Some((holder, until)) = space.leases.get(caller) {
            let taken_over = held_too_long == Some(holder.as_str());
            if *until > now && !taken_over {
                return Ok(Err(holder.clone()));
            }
            if taken_over {
                tracing::warn!(caller, "took over an abandoned renewal lease");
            }
        }
        space
            .leases
            .insert(caller.to_string(), (self.owner.clone(), now + ttl));
        Ok(Ok(Lease {
            caller: caller.to_string(),
            key: caller.to_string(),
            owner: self.owner.clone(),
            ttl,
            valid_until: std::sync::Mutex::new(std::time::Instant::now() + ttl),
        }))
    }

    async fn keep_alive(&self, lease: &Lease) -> StoreError {
        let step = lease.ttl / 3;
        let mut valid_until = Instant::now() + lease.ttl;
        loop {
            tokio::time::sleep(step).await;
            let sent = Instant::now();
            match self.renew(lease) {
                Ok(true) => valid_until = sent + lease.ttl,
                Ok(false) => return StoreError::LeaseLost(lease.caller.clone()),
                Err(e) if Instant::now() + step >= valid_until => return e,
                Err(_) => {}
            }
        }
    }

    async fn release(&self, lease: Lease) -> Result<bool, StoreError> {
        let mut space = self.up()?;
        let held = space.held_by(&lease.caller, &self.owner, Instant::now());
        if held {
            space.leases.remove(&lease.caller);
        }
        Ok(held)
    }

    async fn write(
        &self,
        caller: &str,
        lease: &Lease,
        expected: u64,
        tokens: &StoredTokens,
    ) -> Result<WriteOutcome, StoreError> {
        lease.check_caller(caller)?;
        let mut space = self.up()?;
        if !space.held_by(caller, &lease.owner, Instant::now()) {
            return Ok(WriteOutcome::LeaseLost);
        }
        let current = space.records.get(caller).map_or(0, |r| r.generation);
        if current != expected {
            return Ok(WriteOutcome::Stale(current));
        }
        let generation = current + 1;
        space.records.insert(
            caller.to_string(),
            Record {
                generation,
                tokens: tokens.clone(),
                sealed_with: self.seal_key_id.clone(),
            },
        );
        space.announce(StoreEvent::Changed {
            caller: caller.to_string(),
            generation,
        });
        Ok(WriteOutcome::Written(generation))
    }

    fn subscribe(&self) -> mpsc::Receiver<StoreEvent> {
        // The broker takes a bounded receiver; a forwarding task bridges the unbounded queue.
        let (tx, mut rx_unbounded) = mpsc::unbounded_channel();
        {
            let mut space = self.space();
            if !space.down {
                let _ = tx.send(StoreEvent::Resync);
            }
            space.subscribers.push((self.owner.clone(), tx));
        }
        let (out, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(event) = rx_unbounded.recv().await {
                if out.send(event).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    fn shutdown(&self) {
        self.space()
            .subscribers
            .retain(|(owner, _)| *owner != self.owner);
    }
}
