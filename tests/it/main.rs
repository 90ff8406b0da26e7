//! Integration tests: one binary, one throwaway Postgres cluster per run, a database per test.

mod canary;
mod cli;
mod cluster;
mod connectors;
mod deploy;
mod exfiltration;
mod files;
mod fuzz;
mod grpc;
mod helpers;
mod kms;
mod launcher;
mod metrics;
mod migrations;
mod outbox;
mod publish;
mod rbac;
mod redaction;
mod sandbox;
mod secrets;
mod serve;
mod sink;
mod supervisor;
mod traces;
mod truth;
