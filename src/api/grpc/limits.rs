//! What one caller may hold of the gRPC port: open streams per principal ([`StreamSlots`])
//! and handlers running at once across the process ([`ConcurrencyLayer`]); with the HTTP/2
//! per-connection stream limit (set on the server), a flood of streams or calls from one
//! client leaves room for everyone else; and the size of a request's headers
//! ([`HeaderSizeLayer`]). Nothing here runs in the background.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::Status;
use tonic::codegen::http;
use tower_service::Service;

use super::layer::BoxFuture;
use super::principal::Principal;

/// The limits of the gRPC port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcLimits {
    /// Streams (`WatchEvents`, `WatchStatus`) one principal may hold open at once.
    pub streams_per_caller: usize,
    /// HTTP/2 streams one connection may have in flight.
    pub streams_per_connection: u32,
    /// Handlers running at once in the process; later calls wait their turn, in order.
    pub concurrent_calls: usize,
}

impl Default for RpcLimits {
    fn default() -> Self {
        Self {
            streams_per_caller: 64,
            streams_per_connection: 256,
            concurrent_calls: 128,
        }
    }
}

/// Open streams per principal.
#[derive(Debug)]
pub struct StreamSlots {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream of a principal; gives its slot back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    who: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamSlots {
    /// At most `max` open streams per principal.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// Takes a slot for a new stream of `principal`.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED when the principal already holds the most streams allowed.
    pub fn open(&self, principal: &Principal) -> Result<StreamSlot, Status> {
        let who = principal.subject.clone();
        // A map of counters: consistent after a panic elsewhere.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(who.clone()).or_insert(0);
        if *n >= self.max {
            return Err(Status::resource_exhausted(format!(
                "this caller holds {} open streams, the most allowed; close one first",
                self.max
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            who,
            open: Arc::clone(&self.open),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.who);
            }
        }
    }
}

/// A tower layer that lets at most `n` handlers run at once across every connection; a call
/// waits (in arrival order) for a turn. A streaming call holds its turn only until its stream
/// is returned, so open streams never hold turns.
#[derive(Debug, Clone)]
pub struct ConcurrencyLayer {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLayer {
    /// At most `n` (at least 1) handlers at once.
    pub fn new(n: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(n.max(1))),
        }
    }
}

impl<S> tower_layer::Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Concurrency {
            inner,
            permits: Arc::clone(&self.permits),
        }
    }
}

/// The service of [`ConcurrencyLayer`].
#[derive(Debug, Clone)]
pub struct Concurrency<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<http::Request<B>> for Concurrency<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let permits = Arc::clone(&self.permits);
        let handler = self.inner.call(request);
        Box::pin(async move {
            // The semaphore is never closed: acquiring fails only if it were.
            let _turn = permits.acquire_owned().await;
            handler.await
        })
    }
}

/// A tower layer that answers RESOURCE_EXHAUSTED, on its own call, to a request whose
/// headers (counted as HTTP/2 counts a header list: name, value and 32 bytes a field) exceed
/// a limit: the transport admits much larger header lists so that they get an answer rather
/// than a closed connection, and this keeps what a handler sees small.
#[derive(Debug, Clone, Copy)]
pub struct HeaderSizeLayer {
    max: usize,
}

impl HeaderSizeLayer {
    /// Header lists of at most `max` bytes pass.
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> tower_layer::Layer<S> for HeaderSizeLayer {
    type Service = HeaderSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HeaderSize {
            inner,
            max: self.max,
        }
    }
}

/// The service of [`HeaderSizeLayer`].
#[derive(Debug, Clone)]
pub struct HeaderSize<S> {
    inner: S,
    max: usize,
}

/// The size of `headers` as HTTP/2 counts a header list (RFC 9113, 6.5.2).
pub fn header_list_size(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

impl<S, B, R> Service<http::Request<B>> for HeaderSize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let size = header_list_size(request.headers());
        if size > self.max {
            let max = self.max;
            return Box::pin(async move {
                Ok(Status::resource_exhausted(format!(
                    "the request's headers are {size} bytes; at most {max} are accepted"
                ))
                .into_http())
            });
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::grpc::principal::{Role, Tenant};

    fn principal(subject: &str) -> Principal {
        Principal {
            subject: subject.into(),
            role: Role::Viewer,
            tenant: Tenant::All,
        }
    }

    #[test]
    fn a_principal_gets_at_most_its_slots_and_a_closed_stream_gives_one_back() {
        let slots = StreamSlots::new(2);
        let a1 = slots.open(&principal("a")).unwrap();
        let _a2 = slots.open(&principal("a")).unwrap();
        let refused = slots.open(&principal("a")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Another caller is not affected.
        let _b = slots.open(&principal("b")).unwrap();
        drop(a1);
        let _a3 = slots.open(&principal("a")).unwrap();
    }
}
