//! `cardbench compare-net` and `compare-net-guests`: argument errors exit 2
//! with one line naming the problem, before anything is started.

use std::process::{Command, Output};

fn cardbench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cardbench"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let out = cardbench(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(out.stdout.is_empty(), "{args:?} printed results");
}

#[test]
fn compare_net_argument_errors_exit_2() {
    assert_usage_error(&["compare-net", "--rounds", "0"], "--rounds");
    assert_usage_error(&["compare-net", "--runtime", "0"], "--runtime");
    assert_usage_error(&["compare-net", "--runtime", "soon"], "soon");
    assert_usage_error(&["compare-net", "--frame-size", "63"], "--frame-size 63");
    assert_usage_error(
        &["compare-net", "--frame-size", "9000"],
        "--frame-size 9000",
    );
    assert_usage_error(&["compare-net", "--frame-size", "x"], "x");
    assert_usage_error(&["compare-net", "--mode", "rxonly"], "rxonly");
    assert_usage_error(&["compare-net", "--backend", "ovs"], "ovs");
    assert_usage_error(&["compare-net", "--no-such-flag"], "--no-such-flag");
    assert_usage_error(&["compare-net", "--poll-us", "0"], "--poll-us 0");
    assert_usage_error(
        &["compare-net", "--poll-us", "2000000"],
        "--poll-us 2000000",
    );
}

#[test]
fn compare_net_guests_argument_errors_exit_2() {
    assert_usage_error(&["compare-net-guests", "--rounds", "0"], "--rounds");
    assert_usage_error(&["compare-net-guests", "--runtime", "500ms"], "--runtime");
    assert_usage_error(&["compare-net-guests", "--smp", "0"], "--smp");
    assert_usage_error(&["compare-net-guests", "--streams", "99"], "--streams");
    assert_usage_error(&["compare-net-guests", "--streams", "-1"], "-1");
}

/// One short pass of compare-net against both backends: the harness starts
/// testpmd and the card, frames go through both, and the JSON has a ratio.
#[test]
fn compare_net_quick_pass_measures_both_backends() {
    let card =
        std::path::Path::new(env!("CARGO_BIN_EXE_cardbench")).with_file_name("vhost-net-backend");
    assert!(
        card.exists() || std::env::var_os("CARDSIM_BIN_DIR").is_some(),
        "{} missing: cargo build -p vhost-net-backend --bins",
        card.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = cardbench(&[
        "compare-net",
        "--quick",
        "--backend",
        "card,dpdk-vhost",
        "--mode",
        "txonly",
        "--frame-size",
        "64",
        "--runtime",
        "500ms",
        "--results",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cell = &v["cells"][0];
    assert_eq!(cell["frame_size"], 64);
    for key in ["median_card_mpps", "median_dpdk_mpps", "ratio"] {
        let x = cell[key].as_f64().unwrap();
        assert!(x > 0.0, "{key} = {x}: {text}");
    }
    assert!(cell["card_poll"].as_array().unwrap().is_empty());
    // The card's counters of the run: every frame came from ENI A.
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("card-metrics-txonly-64.json")).unwrap(),
    )
    .unwrap();
    let a = &m["enis"][0];
    assert_eq!(a["id"], "eni-a");
    assert!(a["tx_packets"].as_u64().unwrap() > 0, "{m}");
}
