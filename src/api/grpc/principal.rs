//! Who is calling: the identity, role and tenant scope an authenticated token grants. The
//! auth layer puts a [`Principal`] in every request's extensions; services read it from there.

use std::fmt;

/// A role of the design's RBAC, ordered: each grants what the one before it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `datasource:viewer`: read.
    Viewer,
    /// `datasource:operator`: read, lifecycle, test runs.
    Operator,
    /// `datasource:admin`: everything, including create, update, publish, rollback, secrets,
    /// archive.
    Admin,
}

impl Role {
    /// The claim value naming this role.
    pub fn claim(self) -> &'static str {
        match self {
            Role::Viewer => "datasource:viewer",
            Role::Operator => "datasource:operator",
            Role::Admin => "datasource:admin",
        }
    }

    /// Parses a claim value; other values (roles of other services) are `None`.
    pub fn from_claim(value: &str) -> Option<Self> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.claim() == value)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.claim())
    }
}

/// The datasources a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenant {
    /// Every organisation (platform operators; the embedded default's admin token).
    All,
    /// One organisation; `projects: None` means every project of it.
    Org {
        /// The organisation.
        org: String,
        /// The projects, when limited.
        projects: Option<Vec<String>>,
    },
}

impl Tenant {
    /// Whether a datasource of `org`/`project` is visible.
    pub fn allows(&self, org: &str, project: &str) -> bool {
        match self {
            Tenant::All => true,
            Tenant::Org { org: o, projects } => {
                o == org
                    && projects
                        .as_ref()
                        .is_none_or(|ps| ps.iter().any(|p| p == project))
            }
        }
    }

    /// The organisation every visible datasource belongs to, if limited to one.
    pub fn org(&self) -> Option<&str> {
        match self {
            Tenant::All => None,
            Tenant::Org { org, .. } => Some(org),
        }
    }

    /// The projects visible datasources belong to, if limited.
    pub fn projects(&self) -> Option<&[String]> {
        match self {
            Tenant::All => None,
            Tenant::Org { projects, .. } => projects.as_deref(),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's subject (`sub`), recorded as the actor.
    pub subject: String,
    /// The highest role the token grants.
    pub role: Role,
    /// What it may see.
    pub tenant: Tenant,
}

impl Principal {
    /// The principal of a server running with `--insecure-no-auth`: an admin of every tenant.
    pub fn insecure() -> Self {
        Self {
            subject: "anonymous".to_owned(),
            role: Role::Admin,
            tenant: Tenant::All,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_round_trip_through_claims() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::from_claim(role.claim()), Some(role));
        }
        assert_eq!(Role::from_claim("datasource:root"), None);
    }

    #[test]
    fn a_tenant_sees_its_org_and_projects_only() {
        let one = Tenant::Org {
            org: "acme".into(),
            projects: Some(vec!["a".into()]),
        };
        assert!(one.allows("acme", "a"));
        assert!(!one.allows("acme", "b"));
        assert!(!one.allows("other", "a"));
        let org = Tenant::Org {
            org: "acme".into(),
            projects: None,
        };
        assert!(org.allows("acme", "b") && !org.allows("globex", "b"));
        assert!(Tenant::All.allows("globex", "z"));
    }
}
