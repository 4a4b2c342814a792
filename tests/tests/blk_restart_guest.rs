//! The block card killed with SIGKILL under a guest's verified random writes
//! (fio, iodepth 16) and started again on the same socket: QEMU reconnects,
//! the card resubmits what was in flight from QEMU's inflight region, and the
//! guest sees no error, no lost and no duplicated write. Both VMMs: 7.2
//! reconnects with `reconnect=1` (seconds), 11.1 with `reconnect-ms=50`.
//!
//! Each test prints the longest I/O pause the guest saw.

use anyhow::{ensure, Result};
use cardsim_tests::soak::{self, SoakConfig, SoakReport};
use cardsim_tests::Vmm;

fn killed_under_load(vmm: Vmm, restarts: u32, seed: u64) -> Result<SoakReport> {
    let report = soak::run(&SoakConfig {
        vmm,
        restarts,
        seed,
        until_resubmitted: true,
    })?;
    eprintln!("{vmm}:\n{report}");
    let problems = report.problems();
    ensure!(
        problems.is_empty(),
        "{vmm}: {}\n{report}",
        problems.join(", ")
    );
    // The added latency keeps requests in the card, and the soak restarts
    // again if a kill found none: the inflight path really ran.
    ensure!(
        report.resubmitted > 0,
        "{vmm}: no request was in flight at any kill; the test proved nothing\n{report}"
    );
    Ok(report)
}

#[test]
fn guest_qemu7_block_card_killed_under_fio_verify() -> Result<()> {
    killed_under_load(Vmm::Qemu7, 1, 7).map(drop)
}

#[test]
fn guest_qemu11_block_card_killed_under_fio_verify() -> Result<()> {
    killed_under_load(Vmm::Qemu11, 1, 11).map(drop)
}

/// The short soak CI runs (`cargo xtask soak` runs 100).
#[test]
fn guest_qemu11_block_card_soak_five_restarts() -> Result<()> {
    killed_under_load(Vmm::Qemu11, 5, 5).map(drop)
}
