//! Topic permissions: which topic names a client may publish to and which topic filters it
//! may subscribe to.
//!
//! An [`Acl`] is two lists of granted topic filters. The rules:
//!
//! - **Publish** to topic name `t` is allowed when a publish filter matches `t` (MQTT matching,
//!   [`crate::router::topic::matches`]).
//! - **P2P**: publish to `<parent>/p2p/<ClientId>` is also allowed when a publish filter
//!   matches the parent topic name `<parent>` itself (`parent`, `parent/#`, `+`, `#`): the
//!   right to publish to a parent topic includes sending P2P messages through it, as in LMQ.
//!   `parent/sub/#` does not grant P2P on `parent`.
//! - **Subscribe** to filter `f` (optionally `$share/<group>/f`) is allowed when a subscribe
//!   filter *covers* `f`: every topic name `f` can match is matched by the granted filter.
//!   `a/#` covers `a`, `a/b`, `a/+/c`, `a/#`; `a/+` covers `a/b` and `a/+` but not `a/#`
//!   (which also matches `a` and `a/b/c`); `#` covers everything except filters whose first
//!   level starts with `$` (wildcards never match `$` topics). The share group plays no part.
//!
//! Granted filters are validated when the `Acl` is built, so checks cannot fail on them; a
//! requested name or filter that is not valid is simply not allowed. This module decides
//! only; it does not log or count.

use crate::router::mapping::p2p_target;
use crate::router::topic::{matches, parse_filter, validate_filter, validate_name};

/// Publish and subscribe permissions as topic filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

/// A granted filter that is not a valid plain topic filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{filter}` is not a valid topic filter: {reason}")]
pub struct AclError {
    pub filter: String,
    pub reason: String,
}

fn check(filters: &[String]) -> Result<(), AclError> {
    for f in filters {
        if f.starts_with("$share/") {
            return Err(AclError { filter: f.clone(), reason: "grants are plain filters, without `$share/`".into() });
        }
        validate_filter(f).map_err(|e| AclError { filter: f.clone(), reason: e.to_string() })?;
    }
    Ok(())
}

impl Acl {
    /// Build from granted filters; each must be a valid plain topic filter.
    pub fn new(publish: Vec<String>, subscribe: Vec<String>) -> Result<Acl, AclError> {
        check(&publish)?;
        check(&subscribe)?;
        Ok(Acl { publish, subscribe })
    }

    /// Everything allowed (`#` both ways).
    pub fn allow_all() -> Acl {
        Acl { publish: vec!["#".into()], subscribe: vec!["#".into()] }
    }

    pub fn publish_filters(&self) -> &[String] {
        &self.publish
    }

    pub fn subscribe_filters(&self) -> &[String] {
        &self.subscribe
    }

    /// May a client publish to topic name `topic`? (See the module docs for P2P.)
    pub fn can_publish(&self, topic: &str) -> bool {
        if validate_name(topic).is_err() {
            return false;
        }
        if self.publish.iter().any(|f| matches(f, topic)) {
            return true;
        }
        match (p2p_target(topic), topic.split_once('/')) {
            (Some(_), Some((parent, _))) => self.publish.iter().any(|f| matches(f, parent)),
            _ => false,
        }
    }

    /// May a client subscribe to `requested` (plain or `$share/<group>/<filter>`)?
    pub fn can_subscribe(&self, requested: &str) -> bool {
        match parse_filter(requested) {
            Ok(parsed) => self.subscribe.iter().any(|granted| covers(granted, parsed.filter)),
            Err(_) => false,
        }
    }

    /// Union of two ACLs (several tokens of one connection).
    pub fn union(&self, other: &Acl) -> Acl {
        let merge = |a: &[String], b: &[String]| {
            let mut out = a.to_vec();
            for f in b {
                if !out.contains(f) {
                    out.push(f.clone());
                }
            }
            out
        };
        Acl { publish: merge(&self.publish, &other.publish), subscribe: merge(&self.subscribe, &other.subscribe) }
    }
}

