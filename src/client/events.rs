//! `dsreg events list|watch`: the outbox history, a page at a time or followed live. Also
//! [`follow`], the reconnecting stream loop `events watch` and `status watch` share.
//!
//! A watch that loses its connection reconnects with a capped, jittered backoff and resumes
//! after the last event it printed, so it shows every event once (the server streams in id
//! order with no gap after `after_id`). It ends on Ctrl-C, when stdout closes, or on a
//! refusal that a retry would not change (`PERMISSION_DENIED`, `INVALID_ARGUMENT`, …).

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use crate::api::grpc::pb;
use crate::backoff::{Exponential, Retries};

use super::connect::{Client, ClientArgs};
use super::error::CallError;
use super::input::parse_time;
use super::json::ToJson;
use super::output::{Listing, Printer, note};
use super::table::{self, Table};

/// `dsreg events …`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum EventsCommand {
    /// List events in id order, a page at a time.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Only events created at or after this time (RFC 3339, or a duration ago: 15m, 2h).
        #[arg(long, value_parser = parse_time)]
        since: Option<prost_types::Timestamp>,
        /// Only events created before this time (RFC 3339, or a duration ago).
        #[arg(long, value_parser = parse_time)]
        until: Option<prost_types::Timestamp>,
        /// Events per page (1-1000; the server's default is 100).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1000))]
        page_size: Option<i32>,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
        /// Follow page tokens to the last page.
        #[arg(long)]
        all: bool,
    },
    /// Follow events live (JSON lines with -o json) until Ctrl-C; reconnects and resumes
    /// after the last event shown when the connection drops.
    Watch {
        #[command(flatten)]
        filter: Filter,
        /// Start after this event id (history first, then live; 0: from the first event);
        /// default: new events only.
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        after_id: Option<i64>,
    },
}

#[derive(Debug, clap::Args)]
struct Filter {
    /// Only this datasource's events.
    #[arg(long, value_name = "ID")]
    datasource: Option<String>,
    /// Only events of this type (repeat for several): published, rolled_back, worker_running, …
    #[arg(long = "type", value_name = "TYPE", value_parser = clap::builder::PossibleValuesParser::new(crate::domain::EVENT_TYPES))]
    types: Vec<String>,
}

impl EventsArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let mut client = self.client.connect().await?;
        match self.command {
            EventsCommand::List {
                filter,
                since,
                until,
                page_size,
                page_token,
                all,
            } => {
                let request = pb::ListEventsRequest {
                    datasource_id: filter.datasource.unwrap_or_default(),
                    types: filter.types,
                    since,
                    until,
                    page_size: page_size.unwrap_or(0),
                    page_token: page_token.unwrap_or_default(),
                };
                list(&client, printer, request, all).await
            }
            EventsCommand::Watch { filter, after_id } => {
                let request = pb::WatchEventsRequest {
                    datasource_id: filter.datasource.unwrap_or_default(),
                    types: filter.types,
                    after_id,
                };
                until_ctrl_c(watch(&mut client, printer, request)).await
            }
        }
    }
}

async fn list(
    client: &Client,
    printer: Printer,
    mut request: pb::ListEventsRequest,
    all: bool,
) -> anyhow::Result<()> {
    let mut svc = client.events();
    let mut listing = Listing::new(printer, list_table(), all);
    loop {
        let page = client
            .unary(svc.list_events(client.request(request.clone())))
            .await?;
        match listing.page(&page.events, page.next_page_token, list_row)? {
            Some(next) => request.page_token = next,
            None => return Ok(()),
        }
    }
}

async fn watch(
    client: &mut Client,
    printer: Printer,
    request: pb::WatchEventsRequest,
) -> anyhow::Result<()> {
    let last_id = Cell::new(request.after_id);
    follow(
        client,
        || match last_id.get() {
            Some(id) => format!("after event {id}"),
            None => "from new events".to_owned(),
        },
        |client| {
            let mut events = client.events();
            let request = pb::WatchEventsRequest {
                after_id: last_id.get(),
                ..request.clone()
            };
            async move { events.watch_events(tonic::Request::new(request)).await }
        },
        |event: pb::Event| {
            last_id.set(Some(
                last_id.get().map_or(event.id, |last| last.max(event.id)),
            ));
            if printer.is_json() {
                printer.json(&event.to_json())
            } else {
                printer.text(&watch_line(&event))
            }
        },
    )
    .await
}

