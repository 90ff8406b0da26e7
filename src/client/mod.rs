//! The operator's commands beside `serve`: the gRPC client (`dsreg datasource`, `version`,
//! `secret`, `events`, `status`, `worker`, `position`, `test`, `kinds`, `info`), and `dsreg keys`,
//! `import`, `sync` and `export`, which work on the database directly, like `migrate`.
//!
//! Owns: where the server is and which token goes with each call ([`connect`]), what people
//! read ([`table`]) and what scripts read ([`json`], one document per line), how a refused
//! call is reported ([`error`]), reading files, stdin and durations ([`input`]), and one file
//! per command group. Does not own: the API (`proto/`, `api::grpc`), sealing secrets
//! (`secrets`), settings (`config`); `cli` routes to the command groups here.
//!
//! Every command ends when its call, stream or batch loop does. The watch commands, `sync
//! --watch` and `keys rewrap` stop on Ctrl-C: a watch at once, a sync after its pass, a rewrap
//! after its current batch.
//! Secret values and tokens never come from argv and are never printed.

#![deny(missing_docs)]

pub mod catalog;
pub mod connect;
pub mod datasources;
pub mod dead_letters;
pub mod error;
pub mod events;
pub mod files;
pub mod harness;
pub mod input;
pub mod json;
pub mod keys;
pub mod lifecycle;
pub mod output;
pub mod positions;
pub mod progress;
pub mod secrets;
pub mod table;
pub mod validate;
pub mod versions;

pub use connect::{Client, ClientArgs};
pub use error::{CallError, StdoutClosed, UsageError};
pub use output::{Output, Printer};
