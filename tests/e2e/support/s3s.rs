//! A real S3 server for the S3 tests: s3s-fs (installed by tests/s3s.sh), on a loopback port,
//! storing its bucket in a temp directory the tests can look into. Killed on drop.

use super::dirs::TempDir;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const S3_ACCESS_KEY: &str = "ncps-e2e-access";
/// Long and unlike anything else, so that finding it in a log means it leaked.
pub const S3_SECRET_KEY: &str = "e2e-secret-Zq7WvK3pLx9RtY2m";
pub const S3_BUCKET: &str = "ncps-e2e";

/// The s3s-fs binary (`support::test_tools`); `None`, after saying why, outside CI when it is
/// not installed.
pub fn s3s_fs_or_skip() -> Option<PathBuf> {
    super::test_tools::installed(&super::test_tools::S3S_FS)
}

pub struct S3sFs {
    child: Child,
    root: TempDir,
    pub port: u16,
}

impl S3sFs {
    /// s3s-fs with the empty bucket [`S3_BUCKET`]; `None` when the test must skip.
    pub fn start() -> Option<S3sFs> {
        let bin = s3s_fs_or_skip()?;
        let root = TempDir::new("s3s-fs");
        std::fs::create_dir_all(root.join(S3_BUCKET)).expect("creating the bucket directory");
        let port = super::http::free_port();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let mut s = S3sFs { child, root, port };
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "s3s-fs did not listen on {port}");
            assert!(s.child.try_wait().ok().flatten().is_none(), "s3s-fs exited at start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(s)
    }

    /// The ncps flags that put its blobs in this server's bucket.
    pub fn flags(&self) -> Vec<String> {
        [
            "--cache-storage-s3-bucket",
            S3_BUCKET,
            "--cache-storage-s3-endpoint",
            &format!("http://127.0.0.1:{}", self.port),
            "--cache-storage-s3-access-key-id",
            S3_ACCESS_KEY,
            "--cache-storage-s3-secret-access-key",
            S3_SECRET_KEY,
            "--cache-storage-s3-force-path-style",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Stops the server (SIGSTOP): connections are accepted by the kernel and never answered,
    /// as from an object store that hangs. [`S3sFs::resume`] undoes it.
    pub fn pause(&self) {
        // SAFETY: kill(2) on our own child, not reaped yet (so its pid is not reused).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        // SAFETY: as in `pause`.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT);
        }
    }

    /// The same flags with the endpoint at `port` on loopback (a proxy in front of this server).
    pub fn flags_via(&self, port: u16) -> Vec<String> {
        let mine = format!("http://127.0.0.1:{}", self.port);
        self.flags().into_iter().map(|f| if f == mine { format!("http://127.0.0.1:{port}") } else { f }).collect()
    }

    /// Where s3s-fs keeps the object `key` of the bucket (a plain file).
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.root.join(S3_BUCKET).join(key)
    }

    /// The multipart uploads s3s-fs still holds (it has no ListMultipartUploads: each upload
    /// is a `.upload-<id>.json` file beside its parts, `.upload_id-<id>.part-<n>`, at its root).
    pub fn pending_uploads(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(".upload"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The objects under `prefix` (`nar/`, `narinfo/`) in the bucket, as s3s-fs keeps them.
    pub fn objects(&self, prefix: &str) -> Vec<PathBuf> {
        super::dirs::files_under(&self.root.join(S3_BUCKET).join(prefix))
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
