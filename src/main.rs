//! The `ncps` command: parse the command line, then hand over to [`ncps::serve`].

use ncps::config::{self, Command, Config};
use ncps::serve::{self, Exit};

fn main() {
    if let Err(e) = run() {
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
        Command::Serve(raw) => {
            let config = Config::from_raw(&raw)?;
            ncps::logging::init(config.log_level);
            serve::run(&config)
        }
    }
}
