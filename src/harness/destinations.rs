//! Stored secrets follow saved destinations. A test run of a config nobody saved (an unsaved
//! `config_json`, or anything else not yet a version) may use a datasource's stored secrets
//! only if every destination it may call (scheme, host and port of each URL, each broker) is
//! a destination of a version saved for that datasource, since only admins save versions. So
//! a caller who can run tests, but not save versions, cannot send a credential to a host of
//! their choosing and read it there; they pass test credentials instead.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::connectors::{ConfigError, Connector, Destination};

/// Why a run may not take the stored secrets.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The config is refused by the kind, so its destinations are unknown.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The config calls a destination no saved version of the datasource calls.
    #[error(
        "stored secrets follow saved destinations: this config calls {destination}, which no \
         saved version of the datasource calls; save a version with it (admin) or pass \
         test_secrets instead"
    )]
    Unsaved {
        /// The first such destination.
        destination: Destination,
    },
}

/// Checks that every destination of `config` is one of a `saved` config's (configs the kind
/// refuses add none); returns the destinations of `config`.
///
/// # Errors
/// [`Refusal`].
pub fn check<'a>(
    connector: &dyn Connector,
    config: &Value,
    saved: impl IntoIterator<Item = &'a Value>,
) -> Result<Vec<Destination>, Refusal> {
    let wanted = connector.destinations(config)?;
    if wanted.is_empty() {
        return Ok(wanted);
    }
    let allowed: BTreeSet<Destination> = saved
        .into_iter()
        .filter_map(|c| connector.destinations(c).ok())
        .flatten()
        .collect();
    match wanted.iter().find(|d| !allowed.contains(d)) {
        Some(destination) => Err(Refusal::Unsaved {
            destination: destination.clone(),
        }),
        None => Ok(wanted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::http_poll::HttpPoll;
    use serde_json::json;

    fn config(url: &str) -> Value {
        json!({ "url": url, "bearer_secret": "token" })
    }

    #[test]
    fn the_same_scheme_host_and_port_on_another_path_is_allowed() {
        let saved = [config("https://api.example/v1/items")];
        for same in [
            "https://api.example/v2/other?x=1",
            "https://API.example:443/",
            "https://user@api.example/v1",
        ] {
            let found = check(&HttpPoll::new(), &config(same), &saved).unwrap();
            assert_eq!(found[0].to_string(), "https://api.example:443", "{same}");
        }
    }

    #[test]
    fn another_host_port_or_scheme_is_refused_naming_it() {
        let saved = [config("https://api.example/v1/items"), json!({"bogus": 1})];
        for (other, named) in [
            (
                "https://attacker.example/v1/items",
                "https://attacker.example:443",
            ),
            (
                "https://api.example:8443/v1/items",
                "https://api.example:8443",
            ),
            ("http://api.example/v1/items", "http://api.example:80"),
            (
                "https://api.example.attacker.example/",
                "https://api.example.attacker.example:443",
            ),
        ] {
            let refused = check(&HttpPoll::new(), &config(other), &saved).unwrap_err();
            assert!(
                matches!(&refused, Refusal::Unsaved { destination } if destination.to_string() == named),
                "{other}: {refused}"
            );
            assert!(refused.to_string().contains("saved destinations"));
        }
    }

    #[test]
    fn with_nothing_saved_every_destination_is_refused() {
        let refused = check(&HttpPoll::new(), &config("https://api.example/"), []).unwrap_err();
        assert!(matches!(refused, Refusal::Unsaved { .. }));
    }

    proptest::proptest! {
        /// Whatever the paths, queries and userinfo: the saved scheme, host and port are
        /// allowed, and a change of any one of them is refused.
        #[test]
        fn only_the_saved_scheme_host_and_port_are_allowed(
            https in proptest::bool::ANY,
            host in "[a-z]{1,10}(\\.[a-z]{2,4}){0,2}",
            port in 1u16..,
            saved_path in "(/[a-z0-9]{0,6}){0,3}",
            path in "(/[a-z0-9]{0,6}){0,3}",
            query in "(\\?[a-z]{1,4}=[a-z0-9]{0,4})?",
            user in "([a-z]{1,5}@)?",
            other_host in "[a-z]{1,10}",
            other_port in 1u16..,
        ) {
            let scheme = if https { "https" } else { "http" };
            let saved = [config(&format!("{scheme}://{host}:{port}{saved_path}"))];
            let same = format!("{scheme}://{user}{host}:{port}{path}{query}");
            proptest::prop_assert!(check(&HttpPoll::new(), &config(&same), &saved).is_ok(), "{}", same);
            let other_scheme = if https { "http" } else { "https" };
            let mut changed = vec![format!("{other_scheme}://{host}:{port}{path}")];
            if other_host != host {
                changed.push(format!("{scheme}://{other_host}:{port}{path}"));
            }
            if other_port != port {
                changed.push(format!("{scheme}://{host}:{other_port}{path}"));
            }
            for url in changed {
                let refused = check(&HttpPoll::new(), &config(&url), &saved);
                proptest::prop_assert!(matches!(refused, Err(Refusal::Unsaved { .. })), "{}", url);
            }
        }
    }

    #[test]
    fn a_config_the_kind_refuses_is_a_config_error() {
        let refused = check(&HttpPoll::new(), &json!({"url": 5}), []).unwrap_err();
        assert!(matches!(refused, Refusal::Config(e) if e.field == "url"));
    }
}
