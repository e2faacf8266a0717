//! End-to-end specification of ncps's OpenTelemetry: the real Nix client fetches through
//! ncps while a real collector (Rotel, see `support::collector`) listens, and what arrives
//! there is checked: the spans of each request and their children (names, parent links,
//! attributes), the `/metrics` figures as OTLP metrics, the log lines as log records with
//! their trace ids; over OTLP/HTTP (protobuf), OTLP/gRPC and gRPC over TLS (through a TLS
//! front, as a collector behind a proxy). A client's `traceparent` is continued, a request
//! that joins a download links to it, an eviction pass is a trace of its own, and a collector
//! that is not there changes nothing for clients; what it missed arrives when it comes.
//!
//! Run: `cargo test --test e2e otel::`.

use crate::support::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn attr<'a>(r: &'a Value, key: &str) -> &'a Value {
    &r["attributes"][key]
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

/// An ncps sending telemetry as `flags` say, in front of one upstream serving the fixture.
fn ncps_with_telemetry(fx: &Fixture, flags: &[&str]) -> (Upstream, Ncps) {
    let up = Upstream::for_cache(fx, Compression::Xz);
    let mut extra = vec!["--otel-enabled", "--otel-metric-export-interval", "500", "--prometheus-enabled"];
    extra.extend_from_slice(flags);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &extra);
    (up, ncps)
}

