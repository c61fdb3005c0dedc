//! The `convo` command: parse the command line, load the configuration, set up
//! logging, then run the server or an admin command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use convo::{
    admin::{self, AdminCommand},
    config::{Config, LogFormat},
    server,
};
use tracing_subscriber::EnvFilter;

/// Convo, a Matrix homeserver.
///
/// With no command, runs the server. Every configuration key can also be set by an
/// environment variable: CONVO_ + the key path in capitals with `__` between
/// sections, e.g. CONVO_SERVER_NAME, CONVO_DATABASE__URL, CONVO_REGISTRATION__MODE.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// A TOML configuration file (see config.example.toml). Without it, built-in
    /// defaults: server name `localhost`, client API on 127.0.0.1:8008, data in ./convo-data.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the homeserver (the default).
    Run,
    /// Administer users and registration tokens.
    #[command(subcommand)]
    Admin(AdminCommand),
}

fn init_logging(config: &Config, quiet: bool) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ if quiet => EnvFilter::new("warn"),
        _ => EnvFilter::try_new(&config.logging.level).map_err(|e| format!("config key `logging.level`: {e}"))?,
    };
    // ruma's auth checks log every event at info; keep them quiet unless asked for.
    let filter = if config.logging.level.contains("ruma_state_res") {
        filter
    } else {
        filter.add_directive("ruma_state_res=warn".parse().expect("valid directive"))
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.logging.format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn run_server(config: Config) -> Result<(), String> {
    let mut running = server::start(config.clone()).await?;
    if let Some(token) = &running.first_registration_token {
        println!(
            "\nConvo is running at http://{addr} for server name {name}.\n\
             No registration token existed, so one was created (one use):\n\n    {token}\n\n\
             Next: open a Matrix client (e.g. Element), set the homeserver to http://{addr},\n\
             and register the first account with this token. More tokens:\n    \
             convo admin registration-token create{cfg}\n",
            addr = running.client_addr,
            name = config.server_name,
            cfg = std::env::args()
                .skip(1)
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0] == "--config" || w[0] == "-c")
                .map(|w| format!(" --config {}", w[1]))
                .unwrap_or_default(),
        );
    }
    tokio::select! {
        result = running.wait() => result.map_err(|e| format!("server stopped: {e}"))?,
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            running.stop().await;
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, as sent by service managers and containers.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let config = Config::load(cli.config.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
    let is_admin = matches!(cli.command, Some(Command::Admin(_)));
    init_logging(&config, is_admin)?;
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| "could not install the TLS crypto provider".to_owned())?;
    match cli.command {
        None | Some(Command::Run) => run_server(config).await,
        Some(Command::Admin(command)) => {
            let out = admin::run(config, command).await?;
            println!("{out}");
            Ok(())
        }
    }
}

/// glibc raises its mmap threshold each time a large mmapped block is freed, so after
/// a few password hashes (argon2 takes 19 MiB per hash) those blocks come from the heap
/// instead and stay there: measured, 40 registrations left the process at 620 MB RSS.
/// A fixed threshold keeps every block of 1 MiB or more in its own mapping, returned
/// to the system when freed (the same 40 registrations: 16 MB RSS, 55 MB peak).
fn keep_large_allocations_out_of_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    keep_large_allocations_out_of_the_heap();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("convo: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("convo: error: {e}");
            ExitCode::FAILURE
        }
    }
}
