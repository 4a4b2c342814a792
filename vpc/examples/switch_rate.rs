//! How long the switch takes to decide one frame on the forwarding path (guest to guest, a tracked TCP
//! flow, 64-byte and 1514-byte frames, same subnet and routed across subnets). Not a test: prints ns/frame.
//! `cargo run --release -p vpc --example switch_rate`
use std::hint::black_box;
use std::time::Instant;
use vpc::frames;
use vpc::packet::TCP_ACK;
use vpc::{MacAddr, Switch, Verdict, VnetHeader, VpcConfig};

fn main() {
    let text = vpc::fuzzing::CONFIG.replace("conntrack_entries = 2", "");
    let mut sw = Switch::new(&VpcConfig::parse(&text).expect("config"));
    let a: MacAddr = "02:00:0a:00:01:0a".parse().expect("mac");
    let b: MacAddr = "02:00:0a:00:01:0b".parse().expect("mac");
    let router = vpc::config::DEFAULT_ROUTER_MAC;
    let (ip_a, ip_b) = (
        "10.0.1.10".parse().expect("ip"),
        "10.0.1.11".parse().expect("ip"),
    );
    let n = 2_000_000u32;
    for (what, dst, len) in [
        ("same subnet, 64 B", b, 64usize),
        ("same subnet, 1514 B", b, 1514),
        ("via router, 64 B", router, 64),
    ] {
        let frame = frames::tcp_v4(
            dst,
            a,
            ip_a,
            ip_b,
            40000,
            5201,
            TCP_ACK,
            &vec![0u8; len - 54],
        );
        let h = VnetHeader::plain();
        let start = Instant::now();
        let t0 = Instant::now();
        for _ in 0..n {
            let v = sw.from_port(0, &h, black_box(&frame), t0);
            assert!(matches!(v, Verdict::ToPort { .. }), "{v:?}");
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
        println!(
            "{what:>22}: {ns:6.1} ns/frame ({:.2} Mframes/s on one core)",
            1e3 / ns
        );
    }
}
