//! The `Events` service: history pages and the live watch.
//!
//! The watch delivers events in id order with no gap and no duplicate, so a client resumes
//! from its last id: what the process's [`feed`] already passed is read from the table (final
//! there), the rest comes from the feed. An idle watch does no database work.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use super::call::{self, Call};
use super::datasources::{Check, visible};
use super::lifecycle::tokio_stream_from;
use super::status::{self, invalid};
use super::{Ctx, convert, feed, limits, page, pb};
use crate::db::repository::events::{self, EventFilter};

/// Most types in a filter.
const MAX_TYPES: usize = 32;

/// The service.
#[derive(Clone)]
pub struct EventsService(pub Arc<Ctx>);

impl EventsService {
    /// The filter of a request, scoped to the caller's tenant; checks the datasource is
    /// visible.
    async fn filter(
        &self,
        call: &Call,
        datasource_id: &str,
        types: Vec<String>,
    ) -> Result<EventFilter, Status> {
        if types.len() > MAX_TYPES {
            return Err(invalid(
                "types",
                format!("{} types; at most {MAX_TYPES}", types.len()),
            ));
        }
        if let Some(bad) = types
            .iter()
            .find(|t| !crate::domain::EVENT_TYPES.contains(&t.as_str()))
        {
            let shown: String = bad.chars().take(64).collect();
            return Err(invalid(
                "types",
                format!(
                    "{shown:?} is not an event type; one of {}",
                    crate::domain::EVENT_TYPES.join(", ")
                ),
            ));
        }
        let datasource = match datasource_id {
            "" => None,
            id => {
                let id = convert::id("datasource_id", id)?;
                let client = call::client(&self.0.pool).await?;
                visible(&**client, call, id, Check::Read(&self.0.auditor)).await?;
                Some(id)
            }
        };
        let tenant = &call.principal.tenant;
        Ok(EventFilter {
            datasource_id: datasource,
            kinds: types,
            org: tenant.org().map(str::to_owned),
            projects: tenant.projects().map(<[String]>::to_vec),
            ..EventFilter::default()
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::events_server::Events for EventsService {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let call = Call::of(&request, "ListEvents")?;
        let r = request.into_inner();
        let limit = page::size(r.page_size, 100, 1000)?;
        let mut filter = self.filter(&call, &r.datasource_id, r.types).await?;
        filter.since = r
            .since
            .as_ref()
            .map(|t| convert::from_timestamp("since", t))
            .transpose()?;
        filter.until = r
            .until
            .as_ref()
            .map(|t| convert::from_timestamp("until", t))
            .transpose()?;
        let fingerprint = format!(
            "{:?}|{:?}|{:?}|{:?}|{}",
            filter.datasource_id, filter.kinds, filter.since, filter.until, call.principal.subject
        );
        filter.after_id = self.0.page_key.decode::<i64>(&r.page_token, &fingerprint)?;
        filter.limit = limit + 1;
        let client = call::client(&self.0.pool).await?;
        let mut rows = events::list(&**client, &filter)
            .await
            .map_err(status::db)?
            .events;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some(last) if more => self.0.page_key.encode(&last.id, &fingerprint),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEventsResponse {
            events: rows.into_iter().map(convert::event).collect(),
            next_page_token,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let call = Call::of(&request, "WatchEvents")?;
        let r = request.into_inner();
        if r.after_id.is_some_and(|id| id < 0) {
            return Err(invalid("after_id", "must not be negative"));
        }
        let slot = self.0.streams.open(&call.principal)?;
        let filter = self.filter(&call, &r.datasource_id, r.types).await?;
        let ctx = self.0.clone();
        let start = if let Some(after) = r.after_id {
            // A cursor beyond every id taken comes from another history of the database (a
            // failover or a restore that lost events the client saw): resuming there would
            // skip the ids this history hands out next, so the client is told.
            let client = call::client(&ctx.pool).await?;
            let newest = events::last_id(&**client).await.map_err(status::db)?;
            if after > newest {
                return Err(Status::failed_precondition(format!(
                    "after_id {after} is beyond the newest event id {newest}: the cursor comes from another history of the database (a failover or a restore lost events it had seen); resume from an id up to {newest}, or from 0 to replay what it holds"
                )));
            }
            after
        } else {
            // Only new events: start after the newest id taken so far.
            let client = call::client(&ctx.pool).await?;
            events::last_id(&**client).await.map_err(status::db)?
        };
        let (tx, rx) = mpsc::channel(feed::BATCH as usize);
        ctx.tracker
            .clone()
            .spawn(watch(ctx, filter, start, tx, slot));
        Ok(Response::new(Box::pin(tokio_stream_from(rx))))
    }
}

/// Feeds `tx` with the events after `cursor` until the client goes or the server stops: those
/// the feed already passed are read from the table, later ones come from the feed. The
/// stream's `slot` is held until it ends.
async fn watch(
    ctx: Arc<Ctx>,
    mut filter: EventFilter,
    mut cursor: i64,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
    _slot: limits::StreamSlot,
) {
    loop {
        let joined = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            () = tx.closed() => return,
            joined = ctx.feed.join() => joined,
        };
        let mut rx = joined.rx;
        // Every event up to `joined.cursor` is final: the table has it for good.
        while cursor < joined.cursor {
            filter.after_id = Some(cursor);
            filter.through_id = Some(joined.cursor);
            filter.limit = feed::BATCH;
            let read = async {
                let client = call::client(&ctx.pool).await?;
                events::list(&**client, &filter).await.map_err(status::db)
            }
            .await;
            let page = match read {
                Ok(page) => page.events,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let full = page.len() as i64 >= filter.limit;
            for event in page {
                cursor = event.id;
                if tx.send(Ok(convert::event(event))).await.is_err() {
                    return;
                }
            }
            if !full {
                cursor = joined.cursor;
            }
        }
        loop {
            let batch = tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                () = tx.closed() => return,
                batch = rx.recv() => batch,
            };
            match batch {
                Ok(batch) => {
                    for scoped in &batch.events {
                        if scoped.event.id > cursor && scoped.matches(&filter) {
                            let event = convert::event(scoped.event.clone());
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    cursor = cursor.max(batch.through);
                }
                // Fell behind the feed's buffer: read the gap from the table.
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
