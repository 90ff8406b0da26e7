//! From the `authorization` header to a token, and from a verified token's claims to a
//! [`Principal`]: its subject, highest datasource role and tenant.

use serde::Deserialize;

use super::super::principal::{Principal, Role, Tenant};
use super::denied::Denied;

/// Longer values are refused before any decoding: real tokens are a few hundred bytes.
pub(super) const MAX_TOKEN_BYTES: usize = 8 * 1024;

pub(super) fn bearer_token(authorization: Option<&str>) -> Result<&str, Denied> {
    const EXPECTED: &str = "the authorization metadata must be `Bearer <token>`";
    let value = authorization.ok_or_else(|| {
        Denied::unauthenticated(
            "missing authorization metadata; send `authorization: Bearer <token>`",
        )
    })?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| Denied::unauthenticated(EXPECTED))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::unauthenticated(EXPECTED));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Denied::unauthenticated("the bearer token is empty"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Denied::unauthenticated(format!(
            "the bearer token is longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(token)
}

/// The dsreg claims of a token (the registered ones are checked by [`Validation`]).
#[derive(Deserialize)]
pub(super) struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    projects: Option<Vec<String>>,
    /// Checked by [`TimeRules`]: kept raw so a malformed value is a clear refusal.
    #[serde(default)]
    pub(super) iat: Option<serde_json::Value>,
}

pub(super) fn principal_from(claims: Claims) -> Result<Principal, Denied> {
    let Claims {
        sub,
        roles,
        org,
        projects,
        iat: _,
    } = claims;
    if sub.trim().is_empty() {
        return Err(Denied::unauthenticated("the token's sub claim is empty"));
    }
    let Some(role) = roles.iter().filter_map(|r| Role::from_claim(r)).max() else {
        return Err(Denied::permission_denied(
            "the token grants no datasource role",
            Some(sub),
        ));
    };
    let Some(org) = org.filter(|o| !o.is_empty()) else {
        return Err(Denied::permission_denied(
            "the token names no org",
            Some(sub),
        ));
    };
    let projects = match projects {
        None => None,
        Some(projects) if projects.iter().any(|p| p == "*") => None,
        Some(projects) if projects.is_empty() => {
            return Err(Denied::permission_denied(
                "the token's projects claim lists no project",
                Some(sub),
            ));
        }
        Some(projects) => Some(projects),
    };
    let tenant = match (org.as_str(), projects) {
        ("*", None) => Tenant::All,
        ("*", Some(_)) => {
            return Err(Denied::permission_denied(
                "a token for every org (org \"*\") cannot limit projects",
                Some(sub),
            ));
        }
        (_, projects) => Tenant::Org { org, projects },
    };
    Ok(Principal {
        subject: sub,
        role,
        tenant,
    })
}
