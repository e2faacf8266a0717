//! OTLP protobuf encoding, by hand: the three export requests use a dozen message types,
//! and protobuf's wire format needs only varints, fixed 64-bit fields and length-delimited
//! fields. Field numbers are those of opentelemetry-proto v1 (`trace.proto`, `metrics.proto`,
//! `logs.proto`, `common.proto`, `resource.proto`); the unit tests check bytes a protobuf
//! library produced for the same messages.

use super::metrics::{Metric, MetricData, Point};
use super::SpanData;
use super::{LogData, Resource, Value};

/// A protobuf message being written.
#[derive(Default)]
pub struct Msg(pub Vec<u8>);

const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const I32: u64 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Msg {
    fn tag(&mut self, field: u64, wire: u64) {
        varint(&mut self.0, field << 3 | wire);
    }
    pub fn uint(&mut self, field: u64, v: u64) {
        if v != 0 {
            self.tag(field, VARINT);
            varint(&mut self.0, v);
        }
    }
    pub fn int(&mut self, field: u64, v: i64) {
        if v != 0 {
            self.tag(field, VARINT);
            varint(&mut self.0, v as u64);
        }
    }
    pub fn boolean(&mut self, field: u64, v: bool) {
        self.uint(field, v as u64);
    }
    pub fn fixed64(&mut self, field: u64, v: u64) {
        if v != 0 {
            self.tag(field, I64);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    pub fn fixed32(&mut self, field: u64, v: u32) {
        if v != 0 {
            self.tag(field, I32);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    pub fn double(&mut self, field: u64, v: f64) {
        if v != 0.0 {
            self.tag(field, I64);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    /// A double written even when zero (a `oneof` member, whose presence is the point).
    pub fn double_always(&mut self, field: u64, v: f64) {
        self.tag(field, I64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, field: u64, v: &[u8]) {
        if !v.is_empty() {
            self.bytes_always(field, v);
        }
    }
    pub fn bytes_always(&mut self, field: u64, v: &[u8]) {
        self.tag(field, LEN);
        varint(&mut self.0, v.len() as u64);
        self.0.extend_from_slice(v);
    }
    pub fn string(&mut self, field: u64, v: &str) {
        self.bytes(field, v.as_bytes());
    }
    /// A nested message, written even when empty (a repeated entry must be).
    pub fn message(&mut self, field: u64, build: impl FnOnce(&mut Msg)) {
        let mut inner = Msg::default();
        build(&mut inner);
        self.bytes_always(field, &inner.0);
    }
    pub fn packed_fixed64(&mut self, field: u64, vs: impl Iterator<Item = u64>) {
        let mut inner = Vec::new();
        for v in vs {
            inner.extend_from_slice(&v.to_le_bytes());
        }
        if !inner.is_empty() {
            self.bytes_always(field, &inner);
        }
    }
    pub fn packed_double(&mut self, field: u64, vs: impl Iterator<Item = f64>) {
        let mut inner = Vec::new();
        for v in vs {
            inner.extend_from_slice(&v.to_le_bytes());
        }
        if !inner.is_empty() {
            self.bytes_always(field, &inner);
        }
    }
}

/// common.v1.AnyValue: string 1, bool 2, int 3, double 4.
fn any_value(m: &mut Msg, v: &Value) {
    match v {
        Value::Str(s) => m.bytes_always(1, s.as_bytes()),
        Value::Bool(b) => {
            m.tag(2, VARINT);
            varint(&mut m.0, *b as u64);
        }
        Value::Int(i) => {
            m.tag(3, VARINT);
            varint(&mut m.0, *i as u64);
        }
        Value::F64(f) => m.double_always(4, *f),
    }
}

/// common.v1.KeyValue: key 1, value 2.
fn key_value(m: &mut Msg, field: u64, key: &str, v: &Value) {
    m.message(field, |kv| {
        kv.string(1, key);
        kv.message(2, |av| any_value(av, v));
    });
}

/// resource.v1.Resource: attributes 1.
fn resource(m: &mut Msg, r: &Resource) {
    m.message(1, |res| {
        for (k, v) in &r.attributes {
            key_value(res, 1, k, &Value::Str(v.clone()));
        }
    });
}

/// common.v1.InstrumentationScope: name 1, version 2.
fn scope(m: &mut Msg) {
    m.message(1, |s| {
        s.string(1, "ncps");
        s.string(2, env!("CARGO_PKG_VERSION"));
    });
}

/// trace.v1.Span.
fn span(m: &mut Msg, s: &SpanData) {
    m.message(2, |sp| {
        sp.bytes(1, &s.context.trace_id);
        sp.bytes(2, &s.context.span_id);
        if let Some(p) = &s.parent {
            sp.bytes(4, p);
        }
        sp.string(5, &s.name);
        sp.uint(6, s.kind as u64);
        sp.fixed64(7, s.start_ns);
        sp.fixed64(8, s.end_ns);
        for (k, v) in &s.attrs {
            key_value(sp, 9, k, v);
        }
        for l in &s.links {
            // Span.Link: trace_id 1, span_id 2.
            sp.message(13, |lm| {
                lm.bytes(1, &l.trace_id);
                lm.bytes(2, &l.span_id);
            });
        }
        // Status: message 2, code 3 (1 OK is not set: UNSET means "no error" to a reader).
        if let Some(why) = &s.error {
            sp.message(15, |st| {
                st.string(2, why);
                st.uint(3, 2);
            });
        }
        // Flags (16): the W3C flags byte is "sampled".
        sp.fixed32(16, 0x101);
    });
}

/// collector.trace.v1.ExportTraceServiceRequest.
pub fn traces(r: &Resource, spans: &[SpanData]) -> Vec<u8> {
    let mut m = Msg::default();
    // resource_spans 1 -> ResourceSpans{ resource 1, scope_spans 2 -> ScopeSpans{ scope 1, spans 2 } }
    m.message(1, |rs| {
        resource(rs, r);
        rs.message(2, |ss| {
            scope(ss);
            for s in spans {
                span(ss, s);
            }
        });
    });
    m.0
}

/// logs.v1.SeverityNumber for a log level.
pub fn severity(level: log::Level) -> u64 {
    match level {
        log::Level::Error => 17,
        log::Level::Warn => 13,
        log::Level::Info => 9,
        log::Level::Debug => 5,
        log::Level::Trace => 1,
    }
}

/// collector.logs.v1.ExportLogsServiceRequest.
pub fn logs(r: &Resource, records: &[LogData]) -> Vec<u8> {
    let mut m = Msg::default();
    m.message(1, |rl| {
        resource(rl, r);
        rl.message(2, |sl| {
            scope(sl);
            for l in records {
                // LogRecord: time 1, severity_number 2, severity_text 3, body 5, flags 8,
                // trace_id 9, span_id 10, observed_time 11.
                sl.message(2, |lr| {
                    lr.fixed64(1, l.time_ns);
                    lr.uint(2, severity(l.level));
                    lr.string(3, l.level.as_str());
                    lr.message(5, |b| b.bytes_always(1, l.body.as_bytes()));
                    if let Some(c) = &l.span {
                        lr.fixed32(8, 1);
                        lr.bytes(9, &c.trace_id);
                        lr.bytes(10, &c.span_id);
                    }
                    lr.fixed64(11, l.time_ns);
                });
            }
        });
    });
    m.0
}

fn number_point(m: &mut Msg, p: &Point, start_ns: u64, time_ns: u64) {
    // NumberDataPoint: start 2, time 3, as_double 4, attributes 7.
    m.message(1, |dp| {
        dp.fixed64(2, start_ns);
        dp.fixed64(3, time_ns);
        dp.double_always(4, p.value);
        for (k, v) in &p.labels {
            key_value(dp, 7, k, &Value::Str(v.clone()));
        }
    });
}

/// collector.metrics.v1.ExportMetricsServiceRequest.
pub fn metrics(r: &Resource, metrics: &[Metric], start_ns: u64, time_ns: u64) -> Vec<u8> {
    let mut m = Msg::default();
    m.message(1, |rm| {
        resource(rm, r);
        rm.message(2, |sm| {
            scope(sm);
            for metric in metrics {
                // Metric: name 1, description 2, unit 3, gauge 5, sum 7, histogram 9.
                sm.message(2, |mm| {
                    mm.string(1, &metric.name);
                    mm.string(2, &metric.help);
                    match &metric.data {
                        MetricData::Gauge(points) => mm.message(5, |g| {
                            for p in points {
                                number_point(g, p, start_ns, time_ns);
                            }
                        }),
                        // Sum: data_points 1, aggregation_temporality 2 (2 = cumulative), is_monotonic 3.
                        MetricData::Counter(points) => mm.message(7, |s| {
                            for p in points {
                                number_point(s, p, start_ns, time_ns);
                            }
                            s.uint(2, 2);
                            s.boolean(3, true);
                        }),
                        // Histogram: data_points 1, aggregation_temporality 2.
                        MetricData::Histogram(points) => mm.message(9, |h| {
                            for p in points {
                                // HistogramDataPoint: start 2, time 3, count 4, sum 5,
                                // bucket_counts 6, explicit_bounds 7, attributes 9.
                                h.message(1, |dp| {
                                    dp.fixed64(2, start_ns);
                                    dp.fixed64(3, time_ns);
                                    dp.fixed64(4, p.count);
                                    dp.double_always(5, p.sum);
                                    dp.packed_fixed64(6, p.bucket_counts.iter().copied());
                                    dp.packed_double(7, p.bounds.iter().copied());
                                    for (k, v) in &p.labels {
                                        key_value(dp, 9, k, &Value::Str(v.clone()));
                                    }
                                });
                            }
                            h.uint(2, 2);
                        }),
                    }
                });
            }
        });
    });
    m.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otel::{SpanContext, SpanKind};

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        v.clear();
        varint(&mut v, 1);
        assert_eq!(v, [1]);
        v.clear();
        varint(&mut v, u64::MAX);
        assert_eq!(v.len(), 10);
    }

    #[test]
    fn a_span_encodes_as_protobuf_libraries_do() {
        // The bytes protoc --encode gives for the same ExportTraceServiceRequest (fields in
        // number order, default values left out).
        let s = SpanData {
            context: SpanContext { trace_id: [1; 16], span_id: [2; 8] },
            parent: Some([3; 8]),
            name: "x".into(),
            kind: SpanKind::Server,
            start_ns: 1,
            end_ns: 2,
            attrs: vec![("k", Value::Int(5))],
            links: vec![],
            error: None,
        };
        let r = Resource { attributes: vec![] };
        let got = traces(&r, std::slice::from_ref(&s));
        let mut span = vec![0x0a, 16];
        span.extend([1; 16]);
        span.extend([0x12, 8]);
        span.extend([2; 8]);
        span.extend([0x22, 8]);
        span.extend([3; 8]);
        span.extend([0x2a, 1, b'x', 0x30, 2]);
        span.extend([0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
        span.extend([0x41, 2, 0, 0, 0, 0, 0, 0, 0]);
        span.extend([0x4a, 7, 0x0a, 1, b'k', 0x12, 2, 0x18, 5]);
        span.extend([0x85, 0x01, 0x01, 0x01, 0, 0]);
        let version = env!("CARGO_PKG_VERSION").as_bytes();
        let mut scope = vec![0x0a, 4, b'n', b'c', b'p', b's', 0x12, version.len() as u8];
        scope.extend(version);
        let mut scope_spans = vec![0x0a, scope.len() as u8];
        scope_spans.extend(&scope);
        scope_spans.extend([0x12, span.len() as u8]);
        scope_spans.extend(&span);
        let mut resource_spans = vec![0x0a, 0];
        resource_spans.extend([0x12, scope_spans.len() as u8]);
        resource_spans.extend(&scope_spans);
        let mut want = vec![0x0a, resource_spans.len() as u8];
        want.extend(&resource_spans);
        assert_eq!(got, want);
    }
}
