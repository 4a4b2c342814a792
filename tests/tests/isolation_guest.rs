//! Guests are kept apart (issue 9): what a hostile guest can reach on a card.
//!
//! Each test boots a guest, so each name contains "guest".

use std::fs;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cardsim_tests::block_card::BlockCard;
use cardsim_tests::net_card::{eni_counter, NetCard};
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

/// A VPC with three ENIs: A and B have guests, C (10.0.1.12) has none.
const NET_CONFIG: &str = r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100

[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
gateway = "10.0.1.1"

[[security_group]]
id = "sg-open"
ingress = [ { proto = "all", cidr = "10.0.0.0/16" } ]
egress  = [ { proto = "all", cidr = "0.0.0.0/0" } ]

[[eni]]
id = "eni-a"
socket = "$DIR/eni-a.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
security_groups = ["sg-open"]

[[eni]]
id = "eni-b"
socket = "$DIR/eni-b.sock"
mac = "02:00:0a:00:01:0b"
ip = "10.0.1.11"
subnet = "subnet-a"
security_groups = ["sg-open"]

[[eni]]
id = "eni-c"
socket = "$DIR/eni-c.sock"
mac = "02:00:0a:00:01:0c"
ip = "10.0.1.12"
subnet = "subnet-a"
security_groups = ["sg-open"]
"#;

/// Guest A, after talking to B as itself, tries to send as ENI C: first
/// with C's IP address, then with C's MAC address. The card drops every
/// such frame at A's port and counts it; B receives none of them (its ICMP
/// echo counter moves only for A's honest pings).
#[test]
fn guest_cannot_send_as_another_eni_guest() -> Result<()> {
    let mut card = NetCard::start(NET_CONFIG, &[])?;
    let boot = |socket: &std::path::Path, mac: &str, script: &str| {
        Guest::builder(Vmm::Qemu11)
            .mem_mib(512)
            .vhost_user_net(socket, mac, 1)
            .script(script)
            .timeout(Duration::from_secs(300))
            .boot()
    };
    // B prints its ICMP counters (the values line of /proc/net/snmp's Icmp
    // table) every second, for as long as the test needs.
    let mut b = boot(
        card.socket("eni-b")?,
        "02:00:0a:00:01:0b",
        r#"
ip link set eth0 up
ip addr add 10.0.1.11/24 dev eth0
echo B-UP
while true; do echo "B-ICMP $(grep '^Icmp:' /proc/net/snmp | tail -1)"; sleep 1; done
"#,
    )?;
    b.wait_for_line("B-UP", Duration::from_secs(200))?;
    let a = boot(
        card.socket("eni-a")?,
        "02:00:0a:00:01:0a",
        r#"
ip link set eth0 up
ip addr add 10.0.1.10/24 dev eth0
n=0
until ping -c 1 -W 1 10.0.1.11 > /dev/null 2>&1; do
    n=$((n + 1))
    [ $n -lt 30 ] || { echo "no answer from B"; exit 1; }
done
ping -c 3 10.0.1.11
echo "A-HONEST-PINGS $((n + 4))"
ip addr add 10.0.1.12/32 dev eth0
ping -c 5 -W 1 -I 10.0.1.12 10.0.1.11 && echo "SPOOFED IP GOT THROUGH"
ip addr del 10.0.1.12/32 dev eth0
ip link set eth0 down
ip link set eth0 address 02:00:0a:00:01:0c
ip link set eth0 up
ping -c 5 -W 1 10.0.1.11 && echo "SPOOFED MAC GOT THROUGH"
echo CARDSIM-SPOOF-DONE
"#,
    )?
    .wait()?;
    let console = &a.console;
    ensure!(a.script_rc == Some(0), "guest A failed:\n{console}");
    ensure!(console.contains("CARDSIM-SPOOF-DONE"), "{console}");
    ensure!(
        !console.contains("GOT THROUGH"),
        "a spoofed frame was answered:\n{console}"
    );
    // Every echo request A sent honestly, lost or not (at most this many).
    let honest: u64 = console
        .lines()
        .find_map(|l| l.split("A-HONEST-PINGS ").nth(1)?.trim().parse().ok())
        .context("guest A did not count its pings")?;

    // B's counters from a line printed after A finished: let B print a
    // fresh one, then read its console up to the newest (older lines are
    // still queued: nobody read them while A ran).
    std::thread::sleep(Duration::from_millis(1500));
    let mut line = b.wait_for_line("B-ICMP", Duration::from_secs(10))?;
    while let Ok(newer) = b.wait_for_line("B-ICMP", Duration::from_millis(300)) {
        line = newer;
    }
    // Icmp: InMsgs InErrors InCsumErrors InDestUnreachs InTimeExcds
    // InParmProbs InSrcQuenchs InRedirects InEchos …
    let echos: u64 = line
        .split("Icmp:")
        .nth(1)
        .and_then(|v| v.split_whitespace().nth(8)?.parse().ok())
        .with_context(|| format!("no InEchos in {line:?}"))?;

    card.check_alive()?;
    let metrics = card.metrics()?;
    let spoofed_ip = eni_counter(&metrics, "eni-a", "spoofed_ip").context("spoofed_ip counter")?;
    let spoofed_mac =
        eni_counter(&metrics, "eni-a", "spoofed_mac").context("spoofed_mac counter")?;
    eprintln!("B received {echos} echo requests of A's {honest} honest ones; eni-a spoofed_ip {spoofed_ip}, spoofed_mac {spoofed_mac}");
    ensure!(
        spoofed_ip >= 5,
        "only {spoofed_ip} spoofed-IP frames counted: {metrics}"
    );
    ensure!(
        spoofed_mac >= 5,
        "only {spoofed_mac} spoofed-MAC frames counted: {metrics}"
    );
    ensure!(
        (4..=honest).contains(&echos),
        "B received {echos} echo requests; A sent {honest} honest ones and 10 spoofed"
    );
    Ok(())
}

/// Puts every thread of process `pid` in SCHED_IDLE.
fn idle_priority(pid: u32) -> Result<()> {
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a valid sched_param for a thread id we just listed.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } != 0 {
            anyhow::bail!(
                "SCHED_IDLE for thread {tid}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Guest A floods its TX queue with tiny UDP packets (16-byte payloads, as
/// fast as its vCPU can) while guest B, on the same card, measures TCP
/// throughput to a remote host across VXLAN. A's ENI has a packets-per-
/// second allowance, as every ENA interface has: the card holds A's queue at
/// its allowance, so A slows only itself and B keeps at least 80% of what it
/// had alone. A's QEMU runs at idle priority: two TCG guests on two cores
/// otherwise compete for the host's CPU, and the ratio would say nothing
/// about the card. (Measured: 1.00 with the allowance; 0.80-0.85 without it
/// at idle priority, 0.55 without either.)
#[test]
fn a_flooding_guest_slows_only_itself_guest() -> Result<()> {
    use cardsim_tests::net_card::{iperf_received_bps, RemoteHost, GUEST_DHCP};
    let mut remote = RemoteHost::create("10.0.2.5/24", &["10.0.1.0/24"], 100, 4789)?;
    remote.start_iperf3_server(5201)?;
    remote.start_iperf3_server(5202)?;
    let config = format!(
        r#"{NET_CONFIG}
[[remote]]
cidr = "10.0.2.0/24"
vtep = "{}:4789"

[vxlan]
listen = "{}:4789"
"#,
        remote.underlay.remote_ip, remote.underlay.host_ip
    )
    // A's ENI: 2000 packets per second.
    .replacen(
        "ip = \"10.0.1.10\"",
        "ip = \"10.0.1.10\"\nallowance = { ops = { size = 200, refill_time = 100 } }",
        1,
    );
    let mut card = NetCard::start(&config, &[])?;
    let setup = |ip: &str| {
        format!(
            "{GUEST_DHCP}\nip link set eth0 up\nip addr add {ip}/24 dev eth0\n\
             ip route add default via 10.0.1.1\n\
             n=0\nuntil ping -c 1 -W 1 10.0.2.5 > /dev/null 2>&1; do\n\
             n=$((n + 1)); [ $n -lt 60 ] || {{ echo \"no answer from the remote\"; exit 1; }}\ndone\n"
        )
    };
    let boot = |eni: &str, mac: &str, script: String| -> Result<Guest> {
        Guest::builder(Vmm::Qemu11)
            .mem_mib(512)
            .vhost_user_net(card.socket(eni)?, mac, 1)
            .script(&script)
            .timeout(Duration::from_secs(300))
            .boot()
    };
    // A waits for B's word, then floods for longer than B's second run.
    let mut a = boot(
        "eni-a",
        "02:00:0a:00:01:0a",
        setup("10.0.1.10")
            + "echo A-UP\nnc -l -p 9000 > /dev/null\necho A-FLOODING\n\
               iperf3 -u -l 16 -b 0 -t 25 -c 10.0.2.5 -p 5202 > /tmp/flood 2>&1 || true\n\
               tail -4 /tmp/flood\n",
    )?;
    a.wait_for_line("A-UP", Duration::from_secs(200))?;
    // Two TCG guests on two cores compete for the host's CPU whatever the
    // card does; A's vCPUs run only on what is left, so the ratio below
    // measures the card, not the host's scheduler.
    idle_priority(a.pid().context("A's QEMU")?)?;
    let b = boot(
        "eni-b",
        "02:00:0a:00:01:0b",
        setup("10.0.1.11")
            + "iperf_json alone -c 10.0.2.5 -t 5\n\
               until echo go | nc 10.0.1.10 9000; do sleep 1; done\n\
               sleep 4\n\
               iperf_json flooded -c 10.0.2.5 -t 5\n",
    )?
    .wait()?;
    let alone = iperf_received_bps(&b.console, "alone")?;
    let flooded = iperf_received_bps(&b.console, "flooded")?;
    card.check_alive()?;
    let metrics = card.metrics()?;
    let held = eni_counter(&metrics, "eni-a", "pps_allowance_exceeded").unwrap_or(0);
    let a_tx = eni_counter(&metrics, "eni-a", "tx_packets").unwrap_or(0);
    eprintln!(
        "B alone {:.0} Mbit/s, while A floods {:.0} Mbit/s ({:.2}); A sent {a_tx} packets, held {held} times",
        alone / 1e6,
        flooded / 1e6,
        flooded / alone
    );
    ensure!(held > 0, "A's flood never reached its allowance: {metrics}");
    ensure!(
        flooded >= 0.8 * alone,
        "B kept only {:.0}% of its throughput while A flooded",
        100.0 * flooded / alone
    );
    drop(a);
    Ok(())
}
