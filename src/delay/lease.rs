//! Which gateway moves delayed messages: a lease kept in an internal log topic
//! (`<prefix>delay-lease`, one partition) that every gateway follows.
//!
//! Each record is a beat `{"gw": <instance>, "epoch": n}`. Read in log order, every gateway
//! applies the same rule: a beat with a higher epoch than the current one makes its writer the
//! holder (a claim: the first claim of an epoch wins); a beat of the holder with the current
//! epoch shows it is alive; any other beat is ignored. The holder beats every `lease_ms / 5`.
//! A gateway that has not seen the holder beat for `lease_ms` claims `epoch + 1`.
//!
//! A beat without a gateway (`"gw": ""`) releases the lease: a gateway shutting down writes
//! one after its forwarders finished, and the next claims at once.
//!
//! Fencing: the holder moves messages only while it has seen its own beat within
//! `lease_ms / 2`, and its writes time out after `delay.timeout_secs`; a new holder starts
//! once that much time has passed since the old holder's last beat it saw (at least one beat
//! interval after its claim is in the log), so its recovery sees every checkpoint and every
//! write of the old holder. Instances are named by gateway ID
//! and a random number, so a restarted gateway is a new instance. With the embedded core
//! service only one process can use the data directory: it claims at once, without waiting.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::backend::{CoreRecord, SharedCoreService, TopicPartition};
use crate::config::DelayConfig;

#[derive(Serialize, Deserialize)]
struct Beat {
    gw: String,
    epoch: u64,
}

#[derive(Debug, Default)]
struct View {
    /// `None`: nobody yet, or released (`released`).
    holder: Option<String>,
    /// The last holder gave the lease up after finishing its writes: claim at once.
    released: bool,
    epoch: u64,
    /// When the holder last beat (wall clock, ms).
    refreshed_ms: i64,
}

impl View {
    /// Apply one beat in log order; true when it changed the holder.
    fn apply(&mut self, beat: &Beat, seen_ms: i64) -> bool {
        if beat.epoch > self.epoch {
            // A beat without a gateway releases the lease.
            self.released = beat.gw.is_empty();
            self.holder = (!beat.gw.is_empty()).then(|| beat.gw.clone());
            self.epoch = beat.epoch;
            self.refreshed_ms = seen_ms;
            true
        } else {
            if beat.epoch == self.epoch && self.holder.as_deref() == Some(&beat.gw) {
                self.refreshed_ms = self.refreshed_ms.max(seen_ms);
            }
            false
        }
    }
}

/// This gateway's view of the lease.
pub struct Lease {
    me: String,
    lease_ms: i64,
    view: parking_lot::Mutex<View>,
}

impl Lease {
    /// Start following (and, when due, claiming) the lease. The receiver holds `Some(epoch)`
    /// while this gateway may move delayed messages.
    pub fn start(
        core: SharedCoreService,
        topic: String,
        me: String,
        config: &DelayConfig,
        single: bool,
        stop: tokio_util::sync::CancellationToken,
    ) -> (Arc<Lease>, watch::Receiver<Option<u64>>) {
        let timeout_secs = config.timeout_secs;
        let lease = Arc::new(Lease {
            me,
            lease_ms: config.lease_ms.max(500) as i64,
            view: parking_lot::Mutex::new(View::default()),
        });
        let (tx, rx) = watch::channel(None);
        tokio::spawn(follow(lease.clone(), core, topic, (single, timeout_secs), tx, stop));
        (lease, rx)
    }

    /// Give the lease up, once this gateway's forwarders have finished (graceful shutdown): the
    /// next gateway claims it at once instead of waiting for the lease to run out.
    pub async fn release(&self, core: &SharedCoreService, topic: &str) {
        let epoch = {
            let v = self.view.lock();
            if v.holder.as_deref() != Some(&self.me) {
                return;
            }
            v.epoch
        };
        if write_beat(core, topic, "", epoch + 1).await {
            tracing::info!("delayed-message forwarding handed on");
        }
    }

    /// Whether this gateway holds the lease and has seen that recently enough to act on it.
    pub fn valid(&self) -> bool {
        let v = self.view.lock();
        v.holder.as_deref() == Some(&self.me) && crate::now_ms() - v.refreshed_ms < self.lease_ms / 2
    }
}

async fn write_beat(core: &SharedCoreService, topic: &str, me: &str, epoch: u64) -> bool {
    let Ok(value) = serde_json::to_vec(&Beat { gw: me.to_owned(), epoch }) else { return false };
    let rec = CoreRecord { key: None, headers: Vec::new(), value: value.into(), timestamp_ms: crate::now_ms() };
    match tokio::time::timeout(Duration::from_secs(5), core.append(topic, rec)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot write the delay lease");
            false
        }
        Err(_) => false,
    }
}

