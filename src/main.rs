//! The `ncps` command: parse the command line, then hand over to [`ncps::serve`].

use ncps::config::{self, Command, Config};
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
            println!("ncps {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Fsck { raw, repair } => {
            let paths = config::StoragePaths::from_raw(&raw)?;
            ncps::logging::init(log::LevelFilter::Warn);
            match ncps::fsck::run(&paths, repair) {
                Ok(0) => Ok(()),
                Ok(code) => Err(Exit { code, message: "the store has problems (see above)".into() }),
                Err(e) => Err(Exit { code: 1, message: e.to_string() }),
            }
        }
        Command::Serve(raw) => {
            let config = Config::from_raw(&raw)?;
            // Before the logger's thread starts, so that every thread inherits the mask.
            let signals = serve::block_stop_signals();
            ncps::logging::init(config.log_level);
            serve::run(&config, signals)
        }
    }
}
