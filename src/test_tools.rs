//! Servers the tests run against that are installed once from crates.io into the test cache
//! (`${NCPS_TEST_CACHE:-/var/cache/ncps-test}`) by a script of tests/ (tests/s3s.sh,
//! tests/garage.sh, both on tests/cargo-install-once.sh). Shared as source by the unit tests
//! and the e2e suite (`#[path]`), so both find them the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One such server.
pub struct Tool {
    /// For messages, and the name of its directory in the cache (`<name>-<version>`).
    pub name: &'static str,
    /// The binary under `<dir>/bin/`.
    pub binary: &'static str,
    /// A variable naming the binary directly, to use another build.
    pub path_var: &'static str,
    /// A variable naming the version, and the default one (as the script has them).
    pub version_var: &'static str,
    pub default_version: &'static str,
    /// The script that installs it, relative to the repository.
    pub script: &'static str,
}

pub const S3S_FS: Tool = Tool {
    name: "s3s-fs",
    binary: "s3s-fs",
    path_var: "NCPS_TEST_S3S_FS",
    version_var: "NCPS_TEST_S3S_FS_VERSION",
    default_version: "0.14.1",
    script: "tests/s3s.sh",
};

pub const GARAGE: Tool = Tool {
    name: "garage",
    binary: "garage",
    path_var: "NCPS_TEST_GARAGE",
    version_var: "NCPS_TEST_GARAGE_VERSION",
    default_version: "2.5.0",
    script: "tests/garage.sh",
};

/// The tool's binary: its `path_var`, else what its script installed (running the script,
/// which installs it, under CI). `None`, after saying why, outside CI when it is not installed.
pub fn installed(tool: &Tool) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(tool.path_var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("NCPS_TEST_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/ncps-test".into());
    let version = std::env::var(tool.version_var).unwrap_or_else(|_| tool.default_version.into());
    let dir = format!("{}-{version}", tool.name);
    let bin = cache.join(&dir).join("bin").join(tool.binary);
    if cache.join(format!("{dir}.complete")).exists() && bin.exists() {
        return Some(bin);
    }
    if std::env::var_os("CI").is_none_or(|v| v.is_empty()) {
        eprintln!("{} is not installed (bash {} installs it): test skipped", tool.name, tool.script);
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(tool.script);
    let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().expect("running the install script");
    assert!(out.status.success(), "CI is set and {} could not install {}", tool.script, tool.name);
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
