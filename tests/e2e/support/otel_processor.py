# A Rotel processor (rotel-agent --otlp-with-{trace,logs,metrics}-processor) that appends what
# the collector received to $NCPS_OTEL_OUT as JSON lines, one per span, log record or metric
# point, for the e2e tests (tests/e2e/otel.rs) to read. Ids in hex.
import json
import os

OUT = os.environ["NCPS_OTEL_OUT"]


def _write(rows):
    with open(OUT, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _value(v):
    if v is None:
        return None
    return v.value


def _attrs(kvs):
    return {kv.key: _value(kv.value) for kv in kvs}


def _resource(r):
    return _attrs(r.resource.attributes) if r.resource is not None else {}


def process_spans(rs):
    res = _resource(rs)
    rows = []
    for ss in rs.scope_spans:
        for s in ss.spans:
            rows.append({
                "signal": "span",
                "resource": res,
                "name": s.name,
                "kind": int(s.kind) if s.kind is not None else None,
                "trace_id": bytes(s.trace_id).hex(),
                "span_id": bytes(s.span_id).hex(),
                "parent_span_id": bytes(s.parent_span_id).hex(),
                "start": s.start_time_unix_nano,
                "end": s.end_time_unix_nano,
                "attributes": _attrs(s.attributes),
                "links": [{"trace_id": bytes(l.trace_id).hex(), "span_id": bytes(l.span_id).hex()} for l in s.links],
                "status_code": int(s.status.code) if s.status is not None else 0,
            })
    _write(rows)


def process_logs(rl):
    res = _resource(rl)
    rows = []
    for sl in rl.scope_logs:
        for lr in sl.log_records:
            rows.append({
                "signal": "log",
                "resource": res,
                "severity_number": int(lr.severity_number),
                "severity_text": lr.severity_text,
                "body": _value(lr.body),
                "trace_id": bytes(lr.trace_id).hex(),
                "span_id": bytes(lr.span_id).hex(),
            })
    _write(rows)


def process_metrics(rm):
    res = _resource(rm)
    rows = []
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            kind = type(m.data).__name__.replace("MetricData_", "")
            inner = m.data[0]
            for p in inner.data_points:
                row = {"signal": "metric", "resource": res, "name": m.name, "kind": kind,
                       "attributes": _attrs(p.attributes)}
                if kind in ("Sum", "Gauge"):
                    row["value"] = p.value[0]
                elif kind == "Histogram":
                    row["count"] = p.count
                    row["sum"] = p.sum
                    row["bucket_counts"] = list(p.bucket_counts)
                    row["bounds"] = list(p.explicit_bounds)
                rows.append(row)
    _write(rows)
