//! The networking card under real Linux guests: DHCP, ping and iperf3
//! between two guests on one card (QEMU 11.1 with MSI-X and two queue pairs),
//! security groups (QEMU 7.2, INTx), an allowance capping iperf3, and a Linux
//! network namespace reached across VXLAN.
//!
//! Every test here boots a guest, so each name contains "guest" (nextest runs
//! those one at a time; see .config/nextest.toml). The tests need root for the
//! namespace, veth and bridge fixtures (CI runs as root).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cardsim_tests::net_card::{
    dhcp_lease, iperf_json, iperf_received_bps, run_pair, Bridge, NetCard, PairSpec, RemoteHost,
    GUEST_DHCP,
};
use cardsim_tests::{Guest, Vmm};

const MAC_A: &str = "02:00:0a:00:01:0a";
const MAC_B: &str = "02:00:0a:00:01:0b";
const IP_A: &str = "10.0.1.10";
const IP_B: &str = "10.0.1.11";
/// The remote host's overlay address, under the `[[remote]]` CIDR.
const IP_REMOTE: &str = "10.0.2.5";
const VNI: u32 = 100;
const VXLAN_PORT: u16 = 4789;

/// Per guest, boot to poweroff, on a loaded 2-core machine.
const GUEST_TIMEOUT: Duration = Duration::from_secs(200);

