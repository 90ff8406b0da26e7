//! The OTLP/gRPC span exporter: a batch of the SDK's spans is written straight into one
//! `ExportTraceServiceRequest` in the protocol's wire format (the collector's
//! `opentelemetry/proto/collector/trace/v1` messages), without building the intermediate
//! message structs, and sent to `TraceService/Export` over a tonic channel.
//!
//! A registry makes a span per call, tens of thousands a second, on the cores that serve the
//! calls: building the generated structs copies every span (its name, each attribute key and
//! value) and frees it all again, which costs more than the span itself. Here the only copy
//! is the encoded bytes.
//!
//! Settings are the standard ones: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://localhost:4317`), `…_HEADERS` (`key=value,…`, values
//! percent-decoded), `…_TIMEOUT` (milliseconds, 10,000), `…_PROTOCOL` (`grpc` only) and
//! `…_COMPRESSION` (`none` only), the traces-specific variable first.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::SpanData;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::Channel;

/// The exporter's settings, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The collector's gRPC endpoint.
    pub endpoint: String,
    /// Metadata sent with every export.
    pub headers: Vec<(String, String)>,
    /// How long one export may take.
    pub timeout: Duration,
}

impl Settings {
    /// The settings `var` gives (a lookup of an environment variable).
    ///
    /// # Errors
    /// A setting is malformed or asks for what this exporter does not do (another protocol,
    /// compression, TLS); the message names the variable, never a header's value.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let setting = |name: &str| {
            let traces = format!("OTEL_EXPORTER_OTLP_TRACES_{name}");
            let general = format!("OTEL_EXPORTER_OTLP_{name}");
            var(&traces)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (traces, v))
                .or_else(|| {
                    var(&general)
                        .filter(|v| !v.trim().is_empty())
                        .map(|v| (general, v))
                })
        };
        if let Some((name, protocol)) = setting("PROTOCOL")
            && protocol.trim() != "grpc"
        {
            return Err(format!(
                "{name}={protocol}: only grpc is supported (point it at the collector's OTLP/gRPC port)"
            ));
        }
        if let Some((name, compression)) = setting("COMPRESSION")
            && compression.trim() != "none"
        {
            return Err(format!(
                "{name}={compression}: only none is supported (spans go out uncompressed)"
            ));
        }
        let endpoint = setting("ENDPOINT")
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "http://localhost:4317".to_owned());
        if !endpoint.starts_with("http://") {
            return Err(format!(
                "the OTLP endpoint {endpoint:?} is not http://host:port (TLS is not built in: \
                 send to a collector on the same host or network and let it forward)"
            ));
        }
        let timeout = match setting("TIMEOUT") {
            None => Duration::from_secs(10),
            Some((name, v)) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| format!("{name}: not a positive number of milliseconds"))?,
        };
        let headers = match setting("HEADERS") {
            None => Vec::new(),
            Some((name, v)) => parse_headers(&v).map_err(|e| format!("{name}: {e}"))?,
        };
        Ok(Self {
            endpoint,
            headers,
            timeout,
        })
    }
}

/// `key=value,key2=value2` (values percent-encoded) as metadata pairs. Errors name the entry
/// by position, not by its value (a header is often a credential).
fn parse_headers(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut headers = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!("entry {} is not key=value", i + 1));
        };
        let key = key.trim().to_ascii_lowercase();
        let value = percent_decode(value.trim())
            .ok_or_else(|| format!("entry {}: a malformed percent escape", i + 1))?;
        if MetadataKey::<tonic::metadata::Ascii>::from_bytes(key.as_bytes()).is_err()
            || MetadataValue::<tonic::metadata::Ascii>::try_from(value.as_str()).is_err()
        {
            return Err(format!("entry {}: not a valid gRPC metadata pair", i + 1));
        }
        headers.push((key, value));
    }
    Ok(headers)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Sends batches of spans to a collector's `TraceService/Export`.
pub struct Exporter {
    channel: Channel,
    metadata: MetadataMap,
    /// The encoded `Resource` message and the resource's schema URL.
    resource: Vec<u8>,
    schema_url: String,
}

