//! The `cutover` command line: run | check | route | demo. No logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use cutover::config::{Config, Protocol};
use cutover::snapshot::Snapshot;

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Mail front proxy for migrating users between server pools"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file (exit 0 if valid).
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
    },
    /// Show where a user would be routed.
    Route {
        /// Configuration file.
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
        /// Protocol.
        #[arg(long, short, default_value = "imap")]
        protocol: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// The user name, as a client would send it.
        user: String,
    },
    /// Run the proxy with embedded demo backends "new", "green" and "mauve" on loopback.
    Demo,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn load(path: &std::path::Path) -> Result<Snapshot, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    Snapshot::build(config).map_err(|e| format!("{}: {e}", path.display()))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(snap) => {
                let c = &snap.config;
                println!("{}: OK", config.display());
                println!(
                    "  listeners: {}",
                    c.listeners
                        .iter()
                        .map(|l| format!("{} ({} {} {:?})", l.name, l.protocol, l.listen, l.tls))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!(
                    "  pools:     {}",
                    c.pools.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                println!("  routes:    {}", c.routes.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Route {
            config,
            protocol,
            json,
            user,
        } => {
            let protocol: Protocol = match protocol.parse() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match cutover::route::route(&cfg, &user, protocol) {
                Ok(d) => {
                    if json {
                        match serde_json::to_string(&d) {
                            Ok(s) => println!("{s}"),
                            Err(e) => {
                                eprintln!("error: {e}");
                                return ExitCode::FAILURE;
                            }
                        }
                    } else {
                        print!("{}", d.explain());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run { config } => {
            init_logs(cli.log_format);
            let snap = match load(&config) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(cutover::server::run_until(snap, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo => {
            init_logs(cli.log_format);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(cutover::demo::run(shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
