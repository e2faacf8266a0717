//! OTLP/JSON, one export request per line, for `--otel-enabled` without a collector (what the
//! Go ncps prints to stdout then). The OTLP JSON mapping: ids in hex, 64-bit integers as
//! strings, enums as numbers, field names in lowerCamelCase.

use super::metrics::{Metric, MetricData, Point};
use super::proto::severity;
use super::{hex, LogData, Resource, SpanData, Value};
use serde_json::{json, Value as J};

fn any(v: &Value) -> J {
    match v {
        Value::Str(s) => json!({ "stringValue": s }),
        Value::Int(i) => json!({ "intValue": i.to_string() }),
        Value::Bool(b) => json!({ "boolValue": b }),
        Value::F64(f) => json!({ "doubleValue": f }),
    }
}

fn kvs<'a>(it: impl Iterator<Item = (&'a str, J)>) -> J {
    J::Array(it.map(|(k, v)| json!({ "key": k, "value": v })).collect())
}

fn resource(r: &Resource) -> J {
    json!({ "attributes": kvs(r.attributes.iter().map(|(k, v)| (k.as_str(), json!({ "stringValue": v })))) })
}

fn scope() -> J {
    json!({ "name": "ncps", "version": env!("CARGO_PKG_VERSION") })
}

pub fn traces(r: &Resource, spans: &[SpanData]) -> String {
    let spans: Vec<J> = spans
        .iter()
        .map(|s| {
            let mut o = json!({
                "traceId": hex(&s.context.trace_id),
                "spanId": hex(&s.context.span_id),
                "name": &*s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": s.start_ns.to_string(),
                "endTimeUnixNano": s.end_ns.to_string(),
                "attributes": kvs(s.attrs.iter().map(|(k, v)| (*k, any(v)))),
                "flags": 0x101,
            });
            if let Some(p) = &s.parent {
                o["parentSpanId"] = json!(hex(p));
            }
            if !s.links.is_empty() {
                o["links"] = J::Array(
                    s.links.iter().map(|l| json!({ "traceId": hex(&l.trace_id), "spanId": hex(&l.span_id) })).collect(),
                );
            }
            if let Some(why) = &s.error {
                o["status"] = json!({ "code": 2, "message": why });
            }
            o
        })
        .collect();
    json!({ "resourceSpans": [{ "resource": resource(r), "scopeSpans": [{ "scope": scope(), "spans": spans }] }] })
        .to_string()
}

pub fn logs(r: &Resource, records: &[LogData]) -> String {
    let records: Vec<J> = records
        .iter()
        .map(|l| {
            let mut o = json!({
                "timeUnixNano": l.time_ns.to_string(),
                "observedTimeUnixNano": l.time_ns.to_string(),
                "severityNumber": severity(l.level),
                "severityText": l.level.as_str(),
                "body": { "stringValue": l.body },
            });
            if let Some(c) = &l.span {
                o["traceId"] = json!(hex(&c.trace_id));
                o["spanId"] = json!(hex(&c.span_id));
                o["flags"] = json!(1);
            }
            o
        })
        .collect();
    json!({ "resourceLogs": [{ "resource": resource(r), "scopeLogs": [{ "scope": scope(), "logRecords": records }] }] })
        .to_string()
}

fn labels(p: &Point) -> J {
    kvs(p.labels.iter().map(|(k, v)| (k.as_str(), json!({ "stringValue": v }))))
}

pub fn metrics(r: &Resource, metrics: &[Metric], start_ns: u64, time_ns: u64) -> String {
    let number = |p: &Point| {
        json!({
            "attributes": labels(p),
            "startTimeUnixNano": start_ns.to_string(),
            "timeUnixNano": time_ns.to_string(),
            "asDouble": p.value,
        })
    };
    let metrics: Vec<J> = metrics
        .iter()
        .map(|m| {
            let mut o = json!({ "name": m.name, "description": m.help });
            match &m.data {
                MetricData::Gauge(ps) => o["gauge"] = json!({ "dataPoints": ps.iter().map(number).collect::<Vec<_>>() }),
                MetricData::Counter(ps) => {
                    o["sum"] = json!({
                        "dataPoints": ps.iter().map(number).collect::<Vec<_>>(),
                        "aggregationTemporality": 2,
                        "isMonotonic": true,
                    })
                }
                MetricData::Histogram(ps) => {
                    let points: Vec<J> = ps
                        .iter()
                        .map(|p| {
                            json!({
                                "attributes": labels(p),
                                "startTimeUnixNano": start_ns.to_string(),
                                "timeUnixNano": time_ns.to_string(),
                                "count": p.count.to_string(),
                                "sum": p.sum,
                                "bucketCounts": p.bucket_counts.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                                "explicitBounds": p.bounds,
                            })
                        })
                        .collect();
                    o["histogram"] = json!({ "dataPoints": points, "aggregationTemporality": 2 });
                }
            }
            o
        })
        .collect();
    json!({ "resourceMetrics": [{ "resource": resource(r), "scopeMetrics": [{ "scope": scope(), "metrics": metrics }] }] })
        .to_string()
}