/// Names the headers it sends, never their values (often a collector's credential).
impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<&str> = self
            .metadata
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str(),
            })
            .collect();
        f.debug_struct("Exporter")
            .field("headers", &headers)
            .finish_non_exhaustive()
    }
}

/// What an export achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Spans the collector said it rejected (a partial success).
    pub rejected: u64,
}

impl Exporter {
    /// An exporter for `settings`; connects on the first export. Must be called inside the
    /// tokio runtime exports run on.
    ///
    /// # Errors
    /// The endpoint is not a usable URI.
    pub fn new(settings: &Settings) -> Result<Self, String> {
        let channel = Channel::from_shared(settings.endpoint.clone())
            .map_err(|e| {
                format!(
                    "the OTLP endpoint {:?}: {e}",
                    crate::secrets::redact_url(&settings.endpoint)
                )
            })?
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .connect_lazy();
        let mut metadata = MetadataMap::new();
        for (key, value) in &settings.headers {
            // Checked when the settings were read.
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                metadata.insert(key, value);
            }
        }
        Ok(Self {
            channel,
            metadata,
            resource: Vec::new(),
            schema_url: String::new(),
        })
    }

    /// Describes every span as coming from `resource`.
    pub fn set_resource(&mut self, resource: &Resource) {
        self.resource.clear();
        for (key, value) in resource.iter() {
            message(&mut self.resource, 1, |buf| {
                key_value(buf, key.as_str(), value)
            });
        }
        self.schema_url = resource.schema_url().unwrap_or_default().to_owned();
    }

    /// The request that carries `batch`, encoded.
    pub fn encode(&self, batch: &[SpanData]) -> Vec<u8> {
        encode_request(batch, &self.resource, &self.schema_url)
    }

    /// Sends an encoded request.
    ///
    /// # Errors
    /// The collector could not be reached or refused the request; the message names the
    /// failure, not the spans.
    pub async fn send(&self, request: Vec<u8>) -> Result<Exported, OTelSdkError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| OTelSdkError::InternalFailure(format!("the OTLP collector: {e}")))?;
        let mut call = tonic::Request::new(Bytes::from(request));
        *call.metadata_mut() = self.metadata.clone();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        );
        let answer = grpc
            .unary(call, path, RawCodec)
            .await
            .map_err(|e| OTelSdkError::InternalFailure(format!("the OTLP collector: {e}")))?;
        Ok(Exported {
            rejected: answer.into_inner(),
        })
    }
}

/// Sends the request's bytes as they are; reads the answer's count of rejected spans.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = u64;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = u64;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<u64>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        let answer = <ExportResponse as prost::Message>::decode(bytes)
            .map_err(|e| tonic::Status::internal(format!("an unreadable export answer: {e}")))?;
        Ok(Some(answer.partial_success.map_or(0, |p| {
            u64::try_from(p.rejected_spans).unwrap_or(0)
        })))
    }
}

/// `ExportTraceServiceResponse`: what of it the exporter reads.
#[derive(Clone, PartialEq, prost::Message)]
struct ExportResponse {
    #[prost(message, optional, tag = "1")]
    partial_success: Option<PartialSuccess>,
}

/// `ExportTracePartialSuccess`.
#[derive(Clone, PartialEq, prost::Message)]
struct PartialSuccess {
    #[prost(int64, tag = "1")]
    rejected_spans: i64,
    #[prost(string, tag = "2")]
    error_message: String,
}

// ---- The wire format -------------------------------------------------------------------
//
// Every message is written with its length first, so each has a `*_len` that computes its
// encoded size (without its own tag and length) and a writer. Fields holding their default
// value are left out, as proto3 encoders do; members of a oneof are always written.

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from(field << 3 | wire));
}

/// A length-delimited field's size: its tag (every field here is below 16: one byte), its
/// length, its content.
fn delimited_len(content: usize) -> usize {
    1 + varint_len(content as u64) + content
}

fn bytes_field(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
    if !value.is_empty() {
        tag(buf, field, LEN);
        varint(buf, value.len() as u64);
        buf.extend_from_slice(value);
    }
}

fn bytes_field_len(value: &[u8]) -> usize {
    if value.is_empty() {
        0
    } else {
        delimited_len(value.len())
    }
}

fn varint_field(buf: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        tag(buf, field, VARINT);
        varint(buf, value);
    }
}

