//! Subscription trie: topic filter levels → subscribers, so that routing a message costs
//! the number of levels and matches, not the number of subscriptions.

use std::collections::HashMap;

use super::SessionId;
use crate::protocol::QoS;

#[derive(Default, Debug)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    hash: Option<Box<Node>>,
    /// Plain subscriptions ending at this node: session → granted QoS.
    subscribers: HashMap<SessionId, QoS>,
    /// Shared subscriptions ending here: group → members (session, QoS), in join order.
    groups: HashMap<Box<str>, Group>,
}

#[derive(Default, Debug)]
pub struct Group {
    /// The full subscription as clients write it: `$share/<group>/<filter>`.
    pub full: std::sync::Arc<str>,
    pub members: Vec<(SessionId, QoS)>,
    /// Round-robin cursor.
    pub next: usize,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.subscribers.is_empty()
            && self.groups.is_empty()
    }
}

/// A match for one plain subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainMatch {
    pub session: SessionId,
    pub qos: QoS,
}

#[derive(Default, Debug)]
pub struct Trie {
    root: Node,
}

impl Trie {
    fn node_mut(&mut self, filter: &str) -> &mut Node {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = match level {
                "+" => node.plus.get_or_insert_with(Box::default),
                "#" => node.hash.get_or_insert_with(Box::default),
                _ => node.children.entry(level.into()).or_default(),
            };
        }
        node
    }

    /// Whether some subscription starts with a wildcard (`#`, `+/...`): it reads every parent
    /// topic, so every core topic must be tailed.
    pub fn has_root_wildcard(&self) -> bool {
        self.root.plus.is_some() || self.root.hash.is_some()
    }

    /// Add or replace a plain subscription. Returns true if it is new.
    pub fn insert(&mut self, filter: &str, session: SessionId, qos: QoS) -> bool {
        self.node_mut(filter).subscribers.insert(session, qos).is_none()
    }

    /// Add or replace a shared subscription. Returns true if it is new.
    pub fn insert_shared(&mut self, group: &str, filter: &str, session: SessionId, qos: QoS) -> bool {
        let g = self
            .node_mut(filter)
            .groups
            .entry(group.into())
            .or_insert_with(|| Group { full: format!("$share/{group}/{filter}").into(), ..Group::default() });
        match g.members.iter_mut().find(|(s, _)| *s == session) {
            Some(m) => {
                m.1 = qos;
                false
            }
            None => {
                g.members.push((session, qos));
                true
            }
        }
    }

    /// Remove a subscription (`group` for shared ones). Returns true if it existed.
    pub fn remove(&mut self, group: Option<&str>, filter: &str, session: SessionId) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut self.root, &levels, group, session)
    }

    /// Every plain subscriber matching `topic`, and for each matching shared group a
    /// mutable handle to pick a member from.
    pub fn matches<'a>(
        &'a mut self,
        topic: &str,
        plain: &mut Vec<PlainMatch>,
        groups: &mut Vec<(&'a str, &'a mut Group)>,
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        collect(&mut self.root, &levels, 0, dollar, plain, groups);
    }
}

fn remove_at(node: &mut Node, levels: &[&str], group: Option<&str>, session: SessionId) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => node.subscribers.remove(&session).is_some(),
            Some(g) => {
                let Some(grp) = node.groups.get_mut(g) else { return false };
                let before = grp.members.len();
                grp.members.retain(|(s, _)| *s != session);
                let removed = grp.members.len() != before;
                if grp.members.is_empty() {
                    node.groups.remove(g);
                }
                removed
            }
        };
    };
    let (removed, empty) = match *first {
        "+" => match node.plus.as_deref_mut() {
            Some(child) => (remove_at(child, rest, group, session), child.is_empty()),
            None => return false,
        },
        "#" => match node.hash.as_deref_mut() {
            Some(child) => (remove_at(child, rest, group, session), child.is_empty()),
            None => return false,
        },
        level => match node.children.get_mut(level) {
            Some(child) => (remove_at(child, rest, group, session), child.is_empty()),
            None => return false,
        },
    };
    if empty {
        match *first {
            "+" => node.plus = None,
            "#" => node.hash = None,
            level => {
                node.children.remove(level);
            }
        }
    }
    removed
}

