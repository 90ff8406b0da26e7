//! The `Events` service: history pages and the live watch.
//!
//! The watch delivers events in id order with no gap and no duplicate, so a client resumes
//! from its last id. Ids are taken in one order and committed in another; an id is final
//! (visible, or never to be) once every transaction that could hold it has ended. Event ids
//! are taken after the writer's xid (migration V5), so when a read sees ids up to `m`, every
//! transaction holding a lower id had an xid below that read's `xmax`; a later read whose
//! `xmin` has reached that `xmax` proves them all finished, and re-reading up to `m` then
//! returns every event up to `m` for good. With no transaction running (`xmin == xmax`) the
//! first read is already final.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::call::{self, Call};
use super::datasources::{Check, visible};
use super::lifecycle::tokio_stream_from;
use super::status::{self, invalid};
use super::{Ctx, convert, page, pb};
use crate::db::repository::events::{self, EventFilter};

/// Events per watch read.
const WATCH_BATCH: i64 = 500;
/// How often an idle watch re-reads when nothing wakes it.
const WATCH_POLL: Duration = Duration::from_millis(200);
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
        if let Some(bad) = types.iter().find(|t| t.is_empty() || t.len() > 64) {
            return Err(invalid("types", format!("{bad:?} is not an event type")));
        }
        let datasource = match datasource_id {
            "" => None,
            id => {
                let id = convert::id("datasource_id", id)?;
                let client = call::client(&self.0.pool).await?;
                visible(&**client, call, id, Check::Read(&self.0.pool)).await?;
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
        let fingerprint = page::fingerprint(&format!(
            "{:?}|{:?}|{:?}|{:?}|{}",
            filter.datasource_id, filter.kinds, filter.since, filter.until, call.principal.subject
        ));
        filter.after_id = page::decode::<i64>(&r.page_token, &fingerprint)?;
        filter.limit = limit + 1;
        let client = call::client(&self.0.pool).await?;
        let mut rows = events::list(&**client, &filter)
            .await
            .map_err(status::db)?
            .events;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some(last) if more => page::encode(&last.id, &fingerprint),
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
        if r.after_id < 0 {
            return Err(invalid("after_id", "must not be negative"));
        }
        let mut filter = self.filter(&call, &r.datasource_id, r.types).await?;
        filter.limit = WATCH_BATCH;
        let ctx = self.0.clone();
        let start = if r.after_id > 0 {
            r.after_id
        } else {
            // Only new events: start after the newest id taken so far.
            let client = call::client(&ctx.pool).await?;
            events::last_id(&**client).await.map_err(status::db)?
        };
        let (tx, rx) = mpsc::channel(WATCH_BATCH as usize);
        ctx.tracker.clone().spawn(watch(ctx, filter, start, tx));
        Ok(Response::new(Box::pin(tokio_stream_from(rx))))
    }
}

/// Feeds `tx` with the events after `cursor` until the client goes or the server stops.
async fn watch(
    ctx: Arc<Ctx>,
    mut filter: EventFilter,
    mut cursor: i64,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
) {
    let mut wake = ctx.activity.subscribe();
    // A read that saw ids up to `.0`, waiting for every transaction below its xmax `.1`.
    let mut pending: Option<(i64, i64)> = None;
    loop {
        filter.after_id = Some(cursor);
        filter.through_id = pending.map(|(m, _)| m);
        let read = async {
            let client = call::client(&ctx.pool).await?;
            events::list(&**client, &filter).await.map_err(status::db)
        }
        .await;
        let page = match read {
            Ok(page) => page,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let last = page.events.last().map(|e| e.id);
        let full = page.events.len() as i64 >= filter.limit;
        let settle = match pending {
            Some((_, xmax)) => page.xmin >= xmax,
            None => page.xmin == page.xmax,
        };
        let mut progressed = false;
        if settle {
            let upto = pending.map(|(m, _)| m).or(last);
            for event in page.events {
                if tx.send(Ok(convert::event(event))).await.is_err() {
                    return;
                }
            }
            if let Some(upto) = upto {
                // A full page stops at its last row; otherwise every id up to `upto` is done.
                cursor = if full {
                    last.unwrap_or(upto)
                } else {
                    upto.max(cursor)
                };
                progressed = true;
            }
            pending = None;
        } else if pending.is_none()
            && let Some(m) = last
        {
            pending = Some((m, page.xmax));
            progressed = true;
        }
        if progressed && (full || pending.is_some()) {
            // More to read, or waiting on running transactions: look again soon.
            tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                () = tx.closed() => return,
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
            continue;
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            () = tx.closed() => return,
            _ = tokio::time::timeout(if pending.is_some() { Duration::from_millis(5) } else { WATCH_POLL }, wake.changed()) => {}
        }
    }
}
