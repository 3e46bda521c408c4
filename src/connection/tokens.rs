//! Authorisation on a live connection (SPEC §4): denials, `$SYS/uploadToken`, token expiry
//! notices and expiry, revocation of tokens and device credentials. The decisions are the
//! `auth` module's; this file turns them into packets and ends the connection when needed.

use super::appends::Appends;
use super::waiting::{Resume, Step};
use super::*;
use crate::auth::{Denied, Revocation};
use tokio::sync::broadcast::error::RecvError;

/// Client → gateway: replace a token without reconnecting.
pub(super) const SYS_UPLOAD_TOKEN: &str = "$SYS/uploadToken";
/// Gateway → client, about 5 minutes before a token expires.
const SYS_EXPIRE_NOTICE: &str = "$SYS/tokenExpireNotice";
/// Gateway → client, before it is disconnected for an invalid token.
const SYS_INVALID_NOTICE: &str = "$SYS/tokenInvalidNotice";
const EXPIRE_NOTICE_AHEAD_MS: i64 = 5 * 60 * 1000;

impl Conn {
    /// A `$SYS/...` message to this client, which needs no subscription for it.
    pub(super) fn send_sys(&mut self, topic: &str, json: String) {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            payload: Bytes::from(json),
            properties: PublishProperties::default(),
        };
        self.send(&Packet::Publish(publish));
    }

    /// End the connection for a denial; a token client is told why first.
    pub(super) fn deny(&mut self, d: Denied) -> End {
        if let Some(t) = &d.token_invalid {
            self.send_sys(SYS_INVALID_NOTICE, t.notice_json());
        }
        End::Server(d.reason_code, d.reason)
    }

    /// `$SYS/uploadToken`: the new token replaces the old grants, or the client is told
    /// why not and disconnected.
    pub(super) fn on_upload_token(&mut self, payload: &[u8]) -> Result<(), End> {
        match self.ctx.auth.upload_token(&self.identity, payload) {
            Ok(identity) => {
                self.identity = identity;
                // Narrower rights: what they no longer cover is unsubscribed at once.
                self.drop_forbidden_subscriptions("token upload");
                self.expiry_notified.clear();
                if self.revocations.is_none() {
                    self.revocations = Some(self.ctx.auth.revocations());
                }
                Ok(())
            }
            Err(t) => {
                self.send_sys(SYS_INVALID_NOTICE, t.notice_json());
                Err(End::Server(ReasonCode::NOT_AUTHORIZED, "uploaded token invalid"))
            }
        }
    }

    /// Epoch ms of the next token event: an expiry notice not yet sent, or an expiry.
    pub(super) fn next_token_event(&self) -> Option<i64> {
        self.identity
            .tokens
            .iter()
            .map(
                |g| {
                    if self.expiry_notified.contains(&g.jti) {
                        g.expire_ms
                    } else {
                        g.expire_ms - EXPIRE_NOTICE_AHEAD_MS
                    }
                },
            )
            .min()
    }

    pub(super) fn on_token_event(&mut self) -> Result<(), End> {
        let now = now_ms();
        if let Some(d) = self.identity.expired(now) {
            return Err(self.deny(d));
        }
        let due: Vec<(String, String)> = self
            .identity
            .tokens
            .iter()
            .filter(|g| !self.expiry_notified.contains(&g.jti) && now >= g.expire_ms - EXPIRE_NOTICE_AHEAD_MS)
            .map(|g| (g.jti.clone(), g.expire_notice_json()))
            .collect();
        for (jti, notice) in due {
            self.send_sys(SYS_EXPIRE_NOTICE, notice);
            self.expiry_notified.push(jti);
        }
        Ok(())
    }

    /// A token or credential was revoked somewhere: disconnect if this identity used it.
    /// Revocations missed (the stream lagged): the whole identity is checked against the
    /// current ones, beside the loop (`waiting`).
    pub(super) fn on_revocation(&mut self, r: Result<Revocation, RecvError>, appends: &mut Appends) -> Result<(), End> {
        let denied = match r {
            Ok(rev) => self.identity.affected_by(&rev),
            Err(RecvError::Lagged(_)) => {
                let (ctx, identity) = (self.ctx.clone(), self.identity.clone());
                let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
                let step = async move {
                    // A check that cannot finish in time keeps the connection, as one that
                    // cannot read the credentials' view does: the revocation stream goes on.
                    Resume::Rechecked(tokio::time::timeout(timeout, ctx.auth.recheck(&identity)).await.unwrap_or(None))
                };
                return self.wait_for(Step::new(step.boxed()), appends);
            }
            Err(RecvError::Closed) => {
                self.revocations = None;
                None
            }
        };
        match denied {
            Some(d) => Err(self.deny(d)),
            None => Ok(()),
        }
    }
}

/// A tokio instant for an epoch-ms deadline.
pub(super) fn instant_at(epoch_ms: i64) -> Instant {
    let wait = (epoch_ms - now_ms()).max(0);
    Instant::now() + Duration::from_millis(u64::try_from(wait).unwrap_or(0))
}
