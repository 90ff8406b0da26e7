//! How long the database may keep dsreg waiting: one set of bounds for every connection dsreg
//! makes (the pools, the listener, migrations, the CLI subcommands), applied by
//! [`super::Target::parse_with`] and nowhere else.
//!
//! - **Connect**: the whole startup (TCP, TLS, authentication, the server's ready answer) is
//!   bounded, not only the TCP connect; a peer that accepts and then says nothing is given up
//!   on. With several hosts (`host=a,b`) each gets the bound.
//! - **Dead peers**: TCP keepalives (idle, interval, count) find a peer gone silent while a
//!   connection idles, and `tcp_user_timeout` one that stops acknowledging what is sent.
//! - **Statements**: `statement_timeout` is set in the startup packet's `options`
//!   (`-c statement_timeout=…`), so it holds on every connection, a transaction pooler's
//!   included, without a session `SET`.
//! - **Pooled connections** that idled for a while are checked with an empty query, within
//!   the connect bound, before they are handed out; once one fails, those idle since before
//!   the failure are dropped unchecked ([`super::pool_with`]).
//!
//! The flags give the defaults; libpq's URL parameters (`connect_timeout`, `keepalives`,
//! `keepalives_idle`, `keepalives_interval`, `keepalives_count`, `tcp_user_timeout`, and a
//! `statement_timeout` in `options`) win where a connection string sets them, in libpq's units
//! (seconds, and milliseconds for `tcp_user_timeout`).

use std::collections::HashMap;
use std::time::Duration;

use super::tls::TlsError;

/// The URL parameters read here rather than by tokio-postgres (which takes
/// `tcp_user_timeout` in seconds and knows `keepalives_count` only as `keepalives_retries`).
pub(crate) const URL_KEYS: [&str; 7] = [
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "keepalives_retries",
    "tcp_user_timeout",
];

/// The bounds of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectOptions {
    /// How long the whole startup of one connection may take per host (`None`: unbounded).
    pub connect_timeout: Option<Duration>,
    /// The server's `statement_timeout` (`None`: the server's own setting).
    pub statement_timeout: Option<Duration>,
    /// Whether TCP keepalives are sent.
    pub keepalives: bool,
    /// Idle time before the first keepalive (whole seconds, at least one).
    pub keepalive_idle: Duration,
    /// Time between unanswered keepalives (whole seconds, at least one).
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the connection is dropped.
    pub keepalive_count: u32,
    /// How long sent data may stay unacknowledged (`None`: the system's default).
    pub tcp_user_timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    /// Connect 5 s, statements 30 s, keepalives after 10 s idle every 2 s (3 unanswered drop
    /// the connection), unacknowledged data 20 s.
    fn default() -> Self {
        Self {
            connect_timeout: Some(Duration::from_secs(5)),
            statement_timeout: Some(Duration::from_secs(30)),
            keepalives: true,
            keepalive_idle: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(2),
            keepalive_count: 3,
            tcp_user_timeout: Some(Duration::from_secs(20)),
        }
    }
}

