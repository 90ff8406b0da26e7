//! The permission table: the role each `dsreg.v1` RPC needs, in one static list.

use super::super::principal::Role;

/// The role each `dsreg.v1` RPC needs, by full gRPC path. Every RPC of `proto/dsreg/v1` is
/// here (a unit test parses the protos); a method missing from the table is refused.
static PERMISSIONS: &[(&str, Role)] = &[
    ("/dsreg.v1.Registry/GetInfo", Role::Viewer),
    ("/dsreg.v1.Registry/GetRegistryMetrics", Role::Viewer),
    ("/dsreg.v1.Registry/ListInstances", Role::Operator),
    ("/dsreg.v1.Audit/ListAudit", Role::Admin),
    ("/dsreg.v1.Catalog/ListKinds", Role::Viewer),
    ("/dsreg.v1.Catalog/GetKindHealth", Role::Viewer),
    ("/dsreg.v1.Datasources/CreateDatasource", Role::Admin),
    ("/dsreg.v1.Datasources/GetDatasource", Role::Viewer),
    ("/dsreg.v1.Datasources/ListDatasources", Role::Viewer),
    ("/dsreg.v1.Datasources/UpdateDatasource", Role::Admin),
    ("/dsreg.v1.Datasources/ArchiveDatasource", Role::Admin),
    ("/dsreg.v1.Datasources/CreateVersion", Role::Admin),
    ("/dsreg.v1.Datasources/GetVersion", Role::Viewer),
    ("/dsreg.v1.Datasources/ListVersions", Role::Viewer),
    ("/dsreg.v1.Datasources/UpdateVersion", Role::Admin),
    ("/dsreg.v1.Datasources/PublishVersion", Role::Admin),
    ("/dsreg.v1.Datasources/RollbackVersion", Role::Admin),
    ("/dsreg.v1.Events/ListEvents", Role::Viewer),
    ("/dsreg.v1.Events/WatchEvents", Role::Viewer),
    ("/dsreg.v1.Harness/RunTest", Role::Operator),
    ("/dsreg.v1.Lifecycle/StartWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/StopWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/RestartWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/ReloadWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/Backfill", Role::Operator),
    ("/dsreg.v1.Lifecycle/GetStatus", Role::Viewer),
    ("/dsreg.v1.Lifecycle/WatchStatus", Role::Viewer),
    ("/dsreg.v1.Lifecycle/GetDatasourceMetrics", Role::Viewer),
    ("/dsreg.v1.Lifecycle/RestartWorkers", Role::Operator),
    ("/dsreg.v1.Secrets/PutSecret", Role::Admin),
    ("/dsreg.v1.Secrets/DeleteSecret", Role::Admin),
    ("/dsreg.v1.Secrets/ListSecrets", Role::Viewer),
    ("/dsreg.v1.Catalog/ValidateConfig", Role::Viewer),
    ("/dsreg.v1.DeadLetters/ListDeadLetters", Role::Operator),
    ("/dsreg.v1.DeadLetters/ReplayDeadLetters", Role::Operator),
    ("/dsreg.v1.DeadLetters/PurgeDeadLetters", Role::Admin),
    ("/dsreg.v1.Lifecycle/GetSourcePosition", Role::Operator),
    ("/dsreg.v1.Lifecycle/ResetSourcePosition", Role::Operator),
];

/// The role the RPC at `path` (`/dsreg.v1.<Service>/<Method>`) needs: Viewer for reads,
/// Operator for lifecycle and test runs, Admin for create, update, archive, publish, rollback
/// and secret writes. `None` for any path not in the table: callers deny it (fail closed).
pub fn required_role(path: &str) -> Option<Role> {
    PERMISSIONS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, role)| *role)
}

/// The path of the RPC at `path` as the permission table holds it (a `'static` string), if
/// it is one.
pub fn known_path(path: &str) -> Option<&'static str> {
    PERMISSIONS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(p, _)| *p)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// Every `rpc` of every proto file, with the role its doc comment names (Registry's have
    /// none and are reads).
    fn proto_rpcs() -> Vec<(String, Role)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/dsreg/v1");
        let mut rpcs = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "proto"))
            .collect();
        files.sort();
        assert!(!files.is_empty());
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let mut package = None;
            let mut service = None;
            let mut comment = String::new();
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("package ") {
                    package = Some(rest.trim_end_matches(';').trim().to_owned());
                } else if let Some(rest) = line.strip_prefix("service ") {
                    service = Some(rest.split_whitespace().next().unwrap().to_owned());
                } else if let Some(rest) = line.strip_prefix("//") {
                    comment.push_str(rest);
                    comment.push(' ');
                    continue;
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap().trim();
                    let path = format!(
                        "/{}.{}/{method}",
                        package.as_deref().expect("package before rpc"),
                        service.as_deref().expect("service before rpc")
                    );
                    let role = comment
                        .split_whitespace()
                        .rev()
                        .find_map(|w| match w.trim_end_matches('.') {
                            "Viewer" => Some(Role::Viewer),
                            "Operator" => Some(Role::Operator),
                            "Admin" => Some(Role::Admin),
                            _ => None,
                        })
                        .unwrap_or(Role::Viewer);
                    rpcs.push((path, role));
                }
                comment.clear();
            }
        }
        rpcs
    }

    #[test]
    fn every_rpc_of_the_proto_files_has_the_permission_its_doc_names() {
        let rpcs = proto_rpcs();
        for (path, role) in &rpcs {
            assert_eq!(
                required_role(path),
                Some(*role),
                "{path} is missing from the permission table or has the wrong role"
            );
        }
        // No stale or duplicate entries either.
        assert_eq!(rpcs.len(), PERMISSIONS.len());
        let mut paths: Vec<_> = PERMISSIONS.iter().map(|(p, _)| *p).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), PERMISSIONS.len());
    }

    #[test]
    fn unknown_paths_have_no_permission() {
        for path in [
            "/dsreg.v1.Datasources/DropEverything",
            "/dsreg.v1.Nope/GetInfo",
            "/dsreg.v2.Registry/GetInfo",
            "dsreg.v1.Registry/GetInfo",
            "/dsreg.v1.Registry/GetInfo/",
            "",
        ] {
            assert_eq!(required_role(path), None, "{path}");
        }
        assert_eq!(
            required_role("/dsreg.v1.Datasources/PublishVersion"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role("/dsreg.v1.Harness/RunTest"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role("/dsreg.v1.Lifecycle/GetStatus"),
            Some(Role::Viewer)
        );
    }
}
