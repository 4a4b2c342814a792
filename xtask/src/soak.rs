//! `cargo xtask soak`: the block card killed and restarted under a guest's
//! verified load, again and again (cardsim-tests' `soak`), on the release
//! build. Fails if the guest lost, duplicated or failed a single write.

use anyhow::{bail, Result};
use cardsim_tests::soak::{self, SoakConfig};
use cardsim_tests::Vmm;

pub fn run(restarts: u32, qemu7: bool, seed: u64) -> Result<()> {
    crate::cargo(&["build", "--release", "-p", "vhost-blk-backend"])?;
    // The harness finds the cards here (the release build: its restart
    // time is what a deployment sees).
    std::env::set_var(
        "CARDSIM_BIN_DIR",
        cardsim_tests::target_dir().join("release"),
    );
    let vmm = if qemu7 { Vmm::Qemu7 } else { Vmm::Qemu11 };
    eprintln!("soak: {restarts} restarts of the block card under {vmm}, seed {seed}");
    let report = soak::run(&SoakConfig {
        vmm,
        restarts,
        seed,
        until_resubmitted: false,
    })?;
    println!("{report}");
    let problems = report.problems();
    if !problems.is_empty() {
        bail!("the guest saw: {}", problems.join(", "));
    }
    Ok(())
}
