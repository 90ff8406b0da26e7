//! dsreg, the datasource registry: connector configurations in Postgres, one worker per
//! active datasource, hot reload when a version is published.
//!
//! Map of the crate (dependencies point inward: `api` → `supervisor` → `connectors` → `db`):
//! - [`cli`](crate::cli) parses the command line; [`config`] holds every setting; [`app`] wires and runs.
//! - [`backoff`]: the one retry policy every retrying loop paces itself with.
//! - [`domain`]: names and states as types; [`encoding`]: strict percent and hex decoders.
//! - [`db`]: pool, migrations, the embedded Postgres launcher, the repositories.
//! - [`outbox`]: the LISTEN connection and the outbox reader that never skips an event
//!   committed out of order.
//! - [`supervisor`]: reconcile, workers, backoff, the batched state writer, lifecycle ops.
//! - [`connectors`]: the connector trait, the catalog, built-in kinds, sinks.
//! - [`secrets`]: key providers, sealing and opening secrets, rotation and rewrap.
//! - [`api`]: the gRPC and HTTP ports.
//! - [`files`]: datasources from YAML files (import, a watched folder, export), written through
//!   the same repositories and checks as the API.
//! - [`telemetry`](crate::telemetry): logging and the Prometheus metrics.
//! - [`transform`]: a version's Rhai script run per record under hard limits; output schema checks.

pub mod api;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod connectors;
pub mod db;
pub mod domain;
pub mod encoding;
pub mod files;
pub mod harness;
pub mod outbox;
pub mod secrets;
pub mod supervisor;
pub mod telemetry;
pub mod transform;

/// mimalloc serves the many small, short-lived allocations of transforms, JSON records and
/// RPCs faster than the system allocator; set here so tests and benchmarks run on it too. The
/// meter around it counts each thread's live bytes for the transforms' memory limit.
#[global_allocator]
static ALLOCATOR: transform::Metered<mimalloc::MiMalloc> = transform::Metered(mimalloc::MiMalloc);
