//! Shared subscriptions through the core service's consumer groups (Kafka): for each share
//! group and core topic with members on this gateway, one group member reads the topic; the
//! service splits the partitions among the gateways, so a message reaches one member of the
//! group across all gateways. Without consumer groups (embedded log) the router picks a
//! member among this gateway's sessions instead (`Router::route_one`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Delivery, Router, State};
use crate::backend::{BackendError, GroupTail, Record};
use crate::protocol::QoS;

/// How often a reader with nothing to read checks that its group still has local members.
const MEMBER_CHECK: Duration = Duration::from_secs(1);
/// Wait before offering again when every local member's queue is full.
const FULL_RETRY: Duration = Duration::from_millis(10);

pub(super) enum Offer {
    /// A member took it.
    Taken,
    /// Not for this group (no matching filter, P2P, not an MQTT message).
    NotForGroup,
    /// Every member's queue is full.
    Full,
    /// The group has no member here any more.
    NoMembers,
}

impl Router {
    /// Offer a record to one member of `group` on this gateway, round-robin, without waiting.
    pub(super) fn offer_to_group(&self, group: &str, record: &Arc<Record>) -> Offer {
        let Some(message) = self.topics.message_of(&record.tp.topic, &record.record) else {
            return Offer::NotForGroup;
        };
        if self.topics.p2p_target(&message.topic).is_some() {
            return Offer::NotForGroup;
        }
        let mut st = self.state.lock();
        if st.share_members.get(group).copied().unwrap_or(0) == 0 {
            return Offer::NoMembers;
        }
        let State { trie, sessions, .. } = &mut *st;
        let mut plain = Vec::new();
        let mut groups = Vec::new();
        trie.matches(&message.topic, &mut plain, &mut groups);
        let Some((_, g)) = groups.into_iter().find(|(name, _)| *name == group) else {
            return Offer::NotForGroup;
        };
        let message = Arc::new(message);
        let n = g.members.len();
        for i in 0..n {
            let (sid, _qos) = g.members[(g.next + i) % n];
            let Some(slot) = sessions.get(&sid) else { continue };
            let d = Delivery::Shared(Box::new((record.clone(), message.clone(), g.full.clone())));
            if slot.queue.try_send(d).is_ok() {
                g.next = (g.next + i + 1) % n;
                self.stats.routed.inc();
                return Offer::Taken;
            }
        }
        if message.qos == QoS::AtMostOnce {
            // QoS 0 is never waited for.
            self.stats.dropped_qos0.inc();
            return Offer::Taken;
        }
        Offer::Full
    }

    /// Whether the reader of (`group`, `topic`) should stop: no local member is left. The
    /// reader is forgotten in the same step, so a new member starts a new one.
    fn group_reader_should_stop(&self, group: &str, topic: &str) -> bool {
        let mut st = self.state.lock();
        if st.share_members.get(group).copied().unwrap_or(0) > 0 {
            return false;
        }
        st.group_readers.retain(|(g, t)| !(&**g == group && &**t == topic));
        true
    }
}

/// Read one share group's records of one core topic until the group has no local member.
/// Records are handed on in order; a full group waits (the log is the buffer), and the
/// group's position advances only past records a member took.
pub(super) async fn run(router: Weak<Router>, group: Arc<str>, topic: Arc<str>, mut member: Box<dyn GroupTail>) {
    tracing::info!(%group, %topic, "joined the consumer group of a shared subscription");
    'read: loop {
        let polled = tokio::select! {
            r = member.poll() => Some(r),
            _ = tokio::time::sleep(MEMBER_CHECK) => None,
        };
        let Some(r) = router.upgrade() else { return };
        if r.group_reader_should_stop(&group, &topic) {
            break;
        }
        let records = match polled {
            None => continue,
            Some(Ok(records)) => records,
            Some(Err(BackendError::Closed)) => return,
            Some(Err(e)) => {
                tracing::warn!(%group, %topic, error = %e, "shared subscription reader: core service error; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for record in records {
            loop {
                match r.offer_to_group(&group, &record) {
                    Offer::Taken | Offer::NotForGroup => {
                        member.done(&record);
                        break;
                    }
                    Offer::Full => tokio::time::sleep(FULL_RETRY).await,
                    Offer::NoMembers => {
                        // Leave without storing its position: another gateway's member gets it.
                        r.group_reader_should_stop(&group, &topic);
                        break 'read;
                    }
                }
            }
        }
    }
    tracing::info!(%group, %topic, "left the consumer group of a shared subscription");
}
