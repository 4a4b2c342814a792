//! The local-NVMe card under a real Linux guest on QEMU 11.1's
//! `vfio-user-pci` (the host's QEMU 7.2 has no vfio-user client).
//!
//! Every test here boots a guest, so each name contains "guest" (nextest
//! runs those one at a time; see .config/nextest.toml).

use std::time::Duration;

use anyhow::{ensure, Result};
use cardsim_tests::nvme_card::NvmeCard;
use cardsim_tests::{Guest, Vmm};

#[test]
fn smoke_guest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ns = dir.path().join("ns1.img");
    std::fs::File::create(&ns)?.set_len(64 << 20)?;
    let card = NvmeCard::start(dir.path(), &[ns.to_str().unwrap()], &["--serial", "SMOKE1"])?;
    let guest = card.attach(Guest::builder(Vmm::Qemu11).smp(2).mem_mib(512));
    let out = guest
        .script("wait_dev /dev/nvme0n1 30\ncat /sys/block/nvme0n1/size /sys/class/nvme/nvme0/serial /sys/class/nvme/nvme0/model\n")
        .timeout(Duration::from_secs(120))
        .boot()?
        .wait()?;
    ensure!(out.console.contains("SMOKE1"), "{}", out.console);
    Ok(())
}
