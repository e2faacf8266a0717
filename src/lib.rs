//! ncps: a Nix binary cache proxy for a LAN.
//!
//! The modules follow the path of a request: [`config`] says how ncps was asked to run,
//! [`http`] and [`routes`] turn a connection into a question, [`cache`] answers it from
//! [`storage`] (the blobs) and [`index`] (what they are) or from [`upstream`], fetching each
//! miss once, and [`nix`] holds the formats everything above speaks.

pub mod auth;
pub mod cache;
pub mod config;
pub mod config_file;
pub mod data_lock;
pub mod cron;
pub mod duration;
pub mod fsck;
pub mod history;
pub mod http;
pub mod index;
pub mod logging;
pub mod memo;
pub mod metrics;
pub mod migrate_go;
pub mod nix;
pub mod otel;
pub mod routes;
pub mod serve;
pub mod status;
pub mod storage;
pub mod template;
/// The installed test servers; Garage is used only by the e2e scale tests.
#[cfg(all(test, feature = "s3"))]
#[allow(dead_code)]
pub(crate) mod test_tools;
pub mod tls;
pub mod tz;
pub mod upstream;
pub mod url;
