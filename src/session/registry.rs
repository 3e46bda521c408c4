//! Which ClientIds are connected to this gateway, for session takeover, the admin API's
//! client list and kick, the backlog metrics (each connection's published read positions), and
//! delayed will messages waiting to be published.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{oneshot, watch};

/// Why a connection is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// The same ClientId connected again; `clean_start` of the new connection.
    TakenOver { new_clean_start: bool },
    /// Server shutdown.
    Shutdown,
    /// Administrative disconnect.
    Administrative,
}

/// What the admin API shows about a connected client (no secrets).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    pub client_id: String,
    pub channel_id: String,
    /// Client address (real one behind a PROXY-protocol load balancer).
    pub client_ip: String,
    pub listener: String,
    pub transport: &'static str,
    /// `3.1`, `3.1.1` or `5.0`.
    pub protocol: &'static str,
    pub username: Option<String>,
    /// How the client authenticated (`signature`, `token`, ...).
    pub auth_mode: &'static str,
    pub keep_alive_secs: u64,
    pub session_expiry_secs: u32,
    /// Epoch milliseconds.
    pub connected_ms: i64,
}

struct Entry {
    conn_id: u64,
    /// Set once CONNACK was sent.
    info: Option<Arc<ClientInfo>>,
    /// When this connection was registered, epoch ms.
    since_ms: i64,
    kick: Option<oneshot::Sender<Kick>>,
    /// Becomes true when the connection has finished (state saved, events written).
    done: watch::Receiver<bool>,
    /// Read positions the connection publishes for the backlog metrics.
    live: Arc<super::backlog::LiveView>,
}

/// Handle a connection keeps while registered.
pub struct Registration {
    pub conn_id: u64,
    pub kicked: oneshot::Receiver<Kick>,
    pub done: watch::Sender<bool>,
    /// Where the connection publishes its read positions (`session::backlog`).
    pub live: Arc<super::backlog::LiveView>,
}

#[derive(Default)]
pub struct Registry {
    clients: Mutex<HashMap<String, Entry>>,
    wills: Mutex<Wills>,
    /// Persistent sessions per identity in the sessions store.
    pub owners: super::owners::SessionOwners,
}

/// Delayed wills waiting, by ClientId, and how many each identity has waiting.
#[derive(Default)]
struct Wills {
    by_client: HashMap<String, (String, oneshot::Sender<()>)>,
    per_owner: HashMap<String, usize>,
}