/// A duration from milliseconds where 0 means "no bound".
pub fn millis_or_none(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn whole_number(key: &str, value: &str) -> Result<i64, TlsError> {
    value
        .trim()
        .parse::<i64>()
        .map_err(|_| TlsError::Url(format!("{key} {value:?} is not a whole number")))
}

fn secs(key: &str, value: &str) -> Result<Option<Duration>, TlsError> {
    let n = whole_number(key, value)?;
    Ok(u64::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .map(Duration::from_secs))
}

impl ConnectOptions {
    /// These bounds without a `statement_timeout`, for the work that takes as long as it
    /// takes: migrations (which may rewrite a large table) and creating a database from a
    /// template.
    #[must_use]
    pub fn without_statement_timeout(self) -> Self {
        Self {
            statement_timeout: None,
            ..self
        }
    }

    /// These options with what the connection string sets (`found`: the [`URL_KEYS`] it
    /// had) in libpq's meaning: `connect_timeout` in seconds (0 or less: unbounded; 1 counts
    /// as 2, as libpq), `keepalives` 0 or 1, `keepalives_idle` and `keepalives_interval` in
    /// seconds, `keepalives_count`, `tcp_user_timeout` in milliseconds (0: the system's).
    ///
    /// # Errors
    /// [`TlsError::Url`] naming a parameter that is not a number.
    pub(crate) fn with_url(mut self, found: &HashMap<String, String>) -> Result<Self, TlsError> {
        if let Some(v) = found.get("connect_timeout") {
            self.connect_timeout =
                secs("connect_timeout", v)?.map(|d| d.max(Duration::from_secs(2)));
        }
        if let Some(v) = found.get("keepalives") {
            self.keepalives = whole_number("keepalives", v)? != 0;
        }
        if let Some(v) = found.get("keepalives_idle")
            && let Some(d) = secs("keepalives_idle", v)?
        {
            self.keepalive_idle = d;
        }
        if let Some(v) = found.get("keepalives_interval")
            && let Some(d) = secs("keepalives_interval", v)?
        {
            self.keepalive_interval = d;
        }
        for key in ["keepalives_retries", "keepalives_count"] {
            if let Some(v) = found.get(key) {
                let n = whole_number(key, v)?;
                self.keepalive_count = u32::try_from(n)
                    .map_err(|_| TlsError::Url(format!("{key} {v:?} is out of range")))?;
            }
        }
        if let Some(v) = found.get("tcp_user_timeout") {
            let n = whole_number("tcp_user_timeout", v)?;
            self.tcp_user_timeout = u64::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .map(Duration::from_millis);
        }
        Ok(self)
    }

    /// Sets these bounds on `config`; a `statement_timeout` already in its `options` is kept.
    pub(crate) fn apply(&self, config: &mut tokio_postgres::Config) {
        let second = Duration::from_secs(1);
        if let Some(timeout) = self.connect_timeout {
            // tokio-postgres bounds the TCP connect with it; the whole startup is bounded by
            // the caller (`Target::connect_bound`).
            config.connect_timeout(timeout);
        }
        config
            .keepalives(self.keepalives)
            .keepalives_idle(self.keepalive_idle.max(second))
            .keepalives_interval(self.keepalive_interval.max(second))
            .keepalives_retries(self.keepalive_count);
        if let Some(timeout) = self.tcp_user_timeout {
            config.tcp_user_timeout(timeout);
        }
        if let Some(timeout) = self.statement_timeout {
            let existing = config.get_options().unwrap_or("").trim().to_owned();
            if !sets_statement_timeout(&existing) {
                let ms = timeout.as_millis().max(1);
                let options = if existing.is_empty() {
                    format!("-c statement_timeout={ms}")
                } else {
                    format!("{existing} -c statement_timeout={ms}")
                };
                config.options(options);
            }
        }
    }
}

/// The `statement_timeout` a startup `options` string sets (the last one wins, as on the
/// server): `None` when it sets none, sets 0 (no timeout), or a value not read here. A bare
/// number is milliseconds, as on the server; `us`, `ms`, `s`, `min`, `h` and `d` are units.
pub(crate) fn statement_timeout_in(options: &str) -> Option<Duration> {
    let mut found = None;
    let mut words = options.split_whitespace();
    while let Some(word) = words.next() {
        let setting = match word {
            "-c" => words.next().unwrap_or(""),
            other => other
                .strip_prefix("-c")
                .or_else(|| other.strip_prefix("--"))
                .unwrap_or(""),
        };
        let (name, value) = setting.split_once('=').unwrap_or((setting, ""));
        if name.replace('-', "_") == "statement_timeout" {
            found = Some(value.trim_matches(|c| c == '\'' || c == '"').to_owned());
        }
    }
    let value = found?;
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: u64 = number.parse().ok()?;
    let timeout = match unit.trim() {
        "" | "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3_600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    (!timeout.is_zero()).then_some(timeout)
}

/// Whether a startup `options` string sets `statement_timeout` (`-c statement_timeout=…`,
/// `-cstatement_timeout=…` or `--statement-timeout=…`).
fn sets_statement_timeout(options: &str) -> bool {
    let mut words = options.split_whitespace();
    while let Some(word) = words.next() {
        let setting = match word {
            "-c" => words.next().unwrap_or(""),
            other => other
                .strip_prefix("-c")
                .or_else(|| other.strip_prefix("--"))
                .unwrap_or(""),
        };
        let name = setting.split('=').next().unwrap_or("").replace('-', "_");
        if name == "statement_timeout" {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn url_parameters_win_in_libpq_units() {
        let options = ConnectOptions::default()
            .with_url(&found(&[
                ("connect_timeout", "7"),
                ("keepalives_idle", "30"),
                ("keepalives_interval", "4"),
                ("keepalives_count", "9"),
                ("tcp_user_timeout", "1500"),
            ]))
            .unwrap();
        assert_eq!(options.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(options.keepalive_idle, Duration::from_secs(30));
        assert_eq!(options.keepalive_interval, Duration::from_secs(4));
        assert_eq!(options.keepalive_count, 9);
        assert_eq!(options.tcp_user_timeout, Some(Duration::from_millis(1500)));
        let unbounded = ConnectOptions::default()
            .with_url(&found(&[
                ("connect_timeout", "0"),
                ("keepalives", "0"),
                ("tcp_user_timeout", "0"),
            ]))
            .unwrap();
        assert_eq!(unbounded.connect_timeout, None);
        assert!(!unbounded.keepalives);
        assert_eq!(unbounded.tcp_user_timeout, None);
        let one = ConnectOptions::default()
            .with_url(&found(&[("connect_timeout", "1")]))
            .unwrap();
        assert_eq!(one.connect_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn a_parameter_that_is_not_a_number_is_named() {
        for key in URL_KEYS {
            let err = ConnectOptions::default()
                .with_url(&found(&[(key, "soon")]))
                .unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn the_statement_timeout_goes_into_the_startup_options() {
        let mut config: tokio_postgres::Config = "host=db".parse().unwrap();
        ConnectOptions::default().apply(&mut config);
        assert_eq!(config.get_options(), Some("-c statement_timeout=30000"));
        let mut config: tokio_postgres::Config =
            "host=db options='-c search_path=app'".parse().unwrap();
        ConnectOptions::default().apply(&mut config);
        assert_eq!(
            config.get_options(),
            Some("-c search_path=app -c statement_timeout=30000")
        );
        for given in [
            "-c statement_timeout=5s",
            "-cstatement_timeout=5s",
            "--statement-timeout=5s",
        ] {
            let mut config = tokio_postgres::Config::new();
            config.options(given);
            ConnectOptions::default().apply(&mut config);
            assert_eq!(config.get_options(), Some(given));
        }
        let mut config = tokio_postgres::Config::new();
        ConnectOptions {
            statement_timeout: None,
            ..ConnectOptions::default()
        }
        .apply(&mut config);
        assert_eq!(config.get_options(), None);
    }

    #[test]
    fn keepalives_and_the_user_timeout_are_set() {
        let mut config = tokio_postgres::Config::new();
        ConnectOptions::default().apply(&mut config);
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(20))
        );
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(5)));
    }

    #[test]
    fn the_statement_timeout_is_read_back_from_the_options() {
        assert_eq!(
            statement_timeout_in("-c statement_timeout=30000"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            statement_timeout_in("-c search_path=app --statement-timeout=5s"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            statement_timeout_in("-cstatement_timeout=2min"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(statement_timeout_in("-c statement_timeout=0"), None);
        assert_eq!(statement_timeout_in("-c search_path=app"), None);
        assert_eq!(statement_timeout_in("-c statement_timeout=soon"), None);
    }

    proptest::proptest! {
        #[test]
        fn a_statement_timeout_in_milliseconds_reads_back_as_written(ms in 1u64..10_000_000) {
            let mut config = tokio_postgres::Config::new();
            ConnectOptions {
                statement_timeout: Some(Duration::from_millis(ms)),
                ..ConnectOptions::default()
            }
            .apply(&mut config);
            proptest::prop_assert_eq!(
                statement_timeout_in(config.get_options().unwrap_or("")),
                Some(Duration::from_millis(ms))
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn other_options_never_count_as_a_statement_timeout(
            name in "[a-z_]{1,20}", value in "[0-9a-z]{1,6}"
        ) {
            proptest::prop_assume!(name != "statement_timeout");
            let options = format!("-c {name}={value} -c{name}={value} --{name}={value}");
            proptest::prop_assert!(!sets_statement_timeout(&options));
            let with_timeout = format!("{options} -c statement_timeout={value}");
            proptest::prop_assert!(sets_statement_timeout(&with_timeout));
        }
    }
}
