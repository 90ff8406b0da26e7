//! dsreg, the datasource registry: connector configurations in Postgres, one worker per
//! active datasource, hot reload when a version is published.
//!
//! Map of the crate (dependencies point inward: `api` → `db`):
//! - [`cli`](crate::cli) parses the command line; [`config`] holds every setting; [`app`] wires and runs.
//! - [`domain`]: names and states as types.
//! - [`db`]: pool, migrations, the embedded Postgres launcher, the repositories.
//! - [`outbox`]: the outbox reader that never skips an event committed out of order.
//! - [`api`]: the gRPC and HTTP ports.
//! - [`telemetry`](crate::telemetry): logging.

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod outbox;
pub mod telemetry;
