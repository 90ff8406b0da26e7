//! The registry's vocabulary as types: names that are valid by construction and the closed
//! sets of states the schema checks. Pure: no I/O.

use std::fmt;
use std::str::FromStr;

/// A value that failed to parse, with the field it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// The field (as the API names it).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidField {
    /// A parse failure of `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Every type of event the outbox holds: those the schema's triggers write and those the
/// registry writes. A filter naming anything else is a mistake, not an empty result.
pub const EVENT_TYPES: &[&str] = &[
    "created",
    "published",
    "rolled_back",
    "unpublished",
    "enabled",
    "disabled",
    "archived",
    "desired_changed",
    "secret_changed",
    "reload_requested",
    "backfill_requested",
    "lease_acquired",
    "lease_released",
    "sync_conflict",
    "worker_starting",
    "worker_running",
    "worker_stalled",
    "worker_error",
    "worker_stopped",
    "reload_applied",
    "reload_rejected",
    "source_position_reset",
    "auto_disabled",
];

/// An org, project or datasource name: 1-128 characters of `[A-Za-z0-9_.-]`, starting with a
/// letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 128;

    /// Parses `value` as the name in `field`.
    ///
    /// # Errors
    /// Empty, too long, or with characters outside the allowed set.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, InvalidField> {
        if value.is_empty() {
            return Err(InvalidField::new(field, "must not be empty"));
        }
        if value.len() > Self::MAX_LEN {
            return Err(InvalidField::new(
                field,
                format!(
                    "is {} bytes long; at most {} allowed",
                    value.len(),
                    Self::MAX_LEN
                ),
            ));
        }
        if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(InvalidField::new(
                field,
                "must start with a letter or a digit",
            ));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(InvalidField::new(
                field,
                format!("contains {bad:?}; only letters, digits, '_', '-' and '.' are allowed"),
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest owner, in bytes.
pub const MAX_OWNER: usize = 256;
/// Most tags on a datasource.
pub const MAX_TAGS: usize = 64;
/// Longest tag, in bytes.
pub const MAX_TAG: usize = 128;
/// Longest description or version comment, in bytes.
pub const MAX_TEXT: usize = 4096;
/// Largest version config, in bytes of its JSON text (the schema's own limit).
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// Checks a datasource's tags: at most [`MAX_TAGS`], each 1 to [`MAX_TAG`] bytes.
///
/// # Errors
/// The first rule broken, as a problem of `tags`.
pub fn check_tags(tags: &[String]) -> Result<(), InvalidField> {
    if tags.len() > MAX_TAGS {
        return Err(InvalidField::new(
            "tags",
            format!("{} tags; at most {MAX_TAGS}", tags.len()),
        ));
    }
    if tags.iter().any(|t| t.is_empty() || t.len() > MAX_TAG) {
        return Err(InvalidField::new(
            "tags",
            format!("each tag must be 1 to {MAX_TAG} bytes"),
        ));
    }
    Ok(())
}

/// Checks that free text in `field` is at most `max` bytes.
///
/// # Errors
/// The text is longer.
pub fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), InvalidField> {
    if value.len() > max {
        return Err(InvalidField::new(
            field,
            format!("is {} bytes; at most {max} allowed", value.len()),
        ));
    }
    Ok(())
}

/// The top-level keys whose values differ between two configs, sorted (values are never
/// audited: they may hold credentials).
pub fn changed_keys(before: &serde_json::Value, after: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let b = before.as_object().unwrap_or(&empty);
    let a = after.as_object().unwrap_or(&empty);
    let mut keys: Vec<String> = b
        .keys()
        .chain(a.keys())
        .filter(|k| b.get(*k) != a.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Declares a closed set of lowercase states stored as text, with `as_str` and `FromStr`.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored text.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = InvalidField;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(InvalidField::new(
                        stringify!($name),
                        format!("unknown value {other:?}; expected one of {}", [$($text),+].join(", ")),
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Whether a datasource should run at all.
    DatasourceStatus {
        /// Runs its published version.
        Active = "active",
        /// Kept, not running.
        Disabled = "disabled",
        /// Retired; its name is free again.
        Archived = "archived",
    }
}

text_enum! {
    /// Where a configuration version is in its life.
    VersionState {
        /// Editable, not running.
        Draft = "draft",
        /// The one version that runs.
        Published = "published",
        /// Once published or abandoned; can be rolled back to if it was published.
        Archived = "archived",
    }
}

text_enum! {
    /// What the operators want of a datasource's worker.
    DesiredState {
        /// Run the published version.
        Running = "running",
        /// Keep it stopped.
        Stopped = "stopped",
    }
}

text_enum! {
    /// Where a worker is in `INIT → STARTING → RUNNING → ERROR → STOPPED`.
    WorkerStatus {
        /// Known, never started.
        Init = "init",
        /// Being built and started.
        Starting = "starting",
        /// Running and making progress.
        Running = "running",
        /// Failed; waiting for its backoff before the next start.
        Error = "error",
        /// Stopped on purpose.
        Stopped = "stopped",
        /// Failed too often within the window; restarts at the capped delay only.
        CrashLoop = "crash_loop",
        /// Alive but making no progress past its kind's threshold.
        Stalled = "stalled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_allowed_set() {
        for ok in ["a", "orders", "orders-v2.eu_1", &"x".repeat(128)] {
            assert_eq!(Name::parse("name", ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn names_refuse_empty_long_and_odd_characters() {
        assert_eq!(
            Name::parse("name", "").unwrap_err().reason,
            "must not be empty"
        );
        assert!(
            Name::parse("name", &"x".repeat(129))
                .unwrap_err()
                .reason
                .contains("at most 128")
        );
        assert!(
            Name::parse("org", "-lead")
                .unwrap_err()
                .reason
                .contains("start with")
        );
        let err = Name::parse("project", "a b").unwrap_err();
        assert_eq!(err.field, "project");
        assert!(err.reason.contains("' '"), "{}", err.reason);
        assert!(Name::parse("name", "x'; DROP TABLE datasources;--").is_err());
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in WorkerStatus::ALL {
            assert_eq!(s.as_str().parse::<WorkerStatus>().unwrap(), *s);
        }
        for s in VersionState::ALL {
            assert_eq!(s.as_str().parse::<VersionState>().unwrap(), *s);
        }
        let err = "running ".parse::<DatasourceStatus>().unwrap_err();
        assert!(
            err.reason
                .contains("expected one of active, disabled, archived")
        );
    }
}