fn varint_field_len(field: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        varint_len(u64::from(field << 3)) + varint_len(value)
    }
}

/// A fixed-width field (`FIXED64` or `FIXED32`) holding `le` (its value, little-endian).
fn fixed_field(buf: &mut Vec<u8>, field: u32, wire: u32, le: &[u8]) {
    if le.iter().any(|b| *b != 0) {
        tag(buf, field, wire);
        buf.extend_from_slice(le);
    }
}

fn fixed_field_len(field: u32, le: &[u8]) -> usize {
    if le.iter().any(|b| *b != 0) {
        varint_len(u64::from(field << 3)) + le.len()
    } else {
        0
    }
}

fn fixed64_field(buf: &mut Vec<u8>, field: u32, value: u64) {
    fixed_field(buf, field, FIXED64, &value.to_le_bytes());
}

fn fixed64_field_len(field: u32, value: u64) -> usize {
    fixed_field_len(field, &value.to_le_bytes())
}

fn fixed32_field(buf: &mut Vec<u8>, field: u32, value: u32) {
    fixed_field(buf, field, FIXED32, &value.to_le_bytes());
}

fn fixed32_field_len(field: u32, value: u32) -> usize {
    fixed_field_len(field, &value.to_le_bytes())
}

/// A nested message whose size is not known ahead (the resource and scope, written once per
/// batch): written, then its length put in front.
fn message(buf: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut content = Vec::new();
    write(&mut content);
    tag(buf, field, LEN);
    varint(buf, content.len() as u64);
    buf.extend_from_slice(&content);
}

/// A nested message of known size.
fn sized(buf: &mut Vec<u8>, field: u32, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
    tag(buf, field, LEN);
    varint(buf, len as u64);
    let start = buf.len();
    write(buf);
    debug_assert_eq!(buf.len() - start, len, "field {field}: size computed wrong");
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `AnyValue`, for a scalar.
enum Scalar<'a> {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(&'a str),
}

fn scalar_len(v: &Scalar<'_>) -> usize {
    match v {
        Scalar::Bool(_) => 2,
        Scalar::Int(i) => 1 + varint_len(*i as u64),
        Scalar::Double(_) => 9,
        Scalar::Str(s) => delimited_len(s.len()),
    }
}

fn scalar(buf: &mut Vec<u8>, v: &Scalar<'_>) {
    match v {
        Scalar::Bool(b) => {
            tag(buf, 2, VARINT);
            varint(buf, u64::from(*b));
        }
        Scalar::Int(i) => {
            tag(buf, 3, VARINT);
            varint(buf, *i as u64);
        }
        Scalar::Double(d) => {
            tag(buf, 4, FIXED64);
            buf.extend_from_slice(&d.to_bits().to_le_bytes());
        }
        Scalar::Str(s) => {
            tag(buf, 1, LEN);
            varint(buf, s.len() as u64);
            buf.extend_from_slice(s.as_bytes());
        }
    }
}

/// Each element of an array value.
fn elements(array: &Array) -> Vec<Scalar<'_>> {
    match array {
        Array::Bool(v) => v.iter().map(|b| Scalar::Bool(*b)).collect(),
        Array::I64(v) => v.iter().map(|i| Scalar::Int(*i)).collect(),
        Array::F64(v) => v.iter().map(|d| Scalar::Double(*d)).collect(),
        Array::String(v) => v.iter().map(|s| Scalar::Str(s.as_str())).collect(),
        _ => Vec::new(),
    }
}

/// `ArrayValue`'s content: each element an `AnyValue` in field 1.
fn array_len(items: &[Scalar<'_>]) -> usize {
    items.iter().map(|v| delimited_len(scalar_len(v))).sum()
}

/// `AnyValue`'s content.
fn any_value_len(value: &Value) -> usize {
    match value {
        Value::Bool(b) => scalar_len(&Scalar::Bool(*b)),
        Value::I64(i) => scalar_len(&Scalar::Int(*i)),
        Value::F64(d) => scalar_len(&Scalar::Double(*d)),
        Value::String(s) => scalar_len(&Scalar::Str(s.as_str())),
        Value::Array(a) => delimited_len(array_len(&elements(a))),
        _ => 0,
    }
}

fn any_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(b) => scalar(buf, &Scalar::Bool(*b)),
        Value::I64(i) => scalar(buf, &Scalar::Int(*i)),
        Value::F64(d) => scalar(buf, &Scalar::Double(*d)),
        Value::String(s) => scalar(buf, &Scalar::Str(s.as_str())),
        Value::Array(a) => {
            let items = elements(a);
            sized(buf, 5, array_len(&items), |buf| {
                for item in &items {
                    sized(buf, 1, scalar_len(item), |buf| scalar(buf, item));
                }
            });
        }
        _ => {}
    }
}

