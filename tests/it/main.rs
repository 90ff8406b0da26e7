//! Integration tests: one binary, one throwaway Postgres cluster per run, a database per test.

mod abuse;
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
mod publish;
mod rbac;
mod secrets;
mod serve;
mod supervisor;
mod traces;