impl Wills {
    fn remove(&mut self, client_id: &str) -> Option<oneshot::Sender<()>> {
        let (owner, cancel) = self.by_client.remove(client_id)?;
        if let Some(n) = self.per_owner.get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&owner);
            }
        }
        Some(cancel)
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Register `client_id`; if it was connected, kick the old connection and wait (at most
    /// `wait`) until it finished saving its session.
    pub async fn take(&self, client_id: &str, conn_id: u64, kick: Kick, wait: std::time::Duration) -> Registration {
        // A new connection cancels a pending delayed will of the same client.
        let cancel = self.wills.lock().remove(client_id);
        if let Some(cancel) = cancel {
            let _ = cancel.send(());
        }
        let (kick_tx, kick_rx) = oneshot::channel();
        let (done_tx, done_rx) = watch::channel(false);
        let live = Arc::new(super::backlog::LiveView::default());
        let old = self.clients.lock().insert(
            client_id.to_string(),
            Entry {
                conn_id,
                info: None,
                since_ms: crate::now_ms(),
                kick: Some(kick_tx),
                done: done_rx,
                live: live.clone(),
            },
        );
        if let Some(mut old) = old {
            if let Some(k) = old.kick.take() {
                let _ = k.send(kick);
            }
            let _ = tokio::time::timeout(wait, old.done.wait_for(|d| *d)).await;
        }
        Registration { conn_id, kicked: kick_rx, done: done_tx, live }
    }

    /// Remove the entry if it still belongs to `conn_id`.
    pub fn release(&self, client_id: &str, conn_id: u64) {
        let mut c = self.clients.lock();
        if c.get(client_id).map(|e| e.conn_id) == Some(conn_id) {
            c.remove(client_id);
        }
    }

    /// Kick one client; false if it is not connected here.
    pub fn kick(&self, client_id: &str, kick: Kick) -> bool {
        let mut c = self.clients.lock();
        match c.get_mut(client_id).and_then(|e| e.kick.take()) {
            Some(k) => k.send(kick).is_ok(),
            None => false,
        }
    }

    /// Kick one client and wait (at most `wait`) until it finished saving its session; false if
    /// it is not connected here.
    pub async fn kick_and_wait(&self, client_id: &str, kick: Kick, wait: std::time::Duration) -> bool {
        let (sender, mut done) = {
            let mut c = self.clients.lock();
            match c.get_mut(client_id) {
                Some(e) => (e.kick.take(), e.done.clone()),
                None => return false,
            }
        };
        if let Some(k) = sender {
            let _ = k.send(kick);
        }
        let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        true
    }

    /// Kick a client connected here before `than_ms` (a newer connection of the same
    /// ClientId elsewhere wins; an older one does not).
    pub fn kick_if_older(&self, client_id: &str, than_ms: i64, kick: Kick) -> bool {
        let mut c = self.clients.lock();
        match c.get_mut(client_id) {
            Some(e) if e.since_ms < than_ms => match e.kick.take() {
                Some(k) => k.send(kick).is_ok(),
                None => false,
            },
            _ => false,
        }
    }

    /// Kick everyone (shutdown) and return how many were asked.
    pub fn kick_all(&self, kick: Kick) -> usize {
        let mut c = self.clients.lock();
        c.values_mut().filter_map(|e| e.kick.take()).map(|k| k.send(kick)).filter(Result::is_ok).count()
    }

    /// Wait until every registered connection is gone, at most `wait`.
    pub async fn drained(&self, wait: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.clients.lock().is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Attach what the admin API shows to the entry of `conn_id` (after CONNACK).
    pub fn describe(&self, conn_id: u64, info: ClientInfo) {
        let mut c = self.clients.lock();
        if let Some(e) = c.get_mut(&info.client_id).filter(|e| e.conn_id == conn_id) {
            e.info = Some(Arc::new(info));
        }
    }

    /// Connected clients (those past CONNACK), sorted by ClientId.
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut all: Vec<_> = self.clients.lock().values().filter_map(|e| e.info.clone()).collect();
        all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        all
    }

    /// One connected client.
    pub fn get(&self, client_id: &str) -> Option<Arc<ClientInfo>> {
        self.clients.lock().get(client_id).and_then(|e| e.info.clone())
    }

    pub fn connected(&self) -> usize {
        self.clients.lock().len()
    }

    pub fn client_ids(&self) -> Vec<String> {
        self.clients.lock().keys().cloned().collect()
    }

    /// The read positions each connected client (past CONNACK) last published.
    pub fn live_views(&self) -> Vec<(String, Arc<super::backlog::SessionView>)> {
        let c = self.clients.lock();
        c.iter().filter(|(_, e)| e.info.is_some()).filter_map(|(id, e)| Some((id.clone(), e.live.get()?))).collect()
    }

    /// Park a delayed will of identity `owner`; returns the receiver that fires if a new
    /// connection cancels it, or `None` when `owner` has `max` delayed wills waiting already.
    pub fn park_will(&self, client_id: &str, owner: &str, max: usize) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        let mut wills = self.wills.lock();
        let old = wills.remove(client_id);
        if let Some(old) = old {
            let _ = old.send(());
        }
        let n = wills.per_owner.entry(owner.to_string()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                wills.per_owner.remove(owner);
            }
            return None;
        }
        *n += 1;
        wills.by_client.insert(client_id.to_string(), (owner.to_string(), tx));
        Some(rx)
    }

    pub fn will_done(&self, client_id: &str) {
        self.wills.lock().remove(client_id);
    }

    /// Delayed wills waiting for identity `owner`.
    pub fn delayed_wills(&self, owner: &str) -> usize {
        self.wills.lock().per_owner.get(owner).copied().unwrap_or(0)
    }
}
