//! A VMM that connects to the block card, says a little and hangs up, again
//! and again: every session's resources go with it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cardsim_tests::block_card::BlockCard;

/// GET_FEATURES (1) then SET_OWNER (3), as a VMM opens a session; waits for
/// the features reply so the card has set the session up.
fn one_session(socket: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            // Between sessions the card is back to accept() a moment later.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("connecting: {e}"),
        }
    };
    let header = |request: u32| {
        let mut h = Vec::new();
        h.extend_from_slice(&request.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes()); // version 1
        h.extend_from_slice(&0u32.to_le_bytes()); // no payload
        h
    };
    stream.write_all(&header(1)).unwrap();
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).unwrap();
    stream.write_all(&header(3)).unwrap();
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn many_short_sessions_leak_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("vol.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
    let card = BlockCard::start(dir.path(), &backing, &["--num-queues", "4"]).unwrap();
    let settle = || std::thread::sleep(Duration::from_millis(300));

    for _ in 0..10 {
        one_session(&card.socket);
    }
    settle();
    let before = open_descriptors(card.process.id());
    for _ in 0..200 {
        one_session(&card.socket);
    }
    settle();
    let after = open_descriptors(card.process.id());
    // Four queue threads per session: a leak per thread would show as 800.
    assert!(
        after <= before + 2,
        "descriptors grew from {before} to {after} over 200 sessions"
    );
    card.metrics().expect("the card still answers");
}
