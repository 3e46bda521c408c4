//! MQTT topic names and topic filters: validation and matching [MQTT-4.7].

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic must not be empty [MQTT-4.7.3-1]")]
    Empty,
    #[error("topic name must not contain wildcards [MQTT-3.3.2-2]")]
    WildcardInName,
    #[error("`#` must be the last level of a filter, alone [MQTT-4.7.1-2]")]
    BadMultiLevelWildcard,
    #[error("`+` must occupy a whole level [MQTT-4.7.1-3]")]
    BadSingleLevelWildcard,
    #[error(
        "shared subscription must be `$share/<group>/<filter>` with a non-empty group without wildcards [MQTT-4.8.2-1]"
    )]
    BadSharedSubscription,
}

/// Check a topic name (PUBLISH): non-empty, no wildcards.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Check a topic filter (SUBSCRIBE), without the `$share/` prefix.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::BadMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::BadSingleLevelWildcard);
        }
    }
    Ok(())
}

/// A parsed subscription filter: plain, or shared by a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    /// Share group name for `$share/<group>/<filter>`.
    pub group: Option<&'a str>,
    /// The filter proper.
    pub filter: &'a str,
}

/// Split off and check a `$share/<group>/` prefix, then validate the filter.
pub fn parse_filter(raw: &str) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadSharedSubscription)?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return Err(TopicError::BadSharedSubscription);
        }
        validate_filter(filter)?;
        Ok(ParsedFilter { group: Some(group), filter })
    } else {
        validate_filter(raw)?;
        Ok(ParsedFilter { group: None, filter: raw })
    }
}

/// Does `filter` match topic `name`? Wildcards at the first level do not match names that
/// start with `$` [MQTT-4.7.2-1].
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// First level of a topic name or filter: the LMQ parent topic.
pub fn parent(topic: &str) -> &str {
    topic.split('/').next().unwrap_or(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("#", "a/b/c"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/broker", "$SYS/broker"));
        assert!(matches("$SYS/#", "$SYS/broker"));
        assert!(matches("$SYS/+", "$SYS/broker"));
    }

    #[test]
    fn invalid_filters_are_refused() {
        assert_eq!(validate_filter("a/#/b"), Err(TopicError::BadMultiLevelWildcard));
        assert_eq!(validate_filter("a#"), Err(TopicError::BadMultiLevelWildcard));
        assert_eq!(validate_filter("a/b+"), Err(TopicError::BadSingleLevelWildcard));
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
        assert!(validate_filter("+/a/#").is_ok());
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
    }

    #[test]
    fn shared_filters_are_parsed() {
        let p = parse_filter("$share/g1/a/+").unwrap();
        assert_eq!(p, ParsedFilter { group: Some("g1"), filter: "a/+" });
        assert_eq!(parse_filter("$share//a"), Err(TopicError::BadSharedSubscription));
        assert_eq!(parse_filter("$share/g"), Err(TopicError::BadSharedSubscription));
        assert_eq!(parse_filter("a/b").unwrap().group, None);
    }

    #[test]
    fn parent_is_the_first_level() {
        assert_eq!(parent("sensors/room1/temp"), "sensors");
        assert_eq!(parent("sensors"), "sensors");
    }
}