/// `KeyValue`'s content.
fn key_value_len(key: &str, value: &Value) -> usize {
    bytes_field_len(key.as_bytes()) + delimited_len(any_value_len(value))
}

fn key_value(buf: &mut Vec<u8>, key: &str, value: &Value) {
    bytes_field(buf, 1, key.as_bytes());
    sized(buf, 2, any_value_len(value), |buf| any_value(buf, value));
}

/// Repeated `KeyValue`s in `field`: their size.
fn attributes_len(attributes: &[KeyValue]) -> usize {
    attributes
        .iter()
        .map(|kv| delimited_len(key_value_len(kv.key.as_str(), &kv.value)))
        .sum()
}

fn attributes<'a>(
    buf: &mut Vec<u8>,
    field: u32,
    attributes: impl IntoIterator<Item = &'a KeyValue>,
) {
    for kv in attributes {
        let len = key_value_len(kv.key.as_str(), &kv.value);
        sized(buf, field, len, |buf| {
            key_value(buf, kv.key.as_str(), &kv.value)
        });
    }
}

/// `W3C trace flags` plus "whether the parent is remote is known" and, if so, remote.
fn span_flags(trace_flags: u8, remote: bool) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

fn trace_state(context: &SpanContext) -> Option<String> {
    (context.trace_state() != &TraceState::NONE).then(|| context.trace_state().header())
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// `Status`: its message (errors only) and code.
fn status_parts(status: &Status) -> (&str, u64) {
    match status {
        Status::Unset => ("", 0),
        Status::Ok => ("", 1),
        Status::Error { description } => (description.as_ref(), 2),
    }
}

fn status_len(status: &Status) -> usize {
    let (message, code) = status_parts(status);
    bytes_field_len(message.as_bytes()) + varint_field_len(3, code)
}

fn event_len(event: &opentelemetry::trace::Event) -> usize {
    fixed64_field_len(1, nanos(event.timestamp))
        + bytes_field_len(event.name.as_bytes())
        + attributes_len(&event.attributes)
        + varint_field_len(4, u64::from(event.dropped_attributes_count))
}

fn event(buf: &mut Vec<u8>, event: &opentelemetry::trace::Event) {
    fixed64_field(buf, 1, nanos(event.timestamp));
    bytes_field(buf, 2, event.name.as_bytes());
    attributes(buf, 3, &event.attributes);
    varint_field(buf, 4, u64::from(event.dropped_attributes_count));
}

fn link_len(link: &opentelemetry::trace::Link, state: Option<&str>) -> usize {
    let sc = &link.span_context;
    bytes_field_len(&sc.trace_id().to_bytes())
        + bytes_field_len(&sc.span_id().to_bytes())
        + bytes_field_len(state.unwrap_or_default().as_bytes())
        + attributes_len(&link.attributes)
        + varint_field_len(5, u64::from(link.dropped_attributes_count))
        + fixed32_field_len(6, span_flags(sc.trace_flags().to_u8(), sc.is_remote()))
}

fn link(buf: &mut Vec<u8>, link: &opentelemetry::trace::Link, state: Option<&str>) {
    let sc = &link.span_context;
    bytes_field(buf, 1, &sc.trace_id().to_bytes());
    bytes_field(buf, 2, &sc.span_id().to_bytes());
    bytes_field(buf, 3, state.unwrap_or_default().as_bytes());
    attributes(buf, 4, &link.attributes);
    varint_field(buf, 5, u64::from(link.dropped_attributes_count));
    fixed32_field(buf, 6, span_flags(sc.trace_flags().to_u8(), sc.is_remote()));
}

/// The parts of a span whose size is worked out once, then written.
struct SpanParts<'a> {
    span: &'a SpanData,
    state: Option<String>,
    link_states: Vec<Option<String>>,
    parent: [u8; 8],
    len: usize,
}

