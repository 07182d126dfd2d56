//! The `rollgate` command line: parse, initialise tracing, hand off to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rollgate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "rollgate",
    version,
    about = "Ship model versions safely: split, measure, roll back in milliseconds."
)]
struct Cli {
    /// Config file (same as `rollgate run -c FILE`).
    #[arg(short = 'c', long = "config", global = false)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve; exit 0 after a clean drain on SIGTERM/SIGINT.
    Run {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Validate a config file with the startup pipeline; print the effective routing table.
    Check {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Print the JSON Schema of the config file.
    Schema,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match (cli.command, cli.config) {
        (Some(c), _) => c,
        (None, Some(config)) => Command::Run { config },
        (None, None) => {
            eprintln!("rollgate: nothing to do; try `rollgate run -c FILE` or `rollgate --help`");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Schema => {
            println!("{}", rollgate::config::json_schema());
            ExitCode::SUCCESS
        }
        Command::Check { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = runtime();
            let _guard = runtime.enter();
            match rollgate::control::check::report(config) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rollgate check: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            init_tracing(cli.log_format);
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime().block_on(rollgate::app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rollgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime")
}
