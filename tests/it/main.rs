//! Integration tests: one binary, one throwaway Postgres cluster per run, a database per test.

mod canary;
mod cli;
mod cluster;
mod connectors;
mod deploy;
mod files;
mod grpc;
mod helpers;
mod launcher;
mod metrics;
mod migrations;
mod outbox;
mod pgtls;
mod publish;
mod rbac;
mod secrets;
mod serve;
mod sink;
mod supervisor;
mod traces;
mod truth;
