//! Removes stored sessions whose expiry has passed, so the sessions store does not grow with
//! clients that never come back. (A returning client never sees an expired session either
//! way: loading checks the expiry too.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::persist::Stored;
use super::registry::Registry;
use crate::backend::{SharedCoreService, StateStore};
use crate::now_ms;

/// Stored sessions read at once.
const PAGE: usize = 1000;

/// Delete expired sessions not connected here; returns how many were deleted. The store is
/// read a page at a time, so a sweep holds one page of sessions, not all of them.
pub async fn sweep_once(backend: &SharedCoreService, registry: &Registry) -> usize {
    let now = now_ms();
    let connected: std::collections::HashSet<String> = registry.client_ids().into_iter().collect();
    let mut deleted = 0;
    let mut owners: HashMap<String, usize> = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = match backend.scan_state(StateStore::Sessions, after.take(), PAGE).await {
            Ok(page) => page,
            Err(e) => {
                // The counts per identity are kept as they were: a partial count would err low.
                tracing::debug!(error = %e, "session sweep stopped");
                return deleted;
            }
        };
        let last_page = page.len() < PAGE;
        after = page.last().map(|(k, _)| k.clone());
        for (client_id, value) in page {
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
        if last_page || after.is_none() {
            break;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedCore;
    use crate::config::EmbeddedConfig;
    use crate::session::state::SessionState;

    /// A sweep over more sessions than one page deletes every expired one, keeps the others,
    /// and counts the kept ones per identity.
    #[tokio::test]
    async fn a_sweep_pages_through_the_whole_store() {
        let dir = tempfile::tempdir().unwrap();
        let config: EmbeddedConfig =
            serde_yaml_ng::from_str(&format!("data_dir: {}\nfsync: never\n", dir.path().display())).unwrap();
        let core: SharedCoreService = EmbeddedCore::open(&config, "events").await.unwrap();
        let now = now_ms();
        for i in 0..2 * PAGE + 500 {
            let expired = i % 2 == 0;
            let mut state = SessionState::new(format!("c{i:05}"));
            state.owner = Some(if expired { "old" } else { "live" }.into());
            let at = if expired { now - 120_000 } else { now };
            let value = Stored::from_state(&state, 60, Some(at)).encode();
            core.put_state(StateStore::Sessions, &format!("c{i:05}"), Some(value)).await.unwrap();
        }
        let registry = Registry::new();
        assert_eq!(sweep_once(&core, &registry).await, PAGE + 250);
        assert_eq!((registry.owners.count("live"), registry.owners.count("old")), (PAGE + 250, 0));
        let left = core.scan_state(StateStore::Sessions, None, 10 * PAGE).await.unwrap();
        assert_eq!(left.len(), PAGE + 250);
        assert!(left.iter().all(|(k, _)| k[1..].parse::<usize>().unwrap() % 2 == 1));
        core.shutdown().await;
    }
}
