//! `[handoff]`: where offline hand-offs go, how they are signed, batched, retried and
//! bounded, and which rooms fire them (per-prefix rules; channels never do).
//!
//! Owns: the section's fields, defaults and validation (fail fast, naming the field). Must
//! not touch: sockets, threads, worker state.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, humantime_secs, humantime_secs_opt};
use crate::ids::RoomName;

/// The fewest bytes a signing secret may have.
pub const MIN_SECRET_LEN: usize = 16;

/// `[handoff]`: when a member's phone has not received (acked) a message within `delay`, the
/// relay POSTs a signed JSON batch to the app server at `url`, which decides what to push.
/// Off while `url` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    /// The app server's endpoint, `http://host[:port]/path`; empty: no hand-offs. Needs
    /// `control.listen` (the sender runs on the control thread). Default: empty.
    pub url: String,
    /// File holding the HMAC-SHA256 signing secret (at least 16 bytes after a trailing
    /// newline is trimmed). Required (or `secret`) with `url`. Default: none.
    pub secret_file: Option<std::path::PathBuf>,
    /// The signing secret inline (development; prefer `secret_file`). Default: none.
    pub secret: Option<String>,
    /// A member whose connections have not acked a message within this long gets a
    /// hand-off. Default 10 s.
    #[serde(with = "humantime_secs")]
    pub delay: Duration,
    /// Items per POST at most. Default 100.
    pub batch_max: usize,
    /// A batch that is not full is sent once its oldest item has waited this long.
    /// Default 1 s.
    #[serde(with = "humantime_secs")]
    pub batch_interval: Duration,
    /// Items held (queued plus in flight) at most; past it the oldest queued item is
    /// dropped and counted (`pabal_handoff_dropped_total{reason="queue_full"}`).
    /// Default 100,000.
    pub queue_max: usize,
    /// One POST (connect, send, answer) must finish within this, or it is retried.
    /// Default 10 s.
    #[serde(with = "humantime_secs")]
    pub timeout: Duration,
    /// The first pause after a failed POST; it doubles per failure up to `retry_max`, each
    /// pause drawn uniformly from its upper half (jitter). Default 1 s.
    #[serde(with = "humantime_secs")]
    pub retry_initial: Duration,
    /// The longest pause between attempts. Default 60 s.
    #[serde(with = "humantime_secs")]
    pub retry_max: Duration,
    /// Per-prefix rules for rooms; the first whose prefix matches a room's name wins.
    /// Channels never fire hand-offs: they keep no delivered markers, and a brand channel
    /// of millions must not fire one webhook per subscriber (the app server that publishes
    /// a broadcast pushes it itself).
    pub rooms: Vec<HandoffRule>,
}

/// One `[[handoff.rooms]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffRule {
    /// Applies to rooms whose name starts with this.
    pub prefix: String,
    /// Whether they fire hand-offs. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Their delay; default: `handoff.delay`.
    #[serde(default, with = "humantime_secs_opt")]
    pub delay: Option<Duration>,
}

fn yes() -> bool {
    true
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            url: String::new(),
            secret_file: None,
            secret: None,
            delay: Duration::from_secs(10),
            batch_max: 100,
            batch_interval: Duration::from_secs(1),
            queue_max: 100_000,
            timeout: Duration::from_secs(10),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            rooms: Vec::new(),
        }
    }
}

/// Where a parsed `url` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` as written (the `Host` header).
    pub authority: String,
    /// The host to resolve.
    pub host: String,
    /// The port (80 unless written).
    pub port: u16,
    /// Path and query (at least `/`).
    pub path: String,
}

fn invalid(field: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        why: why.into(),
    }
}

impl HandoffConfig {
    /// Whether hand-offs are on.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// The delay for a room, or `None` if it fires no hand-offs (a channel never does).
    pub fn delay_for(&self, room: &RoomName) -> Option<Duration> {
        if room.channel {
            return None;
        }
        match self
            .rooms
            .iter()
            .find(|r| room.name.as_str().starts_with(&r.prefix))
        {
            Some(rule) => rule.enabled.then(|| rule.delay.unwrap_or(self.delay)),
            None => Some(self.delay),
        }
    }