fn collect<'a>(
    node: &'a mut Node,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    plain: &mut Vec<PlainMatch>,
    groups: &mut Vec<(&'a str, &'a mut Group)>,
) {
    let wildcard_ok = !(dollar && depth == 0);
    // Split the borrows of `node` so every branch can be visited.
    let Node { children, plus, hash, subscribers, groups: here } = node;
    // `#` also matches the parent level itself ("sport/#" matches "sport").
    if wildcard_ok {
        if let Some(h) = hash.as_deref_mut() {
            gather(&h.subscribers, &mut h.groups, plain, groups);
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        gather(subscribers, here, plain, groups);
        return;
    };
    if let Some(child) = children.get_mut(*first) {
        collect(child, rest, depth + 1, dollar, plain, groups);
    }
    if wildcard_ok {
        if let Some(p) = plus.as_deref_mut() {
            collect(p, rest, depth + 1, dollar, plain, groups);
        }
    }
}

fn gather<'a>(
    subscribers: &HashMap<SessionId, QoS>,
    here: &'a mut HashMap<Box<str>, Group>,
    plain: &mut Vec<PlainMatch>,
    groups: &mut Vec<(&'a str, &'a mut Group)>,
) {
    plain.extend(subscribers.iter().map(|(s, q)| PlainMatch { session: *s, qos: *q }));
    groups.extend(here.iter_mut().map(|(g, grp)| (&**g, grp)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(t: &mut Trie, topic: &str) -> Vec<SessionId> {
        let mut p = Vec::new();
        let mut g = Vec::new();
        t.matches(topic, &mut p, &mut g);
        let mut ids: Vec<_> = p.iter().map(|m| m.session).collect();
        ids.sort();
        ids
    }

    #[test]
    fn trie_agrees_with_the_matcher() {
        let filters = ["a/b/c", "a/+/c", "a/#", "#", "+/+/+", "+", "a/b", "$SYS/#", "+/b/#", "a/b/c/#"];
        let topics = ["a/b/c", "a/b", "a", "b/b/c", "$SYS/x", "a/b/c/d", "x", "/b/c"];
        let mut t = Trie::default();
        for (i, f) in filters.iter().enumerate() {
            t.insert(f, i as u64, QoS::AtMostOnce);
        }
        for topic in topics {
            let expected: Vec<u64> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| super::super::topic::matches(f, topic))
                .map(|(i, _)| i as u64)
                .collect();
            assert_eq!(plain(&mut t, topic), expected, "topic {topic}");
        }
    }

    #[test]
    fn remove_prunes_and_keeps_others() {
        let mut t = Trie::default();
        t.insert("a/+", 1, QoS::AtLeastOnce);
        t.insert("a/+", 2, QoS::AtLeastOnce);
        assert!(t.remove(None, "a/+", 1));
        assert!(!t.remove(None, "a/+", 1));
        assert_eq!(plain(&mut t, "a/x"), vec![2]);
        assert!(t.remove(None, "a/+", 2));
        assert!(t.root.is_empty());
    }

    #[test]
    fn shared_groups_are_found() {
        let mut t = Trie::default();
        t.insert_shared("g", "a/#", 1, QoS::AtLeastOnce);
        t.insert_shared("g", "a/#", 2, QoS::AtLeastOnce);
        let mut p = Vec::new();
        let mut g = Vec::new();
        t.matches("a/b", &mut p, &mut g);
        assert!(p.is_empty());
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].1.members.len(), 2);
        drop(g);
        assert!(t.remove(Some("g"), "a/#", 1));
        assert!(t.remove(Some("g"), "a/#", 2));
        assert!(t.root.is_empty());
    }
}
