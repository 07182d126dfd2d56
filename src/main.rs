//! The `rollgate` command line: parse, initialise tracing, hand off to the library.

/// mimalloc: per-thread free lists suit a proxy's many short-lived request allocations
/// (see README "Performance" for the measurement against glibc malloc).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps mimalloc's footprint that of a sidecar: arena memory is committed on use rather
/// than up front. Measured with `benches/memory.py`: idle RSS 21 -> 10.5 MiB, 10,000 idle
/// connections 412 -> 252 MiB. (Purging freed pages at once as well saved a little more
/// memory but cost 7 % CPU per request in madvise calls, so the purge delay stays default.)
/// It must run before the first allocation (the first arena is committed then), so it is a
/// constructor in `.init_array`, which the loader runs before Rust's runtime starts.
#[allow(unsafe_code)] // the crate's only unsafe: an FFI option setter, run once at load
extern "C" fn tune_allocator() {
    // mimalloc v3's `mi_option_e`: arena_eager_commit = 4 (mimalloc.h; the Rust bindings do
    // not name it yet). The environment variable MIMALLOC_ARENA_EAGER_COMMIT still overrides.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: mi_option_set_default only stores an integer option default; no other
    // thread exists yet.
    unsafe {
        libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
    }
}

#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

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

#[derive(Copy, Clone, Debug, ValueEnum)]
enum DemoFault {
    /// 30 % of the canary's answers become 500s.
    Error,
    /// The canary's answers take 800 ms.
    Latency,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve; exit 0 after a clean drain on SIGTERM/SIGINT.
    Run {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Data-plane threads, each with its own single-threaded runtime [default: the CPUs
        /// this process may run on]
        #[arg(long, env = "ROLLGATE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        workers: Option<u16>,
    },
    /// Validate a config file with the startup pipeline; print the effective routing table.
    Check {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Print the JSON Schema of the config file.
    Schema,
    /// The whole product in one command: two mock models, the proxy, load, a failing canary
    /// and its automatic rollback (no files needed).
    Demo {
        /// What goes wrong with the canary.
        #[arg(long, value_enum, default_value_t = DemoFault::Error)]
        fault: DemoFault,
        /// Total run time.
        #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
    },
    /// Serve a small OpenAI-compatible mock model (for trying rollgate out).
    MockModel {
        /// Address to listen on (HTTP/1.1 and h2c).
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        /// Served model name: `model` in responses and the `x-mock-version` header.
        #[arg(long, default_value = "mock")]
        name: String,
        /// Delay before each completion's response head, e.g. `250ms`.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: std::time::Duration,
        /// Fraction of completions answered with a 500, between 0 and 1.
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// Stream (SSE) when a request does not set `"stream"`.
        #[arg(long)]
        stream: bool,
        /// Events per stream (words per reply).
        #[arg(long, default_value_t = 8)]
        chunks: u32,
        /// Gap between stream events.
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        chunk_interval: std::time::Duration,
        /// Mean of the `x-model-score` response signal.
        #[arg(long, default_value_t = 0.8)]
        score: f64,
        /// Half-width of the uniform noise on the score.
        #[arg(long, default_value_t = 0.05)]
        score_jitter: f64,
    },
    /// Routes, weights, versions with their window statistics, quarantines.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Roll a version back now (same path as an automatic rollback).
    Rollback {
        /// The version to roll back.
        #[arg(long)]
        version: String,
        /// The route it is judged on (default: the first route serving it).
        #[arg(long)]
        route: Option<String>,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make a version the route's baseline at weight 100.
    Promote {
        #[arg(long)]
        route: String,
        #[arg(long)]
        version: String,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lift a version's quarantine.
    Resume {
        #[arg(long)]
        version: String,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Override a route's weights: `rollgate weights --route chat v2.4=90 v2.5=10`; or
    /// `--reset` to drop the route's runtime overrides and serve the file's split again.
    Weights {
        #[arg(long)]
        route: String,
        /// VERSION=WEIGHT pairs; versions not named get 0.
        #[arg(required_unless_present = "reset", conflicts_with = "reset")]
        weights: Vec<String>,
        /// Back to the config file's split and baseline for this route.
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Freeze (or with --off, unfreeze) automatic decisions on a route.
    Pause {
        #[arg(long)]
        route: String,
        /// Unpause.
        #[arg(long)]
        off: bool,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Rollback drill against a running proxy: inject a fault, wait for the automatic
    /// rollback, restore, score, record. Exit 1 when the drill fails.
    Drill {
        /// The candidate version to drill.
        #[arg(long)]
        version: String,
        /// error=RATE or latency=DURATION.
        #[arg(long, default_value = "error=0.3")]
        fault: rollgate::drill::DrillFault,
        /// How long to wait for the rollback.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Data-plane URL to send synthetic requests to during the drill (counts
        /// client-visible errors), e.g. http://127.0.0.1:8080/v1/chat/completions.
        #[arg(long)]
        load: Option<String>,
        /// Who runs the drill (default: $USER).
        #[arg(long)]
        operator: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Audit records, oldest first.
    Events {
        /// Only records after this id (e.g. rb-000042).
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How the admin client reaches and authenticates to a running proxy.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// Admin API base URL.
    #[arg(long, default_value = "http://127.0.0.1:9901", env = "ROLLGATE_ADMIN")]
    admin: String,
    /// File holding the bearer token (else the ROLLGATE_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

/// Who acts and why, recorded in the audit record.
#[derive(clap::Args, Debug)]
struct Why {
    /// Why, for the audit record.
    #[arg(long)]
    reason: Option<String>,
    /// Who (default: $USER).
    #[arg(long)]
    operator: Option<String>,
}

impl AdminArgs {
    /// The admin API target; a bad `--token-file` is reported and ends the command.
    fn target(self) -> Result<rollgate::cli::Target, ExitCode> {
        rollgate::cli::Target::new(
            self.admin,
            self.token_file,
            std::env::var("ROLLGATE_TOKEN").ok(),
            self.json,
        )
        .map_err(|e| {
            eprintln!("rollgate: {e}");
            ExitCode::FAILURE
        })
    }
}

/// Runs one admin client command: output on stdout, a one-line error on stderr, exit 1.
fn client(admin: AdminArgs, action: rollgate::cli::Action) -> ExitCode {
    let target = match admin.target() {
        Ok(t) => t,
        Err(code) => return code,
    };
    match runtime().block_on(rollgate::cli::run(&target, action)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rollgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: a file, a pipe or a log collector gets plain
    // text. NO_COLOR set to anything but the empty string turns it off (no-color.org).
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Tracing for commands with their own output: warnings and errors only, unless RUST_LOG.
fn init_tracing_quiet(format: LogFormat) {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "error");
    }
    init_tracing(format);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match (cli.command, cli.config) {
        (Some(c), _) => c,
        (None, Some(config)) => Command::Run {
            config,
            workers: None,
        },
        (None, None) => {
            eprintln!("rollgate: nothing to do; try `rollgate run -c FILE` or `rollgate --help`");
            return ExitCode::from(2);
        }
    };
    use rollgate::cli::Action;
    match command {
        Command::Demo { fault, duration } => {
            if duration < std::time::Duration::from_secs(5) {
                eprintln!("rollgate demo: --duration must be at least 5s");
                return ExitCode::from(2);
            }
            init_tracing_quiet(cli.log_format);
            let opts = rollgate::demo::DemoOptions {
                fault: match fault {
                    DemoFault::Error => rollgate::demo::Fault::Error,
                    DemoFault::Latency => rollgate::demo::Fault::Latency,
                },
                duration,
            };
            match runtime().block_on(rollgate::demo::run(opts)) {
                Ok(s) if s.rollback.is_some() && s.client_errors == 0 => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("rollgate demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { admin } => client(admin, Action::Status),
        Command::Drill {
            version,
            fault,
            timeout,
            load,
            operator,
            admin,
        } => {
            let target = match admin.target() {
                Ok(t) => t,
                Err(code) => return code,
            };
            let opts = rollgate::drill::DrillOptions {
                version,
                fault,
                timeout,
                load,
                operator: operator
                    .or_else(|| std::env::var("USER").ok())
                    .unwrap_or_else(|| "drill".into()),
            };
            match runtime().block_on(rollgate::drill::run(&target, opts)) {
                Ok(rec) => {
                    if target.json {
                        println!("{}", serde_json::to_string_pretty(&rec).unwrap_or_default());
                    } else {
                        print!("{}", rollgate::drill::render(&rec));
                    }
                    if rec["passed"] == true {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("rollgate drill: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Events { since, admin } => client(admin, Action::Events { since }),
        Command::Rollback {
            version,
            route,
            why,
            admin,
        } => client(
            admin,
            Action::Rollback {
                version,
                route,
                reason: why.reason,
                operator: why.operator,
            },
        ),
        Command::Promote {
            route,
            version,
            why,
            admin,
        } => client(
            admin,
            Action::Promote {
                route,
                version,
                reason: why.reason,
                operator: why.operator,
            },
        ),
        Command::Resume {
            version,
            why,
            admin,
        } => client(
            admin,
            Action::Resume {
                version,
                reason: why.reason,
                operator: why.operator,
            },
        ),
        Command::Weights {
            route,
            weights,
            reset,
            why,
            admin,
        } => match rollgate::cli::parse_weights(&weights) {
            Ok(weights) => client(
                admin,
                Action::Weights {
                    route,
                    weights,
                    reset,
                    reason: why.reason,
                    operator: why.operator,
                },
            ),
            Err(e) => {
                eprintln!("rollgate weights: {e}");
                ExitCode::from(2)
            }
        },
        Command::Pause {
            route,
            off,
            why,
            admin,
        } => client(
            admin,
            Action::Pause {
                route,
                paused: !off,
                reason: why.reason,
                operator: why.operator,
            },
        ),
        Command::MockModel {
            listen,
            name,
            latency,
            error_rate,
            stream,
            chunks,
            chunk_interval,
            score,
            score_jitter,
        } => {
            init_tracing(cli.log_format);
            let options = rollgate::mock::MockOptions {
                name,
                latency,
                error_rate,
                stream_default: stream,
                chunks,
                chunk_interval,
                score_mean: score,
                score_jitter,
            };
            match runtime().block_on(rollgate::mock::run(listen, options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rollgate mock-model: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
        Command::Run { config, workers } => {
            init_tracing(cli.log_format);
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = workers.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            );
            // The control plane (admin, evaluator, health checks, reload) needs little CPU:
            // one thread; the data plane gets its own threads (see `app::DataPlane`).
            let control = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build the tokio runtime");
            let result = control.block_on(rollgate::app::run(config, workers));
            // Shutdown has waited what it will (`Running::shutdown`); a disk write still
            // blocked in `spawn_blocking` (a hung state volume) must not hold the exit too.
            control.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
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
