//! `POST /ingest/{datasource_id}`: the webhook ingress. The body (one JSON record, an array,
//! or NDJSON) is verified against the datasource's HMAC key and handed to its running worker;
//! 202 is answered only once every record is committed or dead-lettered, with the counts of
//! each (`written` counts output records, after the transform).
//!
//! Answers: 202 accepted, 400 malformed body, 401 bad or missing signature, 409 a delivery id
//! already accepted (by any instance: ids are claimed in Postgres), 404 for every id
//! that is not a webhook running here (missing, another kind, disabled, stopped: one answer),
//! 413 over the size limit, 415 wrong content type, 429 inbox full (with `Retry-After`), 503
//! the worker stopped while the delivery was in hand.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

use super::HttpState;
use crate::connectors::webhook::Refusal;
use crate::db::repository::deliveries;

/// How long a delivery may wait for its commit before the sender is told to retry.
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// The answer for every id that is not a webhook running here.
const NOT_A_WEBHOOK: &str = "no webhook datasource is running at this address";

fn answer(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

pub(super) async fn ingest(
    State(state): State<Arc<HttpState>>,
    Path(datasource): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Every id that is not a webhook running here gets the same answer, without a database
    // read: a sender cannot tell a missing id from another kind, a disabled datasource or
    // another tenant's.
    let Some((datasource, inbox)) = Uuid::parse_str(&datasource)
        .ok()
        .and_then(|id| Some((id, state.ingress.inbox(id)?)))
    else {
        return answer(StatusCode::NOT_FOUND, NOT_A_WEBHOOK);
    };
    let ndjson = match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(t) if t.starts_with("application/json") => false,
        Some(t) if t.starts_with("application/x-ndjson") || t.starts_with("application/ndjson") => {
            true
        }
        _ => {
            return answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content type must be application/json or application/x-ndjson",
            );
        }
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > inbox.max_body_bytes)
    {
        return answer(StatusCode::PAYLOAD_TOO_LARGE, "body over the size limit");
    }
    // Read at most the limit: an oversized body is refused, not buffered.
    let Ok(bytes) = to_bytes(body, inbox.max_body_bytes).await else {
        return answer(StatusCode::PAYLOAD_TOO_LARGE, "body over the size limit");
    };
    let signature = headers
        .get(inbox.signature_header.as_str())
        .and_then(|v| v.to_str().ok());
    let reserved = match inbox.verify(&bytes, signature) {
        Ok(reserved) => reserved,
        Err(Refusal::Stale) => {
            return answer(
                StatusCode::UNAUTHORIZED,
                "the signature's timestamp is outside the tolerance window",
            );
        }
        Err(Refusal::Replayed) => return replayed(),
        Err(Refusal::Busy) => {
            return answer(
                StatusCode::TOO_MANY_REQUESTS,
                "too many delivery ids within the window; retry later",
            );
        }
        Err(_) => return answer(StatusCode::UNAUTHORIZED, "missing or invalid signature"),
    };
    // The id is this instance's now; it must also be no other instance's (a replay sent to
    // another instance behind the same load balancer, or after the datasource moved).
    let shared = match reserved.delivery_id() {
        Some((id, expires_at)) => {
            let claimed = match state.pool.get().await {
                Ok(client) => deliveries::claim(&**client, datasource, id, expires_at).await,
                Err(e) => Err(e.into()),
            };
            match claimed {
                Ok(true) => Some(id.to_owned()),
                Ok(false) => return replayed(),
                Err(e) => {
                    tracing::warn!(%datasource, error = %e, "cannot claim a webhook delivery id");
                    return answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the delivery id could not be checked; retry",
                    );
                }
            }
        }
        None => None,
    };
    let (response, accepted) = deliver(&inbox, &bytes, ndjson, reserved).await;
    if let (false, Some(id)) = (accepted, shared) {
        // Not accepted: the sender may send it again, here or elsewhere.
        let released = match state.pool.get().await {
            Ok(client) => deliveries::release(&**client, datasource, &id).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = released {
            tracing::warn!(%datasource, error = %e, "cannot release a webhook delivery id; it expires with its window");
        }
    }
    response
}

fn replayed() -> Response {
    answer(
        StatusCode::CONFLICT,
        "this delivery id was already accepted",
    )
}

/// Parses the verified body and hands its records to the worker; answers when they are
/// committed. True when the delivery was accepted (its id then stays seen).
async fn deliver(
    inbox: &crate::connectors::webhook::Inbox,
    bytes: &[u8],
    ndjson: bool,
    reserved: crate::connectors::webhook::Reserved,
) -> (Response, bool) {
    let records = match parse(bytes, ndjson) {
        Ok(records) => records,
        Err(reason) => return (answer(StatusCode::BAD_REQUEST, &reason), false),
    };
    let count = records.len();
    let committed = match inbox.offer(records) {
        Ok(committed) => committed,
        Err(Refusal::Busy) => {
            let mut response = answer(
                StatusCode::TOO_MANY_REQUESTS,
                "the datasource's queue is full; retry later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return (response, false);
        }
        Err(_) => {
            return (
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the datasource's worker is not running",
                ),
                false,
            );
        }
    };
    match tokio::time::timeout(COMMIT_WAIT, committed).await {
        Ok(Ok(Ok(outcome))) => {
            reserved.keep();
            let response = (
                StatusCode::ACCEPTED,
                axum::Json(json!({
                    "accepted": count,
                    "written": outcome.written,
                    "dead_lettered": outcome.dead_lettered,
                })),
            )
                .into_response();
            (response, true)
        }
        _ => (
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the records were not committed; retry",
            ),
            false,
        ),
    }
}

/// One JSON record, an array of records, or NDJSON (one record per line).
fn parse(bytes: &[u8], ndjson: bool) -> Result<Vec<Value>, String> {
    if ndjson {
        return bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
            .map(|(i, line)| {
                serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", i + 1))
            })
            .collect();
    }
    match serde_json::from_slice(bytes).map_err(|e| format!("body is not JSON: {e}"))? {
        Value::Array(items) => Ok(items),
        other => Ok(vec![other]),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn bodies_parse_as_one_record_an_array_or_ndjson() {
        assert_eq!(parse(br#"{"a":1}"#, false).unwrap().len(), 1);
        assert_eq!(parse(br#"[{"a":1},{"a":2}]"#, false).unwrap().len(), 2);
        assert_eq!(parse(b"{\"a\":1}\n\n{\"a\":2}\n", true).unwrap().len(), 2);
        assert!(
            parse(b"{\"a\":1}\nnope", true)
                .unwrap_err()
                .starts_with("line 2")
        );
        assert!(parse(b"{", false).is_err());
    }
}
