//! `cargo xtask demo`: a guest on the EBS-style block card.

use anyhow::{bail, Result};

/// Runs the demo against the release binaries (built by the caller).
pub fn run_demo() -> Result<()> {
    let card = cardsim_tests::target_dir().join("release/vhost-blk-backend");
    if !card.is_file() {
        bail!(
            "the block card binary is not built yet ({} is missing)",
            card.display()
        );
    }
    bail!(
        "the demo scenario is not written yet: {} exists but nothing drives it",
        card.display()
    )
}
