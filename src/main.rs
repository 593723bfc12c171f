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
        let mut signals = Signals::new()?;
        run_until_signal(&mut signals, watch, edge.state().config.server.config_watch).await;
        // The load balancer is told at once (`/readyz` 503) and given the drain delay to stop
        // sending clients; a second signal means the operator will not wait for it.
        edge.begin_drain();
        let delay = edge.state().config.server.drain_delay;
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                why = signals.stop() => {
                    tracing::info!("{why} again: ending the drain delay early");
                }
            }
        }
        let grace = edge.state().config.server.shutdown_grace;
        let report = edge.shutdown_within(grace).await;
        if !report.clean {
            tracing::warn!("some sessions outlived the grace period");
        }
        Ok(())
    })
}

/// The signals `serve` answers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
        })
    }

    /// The next SIGTERM or SIGINT; its name.
    async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Serves until SIGTERM or SIGINT; meanwhile reloads the config on SIGHUP and, every `watch`
/// (unless zero), when the file changed. A failed reload is logged by the watch and changes
/// nothing.
async fn run_until_signal(signals: &mut Signals, mut watch: ConfigWatch, every: Duration) {
    let mut tick = tokio::time::interval(if every.is_zero() {
        Duration::from_secs(3600)
    } else {
        every
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = signals.term.recv() => {
                tracing::info!("SIGTERM: draining");
                return;
            }
            _ = signals.int.recv() => {
                tracing::info!("SIGINT: draining");
                return;
            }
            _ = signals.hup.recv() => {
                let _ = watch.reload("SIGHUP");
            }
            _ = tick.tick(), if !every.is_zero() => {
                let _ = watch.poll();
            }
        }
    }
}
