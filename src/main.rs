//! The `edgeplex` binary: command-line parsing, logging setup, signals. Everything else is in
//! the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use edgeplex::config::Config;
use edgeplex::server::reload::ConfigWatch;
use edgeplex::{Edge, telemetry, tls};

#[derive(Parser)]
#[command(
    name = "edgeplex",
    version,
    about = "A real-time edge: WebSocket clients on one pub/sub layer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge.
    Serve {
        /// Config file; EDGEPLEX__SECTION__KEY environment variables override its keys.
        #[arg(long, short, default_value = "config/edgeplex.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective config, or the error.
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve { config } => match serve(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgeplex: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Certificate files are part of the config: a path that does not load is a config error.
    if let edgeplex::config::TlsConfig::Files { .. } = &config.tls
        && let Err(e) = tls::server_config(&config.tls)
    {
        eprintln!("{}: {e}", file.display());
        return ExitCode::from(2);
    }
    println!("{}: valid\n", file.display());
    print!("{}", config.summary());
    println!("\n# effective config (file + EDGEPLEX__* environment)");
    match toml::to_string_pretty(&config.effective) {
        Ok(t) => print!("{t}"),
        Err(e) => eprintln!("cannot print the effective config: {e}"),
    }
    ExitCode::SUCCESS
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    telemetry::init(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let edge = Edge::start(config).await?;
        if let Some(dev) = edge.dev_cert() {
            tracing::info!(
                sha256 = %dev.sha256_hex,
                pem = %dev.written_to.display(),
                "serving a self-signed dev certificate for localhost, 127.0.0.1 and ::1"
            );
            // Plain stdout too: scripts and the README demo read it from here.
            println!("dev certificate SHA-256: {}", dev.sha256_hex);
            println!("dev certificate PEM: {}", dev.written_to.display());
        }
        println!("edgeplex listening on wss://{}/ws", edge.tls_addr());
        let watch = ConfigWatch::new(path.to_owned(), edge.state().clone());
        run_until_signal(watch, edge.state().config.server.config_watch).await?;
        let report = edge.shutdown().await;
        if !report.clean {
            tracing::warn!("some sessions outlived the grace period");
        }
        Ok(())
    })
}

/// Serves until SIGTERM or SIGINT; meanwhile reloads the config on SIGHUP and, every `watch`
/// (unless zero), when the file changed. A failed reload is logged by the watch and changes
/// nothing.
async fn run_until_signal(mut watch: ConfigWatch, every: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let mut tick = tokio::time::interval(if every.is_zero() {
        Duration::from_secs(3600)
    } else {
        every
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining");
                return Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: draining");
                return Ok(());
            }
            _ = hup.recv() => {
                let _ = watch.reload("SIGHUP");
            }
            _ = tick.tick(), if !every.is_zero() => {
                let _ = watch.poll();
            }
        }
    }
}