impl<'a> SpanParts<'a> {
    fn new(span: &'a SpanData) -> Self {
        let state = trace_state(&span.span_context);
        let link_states: Vec<Option<String>> = span
            .links
            .iter()
            .map(|l| trace_state(&l.span_context))
            .collect();
        let parent = if span.parent_span_id == opentelemetry::trace::SpanId::INVALID {
            [0; 8]
        } else {
            span.parent_span_id.to_bytes()
        };
        let mut parts = Self {
            span,
            state,
            link_states,
            parent,
            len: 0,
        };
        parts.len = parts.compute_len();
        parts
    }

    fn parent(&self) -> &[u8] {
        if self.parent == [0; 8] {
            &[]
        } else {
            &self.parent
        }
    }

    fn flags(&self) -> u32 {
        span_flags(
            self.span.span_context.trace_flags().to_u8(),
            self.span.parent_span_is_remote,
        )
    }

    fn compute_len(&self) -> usize {
        let s = self.span;
        let sc = &s.span_context;
        bytes_field_len(&sc.trace_id().to_bytes())
            + bytes_field_len(&sc.span_id().to_bytes())
            + bytes_field_len(self.state.as_deref().unwrap_or_default().as_bytes())
            + bytes_field_len(self.parent())
            + bytes_field_len(s.name.as_bytes())
            + varint_field_len(6, kind(&s.span_kind))
            + fixed64_field_len(7, nanos(s.start_time))
            + fixed64_field_len(8, nanos(s.end_time))
            + attributes_len(&s.attributes)
            + varint_field_len(10, u64::from(s.dropped_attributes_count))
            + s.events
                .iter()
                .map(|e| delimited_len(event_len(e)))
                .sum::<usize>()
            + varint_field_len(12, u64::from(s.events.dropped_count))
            + s.links
                .iter()
                .zip(&self.link_states)
                .map(|(l, state)| delimited_len(link_len(l, state.as_deref())))
                .sum::<usize>()
            + varint_field_len(14, u64::from(s.links.dropped_count))
            + delimited_len(status_len(&s.status))
            + fixed32_field_len(16, self.flags())
    }

    fn write(&self, buf: &mut Vec<u8>) {
        let s = self.span;
        let sc = &s.span_context;
        bytes_field(buf, 1, &sc.trace_id().to_bytes());
        bytes_field(buf, 2, &sc.span_id().to_bytes());
        bytes_field(buf, 3, self.state.as_deref().unwrap_or_default().as_bytes());
        bytes_field(buf, 4, self.parent());
        bytes_field(buf, 5, s.name.as_bytes());
        varint_field(buf, 6, kind(&s.span_kind));
        fixed64_field(buf, 7, nanos(s.start_time));
        fixed64_field(buf, 8, nanos(s.end_time));
        attributes(buf, 9, &s.attributes);
        varint_field(buf, 10, u64::from(s.dropped_attributes_count));
        for e in s.events.iter() {
            sized(buf, 11, event_len(e), |buf| event(buf, e));
        }
        varint_field(buf, 12, u64::from(s.events.dropped_count));
        for (l, state) in s.links.iter().zip(&self.link_states) {
            let state = state.as_deref();
            sized(buf, 13, link_len(l, state), |buf| link(buf, l, state));
        }
        varint_field(buf, 14, u64::from(s.links.dropped_count));
        let (message, code) = status_parts(&s.status);
        sized(buf, 15, status_len(&s.status), |buf| {
            bytes_field(buf, 2, message.as_bytes());
            varint_field(buf, 3, code);
        });
        fixed32_field(buf, 16, self.flags());
    }
}

/// `InstrumentationScope`, encoded.
fn scope(scope: &InstrumentationScope) -> Vec<u8> {
    let mut buf = Vec::new();
    bytes_field(&mut buf, 1, scope.name().as_bytes());
    bytes_field(&mut buf, 2, scope.version().unwrap_or_default().as_bytes());
    attributes(&mut buf, 3, scope.attributes());
    buf
}

