//! cardsim's developer commands. `cargo xtask --help` lists them.

mod demo;
mod deps;
mod fuzz;
mod image;
mod soak;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "cardsim developer commands"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the Debian packages the tests need and prepare QEMU 11.1 from
    /// trixie-backports in the cache folder.
    Deps,
    /// Build (or reuse) the guest kernel + initramfs and print their paths.
    GuestImage,
    /// deps, guest-image, fmt and clippy, build the binaries, then run the tests (nextest if
    /// installed, else cargo test). Extra arguments go to the test runner.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build release binaries and run the demo.
    Demo,
    /// Fuzz the card's guest- and peer-facing parsers (cargo-fuzz, stable,
    /// no sanitizer; installs cargo-fuzz if missing). Crashes land in
    /// fuzz/artifacts/<target>/.
    Fuzz {
        /// CI: every target for 30 s, all at once.
        #[arg(long)]
        quick: bool,
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// One target (see `fuzz/Cargo.toml` or docs/SECURITY.md); all if
        /// omitted.
        target: Option<String>,
    },
    /// Signed card images for verified boot: keygen, build, verify.
    Image {
        #[command(subcommand)]
        cmd: image::ImageCmd,
    },
    /// Kill -9 and restart the block card (release build) under a guest's
    /// verified writes, again and again; fails on any lost or duplicated
    /// write, and prints the longest I/O pause the guest saw.
    Soak {
        /// How many restarts.
        #[arg(long, default_value_t = 100)]
        restarts: u32,
        /// QEMU 7.2 (`reconnect=1`) instead of 11.1 (`reconnect-ms=50`).
        #[arg(long)]
        qemu7: bool,
        /// Seeds the kill times and the card's latency model.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// An error that should end the process with a specific code, after one
/// clear line on stderr (e.g. "run this as root").
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

fn main() -> ExitCode {
    // clap exits 2 on usage errors by itself.
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<Exit>() {
                eprintln!("xtask: {exit}");
                return ExitCode::from(exit.code);
            }
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Deps => deps::run(),
        Cmd::GuestImage => guest_image(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => {
            cargo(&["build", "--release", "--workspace", "--bins"])?;
            demo::run_demo()
        }
        Cmd::Fuzz {
            quick,
            seconds,
            target,
        } => fuzz::run(quick, seconds, target.as_deref()),
        Cmd::Image { cmd } => image::run(cmd),
        Cmd::Soak {
            restarts,
            qemu7,
            seed,
        } => soak::run(restarts, qemu7, seed),
    }
}

fn guest_image() -> Result<()> {
    let started = std::time::Instant::now();
    let image = cardsim_tests::guest_image()?;
    let size = std::fs::metadata(&image.initramfs)?.len();
    println!(
        "kernel     {} ({})",
        image.kernel.display(),
        image.kernel_version
    );
    println!(
        "initramfs  {} ({} MiB)",
        image.initramfs.display(),
        size >> 20
    );
    println!("modules    {}", image.modules.join(" "));
    println!("cmdline    {}", image.cmdline);
    eprintln!("(took {:.1?})", started.elapsed());
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    deps::run()?;
    guest_image()?;
    // The project's standards are part of the suite.
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["build", "--workspace", "--bins"])?;
    let nextest = Command::new(cargo_bin())
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut cmd: Vec<&str> = if nextest {
        vec!["nextest", "run", "--workspace"]
    } else {
        eprintln!(
            "xtask: cargo-nextest not installed; using cargo test (guest tests run one at a time)"
        );
        vec!["test", "--workspace"]
    };
    cmd.extend(args.iter().map(String::as_str));
    if !nextest {
        // cargo test runs a binary's tests in parallel; guests must not share
        // the 2 cores. Keep the user's args before any `--` intact.
        if !args.iter().any(|a| a == "--") {
            cmd.push("--");
        }
        cmd.push("--test-threads=1");
    }
    cargo(&cmd)
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(cargo_bin())
        .args(args)
        .current_dir(cardsim_tests::workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
