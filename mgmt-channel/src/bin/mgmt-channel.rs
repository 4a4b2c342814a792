//! `mgmt-channel`: the control plane daemon. Exit status: 0 after SIGTERM
//! or SIGINT, 1 on a runtime failure, 2 on a usage or configuration error.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use card_firmware::boot::TrustedKeys;
use host_runtime::card::SupervisorConfig;
use host_runtime::instance::Accel;
use mgmt_channel::auth::{load_tokens, AuditLog};
use mgmt_channel::daemon::{CardSource, Config, Daemon};
use mgmt_channel::model::Cidr;
use mgmt_channel::server::{self, App, UnixPeer};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "cardsim's control plane: configures and supervises the cards"
)]
struct Args {
    /// The API's unix socket (mode 0600). Default:
    /// $XDG_RUNTIME_DIR/cardsim/mgmt.sock, else /run/cardsim/mgmt.sock.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Desired state (state.db), volume and namespace files, card sockets,
    /// logs and the audit log.
    #[arg(long, default_value = "/var/lib/cardsim")]
    state_dir: PathBuf,
    /// Also serve the API on TCP (e.g. 127.0.0.1:8750); needs --token-file.
    #[arg(long, requires = "token_file")]
    listen_tcp: Option<SocketAddr>,
    /// Bearer tokens for TCP: lines `NAME SECRET read|write`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Run cards only from verified images signed by one of these ed25519
    /// public keys (hex, one a line). The safe mode: give this, or
    /// --card-bin-dir for unverified development cards; the daemon
    /// refuses to start without either.
    #[arg(long, conflicts_with = "card_bin_dir")]
    trusted_keys: Option<PathBuf>,
    /// The card image (folder of manifest.json, manifest.sig, bin/) to run
    /// when the state records none yet; afterwards the recorded one (the
    /// last `cardctl firmware update`'s) is run, verified again.
    #[arg(long, requires = "trusted_keys")]
    image: Option<PathBuf>,
    /// Run UNVERIFIED card binaries from this folder (development).
    #[arg(long)]
    card_bin_dir: Option<PathBuf>,
    /// Run cards without their sandbox: for debugging only.
    #[arg(long)]
    no_card_sandbox: bool,
    /// QEMU for launched instances.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    vmm: PathBuf,
    /// How QEMU runs guest CPUs: `kvm` or `tcg`.
    #[arg(long, default_value = "tcg", value_parser = parse_accel)]
    accel: Accel,
    /// Default guest kernel for `instance run`.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Default guest initramfs for `instance run`.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The VPC's address block: every subnet lies in it.
    #[arg(long, default_value = "10.0.0.0/16", value_parser = parse_cidr)]
    vpc_cidr: Cidr,
    /// The VPC's VXLAN network identifier.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..16_777_216))]
    vni: u32,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    print_openapi: bool,
}

fn parse_accel(text: &str) -> Result<Accel, String> {
    match text {
        "kvm" => Ok(Accel::Kvm),
        "tcg" => Ok(Accel::Tcg),
        other => Err(format!("{other:?} is not kvm or tcg")),
    }
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    Cidr::parse(text)
}

fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("cardsim/mgmt.sock"),
        None => PathBuf::from("/run/cardsim/mgmt.sock"),
    }
}