/// Does granted filter `granted` match every topic name that `requested` can match?
/// Both must be valid plain filters.
pub fn covers(granted: &str, requested: &str) -> bool {
    let wildcard_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    // A leading wildcard never matches `$` topics [MQTT-4.7.2-1]; a requested filter with a
    // literal `$` first level only matches such topics.
    if requested.starts_with('$') && wildcard_first(granted) {
        return false;
    }
    let mut g = granted.split('/');
    let mut r = requested.split('/');
    loop {
        match (g.next(), r.next()) {
            (Some("#"), _) => return true,
            // `a/#` also matches `a`, which `a/+` or `a/b` do not.
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(gl), Some(rl)) if gl == rl && rl != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(publish: &[&str], subscribe: &[&str]) -> Acl {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        Acl::new(v(publish), v(subscribe)).unwrap()
    }

    #[test]
    fn subscribe_coverage_table() {
        let table: &[(&str, &str, bool)] = &[
            ("a/#", "a", true),
            ("a/#", "a/b", true),
            ("a/#", "a/+/c", true),
            ("a/#", "a/#", true),
            ("a/#", "b/#", false),
            ("a/#", "#", false),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/b", "a/b", true),
            ("a/b", "a/+", false),
            ("a/b", "a/b/c", false),
            ("+/b", "x/b", true),
            ("+/b", "+/b", true),
            ("+/b", "+/+", false),
            ("a/+/#", "a/#", false),
            ("a/+/#", "a/x/#", true),
            ("a/+/#", "a/x", true),
            ("#", "#", true),
            ("#", "a/+/c", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("", "a", false),
        ];
        for (granted, requested, want) in table {
            assert_eq!(covers(granted, requested), *want, "covers({granted:?}, {requested:?})");
        }
    }

    #[test]
    fn subscribe_with_share_prefix_uses_the_inner_filter() {
        let a = acl(&[], &["sensors/#"]);
        assert!(a.can_subscribe("$share/g1/sensors/+/temp"));
        assert!(a.can_subscribe("sensors/room1"));
        assert!(!a.can_subscribe("$share/g1/other/#"));
        assert!(!a.can_subscribe("$share/sensors/#"), "group without filter is not valid");
        assert!(!a.can_subscribe("sensors/#/x"), "invalid filter");
        assert!(!a.can_subscribe("#"));
    }

    #[test]
    fn publish_table_with_p2p() {
        let a = acl(&["sensors/#", "cmd", "alerts/+/high"], &[]);
        let table: &[(&str, bool)] = &[
            ("sensors", true),
            ("sensors/room1/temp", true),
            ("cmd", true),
            ("cmd/x", false),
            ("cmd/p2p/GID_a@@@d1", true), // P2P through a parent the key may publish to
            ("alerts/x/high", true),
            ("alerts/p2p/GID_a@@@d1", false), // `alerts/+/high` does not grant the parent
            ("other/p2p/GID_a@@@d1", false),
            ("cmd/p2p/", false),
            ("sensors/+", false), // not a topic name
            ("", false),
        ];
        for (topic, want) in table {
            assert_eq!(a.can_publish(topic), *want, "can_publish({topic:?})");
        }
        let b = acl(&["x/p2p/+"], &[]);
        assert!(b.can_publish("x/p2p/GID_a@@@d1"), "a filter matching the full P2P topic also grants it");
        assert!(!b.can_publish("x/y"));
    }

    #[test]
    fn grants_are_validated_and_empty_acl_allows_nothing() {
        assert!(Acl::new(vec!["a/#/b".into()], vec![]).is_err());
        assert!(Acl::new(vec![], vec!["$share/g/a".into()]).is_err());
        let none = Acl::default();
        assert!(!none.can_publish("a") && !none.can_subscribe("a"));
        let all = Acl::allow_all();
        assert!(all.can_publish("a/b") && all.can_subscribe("a/#") && !all.can_publish("$SYS/x"));
        let u = acl(&["a"], &[]).union(&acl(&["b", "a"], &["c"]));
        assert_eq!(u.publish_filters(), ["a".to_string(), "b".to_string()]);
        assert_eq!(u.subscribe_filters(), ["c".to_string()]);
    }
}