/// One `ExportTraceServiceRequest` holding `batch`: one `ResourceSpans` (the exporter's
/// `resource`, encoded, and its `schema_url`), with a `ScopeSpans` for each run of spans from
/// one instrumentation scope.
fn encode_request(batch: &[SpanData], resource: &[u8], schema_url: &str) -> Vec<u8> {
    let parts: Vec<SpanParts<'_>> = batch.iter().map(SpanParts::new).collect();
    // Runs of one scope (a registry has one tracer: one run).
    let mut runs: Vec<(Vec<u8>, &str, std::ops::Range<usize>)> = Vec::new();
    for (i, span) in batch.iter().enumerate() {
        match runs.last_mut() {
            Some((_, _, range))
                if batch[range.start].instrumentation_scope == span.instrumentation_scope =>
            {
                range.end = i + 1;
            }
            _ => runs.push((
                scope(&span.instrumentation_scope),
                span.instrumentation_scope.schema_url().unwrap_or_default(),
                i..i + 1,
            )),
        }
    }
    let run_len = |(scope, schema, range): &(Vec<u8>, &str, std::ops::Range<usize>)| {
        delimited_len(scope.len())
            + parts[range.clone()]
                .iter()
                .map(|p| delimited_len(p.len))
                .sum::<usize>()
            + bytes_field_len(schema.as_bytes())
    };
    let resource_spans_len = delimited_len(resource.len())
        + runs
            .iter()
            .map(|r| delimited_len(run_len(r)))
            .sum::<usize>()
        + bytes_field_len(schema_url.as_bytes());
    let mut buf = Vec::with_capacity(delimited_len(resource_spans_len));
    sized(&mut buf, 1, resource_spans_len, |buf| {
        sized(buf, 1, resource.len(), |buf| {
            buf.extend_from_slice(resource)
        });
        for run in &runs {
            let (scope, schema, range) = run;
            sized(buf, 2, run_len(run), |buf| {
                sized(buf, 1, scope.len(), |buf| buf.extend_from_slice(scope));
                for part in &parts[range.clone()] {
                    sized(buf, 2, part.len, |buf| part.write(buf));
                }
                bytes_field(buf, 3, schema.as_bytes());
            });
        }
        bytes_field(buf, 3, schema_url.as_bytes());
    });
    buf
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use opentelemetry::trace::{Event, Link, SpanId, TraceFlags, TraceId, TraceState as State};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;

    use super::*;

    fn context(trace: u128, span: u64, remote: bool, state: State) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            state,
        )
    }

    fn span(n: u64, scope: &InstrumentationScope) -> SpanData {
        let at = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + n);
        let mut events = SpanEvents::default();
        events.events.push(Event::new(
            "an event",
            at,
            vec![KeyValue::new("count", 3_i64), KeyValue::new("ok", false)],
            1,
        ));
        events.dropped_count = 2;
        let mut links = SpanLinks::default();
        links.links.push(Link::new(
            context(
                0xabc,
                0xdef,
                true,
                State::from_key_value([("k", "v")]).unwrap(),
            ),
            vec![KeyValue::new("why", "batch")],
            0,
        ));
        SpanData {
            span_context: context(
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736 + u128::from(n),
                n + 1,
                false,
                State::NONE,
            ),
            parent_span_id: if n.is_multiple_of(2) {
                SpanId::from(77)
            } else {
                SpanId::INVALID
            },
            parent_span_is_remote: n.is_multiple_of(2),
            span_kind: [SpanKind::Server, SpanKind::Internal, SpanKind::Client][n as usize % 3]
                .clone(),
            name: Cow::Owned(format!("dsreg.v1.Lifecycle/GetStatus-{n}")),
            start_time: at,
            end_time: at + Duration::from_micros(250),
            attributes: vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", "GetStatus"),
                KeyValue::new("n", n as i64),
                KeyValue::new("ratio", 0.5),
                KeyValue::new("flag", true),
                KeyValue::new("big", -1_i64),
                KeyValue::new(
                    "tags",
                    Value::Array(Array::String(vec!["a".into(), "".into()])),
                ),
                KeyValue::new("ints", Value::Array(Array::I64(vec![1, -2, 300]))),
                KeyValue::new("empty", ""),
                KeyValue::new("é".repeat(70), "x".repeat(200)),
            ],
            dropped_attributes_count: u32::from(n == 1),
            events,
            links,
            status: match n % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error("it failed"),
            },
            instrumentation_scope: scope.clone(),
        }
    }

    fn decoded(bytes: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(bytes).expect("well-formed protobuf")
    }

    #[test]
    fn a_batch_decodes_to_what_the_official_conversion_builds() {
        let scope = InstrumentationScope::builder("dsreg")
            .with_version("1.2.3")
            .with_attributes([KeyValue::new("scope.attr", 1_i64)])
            .build();
        let resource = Resource::builder()
            .with_service_name("dsreg-test")
            .with_attributes([KeyValue::new("deployment.environment", "ci")])
            .build();
        let batch: Vec<SpanData> = (0..6).map(|n| span(n, &scope)).collect();

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _inside = runtime.enter();
        let settings = Settings::from_lookup(|_| None).unwrap();
        let mut exporter = Exporter::new(&settings).unwrap();
        exporter.set_resource(&resource);
        let ours = decoded(&exporter.encode(&batch));

        let official = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                batch.clone(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        let mut ours_sorted = ours.clone();
        let mut official_sorted = official;
        for request in [&mut ours_sorted, &mut official_sorted] {
            for rs in &mut request.resource_spans {
                if let Some(r) = rs.resource.as_mut() {
                    r.attributes.sort_by(|a, b| a.key.cmp(&b.key));
                }
            }
        }
        assert_eq!(ours_sorted, official_sorted);
        assert_eq!(ours.resource_spans[0].scope_spans[0].spans.len(), 6);
    }

    #[test]
    fn spans_of_two_scopes_go_in_a_scope_each_and_an_empty_batch_is_a_valid_request() {
        let a = InstrumentationScope::builder("a").build();
        let b = InstrumentationScope::builder("b").build();
        let batch = vec![span(0, &a), span(1, &a), span(2, &b)];
        let request = decoded(&encode_request(&batch, &[], ""));
        let scopes: Vec<(String, usize)> = request.resource_spans[0]
            .scope_spans
            .iter()
            .map(|s| (s.scope.as_ref().unwrap().name.clone(), s.spans.len()))
            .collect();
        assert_eq!(scopes, vec![("a".to_owned(), 2), ("b".to_owned(), 1)]);
        let empty = decoded(&encode_request(&[], &[], ""));
        assert!(empty.resource_spans[0].scope_spans.is_empty());
    }

    #[test]
    fn the_exporter_never_shows_a_header_value() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _inside = runtime.enter();
        let settings = Settings::from_lookup(|name| {
            (name == "OTEL_EXPORTER_OTLP_HEADERS").then(|| "authorization=Bearer s3cret".to_owned())
        })
        .unwrap();
        let shown = format!("{:?}", Exporter::new(&settings).unwrap());
        assert!(
            shown.contains("authorization") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn varint_sizes_match_what_is_written() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn settings_come_from_the_standard_variables_and_bad_ones_are_refused_without_values() {
        let env = crate::telemetry::env_of;
        let s = Settings::from_lookup(env(&[])).unwrap();
        assert_eq!(s.endpoint, "http://localhost:4317");
        assert_eq!(s.timeout, Duration::from_secs(10));
        let s = Settings::from_lookup(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20s3cret, x-tenant = a ",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]))
        .unwrap();
        assert_eq!(s.endpoint, "http://traces:4317");
        assert_eq!(
            s.headers,
            vec![
                ("authorization".to_owned(), "Bearer s3cret".to_owned()),
                ("x-tenant".to_owned(), "a".to_owned())
            ]
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
        for (bad, says) in [
            (
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")][..],
                "only grpc",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")][..],
                "only none",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")][..],
                "TLS",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")][..],
                "milliseconds",
            ),
            (
                &[(
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "Authorization=Bearer%zzs3cret",
                )][..],
                "entry 1",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_HEADERS", "ok=1,s3cret")][..],
                "entry 2",
            ),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = bad;
            let e = Settings::from_lookup(env(pairs)).unwrap_err();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