/// A usage or configuration error: exit 2.
struct ConfigError(anyhow::Error);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.print_openapi {
        print!("{}", server::openapi_json());
        return ExitCode::SUCCESS;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(ConfigError(e))) => {
            eprintln!("mgmt-channel: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("mgmt-channel: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Config(ConfigError),
    Runtime(anyhow::Error),
}

fn config_err(e: anyhow::Error) -> Failure {
    Failure::Config(ConfigError(e))
}

fn run(args: Args) -> Result<(), Failure> {
    let socket = args.socket.clone().unwrap_or_else(default_socket);
    let tokens = match &args.token_file {
        Some(path) => load_tokens(path).map_err(|e| config_err(e.into()))?,
        None => Vec::new(),
    };
    let cards = match (&args.trusted_keys, &args.card_bin_dir) {
        (Some(keys), _) => CardSource::Verified {
            trusted: TrustedKeys::load(keys)
                .with_context(|| "--trusted-keys")
                .map_err(config_err)?,
            initial_image: match &args.image {
                Some(dir) => Some(
                    std::path::absolute(dir)
                        .with_context(|| format!("--image {}", dir.display()))
                        .map_err(config_err)?,
                ),
                None => None,
            },
        },
        (None, Some(dir)) => {
            for card in ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"] {
                if !dir.join(card).is_file() {
                    tracing::warn!(card, dir = %dir.display(), "card binary missing: its resources cannot be created");
                }
            }
            CardSource::Unverified {
                bin_dir: dir.clone(),
            }
        }
        (None, None) => {
            return Err(config_err(anyhow::anyhow!(
                "give --trusted-keys FILE --image DIR (cards only from a verified image) or --card-bin-dir DIR (unverified cards, for development)"
            )))
        }
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating --state-dir {}", args.state_dir.display()))
        .map_err(config_err)?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))
        .map_err(config_err)?;
    let audit = AuditLog::open(&state_dir.join("audit.log"))
        .context("opening the audit log")
        .map_err(config_err)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
        .map_err(Failure::Runtime)?;
    runtime.block_on(async move {
        // Refuse now if another daemon serves the socket (this one would end
        // its cards), but bind only once the cards are back: a caller then
        // never waits out a card's start.
        check_socket_free(&socket).map_err(config_err)?;
        let tcp = match args.listen_tcp {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --listen-tcp {addr}"))
                    .map_err(config_err)?,
            ),
            None => None,
        };
        let config = Config {
            state_dir,
            cards,
            card_sandbox: !args.no_card_sandbox,
            vmm: args.vmm,
            accel: args.accel,
            kernel: args.kernel,
            initrd: args.initrd,
            vpc_cidr: args.vpc_cidr,
            vni: args.vni,
            supervisor: SupervisorConfig::default(),
        };
        let daemon = tokio::task::spawn_blocking(move || Daemon::open(config))
            .await
            .map_err(|e| Failure::Runtime(e.into()))?
            .map_err(config_err)?;
        let unix = bind_unix(&socket).map_err(config_err)?;
        let app = App {
            daemon: daemon.clone(),
            audit: Arc::new(audit),
            tokens: Arc::new(tokens),
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        {
            let router =
                server::unix_router(app.clone()).into_make_service_with_connect_info::<UnixPeer>();
            let mut stop = stop_rx.clone();
            servers.spawn(async move {
                axum::serve(unix, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            });
        }
        if let Some(tcp) = tcp {
            let router =
                server::tcp_router(app.clone()).into_make_service_with_connect_info::<SocketAddr>();
            let mut stop = stop_rx.clone();
            tracing::info!(addr = ?tcp.local_addr().ok(), "serving on TCP");
            servers.spawn(async move {
                axum::serve(tcp, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            });
        }
        tracing::info!(socket = %socket.display(), "serving");
        wait_for_signal().await;
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
        while let Some(result) = servers.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::error!(error = %e, "serving");
            }
        }
        tokio::task::spawn_blocking(move || daemon.shutdown())
            .await
            .map_err(|e| Failure::Runtime(e.into()))?;
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Refuses a socket a live daemon answers on.
fn check_socket_free(path: &Path) -> anyhow::Result<()> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "{} is in use: another mgmt-channel is running",
            path.display()
        );
    }
    Ok(())
}

/// Binds the API socket, mode 0600. A socket left by a daemon that died is
/// replaced; one a live daemon answers on is refused.
fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: another mgmt-channel is running",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Created 0600 from the start: no window where others could connect.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}
