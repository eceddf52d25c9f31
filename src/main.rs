//! hvnode's binary: parse the command line, load the configuration, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hvnode::config::Config;
use hvnode::ctl;

const DEFAULT_CONFIG: &str = "/etc/hvnode/config.toml";

#[derive(Parser)]
#[command(
    name = "hvnode",
    version,
    about = "The hypervisor agent of a VPS platform"
)]
struct Cli {
    /// Config file (TOML). Default: /etc/hvnode/config.toml when it exists.
    #[arg(long, global = true, env = "HVNODE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Serve,
    /// Print the effective configuration (defaults, file, environment), secrets masked.
    Config,
    /// Print the SHA-256 to put in api.token_sha256 for a token read from stdin.
    HashToken,
    /// Print the OpenAPI document of the API (the repository's openapi.json).
    Openapi,
    /// Talk to the running agent over its Unix socket.
    Ctl {
        /// Socket path; default: api.socket from the configuration.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the API's JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: ctl::Command,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli
        .config
        .clone()
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
    let config = match Config::load(path.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hvnode: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hvnode: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve => {
            hvnode::daemon::init_tracing(&config.log.level, &config.log.format);
            if let Some(p) = &path {
                if let Err(e) = hvnode::config::check_file_permissions(p, &config) {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            }
            match runtime.block_on(hvnode::daemon::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::from(e.exit_status())
                }
            }
        }
        Command::Config => {
            print!("{}", config.to_masked_toml());
            ExitCode::SUCCESS
        }
        Command::HashToken => {
            let mut token = String::new();
            if std::io::stdin().read_line(&mut token).is_err() || token.trim().is_empty() {
                eprintln!("hvnode: give the token on stdin");
                return ExitCode::from(2);
            }
            println!("{}", hvnode::api::auth::hash_token(token.trim()));
            ExitCode::SUCCESS
        }
        Command::Openapi => {
            print!("{}", hvnode::api::openapi::json());
            ExitCode::SUCCESS
        }
        Command::Ctl {
            socket,
            json,
            command,
        } => {
            let socket = socket.unwrap_or_else(|| config.api.socket.clone());
            runtime.block_on(ctl::run(&socket, json, command))
        }
    }
}