/// The VPC of issue 4: one subnet, sg-web (TCP 5201 and ICMP in, all out),
/// ENI A and B. `a_extra` is appended to ENI A's table (an allowance),
/// `tail` to the file (`[[remote]]`, `[vxlan]`).
fn vpc_config(queue_pairs: u16, a_extra: &str, tail: &str) -> String {
    format!(
        r#"
[vpc]
cidr = "10.0.0.0/16"
vni = {VNI}

[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"

[[security_group]]
id = "sg-web"
ingress = [ {{ proto = "tcp", ports = "5201", cidr = "10.0.0.0/16" }}, {{ proto = "icmp", cidr = "0.0.0.0/0" }} ]
egress  = [ {{ proto = "all", cidr = "0.0.0.0/0" }} ]

[[eni]]
id = "eni-a"
socket = "$DIR/eni-a.sock"
mac = "{MAC_A}"
ip = "{IP_A}"
subnet = "subnet-a"
security_groups = ["sg-web"]
queue_pairs = {queue_pairs}
{a_extra}

[[eni]]
id = "eni-b"
socket = "$DIR/eni-b.sock"
mac = "{MAC_B}"
ip = "{IP_B}"
subnet = "subnet-a"
security_groups = ["sg-web"]
queue_pairs = {queue_pairs}
{tail}
"#
    )
}

/// A pair where both guests take their address by DHCP: server on ENI B,
/// client on ENI A.
fn dhcp_pair(vmm: Vmm, smp: u32, server_extra: &str, client_body: &str) -> PairSpec {
    PairSpec {
        vmm,
        smp,
        mem_mib: 512,
        server_setup: "dhcp eth0".into(),
        client_setup: "dhcp eth0".into(),
        server_ip: IP_B.into(),
        client_ip: IP_A.into(),
        server_extra: server_extra.into(),
        client_body: client_body.into(),
        timeout: GUEST_TIMEOUT,
    }
}

/// Checks the lease a guest printed: its ENI's address, the subnet's
/// gateway, the port's MTU (the VPC's, or the lower one its VMM set).
fn check_lease(console: &str, ip: &str, mtu: &str) -> Result<()> {
    let lease = dhcp_lease(console).context("no DHCP-BOUND line: udhcpc got no lease")?;
    ensure!(lease.ip == ip, "leased {} instead of {ip}", lease.ip);
    ensure!(
        lease.mask == "24",
        "leased mask /{} instead of /24",
        lease.mask
    );
    ensure!(lease.router == "10.0.1.1", "router {}", lease.router);
    ensure!(
        lease.mtu == mtu,
        "MTU option {:?} instead of {mtu}",
        lease.mtu
    );
    Ok(())
}

/// Two guests on QEMU 11.1 (MSI-X, two queue pairs each) get their addresses
/// by DHCP, ping each other and run iperf3 both ways. The client's QEMU sets
/// `host_mtu=1400` (VHOST_USER_NET_SET_MTU): its link and its DHCP lease say
/// 1400, and the server's 1478-byte echo replies (its MTU is the VPC's 1500)
/// are dropped before they reach it, and counted.
#[test]
fn dhcp_ping_and_iperf3_between_two_guests_qemu11_multiqueue_guest() -> Result<()> {
    let mut card = NetCard::start(&vpc_config(2, "", ""), &[])?;
    let spec = dhcp_pair(
        Vmm::Qemu11,
        2,
        "",
        &format!(
            r#"
echo "queues: $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
[ -e /sys/class/net/eth0/queues/rx-1 ] || {{ echo "only one queue pair"; exit 1; }}
ip link show eth0
mtu=$(cat /sys/class/net/eth0/mtu)
echo "eth0 mtu: $mtu"
[ "$mtu" = 1400 ] || {{ echo "eth0 MTU is $mtu, not the host_mtu 1400"; exit 1; }}
ping -c 2 -W 2 -s 1372 {IP_B} > /dev/null || {{ echo "no answer to a 1400-byte ping"; exit 1; }}
if ping -c 2 -W 2 -s 1450 {IP_B}; then echo "MTU-BREACH: 1478-byte replies reached a 1400-byte link"; exit 1; fi
echo MTU-ENFORCED
iperf_json up -c {IP_B} -t 3 -P 2
iperf_json down -c {IP_B} -t 3 -P 2 -R
"#
        ),
    );
    let run = run_pair(
        &spec,
        |g| Ok(g.vhost_user_net(card.socket("eni-b")?, MAC_B, 2)),
        |g| {
            Ok(g.vhost_user_net(card.socket("eni-a")?, MAC_A, 2)
                .qemu_arg("-global")
                .qemu_arg("virtio-net-pci.host_mtu=1400"))
        },
    )?;
    check_lease(&run.server_console, IP_B, "1500").context("server")?;
    check_lease(&run.client.console, IP_A, "1400").context("client")?;
    ensure!(
        run.client.console.contains("eth0 mtu: 1400")
            && run.client.console.contains("MTU-ENFORCED"),
        "the client's MTU checks did not finish"
    );
    let oversized = card.counter("eni-a", "rx_oversized")?;
    ensure!(
        oversized >= 2,
        "{oversized} frames above the client's MTU counted (2 echo replies expected)"
    );
    for name in ["up", "down"] {
        let bps = iperf_received_bps(&run.client.console, name)?;
        eprintln!("iperf3 {name}: {:.0} Mbit/s", bps / 1e6);
        ensure!(bps > 1e6, "iperf3 {name}: only {bps} bit/s");
    }
    card.check_alive()?;
    eprintln!("card metrics: {}", card.metrics()?);
    Ok(())
}

/// On QEMU 7.2 (INTx, `vectors=0`): a TCP port sg-web allows is reachable,
/// one it doesn't (5202, with a server listening) is not.
#[test]
fn security_group_blocks_unlisted_port_qemu7_guest() -> Result<()> {
    let mut card = NetCard::start(&vpc_config(1, "", ""), &[])?;
    let spec = dhcp_pair(
        Vmm::Qemu7,
        1,
        "iperf3 -s -D -p 5202",
        &format!(
            r#"
iperf_json allowed -c {IP_B} -p 5201 -t 2
if iperf3 -c {IP_B} -p 5202 -t 1 --connect-timeout 3000; then
    echo "SG-BREACH: port 5202 reachable"
    exit 1
fi
echo SG-BLOCKED
"#
        ),
    );
    let run = run_pair(
        &spec,
        |g| Ok(g.vhost_user_net(card.socket("eni-b")?, MAC_B, 1)),
        |g| Ok(g.vhost_user_net(card.socket("eni-a")?, MAC_A, 1)),
    )?;
    check_lease(&run.client.console, IP_A, "1500")?;
    let bps = iperf_received_bps(&run.client.console, "allowed")?;
    ensure!(bps > 1e6, "iperf3 to the allowed port: only {bps} bit/s");
    ensure!(run.client.console.contains("SG-BLOCKED"));
    card.check_alive()?;
    eprintln!("card metrics: {}", card.metrics()?);
    Ok(())
}

/// A 20 Mbit/s bandwidth allowance on ENI A caps iperf3 from A at that rate
/// (±15%) and counts `bw_out_allowance_exceeded`.
#[test]
fn bandwidth_allowance_caps_iperf3_guest() -> Result<()> {
    // 250 000 bytes per 100 ms: 2.5 MB/s, 20 Mbit/s.
    const RATE_BPS: f64 = 20e6;
    let allowance = "allowance = { bandwidth = { size = 250000, refill_time = 100 } }";
    let card = NetCard::start(&vpc_config(1, allowance, ""), &[])?;
    let before = card.counter("eni-a", "bw_out_allowance_exceeded")?;
    let spec = dhcp_pair(
        Vmm::Qemu11,
        1,
        "",
        &format!("iperf_json capped -c {IP_B} -t 8 -O 1\n"),
    );
    let run = run_pair(
        &spec,
        |g| Ok(g.vhost_user_net(card.socket("eni-b")?, MAC_B, 1)),
        |g| Ok(g.vhost_user_net(card.socket("eni-a")?, MAC_A, 1)),
    )?;
    let bps = iperf_received_bps(&run.client.console, "capped")?;
    let after = card.counter("eni-a", "bw_out_allowance_exceeded")?;
    eprintln!(
        "capped iperf3: {:.2} Mbit/s (allowance {:.0} Mbit/s), bw_out_allowance_exceeded {before} -> {after}",
        bps / 1e6,
        RATE_BPS / 1e6
    );
    ensure!(
        (bps - RATE_BPS).abs() <= 0.15 * RATE_BPS,
        "iperf3 ran at {:.2} Mbit/s, not within 15% of the {:.0} Mbit/s allowance",
        bps / 1e6,
        RATE_BPS / 1e6
    );
    ensure!(
        after > before,
        "bw_out_allowance_exceeded did not grow ({before} -> {after})"
    );
    Ok(())
}

/// A Linux network namespace with a `vxlan` device (VNI 100, port 4789) is a
/// remote host under `[[remote]] 10.0.2.0/24`: the guest pings it and runs
/// iperf3 both ways across VXLAN, and the namespace pings the guest.
#[test]
fn vxlan_to_linux_netns_guest() -> Result<()> {
    let mut remote = RemoteHost::create(
        &format!("{IP_REMOTE}/24"),
        &["10.0.1.0/24"],
        VNI,
        VXLAN_PORT,
    )?;
    remote.start_iperf3_server(5201)?;
    let tail = format!(
        r#"
[[remote]]
cidr = "10.0.2.0/24"
vtep = "{}:{VXLAN_PORT}"

[vxlan]
listen = "{}:{VXLAN_PORT}"
"#,
        remote.underlay.remote_ip, remote.underlay.host_ip
    );
    let mut card = NetCard::start(&vpc_config(1, "", &tail), &[])?;
    let script = format!(
        r#"{GUEST_DHCP}
dhcp eth0
echo GUEST-UP
n=0
until ping -c 1 -W 1 {IP_REMOTE} > /dev/null 2>&1; do
    n=$((n + 1))
    [ $n -lt 30 ] || {{ echo "no answer from {IP_REMOTE}"; exit 1; }}
done
ping -c 3 {IP_REMOTE}
iperf_json vx-up -c {IP_REMOTE} -t 3
iperf_json vx-down -c {IP_REMOTE} -t 3 -R
"#
    );
    let mut guest = Guest::builder(Vmm::Qemu11)
        .smp(1)
        .mem_mib(512)
        .vhost_user_net(card.socket("eni-a")?, MAC_A, 1)
        .script(&script)
        .timeout(GUEST_TIMEOUT)
        .boot()?;
    guest.wait_for_line("GUEST-UP", GUEST_TIMEOUT)?;
    // The remote side starts a flow too: the card must answer its ARP for
    // the ENI over VXLAN and let the echo requests in (sg-web allows ICMP).
    let mut pinged = Err(anyhow::anyhow!("not tried"));
    for _ in 0..10 {
        pinged = remote.exec(&["busybox", "ping", "-c", "1", "-W", "2", IP_A]);
        if pinged.is_ok() {
            break;
        }
    }
    pinged.with_context(|| {
        format!(
            "pinging the guest from the namespace\n{}",
            remote.vxlan_stats()
        )
    })?;
    let out = guest
        .wait()
        .with_context(|| format!("vxlan stats in the namespace:\n{}", remote.vxlan_stats()))?;
    for name in ["vx-up", "vx-down"] {
        let bps = iperf_received_bps(&out.console, name)?;
        eprintln!("iperf3 {name} across VXLAN: {:.0} Mbit/s", bps / 1e6);
        ensure!(
            bps > 1e6,
            "iperf3 {name}: only {bps} bit/s\ncard metrics: {}\nnamespace: {}",
            card.metrics()?,
            remote.vxlan_stats()
        );
    }
    card.check_alive()?;
    Ok(())
}

/// The same two guests on a Linux bridge with vhost-less taps (static
/// addresses): the baseline of the throughput target, and a check of the
/// pair harness without the card. Run by hand:
/// `cargo nextest run -p cardsim-tests --run-ignored only linux_bridge`.
#[test]
#[ignore = "baseline for cardbench compare-net-guests; run by hand"]
fn linux_bridge_pair_baseline_guest() -> Result<()> {
    let bridge = Bridge::create(2)?;
    let spec = PairSpec {
        vmm: Vmm::Qemu11,
        smp: 1,
        mem_mib: 512,
        server_setup: format!("ip link set eth0 up\nip addr add {IP_B}/24 dev eth0"),
        client_setup: format!("ip link set eth0 up\nip addr add {IP_A}/24 dev eth0"),
        server_ip: IP_B.into(),
        client_ip: IP_A.into(),
        server_extra: String::new(),
        client_body: format!("iperf_json up -c {IP_B} -t 5\n"),
        timeout: GUEST_TIMEOUT,
    };
    let run = run_pair(
        &spec,
        |mut g| {
            for a in bridge.qemu_args(1, MAC_B)? {
                g = g.qemu_arg(a);
            }
            Ok(g)
        },
        |mut g| {
            for a in bridge.qemu_args(0, MAC_A)? {
                g = g.qemu_arg(a);
            }
            Ok(g)
        },
    )?;
    let json = iperf_json(&run.client.console, "up")?;
    let bps = iperf_received_bps(&run.client.console, "up")?;
    eprintln!("Linux bridge iperf3: {:.0} Mbit/s", bps / 1e6);
    ensure!(json.pointer("/end/sum_sent").is_some());
    ensure!(bps > 1e6, "only {bps} bit/s on the bridge");
    Ok(())
}
