//! What a reload may change, decided field by field, so that a reload never reports a
//! change it does not apply.
//!
//! Every leaf of the configuration (a dotted path such as `limits.publish_rate`) belongs to
//! one subsystem in [`FIELDS`], which says whether it takes a new value live and who
//! applies it, or whether it needs a restart. [`Plan::new`] compares the running and the
//! new configuration leaf by leaf, sorts each change into live or restart, and puts the
//! running value back into the new configuration for each restart field, so the config the
//! relay then reports as "in force" is the one really in force. A field missing from the
//! table (a new one nobody classified) is treated as needing a restart and logged, and the
//! test that walks every field fails until it is classified.
//!
//! Owns: the table and the field-by-field comparison. Must not touch: the subsystems (the
//! runtime applies the plan: `Relay::reload`).

use serde::Serialize;
use toml::Value;

use crate::config::{Config, ConfigError};

/// How a field takes a new value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied at once by the named subsystem.
    Live(&'static str),
    /// Read once at start; the running value stays until a restart.
    Restart,
}

/// Each field, or a prefix that covers a table or array of them, and how it reloads.
/// Prefixes match whole path segments (`auth.jwt` covers `auth.jwt.keys`).
pub const FIELDS: &[(&str, Reload)] = &[
    ("listen", Reload::Restart),
    ("workers", Reload::Restart),
    ("pin_workers", Reload::Restart),
    ("io_backend", Reload::Restart),
    // Each worker's engine connects with these at start.
    ("cluster", Reload::Restart),
    ("auth.mode", Reload::Restart),
    // Only validation reads it, and the new file was validated with it.
    ("auth.allow_none_on_public", Reload::Live("validation")),
    (
        "auth.handshake_timeout",
        Reload::Live("workers (connections opened after the reload)"),
    ),
    ("auth.jwt", Reload::Live("token verifier")),
    ("connection.max_frame_len", Reload::Restart),
    ("connection.max_queued_bytes", Reload::Live("workers")),
    ("connection.max_rooms", Reload::Live("workers")),
    (
        "connection.sender_aliases",
        Reload::Live("workers (connections opened after the reload)"),
    ),
    ("connection.replay_page_bytes", Reload::Live("workers")),
    ("connection.restart_grace", Reload::Live("workers")),
    (
        "connection.send_buffer_bytes",
        Reload::Live("workers (connections opened after the reload)"),
    ),
    (
        "heartbeat",
        Reload::Live("workers (connections opened after the reload)"),
    ),
    ("retention", Reload::Live("workers (every room's history)")),
    ("shutdown", Reload::Live("workers")),
    ("control.listen", Reload::Restart),
    ("control", Reload::Live("control plane")),
    (
        "limits.max_rooms_per_user",
        Reload::Live("membership directory"),
    ),
    ("limits", Reload::Live("workers")),
    (
        "log.level",
        Reload::Live("log filter (the binary; RUST_LOG overrides it)"),
    ),
    ("log.format", Reload::Restart),
    // Each worker's log is opened (and recovered) with these at start.
    ("storage", Reload::Restart),
    // The sender and the workers' rules are set up once at start.
    ("handoff", Reload::Restart),
    // Turning TLS on or off is refused live by `Relay::reload` itself (a restart).
    ("tls", Reload::Live("TLS (new handshakes)")),
    ("websocket.listen", Reload::Restart),
    (
        "websocket",
        Reload::Live("WebSocket layer (new handshakes)"),
    ),
];

/// How `path` reloads: the most specific entry of [`FIELDS`] covering it, `None` if none.
pub fn classify(path: &str) -> Option<Reload> {
    FIELDS
        .iter()
        .filter(|(field, _)| covers(field, path))
        .max_by_key(|(field, _)| field.len())
        .map(|&(_, how)| how)
}

