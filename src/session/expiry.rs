//! Removes stored sessions whose expiry has passed, so the sessions store does not grow with
//! clients that never come back. (A returning client never sees an expired session either
//! way: loading checks the expiry too.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::persist::Stored;
use super::registry::Registry;
use crate::backend::{SharedCoreService, StateStore};
use crate::connection::now_ms;

/// Delete expired sessions not connected here; returns how many were deleted.
pub async fn sweep_once(backend: &SharedCoreService, registry: &Registry) -> usize {
    // A snapshot of the store; the update channel is dropped at once (no subscription). Kept
    // open, its one slot would fill with the sweep's own deletions and stall the store's
    // writer, which waits for watchers, while the sweep waits for that writer.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(rx);
    let snapshot = match backend.watch_state(StateStore::Sessions, tx).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "session sweep skipped");
            return 0;
        }
    };
    let now = now_ms();
    let connected: std::collections::HashSet<String> = registry.client_ids().into_iter().collect();
    let mut deleted = 0;
    let mut owners: HashMap<String, usize> = HashMap::new();
    for (client_id, value) in snapshot {
        let stored = Stored::decode(&value);
        let expired = match &stored {
            Some(s) => s.expired(now),
            None => true, // unreadable (older format): nothing could resume it
        };
        if expired
            && !connected.contains(&client_id)
            && backend.put_state(StateStore::Sessions, &client_id, None).await.is_ok()
        {
            deleted += 1;
            continue;
        }
        if let Some(owner) = stored.and_then(|s| s.owner) {
            *owners.entry(owner).or_insert(0) += 1;
        }
    }
    registry.owners.replace(owners);
    if deleted > 0 {
        tracing::info!(deleted, "expired sessions removed");
    }
    deleted
}

/// Sweep every `every` until the token is cancelled.
pub async fn run(
    backend: SharedCoreService,
    registry: Arc<Registry>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        // At start too: the sweep also counts the sessions per identity.
        sweep_once(&backend, &registry).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