    /// The parsed `url` (only plain `http://`).
    pub fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        let uri: hyper::Uri = self
            .url
            .parse()
            .map_err(|e| invalid("handoff.url", format!("`{}`: {e}", self.url)))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "handoff.url",
                    "https is not supported: point it at the app server over a private \
                     network, or at a TLS-originating proxy on loopback",
                ));
            }
            _ => return Err(invalid("handoff.url", "must start with http://")),
        }
        let Some(authority) = uri.authority() else {
            return Err(invalid("handoff.url", "names no host"));
        };
        if authority.as_str().contains('@') {
            return Err(invalid(
                "handoff.url",
                "credentials in the URL are not supported (requests are signed instead)",
            ));
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Ok(Endpoint {
            authority: authority.as_str().to_string(),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(80),
            path: if path.is_empty() { "/" } else { path }.to_string(),
        })
    }

    /// The signing secret, read from the file or taken inline; `None` when neither is set.
    pub fn load_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        if let Some(path) = &self.secret_file {
            let text = std::fs::read(path).map_err(|e| {
                invalid(
                    "handoff.secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let secret = text
                .strip_suffix(b"\n")
                .map(|k| k.strip_suffix(b"\r").unwrap_or(k))
                .unwrap_or(&text);
            check_secret("handoff.secret_file", secret)?;
            return Ok(Some(secret.to_vec()));
        }
        if let Some(secret) = &self.secret {
            check_secret("handoff.secret", secret.as_bytes())?;
            return Ok(Some(secret.as_bytes().to_vec()));
        }
        Ok(None)
    }

    /// Checks `[handoff]` without reading files (the secret file is read by
    /// `Config::check_files` and at start). `control_on`: whether `control.listen` is set.
    pub fn validate(&self, control_on: bool) -> Result<(), ConfigError> {
        if self.secret.is_some() && self.secret_file.is_some() {
            return Err(invalid(
                "handoff.secret",
                "set either handoff.secret or handoff.secret_file, not both",
            ));
        }
        if let Some(secret) = &self.secret {
            check_secret("handoff.secret", secret.as_bytes())?;
        }
        if self.enabled() {
            self.endpoint()?;
            if self.secret.is_none() && self.secret_file.is_none() {
                return Err(invalid(
                    "handoff.secret_file",
                    "required with handoff.url (every batch is signed)",
                ));
            }
            if !control_on {
                return Err(invalid(
                    "handoff.url",
                    "needs control.listen: the sender runs on the control thread",
                ));
            }
        }
        if !(1..=10_000).contains(&self.batch_max) {
            return Err(invalid("handoff.batch_max", "must be 1 ..= 10000"));
        }
        if self.queue_max < self.batch_max || self.queue_max > 100_000_000 {
            return Err(invalid(
                "handoff.queue_max",
                "must be handoff.batch_max ..= 100000000",
            ));
        }
        for (field, value) in [
            ("handoff.delay", self.delay),
            ("handoff.batch_interval", self.batch_interval),
            ("handoff.timeout", self.timeout),
            ("handoff.retry_initial", self.retry_initial),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be > 0"));
            }
        }
        if self.retry_max < self.retry_initial {
            return Err(invalid(
                "handoff.retry_max",
                "must be at least handoff.retry_initial",
            ));
        }
        for rule in &self.rooms {
            if rule.prefix.is_empty() {
                return Err(invalid(
                    "handoff.rooms.prefix",
                    "must not be empty (set handoff.delay instead)",
                ));
            }
            if rule.delay.is_some_and(|d| d.is_zero()) {
                return Err(invalid("handoff.rooms.delay", "must be > 0"));
            }
        }
        Ok(())
    }
}