async fn follow(
    lease: Arc<Lease>,
    core: SharedCoreService,
    topic: String,
    (single, timeout_secs): (bool, u64),
    held: watch::Sender<Option<u64>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let tp = TopicPartition::new(topic.as_str(), 0);
    let started = crate::now_ms();
    // Where to start: a few records back, so the current holder is known at once.
    let end = loop {
        match core.end_offset(&tp).await {
            Ok(end) => break end,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the delay lease; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    let mut tail = core.tail();
    tail.assign(tp.clone(), end.saturating_sub(32));
    let beat_every = Duration::from_millis((lease.lease_ms / 5).max(100) as u64);
    // How long a holder that lost sight of its beats may still be writing: it stops new
    // writes `lease_ms / 2` after its last beat it saw, and a write takes at most the timeout.
    let fence_ms = lease.lease_ms / 2 + (timeout_secs as i64).saturating_mul(1000);
    let mut grace_ms = 0;
    let mut ticks = tokio::time::interval(beat_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When this gateway's claim was seen, and whether it was announced as held.
    let mut claimed_at: Option<i64> = None;
    let mut claiming = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = held.send(None);
                return;
            }
            polled = tail.poll() => match polled {
                Ok(records) => {
                    let now = crate::now_ms();
                    let mut v = lease.view.lock();
                    for r in records {
                        let Ok(beat) = serde_json::from_slice::<Beat>(&r.record.value) else { continue };
                        // Beats written before this gateway started count from their own time.
                        let seen = if r.offset < end { r.record.timestamp_ms.min(now) } else { now };
                        if v.apply(&beat, seen) {
                            claiming = false;
                            if beat.gw == lease.me {
                                claimed_at = Some(now);
                                tracing::info!(epoch = beat.epoch, "this gateway now moves delayed messages");
                            } else if claimed_at.take().is_some() {
                                tracing::info!(by = beat.gw, "another gateway took over moving delayed messages");
                            }
                        }
                    }
                }
                Err(crate::backend::BackendError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the delay lease failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            _ = ticks.tick() => {
                let now = crate::now_ms();
                let (holder, epoch, refreshed, released) = {
                    let v = lease.view.lock();
                    (v.holder.clone(), v.epoch, v.refreshed_ms, v.released)
                };
                if holder.as_deref() == Some(&lease.me) {
                    write_beat(&core, &topic, &lease.me, epoch).await;
                } else if !claiming {
                    // Nobody known, or the holder is silent: claim the next epoch.
                    let silent = match holder {
                        // An empty lease log (nobody ever held it), or released.
                        None if end == 0 || released => i64::MAX,
                        None => now - started,
                        Some(_) => now - refreshed,
                    };
                    if single || silent > lease.lease_ms {
                        claiming = write_beat(&core, &topic, &lease.me, epoch + 1).await;
                        // Wait out whatever the silent holder may still write (at least one
                        // beat interval, in case it is alive and only our view was stale).
                        grace_ms = if single { 0 } else { (fence_ms - silent).max(lease.lease_ms / 5) };
                    }
                } else if now - refreshed > 2 * lease.lease_ms {
                    // The claim was written but never seen (or lost the race unseen): try again.
                    claiming = false;
                }
            }
        }
        // After every event: announce whether this gateway may forward now.
        let now = crate::now_ms();
        let holds = claimed_at.is_some_and(|at| now - at >= grace_ms) && lease.valid();
        let epoch = lease.view.lock().epoch;
        if holds != held.borrow().is_some() {
            let _ = held.send(holds.then_some(epoch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(gw: &str, epoch: u64) -> Beat {
        Beat { gw: gw.into(), epoch }
    }

    #[test]
    fn the_first_claim_of_an_epoch_wins_and_stale_beats_are_ignored() {
        let mut v = View::default();
        assert!(v.apply(&beat("a", 1), 10));
        // A late claim of the same epoch by another gateway loses.
        assert!(!v.apply(&beat("b", 1), 11));
        assert_eq!(v.holder.as_deref(), Some("a"));
        assert!(!v.apply(&beat("a", 1), 20));
        assert_eq!(v.refreshed_ms, 20);
        // b claims the next epoch: a's later beats of its old epoch no longer count.
        assert!(v.apply(&beat("b", 2), 30));
        assert!(!v.apply(&beat("a", 1), 40));
        assert_eq!((v.holder.as_deref(), v.epoch, v.refreshed_ms), (Some("b"), 2, 30));
        // b releases it; the next claim wins at once.
        assert!(v.apply(&beat("", 3), 50));
        assert!(v.holder.is_none() && v.released);
        assert!(v.apply(&beat("c", 4), 51));
        assert!(!v.released);
        assert_eq!(v.holder.as_deref(), Some("c"));
    }

    #[test]
    fn gateways_starting_at_different_places_agree_once_the_holder_beats() {
        let log = [beat("a", 1), beat("b", 1), beat("a", 1), beat("a", 1)];
        let mut from_start = View::default();
        let mut from_middle = View::default();
        for (i, b) in log.iter().enumerate() {
            from_start.apply(b, i as i64);
            if i >= 2 {
                from_middle.apply(b, i as i64);
            }
        }
        assert_eq!(from_start.holder, from_middle.holder);
    }
}
