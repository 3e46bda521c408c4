//! LMQ ClientId rules (SPEC §4): `<GroupId>@@@<DeviceId>`.
//!
//! - GroupId: starts with `GID_` or `GID-`, 7 to 64 characters, letters, digits, `-`, `_`.
//! - DeviceId: non-empty, letters, digits, `-`, `_`.
//! - With `auth.allow_plain_client_ids`, any non-empty ClientId of letters, digits, `-`, `_`
//!   and `@` is accepted as well.
//!
//! The total length (64 by default) is checked by [`crate::limits`], not here.

const SEPARATOR: &str = "@@@";
const GROUP_MIN: usize = 7;
const GROUP_MAX: usize = 64;

/// Why a ClientId was refused (answered with 0x85 / CONNACK 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdError {
    #[error("ClientId is empty")]
    Empty,
    #[error("ClientId must be `<GroupId>@@@<DeviceId>`")]
    NotGroupAndDevice,
    #[error("GroupId must start with `GID_` or `GID-`")]
    GroupPrefix,
    #[error("GroupId must be 7 to 64 characters")]
    GroupLength,
    #[error("DeviceId must not be empty")]
    EmptyDevice,
    #[error("ClientId may contain only letters, digits, `-`, `_` (and `@@@` once)")]
    Characters,
}

/// The parts of an LMQ ClientId.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmqClientId<'a> {
    pub group_id: &'a str,
    pub device_id: &'a str,
}

fn plain_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Parse a ClientId in LMQ form.
pub fn parse(client_id: &str) -> Result<LmqClientId<'_>, ClientIdError> {
    if client_id.is_empty() {
        return Err(ClientIdError::Empty);
    }
    let (group_id, device_id) = client_id.split_once(SEPARATOR).ok_or(ClientIdError::NotGroupAndDevice)?;
    if !(group_id.starts_with("GID_") || group_id.starts_with("GID-")) {
        return Err(ClientIdError::GroupPrefix);
    }
    if !group_id.chars().all(plain_char) {
        return Err(ClientIdError::Characters);
    }
    // All ASCII from here on, so bytes = characters.
    if !(GROUP_MIN..=GROUP_MAX).contains(&group_id.len()) {
        return Err(ClientIdError::GroupLength);
    }
    if device_id.is_empty() {
        return Err(ClientIdError::EmptyDevice);
    }
    if !device_id.chars().all(plain_char) {
        return Err(ClientIdError::Characters);
    }
    Ok(LmqClientId { group_id, device_id })
}

/// Check a ClientId: LMQ form, or (with `allow_plain`) any id of allowed characters.
pub fn validate(client_id: &str, allow_plain: bool) -> Result<(), ClientIdError> {
    match parse(client_id) {
        Ok(_) => Ok(()),
        Err(_) if allow_plain && !client_id.is_empty() && client_id.chars().all(|c| plain_char(c) || c == '@') => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClientIdError::*;

    #[test]
    fn lmq_rules_table() {
        let g64 = format!("GID_{}", "x".repeat(60));
        let g65 = format!("GID_{}", "x".repeat(61));
        let ok64 = format!("{g64}@@@d");
        let bad65 = format!("{g65}@@@d");
        let table: Vec<(&str, Result<(), ClientIdError>)> = vec![
            ("GID_demo@@@dev1", Ok(())),
            ("GID-demo@@@dev-1_x", Ok(())),
            ("GID_abc@@@d", Ok(())), // 7 characters
            ("GID_ab@@@d", Err(GroupLength)),
            (&ok64, Ok(())),
            (&bad65, Err(GroupLength)),
            ("", Err(Empty)),
            ("GID_demo", Err(NotGroupAndDevice)),
            ("GID_demo@@dev", Err(NotGroupAndDevice)),
            ("gid_demo@@@dev", Err(GroupPrefix)),
            ("XID_demo@@@dev", Err(GroupPrefix)),
            ("GID_demo@@@", Err(EmptyDevice)),
            ("GID_de.mo@@@dev", Err(Characters)),
            ("GID_demo@@@de v", Err(Characters)),
            ("GID_demo@@@d@@@e", Err(Characters)),
            ("GID_démo@@@dev", Err(Characters)),
        ];
        for (id, want) in table {
            assert_eq!(validate(id, false), want, "{id:?}");
        }
        assert_eq!(parse("GID_demo@@@dev1"), Ok(LmqClientId { group_id: "GID_demo", device_id: "dev1" }));
    }

    #[test]
    fn plain_ids_only_when_allowed() {
        for id in ["c1", "sensor-7_a", "user@host"] {
            assert!(validate(id, false).is_err(), "{id:?} accepted without the switch");
            assert_eq!(validate(id, true), Ok(()), "{id:?}");
        }
        for id in ["", "a b", "a/b", "a+b", "é"] {
            assert!(validate(id, true).is_err(), "{id:?} accepted");
        }
        assert_eq!(validate("GID_demo@@@dev1", true), Ok(()));
    }
}