fn check_secret(field: &'static str, secret: &[u8]) -> Result<(), ConfigError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(invalid(
            field,
            format!(
                "the secret has {} bytes; it must have at least {MIN_SECRET_LEN}",
                secret.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::config::Config;
    use pabal_codec::Text;

    fn room(channel: bool, name: &'static str) -> RoomName {
        RoomName::new(channel, Text::from_static(name))
    }

    #[test]
    fn rooms_fire_and_channels_never_do() {
        let c = HandoffConfig::default();
        assert_eq!(
            c.delay_for(&room(false, "group:1")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(c.delay_for(&room(true, "brand:acme")), None);
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let c = Config::from_toml(
            "[[handoff.rooms]]\nprefix = \"chan:\"\nenabled = false\n\
             [[handoff.rooms]]\nprefix = \"dm:\"\ndelay = \"3s\"\n\
             [[handoff.rooms]]\nprefix = \"d\"\nenabled = false\n",
        )
        .unwrap();
        // --check-config prints rules back, a rule without its own delay included.
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.handoff, c.handoff);
        let c = c.handoff;
        assert_eq!(c.delay_for(&room(false, "chan:x")), None);
        assert_eq!(
            c.delay_for(&room(false, "dm:1:2")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(c.delay_for(&room(false, "door")), None);
        assert_eq!(
            c.delay_for(&room(false, "news")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(c.delay_for(&room(true, "dm:news")), None, "never a channel");
    }

    #[test]
    fn bad_values_name_their_field() {
        let secret = "secret = \"0123456789abcdef\"\n";
        for (toml, field) in [
            (
                "[handoff]\nurl = \"https://x/\"\nsecret = \"0123456789abcdef\"".to_string(),
                "handoff.url",
            ),
            ("[handoff]\nurl = \"ftp://x/\"".to_string(), "handoff.url"),
            (
                "[handoff]\nurl = \"http://127.0.0.1:9/h\"".to_string(),
                "handoff.secret_file",
            ),
            (
                "[handoff]\nsecret = \"short\"".to_string(),
                "handoff.secret",
            ),
            (
                format!("[control]\nlisten = \"\"\n[handoff]\nurl = \"http://h/\"\n{secret}"),
                "handoff.url",
            ),
            ("[handoff]\nbatch_max = 0".to_string(), "handoff.batch_max"),
            (
                "[handoff]\nbatch_max = 10\nqueue_max = 5".to_string(),
                "handoff.queue_max",
            ),
            ("[handoff]\ndelay = \"0s\"".to_string(), "handoff.delay"),
            (
                "[handoff]\nretry_initial = \"10s\"\nretry_max = \"1s\"".to_string(),
                "handoff.retry_max",
            ),
            (
                "[[handoff.rooms]]\nprefix = \"\"".to_string(),
                "handoff.rooms.prefix",
            ),
        ] {
            let err = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(err.contains(field), "{toml}: {err}");
        }
    }

    #[test]
    fn a_plain_http_url_parses() {
        let c = Config::from_toml(
            "[handoff]\nurl = \"http://app.internal:8080/push?x=1\"\nsecret = \"0123456789abcdef\"",
        )
        .unwrap()
        .handoff;
        let e = c.endpoint().unwrap();
        assert_eq!(e.host, "app.internal");
        assert_eq!(e.port, 8080);
        assert_eq!(e.authority, "app.internal:8080");
        assert_eq!(e.path, "/push?x=1");
        assert_eq!(c.load_secret().unwrap().unwrap(), b"0123456789abcdef");
    }

    #[test]
    fn the_secret_file_is_read_by_check_files_and_must_hold_16_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.key");
        let toml = format!(
            "[handoff]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = \"{}\"",
            path.display()
        );
        let c = Config::from_toml(&toml).unwrap();
        let err = c.check_files().unwrap_err().to_string();
        assert!(err.contains("handoff.secret_file"), "{err}");
        std::fs::write(&path, "short\n").unwrap();
        let err = c.check_files().unwrap_err().to_string();
        assert!(err.contains("handoff.secret_file"), "{err}");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        c.check_files().unwrap();
        assert_eq!(
            c.handoff.load_secret().unwrap().unwrap(),
            b"0123456789abcdef"
        );
    }
}
