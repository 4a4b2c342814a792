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
