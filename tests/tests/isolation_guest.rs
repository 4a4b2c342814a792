//! Guests are kept apart (issue 9): what a hostile guest can reach on a card.
//!
//! Each test boots a guest, so each name contains "guest".

use std::fs;
use std::time::Duration;

use anyhow::{ensure, Result};
use cardsim_tests::block_card::BlockCard;
use cardsim_tests::sandbox::process_jail;
use cardsim_tests::{Guest, Vmm};
use sha2::{Digest, Sha256};

const VOLUME_SIZE: u64 = 16 << 20;
const SECRET: &str = "CARDSIM-SECRET-OF-VOLUME-B";

/// Two volumes on two cards, as two instances have them. Guest A, on card A,
/// reads every byte its device offers and writes all over it; volume B's
/// secret never shows up, and volume B is not changed by a single byte. Card
/// A's jail does not even hold volume B's path.
#[test]
fn guest_cannot_read_or_write_another_guests_volume() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&dir_a)?;
    fs::create_dir_all(&dir_b)?;
    let vol_a = dir_a.join("vol.img");
    let vol_b = dir_b.join("vol.img");
    fs::File::create(&vol_a)?.set_len(VOLUME_SIZE)?;
    let secret: Vec<u8> = format!("{SECRET}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(VOLUME_SIZE as usize)
        .collect();
    fs::write(&vol_b, &secret)?;
    let b_before = Sha256::digest(fs::read(&vol_b)?);

    let card_a = BlockCard::start(&dir_a, &vol_a, &[])?;
    let _card_b = BlockCard::start(&dir_b, &vol_b, &[])?;
    let jail =
        cardsim_tests::sandbox::wait_for_seccomp(card_a.process.id(), Duration::from_secs(10))?;
    ensure!(
        jail.root_entries.is_empty(),
        "card A sees {:?} at its root",
        jail.root_entries
    );
    ensure!(process_jail(card_a.process.id())?.own_mount_namespace);

    let script = format!(
        r#"
wait_dev /dev/vda
size=$(cat /sys/block/vda/size)
echo "vda: $size sectors"
# Everything the device offers, and one sector past its end.
hits=$(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | grep -c {SECRET} || true)
echo "secret hits: $hits"
dd if=/dev/vda of=/dev/null bs=512 skip=$size count=1 iflag=direct 2>&1 | tail -1
# Write the whole device, then flush.
dd if=/dev/zero of=/dev/vda bs=1M oflag=direct 2>/dev/null || true
sync
echo CARDSIM-ISOLATION-DONE
"#
    );
    let out = Guest::builder(Vmm::Qemu11)
        .vhost_user_blk(&card_a.socket, 1, false)
        .script(&script)
        .timeout(Duration::from_secs(120))
        .boot()?
        .wait()?;
    ensure!(
        out.script_rc == Some(0),
        "guest script failed:\n{}",
        out.console
    );
    ensure!(
        out.console
            .contains(&format!("vda: {} sectors", VOLUME_SIZE / 512)),
        "{}",
        out.console
    );
    ensure!(
        out.console.contains("secret hits: 0"),
        "guest A read volume B's secret:\n{}",
        out.console
    );
    ensure!(
        out.console.contains("CARDSIM-ISOLATION-DONE"),
        "{}",
        out.console
    );
    ensure!(
        Sha256::digest(fs::read(&vol_b)?) == b_before,
        "volume B changed while guest A wrote all over its own device"
    );
    // The secret is still there to be found: the check above could fail.
    ensure!(fs::read(&vol_b)?
        .windows(SECRET.len())
        .any(|w| w == SECRET.as_bytes()));
    Ok(())
}