/// The checks of a `nix copy` through ncps, whichever way the telemetry came.
fn a_nix_copy_arrives_as_traces_metrics_and_logs(collector: &Collector, flags: &[&str]) {
    let Some(fx) = fixture_or_skip() else { return };
    let (up, ncps) = ncps_with_telemetry(fx, flags);
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("nix copy through ncps");
    let nars = fx.top_closure.len();

    // Every request is a server span; a narinfo miss has one child per upstream asked, and a
    // NAR miss a download span (on the download's thread) with the upstream fetch and the
    // store write under it.
    let records = collector.wait_for("the spans of the nix copy", WAIT, |r| {
        let spans: Vec<Value> = r.iter().filter(|x| x["signal"] == "span").cloned().collect();
        named(&spans, "store write").len() >= 2 * nars && named(&spans, "nar download").len() >= nars
    });
    let spans: Vec<Value> = records.iter().filter(|r| r["signal"] == "span").cloned().collect();
    let by_id: HashMap<&str, &Value> = spans.iter().map(|s| (s["span_id"].as_str().unwrap(), s)).collect();
    let parent_of = |s: &Value| by_id.get(s["parent_span_id"].as_str().unwrap()).copied();

    let narinfo_requests = named(&spans, "GET /{hash}.narinfo");
    assert!(narinfo_requests.len() >= nars, "a span per narinfo request: {narinfo_requests:?}");
    for s in &narinfo_requests {
        assert_eq!(s["kind"], 2, "request spans are server spans: {s}");
        assert_eq!(s["resource"]["service.name"], "ncps");
        assert_eq!(attr(s, "http.route"), "/{hash}.narinfo");
        assert_eq!(attr(s, "http.request.method"), "GET");
        assert_eq!(attr(s, "client.address"), "127.0.0.1");
        assert!(attr(s, "url.path").as_str().unwrap().ends_with(".narinfo"), "{s}");
        assert!(attr(s, "http.response.status_code").as_i64().is_some(), "{s}");
    }
    let lookups = named(&spans, "upstream narinfo");
    assert!(lookups.len() >= nars, "one upstream lookup per narinfo miss: {lookups:?}");
    for l in &lookups {
        let parent = parent_of(l).unwrap_or_else(|| panic!("the lookup's parent span arrived: {l}"));
        // Nix asks with GET, or HEAD when it only wants to know whether a path is there.
        assert_eq!(attr(parent, "http.route"), "/{hash}.narinfo", "{l}\nparent: {parent}");
        assert_eq!(parent["trace_id"], l["trace_id"]);
        assert_eq!(l["kind"], 3, "upstream lookups are client spans");
        assert_eq!(attr(l, "ncps.upstream").as_str(), Some(up.url().as_str()));
        assert!(l["end"].as_u64().unwrap() >= l["start"].as_u64().unwrap());
        assert!(
            ["found", "absent"].contains(&attr(l, "ncps.result").as_str().unwrap_or("")),
            "{l}"
        );
        if attr(l, "ncps.result") == "found" {
            assert_eq!(attr(parent, "ncps.cache.result"), "miss", "{parent}");
            assert_eq!(attr(l, "http.response.status_code"), 200);
        }
    }
    let downloads = named(&spans, "nar download");
    for d in &downloads {
        let parent = parent_of(d).unwrap_or_else(|| panic!("the download's request span arrived: {d}"));
        assert_eq!(parent["name"], "GET /nar/{name}", "{d}");
        assert_eq!(attr(d, "ncps.verification"), "ok", "{d}");
        assert_eq!(attr(d, "ncps.upstream").as_str(), Some(up.url().as_str()));
        let children: Vec<&Value> = spans.iter().filter(|s| s["parent_span_id"] == d["span_id"]).collect();
        let fetch = children.iter().find(|c| c["name"] == "upstream nar").unwrap_or_else(|| panic!("{children:?}"));
        assert_eq!(attr(fetch, "ncps.bytes"), attr(d, "ncps.nar.size"));
        let write = children.iter().find(|c| c["name"] == "store write").unwrap_or_else(|| panic!("{children:?}"));
        assert_eq!(attr(write, "ncps.store.kind"), "nar");
    }
    // The upstream was told which span asked (W3C trace context).
    let sent: Vec<String> = up.request_header("traceparent").into_iter().filter_map(|(_, v)| v).collect();
    assert!(!sent.is_empty(), "ncps sends traceparent upstream");
    for t in &sent {
        let span_id = t.split('-').nth(2).unwrap();
        let s = by_id.get(span_id).unwrap_or_else(|| panic!("traceparent {t} names a span that arrived"));
        assert!(s["name"] == "upstream narinfo" || s["name"] == "upstream nar", "{s}");
    }

    // Metrics: the /metrics figures, on the export interval.
    let records = collector.wait_for("the narinfo counter with the misses", WAIT, |r| {
        r.iter().any(|m| {
            m["signal"] == "metric"
                && m["name"] == "ncps_narinfo_served_total"
                && m["attributes"]["result"] == "miss"
                && m["attributes"]["status"] == "success"
                && m["value"].as_f64().unwrap_or(0.0) >= nars as f64
        })
    });
    let metric = |name: &str| records.iter().find(|m| m["signal"] == "metric" && m["name"] == name).cloned();
    assert_eq!(metric("ncps_narinfo_served_total").unwrap()["kind"], "Sum");
    assert_eq!(metric("ncps_store_total_size_bytes").unwrap()["kind"], "Gauge");
    let h = metric("ncps_upstream_narinfo_fetch_duration_seconds").unwrap_or_else(|| panic!("no histogram"));
    assert_eq!(h["kind"], "Histogram");
    assert_eq!(h["attributes"]["upstream_hostname"], up.url().trim_start_matches("http://"));
    let counts: Vec<u64> = h["bucket_counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    assert_eq!(counts.iter().sum::<u64>(), h["count"].as_u64().unwrap(), "per-bucket counts add up: {h}");
    assert_eq!(counts.len(), h["bounds"].as_array().unwrap().len() + 1);

    // Logs: the request lines, with the trace and span of their request. They are exported in
    // their own batches, so they may come after the metrics above (seen on a loaded machine).
    let is_nar_line = |l: &Value| {
        l["signal"] == "log" && l["body"].as_str().is_some_and(|b| b.contains(" GET /nar/") && b.contains(" 200 "))
    };
    let records = collector.wait_for("a NAR's request line as a log record", WAIT, |r| r.iter().any(is_nar_line));
    let logs: Vec<&Value> = records.iter().filter(|r| r["signal"] == "log").collect();
    let line = logs
        .iter()
        .find(|l| l["body"].as_str().is_some_and(|b| b.contains(" GET /nar/") && b.contains(" 200 ")))
        .unwrap_or_else(|| panic!("a request line arrived as a log record: {logs:?}"));
    assert_eq!(line["severity_text"], "INFO");
    let request = by_id.get(line["span_id"].as_str().unwrap()).unwrap_or_else(|| panic!("{line}"));
    assert_eq!(request["name"], "GET /nar/{name}");
    assert_eq!(request["trace_id"], line["trace_id"]);
}

#[test]
fn a_nix_copy_arrives_as_traces_metrics_and_logs_over_otlp_http() {
    let collector = Collector::start();
    let url = collector.http_url();
    a_nix_copy_arrives_as_traces_metrics_and_logs(&collector, &["--otel-endpoint", &url, "--otel-protocol", "http/protobuf"]);
}

#[test]
fn a_nix_copy_arrives_as_traces_metrics_and_logs_over_otlp_grpc() {
    let collector = Collector::start();
    let url = collector.grpc_url();
    a_nix_copy_arrives_as_traces_metrics_and_logs(&collector, &["--otel-grpc-url", &url]);
}

#[test]
fn a_nix_copy_arrives_over_otlp_grpc_with_tls() {
    let Some(fx) = fixture_or_skip() else { return };
    let collector = Collector::start();
    let front = TlsFront::for_h2(collector.grpc_port).expect("a TLS front (openssl)");
    let url = front.url();
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ca = front.ca_file().to_string_lossy().into_owned();
    let ncps = Ncps::start_with_env(
        &["--upstream-cache", &up.url(), "--upstream-public-key", &fx.up1_public_key, "--otel-enabled", "--otel-grpc-url", &url],
        &[("SSL_CERT_FILE", &ca)],
    );
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("nix copy through ncps");
    collector.wait_for("the NAR downloads' spans, over TLS", WAIT, |r| {
        r.iter().filter(|x| x["name"] == "nar download").count() >= fx.top_closure.len()
    });
}

#[test]
fn a_clients_traceparent_is_continued_and_warnings_arrive_with_its_trace_id() {
    let collector = Collector::start();
    let up = Upstream::serve_dir(TempDir::new("empty-upstream").path());
    up.set_mode(Mode::Status500);
    let url = collector.http_url();
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[], &["--otel-enabled", "--otel-endpoint", &url]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let r = http_request_with(
        "GET",
        &format!("{}/{}.narinfo", ncps.url(), random_hash(7)),
        &[("traceparent", &format!("00-{trace}-{parent}-01"))],
    )
    .unwrap();
    assert_eq!(r.status, 502);
    let records = collector.wait_for("the request's span and its warning", WAIT, |r| {
        r.iter().any(|x| x["signal"] == "span" && x["name"] == "GET /{hash}.narinfo")
            && r.iter().any(|x| x["signal"] == "log" && x["severity_text"] == "WARN" && x["trace_id"] == trace)
    });
    let request = records.iter().find(|x| x["signal"] == "span" && x["name"] == "GET /{hash}.narinfo").unwrap();
    assert_eq!(request["trace_id"], trace, "the client's trace is continued");
    assert_eq!(request["parent_span_id"], parent, "under the client's span");
    assert_eq!(request["status_code"], 2, "a 502 is an error span");
    let lookup = records.iter().find(|x| x["signal"] == "span" && x["name"] == "upstream narinfo").unwrap();
    assert_eq!(lookup["parent_span_id"], request["span_id"]);
    assert_eq!(lookup["status_code"], 2);
    // Start-up's warnings (no upstream key given) arrive too, with no trace; the lookup's has
    // the request's.
    let warning = records
        .iter()
        .find(|x| x["signal"] == "log" && x["severity_text"] == "WARN" && x["trace_id"] == trace)
        .unwrap();
    assert!(warning["body"].as_str().unwrap().contains("narinfo"), "{warning}");
    assert!(
        records.iter().any(|x| x["signal"] == "log" && x["trace_id"] == "" && x["body"].as_str().unwrap_or("").contains("no --upstream-public-key")),
        "start-up lines are exported too"
    );
    assert_eq!(warning["span_id"], lookup["span_id"], "the warning belongs to the lookup that failed");
    assert_eq!(warning["severity_number"], 13);
    // And the upstream was asked under the same trace.
    let sent: Vec<String> = up.request_header("traceparent").into_iter().filter_map(|(_, v)| v).collect();
    assert_eq!(sent, vec![format!("00-{trace}-{}-01", lookup["span_id"].as_str().unwrap())]);
}

#[test]
fn a_request_that_joins_a_download_in_flight_links_to_its_span() {
    let Some(fx) = fixture_or_skip() else { return };
    let collector = Collector::start();
    let url = collector.http_url();
    let (up, ncps) = ncps_with_telemetry(fx, &["--otel-endpoint", &url]);
    // The big NAR, sent slowly, so that a second client arrives while it downloads.
    let path = &fx.big;
    let nar = upstream_nar_path(fx, Compression::Xz, path);
    assert_eq!(ncps.get(&format!("/{}.narinfo", store_hash(path))).status, 200);
    up.set_mode_for(Mode::Slow(2_000_000), Target::Nar);
    let first = {
        let u = format!("{}{nar}", ncps.url());
        std::thread::spawn(move || http_get(&u).map(|r| r.status))
    };
    assert!(wait_until(Duration::from_secs(10), || up.bytes_sent(&nar) > 0), "the download started");
    let second = http_get(&format!("{}{nar}", ncps.url())).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(first.join().unwrap().unwrap(), 200);
    assert_eq!(up.hits(&nar), 1, "one download for both");
    let records = collector.wait_for("both requests and the download", WAIT, |r| {
        r.iter().filter(|x| x["name"] == "GET /nar/{name}").count() >= 2 && r.iter().any(|x| x["name"] == "nar download")
    });
    let download = records.iter().find(|x| x["name"] == "nar download").unwrap();
    let requests: Vec<&Value> = records.iter().filter(|x| x["name"] == "GET /nar/{name}").collect();
    let joiner = requests
        .iter()
        .find(|r| r["attributes"]["ncps.download.joined"] == true)
        .unwrap_or_else(|| panic!("one request joined: {requests:?}"));
    assert_eq!(
        joiner["links"],
        serde_json::json!([{ "trace_id": download["trace_id"], "span_id": download["span_id"] }]),
        "the joiner links to the download's span"
    );
    assert_ne!(joiner["trace_id"], download["trace_id"], "the joiner has its own trace");
}

#[test]
fn a_collector_that_is_down_changes_nothing_for_clients_and_its_telemetry_waits_for_it() {
    let Some(fx) = fixture_or_skip() else { return };
    // Nothing listens there yet.
    let (grpc_port, http_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{grpc_port}");
    let (_up, ncps) = ncps_with_telemetry(fx, &["--otel-grpc-url", &url]);
    let started = std::time::Instant::now();
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("nix copy with the collector down");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "nix copy took {took:?}");
    ncps.wait_for_log(0, "otel: export failed", WAIT);
    // The metrics of an interval nobody took are dropped, and counted.
    let counted = wait_until(WAIT, || {
        let m = ncps.get("/metrics").text();
        m.lines().any(|l| l.starts_with("ncps_otel_dropped_total{signal=\"metrics\"}") && !l.ends_with(" 0"))
            && m.lines().any(|l| l.starts_with("ncps_otel_export_failures_total") && !l.ends_with(" 0"))
    });
    assert!(counted, "drops and failures counted in /metrics:\n{}", ncps.get("/metrics").text());
    // The spans waited: once the collector is there, they arrive.
    let collector = Collector::start_on(grpc_port, http_port);
    let nars = fx.top_closure.len();
    collector.wait_for("the spans made while it was down", Duration::from_secs(60), |r| {
        r.iter().filter(|x| x["name"] == "nar download").count() >= nars
    });
    ncps.wait_for_log(0, "otel: the collector takes telemetry again", WAIT);
}

#[test]
fn without_a_collector_url_telemetry_goes_to_stdout_as_otlp_json() {
    let up = Upstream::serve_dir(TempDir::new("empty-upstream").path());
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[], &["--otel-enabled"]);
    assert_eq!(ncps.get("/nix-cache-info").status, 200);
    // stdout and stderr share the test's log file: the OTLP/JSON lines are in it.
    let log = ncps.wait_for_log(0, "\"resourceSpans\"", WAIT);
    let line = log.lines().find(|l| l.contains("\"resourceSpans\"")).unwrap();
    let v: Value = serde_json::from_str(line).expect("a JSON line");
    let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(span["name"], "GET /nix-cache-info");
    assert_eq!(span["traceId"].as_str().unwrap().len(), 32);
}

