//! ncps: a Nix binary cache proxy for a LAN.
//!
//! The modules follow the path of a request: [`config`] says how ncps was asked to run,
//! [`http`] and [`routes`] turn a connection into a question, [`cache`] answers it from
//! [`store`] (files) and [`db`] (the index) or from [`upstream`], with [`flight`] making sure
//! each miss is fetched once, and [`nix`] holds the formats everything above speaks.

pub mod cache;
pub mod config;
pub mod cron;
pub mod db;
pub mod duration;
pub mod flight;
pub mod fsck;
pub mod http;
pub mod logging;
pub mod memo;
pub mod metrics;
pub mod nix;
pub mod routes;
pub mod serve;
pub mod status;
pub mod store;
pub mod tz;
pub mod upstream;
