//! Verified card images with real card binaries: an image signed with a
//! fresh key starts a card from its sealed bytes, the card jails itself as
//! usual and answers its agent; the start goes into a measured-boot log;
//! a tampered image is refused while the running card keeps running.

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use card_firmware::agent::AgentClient;
use card_firmware::boot::{
    self, BootError, BootRecord, MeasuredBootLog, SigningKey, TrustedKeys, VerifiedImage,
};
use cardsim_tests::block_card::AGENT_TIMEOUT;
use cardsim_tests::sandbox::wait_for_seccomp;
use cardsim_tests::{card_binary, wait_for_socket, KillOnDrop};
use serde_json::json;

const CARDS: [&str; 3] = ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"];
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An image of the cards this test build uses, signed with a fresh key.
fn image(dir: &std::path::Path) -> (SigningKey, TrustedKeys) {
    let bin = boot::create_bin_dir(dir).unwrap();
    for card in CARDS {
        fs::copy(card_binary(card).unwrap(), bin.join(card)).unwrap();
    }
    let key = boot::generate_signing_key().unwrap();
    boot::sign_image(dir, &key, "0.1.0-test").unwrap();
    let trusted = dir.join("trusted");
    fs::write(
        &trusted,
        format!(
            "# the test's key\n{}\n",
            boot::public_key_hex(&key.verifying_key())
        ),
    )
    .unwrap();
    (key, TrustedKeys::load(&trusted).unwrap())
}

#[test]
fn a_card_started_from_a_verified_image_runs_jailed_and_answers_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let image_dir = dir.path().join("image");
    let (_key, trusted) = image(&image_dir);
    let verified: VerifiedImage = boot::verify_image(&image_dir, &trusted).unwrap();
    assert_eq!(verified.version(), "0.1.0-test");

    let backing = dir.path().join("vol.img");
    fs::File::create(&backing)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let agent = dir.path().join("agent.sock");
    let mut command = verified.command("vhost-blk-backend").unwrap();
    command
        .arg("--socket")
        .arg(dir.path().join("blk.sock"))
        .arg("--backing")
        .arg(&backing)
        .arg("--agent")
        .arg(&agent)
        .stdin(Stdio::null());
    let mut card = KillOnDrop(command.spawn().unwrap());
    let log = MeasuredBootLog::new(&dir.path().join("boot.log"));
    log.append(&BootRecord {
        card: "vol-test",
        binary: "vhost-blk-backend",
        image_version: verified.version(),
        sha256: verified.sha256("vhost-blk-backend").unwrap(),
    })
    .unwrap();

    wait_for_socket(&agent, Some(&mut card.0), Duration::from_secs(10)).unwrap();
    // What runs is the sealed copy, not a file on disk.
    let exe = fs::read_link(format!("/proc/{}/exe", card.id())).unwrap();
    assert!(
        exe.to_string_lossy()
            .starts_with("/memfd:vhost-blk-backend"),
        "{}",
        exe.display()
    );
    let mut client = AgentClient::connect(&agent, AGENT_TIMEOUT).unwrap();
    assert_eq!(client.card().pid, card.id());
    assert_eq!(client.call("health", json!({})).unwrap()["status"], "ok");

    // Its sandbox is the usual one.
    let jail = wait_for_seccomp(card.id(), Duration::from_secs(10)).unwrap();
    assert!(jail.no_new_privs, "{jail:?}");
    if is_root() {
        assert_eq!((jail.uid, jail.gid), (NOBODY, NOBODY), "{jail:?}");
        assert_eq!(jail.cap_effective, 0, "{jail:?}");
        assert!(jail.own_mount_namespace, "{jail:?}");
    }

    // The image is tampered with while the card runs: refused, naming the
    // binary, and the running card keeps answering.
    let path = image_dir.join("bin/vhost-blk-backend");
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    match boot::verify_image(&image_dir, &trusted) {
        Err(BootError::DigestMismatch { name, .. }) => assert_eq!(name, "vhost-blk-backend"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.call("health", json!({})).unwrap()["status"], "ok");

    let entries = log.verify().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].sha256,
        verified.sha256("vhost-blk-backend").unwrap()
    );
}

#[test]
fn an_image_signed_by_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_key, _trusted) = image(dir.path());
    let other = boot::generate_signing_key().unwrap();
    let theirs = TrustedKeys::from_keys(vec![other.verifying_key()]);
    let e = boot::verify_image(dir.path(), &theirs).unwrap_err();
    assert!(matches!(e, BootError::UnknownKey { .. }), "{e}");
}