#[test]
fn an_eviction_pass_is_a_span_of_its_own() {
    let collector = Collector::start();
    let up = Upstream::serve_dir(TempDir::new("empty-upstream").path());
    let url = collector.http_url();
    // With a size limit, start-up runs a thorough pass (nothing to evict in an empty store).
    let _ncps = Ncps::for_upstreams_with(&[up.url()], &[], &["--cache-max-size", "10M", "--otel-enabled", "--otel-endpoint", &url]);
    let records = collector.wait_for("the start-up eviction pass", WAIT, |r| r.iter().any(|x| x["name"] == "eviction"));
    let pass = records.iter().find(|x| x["name"] == "eviction").unwrap();
    assert_eq!(pass["parent_span_id"], "", "a trace of its own: {pass}");
    assert_eq!(attr(pass, "ncps.eviction.pass"), "thorough");
    assert_eq!(attr(pass, "ncps.eviction.target_bytes"), 10 * 1024 * 1024);
    assert_eq!(attr(pass, "ncps.eviction.nars"), 0);
}

#[test]
fn export_headers_go_with_every_export_and_never_into_the_log() {
    // Not a collector: the test upstream, which records what it is sent (and answers a POST
    // with a 4xx, which ncps counts as refused).
    let sink = Upstream::serve_dir(TempDir::new("header-sink").path());
    let up = Upstream::serve_dir(TempDir::new("empty-upstream").path());
    let endpoint = sink.url();
    let ncps = Ncps::start_with_env(
        &["--upstream-cache", &up.url(), "--otel-enabled", "--otel-endpoint", &endpoint],
        &[("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20s3cret-token,X-Scope-OrgID=lab")],
    );
    assert_eq!(ncps.get("/nix-cache-info").status, 200);
    assert!(
        wait_until(WAIT, || sink.requests().iter().any(|r| r.ends_with("/v1/traces"))),
        "an export reached the sink: {:?}",
        sink.requests()
    );
    let sent = |name: &str| {
        sink.request_header(name).into_iter().find(|(r, _)| r.ends_with("/v1/traces")).and_then(|(_, v)| v)
    };
    assert_eq!(sent("authorization").as_deref(), Some("Bearer s3cret-token"));
    assert_eq!(sent("x-scope-orgid").as_deref(), Some("lab"));
    assert_eq!(sent("content-type").as_deref(), Some("application/x-protobuf"));
    ncps.wait_for_log(0, "otel: export failed", WAIT);
    assert!(!ncps.log().contains("s3cret"), "the token is not in the log:\n{}", ncps.log());
}
