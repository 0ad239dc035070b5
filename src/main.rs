//! The `coap-gateway` command line (SURFACE.md): `serve` (default), `certs
//! init`, `certs device`, `check-config`. Exit codes: 0 success, 2 bad usage
//! or config, 1 runtime failure.
#![forbid(unsafe_code)]

/// See Cargo.toml: cross-thread frees without a lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use coap_gateway::api::{ApiServer, ApiState};
use coap_gateway::auth::authority::Authority;
use coap_gateway::auth::pki;
use coap_gateway::config::{Config, LogFormat};
use coap_gateway::server;

#[derive(Parser)]
#[command(
    name = "coap-gateway",
    version,
    about = "CoAP gateway for OCF devices (coaps+tcp)"
)]
struct Cli {
    /// Log format on stderr (overrides `log.format`).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Config file for `serve` when no subcommand is given.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway (the default).
    Serve {
        /// Keep the hub in memory only: the data directory's hub store is
        /// not opened, and devices, twins and commands are lost on exit.
        #[arg(long)]
        memory: bool,
    },
    /// Create certificates: a development CA and gateway certificate, or
    /// device certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Validate a config file and print the effective configuration.
    CheckConfig,
    /// Issue tokens from the embedded authority (its key is in the data
    /// directory, or `[authority] key_file`).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a one-time authorization code for a device's sign-up.
    Code {
        #[arg(long)]
        owner: String,
        /// Bind the code to one device.
        #[arg(long)]
        device_id: Option<uuid::Uuid>,
        /// Data directory holding the authority's key (overrides
        /// `hub.data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print a bearer token for the HTTP API.
    User {
        #[arg(long)]
        owner: String,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create ca.pem, ca-key.pem, gateway.pem and gateway-key.pem in DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// The hub ID: the gateway certificate's CN is `uuid:<hub-id>`.
        #[arg(long)]
        hub_id: Option<uuid::Uuid>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create device.pem and device-key.pem signed by the CA in --ca DIR.
    Device {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        device_id: uuid::Uuid,
        #[arg(long)]
        out: PathBuf,
        /// A plain client certificate without the OCF identity properties
        /// (for `client_auth = "any"`).
        #[arg(long)]
        any: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { memory: false }) {
        Command::Serve { memory } => serve(cli.config.as_deref(), cli.log_format, memory),
        Command::CheckConfig => check_config(cli.config.as_deref()),
        Command::Token(command) => token(cli.config.as_deref(), command),
        Command::Certs(CertsCommand::Init { out, hub_id, force }) => {
            let hub_id = hub_id.unwrap_or_else(uuid::Uuid::new_v4);
            match pki::init(&out, hub_id, force) {
                Ok(paths) => {
                    for p in paths.written() {
                        println!("wrote {}", p.display());
                    }
                    println!("hub ID {hub_id}");
                    ExitCode::SUCCESS
                }
                Err(e) => usage_error(&e.to_string()),
            }
        }
        Command::Certs(CertsCommand::Device {
            ca,
            device_id,
            out,
            any,
        }) => match pki::device(&ca, device_id, &out, any) {
            Ok(paths) => {
                for p in paths.written() {
                    println!("wrote {}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(&e.to_string()),
        },
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| usage_error(&e.to_string()))
}

fn check_config(path: Option<&Path>) -> ExitCode {
    let Some(path) = path else {
        return usage_error("check-config needs --config FILE");
    };
    let config = match load_config(Some(path)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match config.to_toml_string() {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(&e.to_string()),
    }
}

/// `token code` / `token user` (SURFACE.md): sign with the same key the
/// gateway uses, so a gateway started on the same data directory (or
/// `key_file`) accepts what is printed here.
fn token(config_path: Option<&Path>, command: TokenCommand) -> ExitCode {
    let mut config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let data_dir = match &command {
        TokenCommand::Code { data_dir, .. } | TokenCommand::User { data_dir, .. } => {
            data_dir.clone()
        }
    };
    if let Some(dir) = data_dir {
        config.hub.data_dir = dir;
    }
    let authority = match load_authority(&config) {
        Ok(a) => a,
        Err(e) => return usage_error(&e),
    };
    // The CLI is the IO side: it reads the clock for the tokens' iat/exp.
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let issued = match command {
        TokenCommand::Code {
            owner, device_id, ..
        } => authority.issue_code(&owner, device_id.map(|d| d.to_string()).as_deref(), now),
        TokenCommand::User { owner, ttl, .. } => authority
            .issue_user_token(&owner, ttl, now)
            .map(|t| t.token),
    };
    match issued {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(&e.to_string()),
    }
}

fn load_authority(config: &Config) -> Result<Authority, String> {
    server::load_authority(config)
}

fn init_logging(config: &Config, format: Option<LogFormatArg>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        Some(LogFormatArg::Json) => true,
        Some(LogFormatArg::Text) => false,
        None => config.log.format == LogFormat::Json,
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(path: Option<&Path>, format: Option<LogFormatArg>, memory: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config, format);

    match server::prepare_dev_pki(&config) {
        Ok(Some(paths)) => print_first_start(&config, &paths),
        Ok(None) => {}
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    }
    let open_files = shards::system::raise_nofile_limit();
    // Signal handlers first: a SIGTERM during start-up then drains instead
    // of killing the process.
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, shutdown.clone()) {
            tracing::error!("cannot install the handler for signal {signal}: {e}");
            return ExitCode::from(1);
        }
    }
    let options = server::StartOptions { memory };
    let gateway = match server::start_with_options(&config, shutdown, options) {
        Ok(gw) => gw,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    let mut api_state = ApiState::new(
        gateway.runtime.stats().to_vec(),
        gateway.runtime.shutdown_flag(),
    );
    // The provider carries the embedded authority: its discovery documents,
    // codes and token endpoint.
    if let Some(provider) = &gateway.provider {
        api_state = api_state.with_provider(provider.clone());
    }
    let api_state = api_state
        .with_hub(gateway.hub.clone())
        .with_command_ttl(config.hub.command_time_to_live)
        .with_validator(gateway.validator.clone());
    let api = match ApiServer::start(config.api.address, api_state.clone()) {
        Ok(api) => api,
        Err(e) => {
            tracing::error!("{e}");
            gateway.shutdown();
            gateway.join();
            return ExitCode::from(1);
        }
    };
    api_state.set_ready(true);
    let scheme = if config.coap.tls.enabled {
        "coaps+tcp"
    } else {
        "coap+tcp"
    };
    tracing::info!(
        address = %gateway.local_addr(),
        shards = gateway.runtime.stats().len(),
        client_auth = ?config.coap.tls.client_auth,
        open_files,
        "listening for devices on {scheme}://{}",
        gateway.local_addr()
    );
    tracing::info!(address = %api.local_addr(), "HTTP API on http://{}", api.local_addr());
    spawn_shutdown_watchdog(gateway.runtime.shutdown_flag());
    gateway.join();
    api.stop();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Once a shutdown starts, the shards drain within their drain timeout (5 s);
/// if they have not stopped well after that, exit rather than hang: an
/// operator's SIGTERM must end the process.
fn spawn_shutdown_watchdog(flag: Arc<AtomicBool>) {
    const GRACE: std::time::Duration = std::time::Duration::from_secs(15);
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            std::thread::sleep(GRACE);
            tracing::error!(
                "shards did not stop within {GRACE:?} of the shutdown request; exiting"
            );
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the shutdown watchdog: {e}");
    }
}

/// SURFACE.md: on first start with the embedded defaults, say where the
/// development PKI is and how to get a device certificate.
fn print_first_start(config: &Config, paths: &pki::PkiPaths) {
    let pki_dir = config.hub.pki_dir();
    let devices = server::default_device_dir(config);
    eprintln!(
        "Created a development PKI (not for production) in {}:",
        pki_dir.display()
    );
    for p in paths.written() {
        eprintln!("  {}", p.display());
    }
    eprintln!(
        "Create a device certificate with:\n  coap-gateway certs device --ca {} --device-id $(cat /proc/sys/kernel/random/uuid) --out {}\n\
         and talk to the gateway with libcoap:\n  coap-client-openssl -c {dev}/device.pem -j {dev}/device-key.pem -R {ca} coaps+tcp://127.0.0.1:{port}/x.plgd.dev/time",
        pki_dir.display(),
        devices.display(),
        dev = devices.display(),
        ca = pki_dir.join("ca.pem").display(),
        port = config.coap.address.port(),
    );
}