/// Whether the entry `field` covers `path` (equal, or a parent table of it).
pub fn covers(field: &str, path: &str) -> bool {
    path == field
        || path
            .strip_prefix(field)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// A reload decided: what changes live, what keeps its running value, and the
/// configuration that will then really be in force.
#[derive(Debug)]
pub struct Plan {
    /// Changed fields applied at once.
    pub live: Vec<String>,
    /// Changed fields whose running value stays until a restart.
    pub needs_restart: Vec<String>,
    /// The new configuration with the running value back in every restart field.
    pub effective: Config,
}

impl Plan {
    /// Compares `old` and `new` leaf by leaf.
    pub fn new(old: &Config, new: &Config) -> Result<Plan, ConfigError> {
        let old_v = to_value(old)?;
        let mut new_v = to_value(new)?;
        let mut changed = Vec::new();
        diff("", &old_v, &new_v, &mut changed);
        let mut live = Vec::new();
        let mut needs_restart = Vec::new();
        for path in changed {
            match classify(&path) {
                Some(Reload::Live(_)) => live.push(path),
                Some(Reload::Restart) => {
                    restore(&mut new_v, &old_v, &path);
                    needs_restart.push(path);
                }
                None => {
                    tracing::warn!(
                        "reload: `{path}` is not classified as live or restart; keeping its \
                         running value"
                    );
                    restore(&mut new_v, &old_v, &path);
                    needs_restart.push(path);
                }
            }
        }
        let effective = new_v
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                field: "(reload)",
                why: format!("cannot rebuild the configuration: {e}"),
            })?;
        Ok(Plan {
            live,
            needs_restart,
            effective,
        })
    }
}

/// A configuration as a TOML tree.
pub fn to_value(config: &impl Serialize) -> Result<Value, ConfigError> {
    Value::try_from(config).map_err(|e| ConfigError::Invalid {
        field: "(reload)",
        why: format!("cannot compare configurations: {e}"),
    })
}

/// The dotted paths of every leaf whose value differs (`limits.publish_rate`); tables are
/// walked, anything else (arrays such as `retention.override`) compares whole.
pub fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Table(a), Value::Table(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = join(path, key);
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff(&child, x, y, out),
                    _ => out.push(child),
                }
            }
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

/// `path.key`, or `key` at the top.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Copies the value at `path` from `old` into `new` (removing it when `old` has none).
fn restore(new: &mut Value, old: &Value, path: &str) {
    let mut segments: Vec<&str> = path.split('.').collect();
    let Some(last) = segments.pop() else {
        return;
    };
    let (mut n, mut o) = (new, Some(old));
    for seg in segments {
        let Some(table) = n.as_table_mut() else {
            return;
        };
        n = table
            .entry(seg.to_string())
            .or_insert_with(|| Value::Table(toml::Table::new()));
        o = o.and_then(|v| v.get(seg));
    }
    let Some(table) = n.as_table_mut() else {
        return;
    };
    match o.and_then(|v| v.get(last)) {
        Some(value) => {
            table.insert(last.to_string(), value.clone());
        }
        None => {
            table.remove(last);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    #[test]
    fn the_most_specific_entry_wins() {
        assert_eq!(classify("control.listen"), Some(Reload::Restart));
        assert!(matches!(classify("control.api_key"), Some(Reload::Live(_))));
        assert!(matches!(
            classify("limits.max_rooms_per_user"),
            Some(Reload::Live("membership directory"))
        ));
        assert!(matches!(classify("auth.jwt.keys"), Some(Reload::Live(_))));
        assert_eq!(
            classify("listen_backlog"),
            None,
            "prefixes match whole segments"
        );
        assert_eq!(classify("nothing.at.all"), None);
    }

    #[test]
    fn a_plan_sorts_changes_and_keeps_running_values_for_restart_fields() {
        let old = Config::default();
        let mut new = Config::default();
        new.limits.publish_rate = 100.0;
        new.retention.max_messages = 5;
        new.workers = 3;
        new.control.api_key = Some("a-new-key-of-16-bytes".into());
        let plan = Plan::new(&old, &new).unwrap();
        assert_eq!(
            plan.live,
            [
                "control.api_key",
                "limits.publish_rate",
                "retention.max_messages"
            ]
        );
        assert_eq!(plan.needs_restart, ["workers"]);
        assert_eq!(plan.effective.workers, old.workers);
        assert_eq!(plan.effective.limits.publish_rate, 100.0);
        assert!(Plan::new(&old, &old).unwrap().live.is_empty());
    }

    #[test]
    fn restoring_a_field_absent_before_removes_it() {
        let old = Config::default();
        let mut new = Config::default();
        new.control.listen = "127.0.0.1:9".into();
        let plan = Plan::new(&old, &new).unwrap();
        assert_eq!(plan.needs_restart, ["control.listen"]);
        assert_eq!(plan.effective.control.listen, old.control.listen);
    }
}
