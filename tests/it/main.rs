//! Integration tests: one binary, one throwaway Postgres cluster per run, a database per test.

mod helpers;
mod launcher;
mod migrations;
mod outbox;
mod publish;
mod serve;
mod supervisor;
