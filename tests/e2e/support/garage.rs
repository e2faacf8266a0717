//! A real distributed S3 store for the scale tests: a three-node Garage cluster (installed by
//! tests/garage.sh) on loopback, replication factor 3 in the consistent mode (a write or a read
//! needs 2 of the 3 nodes), one zone a node, one bucket and one key. s3s-fs (support::s3s) is
//! one process; this is a cluster whose nodes can be stopped and started one at a time, which
//! is what replicas in production share.
//!
//! Each node has its own config file, metadata and data directories in a temp dir, its own RPC
//! and S3 ports, and the cluster's `rpc_secret`. The cluster is formed with the `garage` CLI
//! (`node id`, `node connect`, `layout assign`, `layout apply`), the bucket and key with
//! `bucket create`, `key create` (whose output gives the key id and secret) and `bucket allow`.
//! Every node is killed on drop.

use super::dirs::TempDir;
use super::http::free_port;
use super::process::{run_with_timeout, wait_until};
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

pub const GARAGE_BUCKET: &str = "ncps-scale";
pub const GARAGE_REGION: &str = "garage";
const KEY_NAME: &str = "ncps-scale-key";

/// The garage binary (`support::test_tools`); `None`, after saying why, outside CI when it is
/// not installed.
pub fn garage_or_skip() -> Option<PathBuf> {
    super::test_tools::installed(&super::test_tools::GARAGE)
}

struct Node {
    config: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    child: Option<Child>,
}

pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    _dir: TempDir,
    /// `<node id>@127.0.0.1:<rpc port>` of each node.
    ids: Vec<String>,
    pub access_key: String,
    pub secret_key: String,
}

/// 32 random bytes as 64 hex digits (the form Garage wants its `rpc_secret` in).
fn random_hex32() -> String {
    let mut b = [0u8; 32];
    let mut f = fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut f, &mut b).expect("reading /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The value after `label` on the line that starts with it (`Key ID:  GK...`).
fn field(text: &str, label: &str) -> Option<String> {
    text.lines().find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
}

impl Garage {
    /// Three nodes, connected, with a layout applied, the bucket [`GARAGE_BUCKET`] and a key
    /// that owns it; `None` when the test must skip (Garage not installed).
    pub fn start() -> Option<Garage> {
        let bin = garage_or_skip()?;
        let dir = TempDir::new("garage");
        let secret = random_hex32();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let (rpc_port, s3_port) = (free_port(), free_port());
            let node_dir = dir.join(format!("node{i}"));
            fs::create_dir_all(&node_dir).expect("node dir");
            let config = dir.join(format!("node{i}.toml"));
            // No fsync: a test cluster on one disk; a killed process loses nothing LMDB wrote.
            let toml = format!(
                "metadata_dir = \"{m}\"\ndata_dir = \"{d}\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = 3\nconsistency_mode = \"consistent\"\n\
                 metadata_fsync = false\ndata_fsync = false\n\
                 rpc_secret = \"{secret}\"\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\n\
                 [s3_api]\napi_bind_addr = \"127.0.0.1:{s3_port}\"\ns3_region = \"{GARAGE_REGION}\"\n",
                m = node_dir.join("meta").display(),
                d = node_dir.join("data").display(),
            );
            fs::write(&config, toml).expect("writing a Garage config");
            nodes.push(Node { config, log: dir.join(format!("node{i}.log")), rpc_port, s3_port, child: None });
        }
        let mut g = Garage { bin, nodes, _dir: dir, ids: Vec::new(), access_key: String::new(), secret_key: String::new() };
        for i in 0..3 {
            g.start_node(i);
        }
        let ids: Vec<String> = (0..3)
            .map(|i| {
                let out = g.cli(i, &["node", "id", "-q"]);
                out.lines().next().unwrap_or_default().trim().to_string()
            })
            .collect();
        for id in &ids[1..] {
            g.cli(0, &["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or_default();
            g.cli(0, &["layout", "assign", "-z", &format!("z{i}"), "-c", "1G", short]);
        }
        g.cli(0, &["layout", "apply", "--version", "1"]);
        g.cli(0, &["bucket", "create", GARAGE_BUCKET]);
        let key = g.cli(0, &["key", "create", KEY_NAME]);
        g.access_key = field(&key, "Key ID:").expect("a Key ID in `garage key create`'s output");
        g.secret_key = field(&key, "Secret key:").expect("a Secret key in `garage key create`'s output");
        g.cli(0, &["bucket", "allow", "--read", "--write", "--owner", GARAGE_BUCKET, "--key", KEY_NAME]);
        g.ids = ids;
        Some(g)
    }

    /// `garage -c <node i's config> ARGS`, which must succeed within 30 s; its stdout.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(&self.nodes[i].config).args(args).env("RUST_LOG", "warn");
        let out = run_with_timeout(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("garage {args:?}: {e}"));
        assert!(out.status.success(), "garage {args:?} failed ({}):\n{}\n{}", out.status, out.stdout, out.stderr);
        out.stdout
    }

    /// Starts node `i` (again, after [`Garage::stop_node`]) and waits until its RPC and S3
    /// ports listen.
    pub fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {i} is running");
        let log = fs::OpenOptions::new().create(true).append(true).open(&n.log).expect("garage log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&n.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("garage log"))
            .stderr(log)
            .spawn()
            .expect("starting garage server");
        n.child = Some(child);
        let (rpc, s3) = (n.rpc_port, n.s3_port);
        let up = wait_until(Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", rpc)).is_ok() && TcpStream::connect(("127.0.0.1", s3)).is_ok()
        });
        assert!(up, "Garage node {i} did not listen on {rpc} and {s3}:\n{}", self.log(i));
    }

    /// Starts node `i` again after [`Garage::stop_node`] and has the others connect to it at
    /// once (left alone, they retry a lost peer with a backoff: about 30 s here).
    pub fn restart_node(&mut self, i: usize) {
        self.start_node(i);
        for j in (0..self.nodes.len()).filter(|&j| j != i) {
            self.cli(j, &["node", "connect", &self.ids[i]]);
        }
    }

    /// Kills node `i` (SIGKILL: a crash, not a shutdown).
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until node `i` sees all three nodes up (`garage status` lists no failed node).
    pub fn wait_healthy(&self, i: usize, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let mut cmd = Command::new(&self.bin);
            cmd.arg("-c").arg(&self.nodes[i].config).arg("status").env("RUST_LOG", "warn");
            match run_with_timeout(cmd, Duration::from_secs(10)) {
                Ok(o) => o.status.success() && !o.stdout.contains("FAILED NODES"),
                Err(_) => false,
            }
        })
    }

    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn s3_endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The ncps flags that put its blobs in the bucket, through node `i`'s S3 API.
    pub fn flags(&self, i: usize) -> Vec<String> {
        [
            "--cache-storage-s3-bucket",
            GARAGE_BUCKET,
            "--cache-storage-s3-endpoint",
            &self.s3_endpoint(i),
            "--cache-storage-s3-region",
            GARAGE_REGION,
            "--cache-storage-s3-access-key-id",
            &self.access_key,
            "--cache-storage-s3-secret-access-key",
            &self.secret_key,
            "--cache-storage-s3-force-path-style",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
        if thread::panicking() {
            for i in 0..self.nodes.len() {
                let log = self.log(i);
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("----- Garage node {i} log (last {} lines) -----\n{}", tail.len(), tail.join("\n"));
            }
        }
    }
}
