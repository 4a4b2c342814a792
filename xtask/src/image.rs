//! `cargo xtask image`: signed card images for verified boot
//! (`card_firmware::boot`). `keygen` makes a signing key; `build` builds the
//! release cards, copies them into an image folder and signs its manifest;
//! `verify` checks an image as the launcher does.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use card_firmware::boot::{self, TrustedKeys};
use clap::Subcommand;

use crate::{cargo, Exit};

/// The card binaries an image holds.
pub const CARDS: [&str; 3] = ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"];

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Make an ed25519 signing key (hex, mode 0600; an existing file is never
    /// replaced) and print its public key for the launcher's trusted keys.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Build the release cards, copy them into OUT/bin and sign the image
    /// (OUT/manifest.json, OUT/manifest.sig). OUT must be absent or empty.
    Build {
        /// The signing key (from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The image's version, recorded in its manifest.
        #[arg(long)]
        version: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an image as the launcher does: signature by a trusted key, every
    /// binary listed and intact.
    Verify {
        /// Trusted public keys, one hex key a line (`#` comments).
        #[arg(long)]
        trusted: PathBuf,
        image: PathBuf,
    },
}

fn config_error(message: String) -> anyhow::Error {
    Exit { code: 2, message }.into()
}

pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Keygen { out } => keygen(&out),
        ImageCmd::Build { key, version, out } => build(&key, &version, &out),
        ImageCmd::Verify { trusted, image } => verify(&trusted, &image),
    }
}

fn keygen(out: &Path) -> Result<()> {
    let key = boot::generate_signing_key().context("no randomness for a key")?;
    boot::write_signing_key(out, &key).map_err(|e| config_error(e.to_string()))?;
    eprintln!(
        "xtask: signing key written to {} (keep it secret)",
        out.display()
    );
    println!("{}", boot::public_key_hex(&key.verifying_key()));
    Ok(())
}

fn build(key_path: &Path, version: &str, out: &Path) -> Result<()> {
    // Everything the operator gave is checked before the (long) build.
    let key = boot::read_signing_key(key_path).map_err(|e| config_error(e.to_string()))?;
    if version.trim().is_empty() || version.chars().any(char::is_control) {
        return Err(config_error(format!(
            "--version {version:?}: give a printable version, e.g. 1.4.0"
        )));
    }
    if let Ok(mut entries) = std::fs::read_dir(out) {
        if entries.next().is_some() {
            return Err(config_error(format!(
                "--out {}: not empty; an image is built into a new folder",
                out.display()
            )));
        }
    }
    let mut args = vec!["build", "--release"];
    for card in CARDS {
        args.extend(["-p", card]);
    }
    args.push("--bins");
    cargo(&args)?;

    let bin = boot::create_bin_dir(out).map_err(anyhow::Error::from)?;
    let release = cardsim_tests::target_dir().join("release");
    for card in CARDS {
        let from = release.join(card);
        let to = bin.join(card);
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    let manifest = boot::sign_image(out, &key, version)?;
    println!(
        "image {} version {} signed by {}",
        out.display(),
        manifest.version,
        boot::public_key_hex(&key.verifying_key())
    );
    for (name, entry) in &manifest.binaries {
        println!(
            "  {name:<20} {:>10} bytes  sha256 {}",
            entry.size, entry.sha256
        );
    }
    Ok(())
}

fn verify(trusted: &Path, image: &Path) -> Result<()> {
    let keys = TrustedKeys::load(trusted).map_err(|e| config_error(e.to_string()))?;
    let verified = boot::verify_image(image, &keys)
        .with_context(|| format!("image {} refused", image.display()))?;
    println!(
        "image {} version {}: good, signed by {}",
        image.display(),
        verified.version(),
        boot::public_key_hex(&verified.signer)
    );
    Ok(())
}