/// Runs `work` until it ends or Ctrl-C is pressed (which ends it successfully).
///
/// # Errors
/// `work`'s error; a failure to watch for Ctrl-C.
pub async fn until_ctrl_c(work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::select! {
        result = work => result,
        signal = tokio::signal::ctrl_c() => Ok(signal?),
    }
}

/// Reconnect pacing: 250 ms doubling up to 5 s, jittered, started over by progress.
const RECONNECT: Exponential = Exponential::new(Duration::from_millis(250), Duration::from_secs(5));

/// Follows a server stream until it is refused for good or `on_item` fails: `open` starts it
/// (called again after each reconnect, so it can resume where the last one stopped); a stream
/// that ends or breaks with a retryable code is reopened on a fresh connection after a
/// [`RECONNECT`] delay, with a note on stderr naming `position()`.
///
/// # Errors
/// A non-retryable [`CallError`]; `on_item`'s error (say, stdout closed).
///
/// # Cancel safety
/// Cancel safe: dropping it drops the stream; nothing is half-printed.
pub async fn follow<T, F, Fut>(
    client: &mut Client,
    position: impl Fn() -> String,
    mut open: F,
    mut on_item: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<()>
where
    F: FnMut(&Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
{
    let mut backoff = Retries::new(RECONNECT);
    let mut reconnect = false;
    loop {
        let ended = async {
            if reconnect {
                client.reconnect().await.map_err(|e| CallError {
                    code: tonic::Code::Unavailable,
                    message: format!("{:#}", anyhow::Error::new(e)),
                    violations: Vec::new(),
                })?;
            }
            let mut stream = open(client).await.map_err(CallError::from)?.into_inner();
            while let Some(item) = stream.message().await.map_err(CallError::from)? {
                backoff.succeeded();
                on_item(item)?;
            }
            anyhow::Ok(())
        }
        .await;
        let reason = match ended {
            Ok(()) => "the server ended the stream".to_owned(),
            Err(e) => match e.downcast_ref::<CallError>() {
                Some(call) if call.is_retryable() => call.to_string(),
                _ => return Err(e),
            },
        };
        let delay = backoff.failed(rand::random::<f64>());
        note(&format!(
            "watch interrupted ({}); reconnecting in {} ms, {}",
            table::clean(&reason),
            delay.as_millis(),
            position()
        ));
        tokio::time::sleep(delay).await;
        reconnect = true;
    }
}

/// The columns of `events list`.
pub fn list_table() -> Table {
    Table::new([
        "ID",
        "TIME",
        "TYPE",
        "DATASOURCE",
        "VERSION",
        "ACTOR",
        "PAYLOAD",
    ])
}

/// One row of `events list`.
pub fn list_row(table: &mut Table, event: &pb::Event) {
    table.row([
        event.id.to_string(),
        table::time(event.created_at.as_ref()),
        event.r#type.clone(),
        event.datasource_id.clone(),
        table::version(event.version),
        event.actor.clone(),
        table::truncate(&compact(&event.payload_json), 60),
    ]);
}

/// One event as a line of `events watch`, its columns at fixed widths.
pub fn watch_line(event: &pb::Event) -> String {
    table::clean(&format!(
        "{:>8}  {}  {:<18}  {:<36}  {:>4}  {:<12}  {}",
        event.id,
        table::time(event.created_at.as_ref()),
        event.r#type,
        event.datasource_id,
        table::version(event.version),
        event.actor,
        table::truncate(&compact(&event.payload_json), 80),
    ))
    .trim_end()
    .to_owned()
}

/// JSON text re-serialized on one line (as sent when it does not parse).
fn compact(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| json.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_line_shows_its_payload_on_one_line() {
        let line = watch_line(&pb::Event {
            id: 42,
            datasource_id: "d1".into(),
            r#type: "published".into(),
            version: 3,
            actor: "alice".into(),
            payload_json: "{\n  \"from\": 2\n}".into(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_714_564_803,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert!(
            line.starts_with("      42  2024-05-01T12:00:03Z  published"),
            "{line}"
        );
        assert!(line.ends_with(r#"alice         {"from":2}"#), "{line}");
        assert!(!line.contains('\n'));
    }
}
