//! Integration tests: one binary, one throwaway Postgres cluster per run, a database per test.

mod bounds;
mod canary;
mod cli;
mod cluster;
mod connectors;
mod containment;
mod control_plane;
mod deploy;
mod files;
mod grpc;
mod helpers;
mod launcher;
mod log_hygiene;
mod metrics;
mod migrations;
mod outbox;
mod publish;
mod rbac;
mod secrets;
mod serve;
mod stop_reasons;
mod supervisor;
mod traces;
