//! A real OpenTelemetry collector: Rotel's `rotel-agent` (installed by tests/rotel.sh),
//! listening for OTLP over gRPC and HTTP on free loopback ports, with the processor
//! `otel_processor.py` (beside this file) appending everything it receives to a JSON-lines
//! file that [`Collector::records`] reads. Killed on drop.

use super::dirs::TempDir;
use super::http::free_port;
use super::process::wait_until;
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Path of `rotel-agent`, installing it once per test run (tests/rotel.sh).
fn rotel_agent() -> &'static str {
    static AGENT: OnceLock<String> = OnceLock::new();
    AGENT.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rotel.sh");
        let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().expect("run tests/rotel.sh");
        assert!(out.status.success(), "tests/rotel.sh failed: the OpenTelemetry tests need Rotel");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

/// One thing the collector received: a span, a log record or a metric point.
pub type Record = serde_json::Value;

pub struct Collector {
    child: Option<Child>,
    pub grpc_port: u16,
    pub http_port: u16,
    dir: TempDir,
}

impl Collector {
    /// Starts a collector on fresh ports.
    pub fn start() -> Collector {
        Collector::start_on(free_port(), free_port())
    }

    /// Starts a collector on these ports (a test that starts it late, where ncps already
    /// sends).
    pub fn start_on(grpc_port: u16, http_port: u16) -> Collector {
        let dir = TempDir::new("collector");
        let processor = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/support/otel_processor.py");
        let log = fs::File::create(dir.join("rotel.log")).expect("rotel log");
        let child = Command::new(rotel_agent())
            .args(["start", "--exporter", "blackhole"])
            .arg("--otlp-grpc-endpoint")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--otlp-http-endpoint")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(["--otlp-with-trace-processor", processor])
            .args(["--otlp-with-logs-processor", processor])
            .args(["--otlp-with-metrics-processor", processor])
            // Hand what arrives to the processor at once, not in 200 ms batches.
            .args(["--batch-timeout", "10ms"])
            .arg("--pid-file")
            .arg(dir.join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.join("rotel-agent.log"))
            .env("NCPS_OTEL_OUT", dir.join("received.jsonl"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start rotel-agent");
        let c = Collector { child: Some(child), grpc_port, http_port, dir };
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", http_port)).is_ok() && TcpStream::connect(("127.0.0.1", grpc_port)).is_ok()
        });
        assert!(up, "rotel-agent did not listen within 10s; its log:\n{}", c.log());
        c
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn out_path(&self) -> PathBuf {
        self.dir.join("received.jsonl")
    }

    pub fn log(&self) -> String {
        let mut s = fs::read_to_string(self.dir.join("rotel.log")).unwrap_or_default();
        s.push_str(&fs::read_to_string(self.dir.join("rotel-agent.log")).unwrap_or_default());
        s
    }

    /// Everything received so far.
    pub fn records(&self) -> Vec<Record> {
        fs::read_to_string(self.out_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until `done` holds for what was received; returns it. Panics with what arrived
    /// if it never does.
    pub fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let ok = wait_until(timeout, || done(&self.records()));
        let got = self.records();
        if !ok {
            let shown: Vec<String> = got.iter().map(|r| r.to_string().chars().take(300).collect()).collect();
            panic!("the collector did not receive {what} within {timeout:?}; received:\n{}\ncollector log:\n{}", shown.join("\n"), self.log());
        }
        got
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}
