//! Device credentials (SPEC §4, "one device, one secret"): what is stored per device in the
//! core service's `StateStore::Credentials` (key = DeviceAccessKeyId, value = JSON below),
//! and how new ones are made.
//!
//! The secret is stored as is: the gateway must compute HMAC-SHA1 with it to check a
//! password, so it cannot be hashed. Whoever can read the core service's credential store can
//! impersonate devices; protect it like the access keys in `gateway.yaml`.
//! The connection never sees this type, only the [`super::Identity`] built from it.

use serde::{Deserialize, Serialize};
use std::fmt;

use super::acl::Acl;
use crate::config::auth::Secret;

/// Stored form of one device credential (JSON in the core service, `v` = format version).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCredential {
    pub v: u32,
    pub secret: String,
    /// The one ClientId this credential may connect as.
    pub client_id: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Creation time, milliseconds since the epoch.
    pub created_ms: i64,
}

impl fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredCredential")
            .field("v", &self.v)
            .field("secret", &"<redacted>")
            .field("client_id", &self.client_id)
            .field("publish", &self.publish)
            .field("subscribe", &self.subscribe)
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

/// A credential as the authenticator holds it in memory.
#[derive(Debug, Clone)]
pub struct DeviceCredential {
    pub secret: Secret,
    pub client_id: String,
    pub acl: Acl,
    pub created_ms: i64,
}

pub const FORMAT_VERSION: u32 = 1;

impl StoredCredential {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain strings and numbers to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse a stored value; `None` if it is not a credential of a known format version.
    pub fn decode(bytes: &[u8]) -> Option<DeviceCredential> {
        let s: StoredCredential = serde_json::from_slice(bytes).ok()?;
        if s.v != FORMAT_VERSION || s.secret.is_empty() {
            return None;
        }
        let acl = Acl::new(s.publish, s.subscribe).ok()?;
        Some(DeviceCredential { secret: Secret::new(s.secret), client_id: s.client_id, acl, created_ms: s.created_ms })
    }
}

/// What `register_credential` hands back, once: give it to the device.
#[derive(Clone)]
pub struct NewCredential {
    /// DeviceAccessKeyId (`DAK` + 24 hex digits), the middle part of the user name.
    pub access_key_id: String,
    /// DeviceAccessKeySecret (32 random bytes, Base64).
    pub secret: Secret,
    pub client_id: String,
}

impl fmt::Debug for NewCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewCredential")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &self.secret)
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// Longest DeviceAccessKeyId looked up (those [`generate`] makes have 27 characters).
pub const MAX_ACCESS_KEY_ID: usize = 64;

/// A fresh random DeviceAccessKeyId and secret.
pub fn generate() -> (String, Secret) {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut id = [0u8; 12];
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut id);
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let id: String = id.iter().map(|b| format!("{b:02X}")).collect();
    (format!("DAK{id}"), Secret::new(base64::engine::general_purpose::STANDARD.encode(secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips_and_hides_the_secret() {
        let s = StoredCredential {
            v: FORMAT_VERSION,
            secret: "dev-secret-123".into(),
            client_id: "GID_a@@@d1".into(),
            publish: vec!["a/#".into()],
            subscribe: vec![],
            created_ms: 5,
        };
        assert!(!format!("{s:?}").contains("dev-secret-123"));
        let c = StoredCredential::decode(&s.encode()).unwrap();
        assert_eq!(c.secret.expose(), "dev-secret-123");
        assert!(c.acl.can_publish("a/b") && !c.acl.can_subscribe("a/b"));
        assert!(!format!("{c:?}").contains("dev-secret-123"));
        assert!(StoredCredential::decode(b"{}").is_none());
        assert!(StoredCredential::decode(&StoredCredential { v: 2, ..s.clone() }.encode()).is_none());
        assert!(StoredCredential::decode(&StoredCredential { secret: String::new(), ..s }.encode()).is_none());
    }

    #[test]
    fn generated_ids_are_unique_and_well_formed() {
        let (a, sa) = generate();
        let (b, sb) = generate();
        assert_ne!(a, b);
        assert_ne!(sa, sb);
        assert!(a.starts_with("DAK") && a.len() == 27 && a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(!format!("{:?}", NewCredential { access_key_id: a, secret: sa.clone(), client_id: "c".into() })
            .contains(sa.expose()));
    }
}
