//! The `ncps` command: parse the command line, then hand over to [`ncps::serve`].

use ncps::config::{self, Command, Config, ConfigError, RawValues};
use ncps::serve::{self, Exit};

fn main() {
    if let Err(e) = run() {
        ncps::logging::flush();
        eprintln!("ncps: {e}");
        std::process::exit(e.code);
    }
}

fn run() -> Result<(), Exit> {
    let args = std::env::args_os().skip(1);
    match config::parse_args(args, |k| std::env::var(k).ok())? {
        Command::Help(sub) => {
            print!("{}", config::help_text(sub));
            Ok(())
        }
        Command::Version => {
            // The optional parts built in, so that a script (and the e2e suite) can tell.
            let features: &[&str] = &[#[cfg(feature = "postgres")] "postgres", #[cfg(feature = "s3")] "s3"];
            if features.is_empty() {
                println!("ncps {}", env!("CARGO_PKG_VERSION"));
            } else {
                println!("ncps {} (features: {})", env!("CARGO_PKG_VERSION"), features.join(", "));
            }
            Ok(())
        }
        Command::Fsck { mut raw, repair } => {
            read_config_file(&mut raw)?;
            let paths = config::StoragePaths::from_raw(&raw)?;
            let s3 = raw.s3()?;
            ncps::logging::init(log::LevelFilter::Warn);
            match ncps::fsck::run(&paths, s3.as_ref(), repair) {
                Ok(0) => Ok(()),
                Ok(code) => Err(Exit { code, message: "the store has problems (see above)".into() }),
                Err(e) => Err(Exit { code: 1, message: e.to_string() }),
            }
        }
        Command::Serve(mut raw) => {
            read_config_file(&mut raw)?;
            let config = Config::from_raw(&raw)?;
            // Before the logger's thread starts, so that every thread inherits the mask.
            let signals = serve::block_stop_signals();
            ncps::logging::init(config.log_level);
            serve::run(&config, signals)
        }
    }
}

/// Reads the config file (the one I/O of configuration; config.rs parses the text) and adds
/// its settings under those of the command line and the environment.
fn read_config_file(raw: &mut RawValues) -> Result<(), Exit> {
    let Some((path, required)) = raw.config_file(|k| std::env::var(k).ok()) else { return Ok(()) };
    let shown = path.display().to_string();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes)
                .map_err(|_| ConfigError::in_file(&shown, "", "config", "not UTF-8 text"))?;
            Ok(raw.merge_file(&shown, &text)?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(()),
        Err(e) => Err(ConfigError::in_file(&shown, "", "config", format!("cannot read it: {e}")).into()),
    }
}
