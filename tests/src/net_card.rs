//! Starting the networking card (`vhost-net-backend`) for a test, reading its
//! counters, and the peers the guests talk to across it: a Linux network
//! namespace with a `vxlan` device standing in for a remote host, a Linux
//! bridge with taps (the baseline the card is compared against), and the
//! guest-side pieces (the udhcpc script, iperf3's JSON on the console).
//!
//! Every fixture undoes what it made when dropped: processes are killed,
//! namespaces, bridges and taps deleted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::{card_binary, wait_for_socket, Guest, GuestBuilder, GuestOutput, KillOnDrop, Vmm};

/// Written into a config template, replaced by the card's temporary folder
/// (the ENI sockets go there).
pub const DIR_PLACEHOLDER: &str = "$DIR";

/// A running `vhost-net-backend`: its config, one vhost-user socket per ENI,
/// an agent socket and a metrics file, all in a temporary folder.
pub struct NetCard {
    pub process: KillOnDrop,
    pub config: PathBuf,
    pub agent: PathBuf,
    pub metrics_file: PathBuf,
    /// `(eni id, socket)` in the config's order.
    pub enis: Vec<(String, PathBuf)>,
    dir: tempfile::TempDir,
}

impl NetCard {
    /// Writes `config` (a TOML template: every `$DIR` becomes the card's
    /// temporary folder) and starts the card on it with `extra` flags, then
    /// waits for every ENI's socket and the agent socket.
    pub fn start(config: &str, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cardsim-net-")
            .tempdir()
            .context("creating the card's temporary folder")?;
        let text = config.replace(DIR_PLACEHOLDER, &dir.path().display().to_string());
        let config = dir.path().join("vpc.toml");
        fs::write(&config, &text).with_context(|| format!("writing {}", config.display()))?;
        let enis = eni_sockets(&text)?;
        ensure!(
            !enis.is_empty(),
            "the card's config has no [[eni]] with a socket"
        );
        let agent = dir.path().join("agent.sock");
        // The card jails itself as nobody and rewrites its metrics file by
        // name: the folder must be that uid's (root still reaches it).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let nobody = card_firmware::sandbox::DEFAULT_ID;
            std::os::unix::fs::chown(dir.path(), Some(nobody), Some(nobody))
                .context("giving the card's folder to nobody")?;
        }
        let metrics_file = dir.path().join("metrics.json");
        let child = Command::new(card_binary("vhost-net-backend")?)
            .arg("--config")
            .arg(&config)
            .arg("--agent")
            .arg(&agent)
            .arg("--metrics")
            .arg(&metrics_file)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .context("starting vhost-net-backend")?;
        let mut process = KillOnDrop(child);
        for (_, socket) in &enis {
            wait_for_socket(socket, Some(&mut process.0), Duration::from_secs(20))?;
        }
        wait_for_socket(&agent, Some(&mut process.0), Duration::from_secs(20))?;
        Ok(Self {
            process,
            config,
            agent,
            metrics_file,
            enis,
            dir,
        })
    }

    /// The card's temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The vhost-user socket of the ENI named `eni`.
    pub fn socket(&self, eni: &str) -> Result<&Path> {
        self.enis
            .iter()
            .find(|(id, _)| id == eni)
            .map(|(_, s)| s.as_path())
            .with_context(|| format!("no ENI {eni} in the card's config"))
    }

    /// One agent request on a fresh connection; its `ok` value, or the
    /// card's error (see [`crate::block_card::card_error_code`]).
    pub fn call(&self, op: &str, args: Value) -> Result<Value> {
        crate::block_card::call(&self.agent, op, args)
    }

    /// Everything the card counts, now.
    pub fn metrics(&self) -> Result<Value> {
        self.call("metrics", json!({}))
    }

    /// The counter `name` of ENI `eni` in the card's metrics now (see
    /// [`eni_counter`]).
    pub fn counter(&self, eni: &str, name: &str) -> Result<u64> {
        let metrics = self.metrics()?;
        eni_counter(&metrics, eni, name).with_context(|| {
            format!(
                "no counter {name} for {eni} in the card's metrics: {}",
                short(&metrics)
            )
        })
    }

    /// Fails if the card has exited (it must survive everything a test does).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.process.0.try_wait()? {
            bail!("vhost-net-backend exited: {status}");
        }
        Ok(())
    }
}

/// The `(id, socket)` of every `[[eni]]` table of a TOML config, read line
/// by line (the harness doesn't parse the VPC config itself: the card is the
/// one that must).
fn eni_sockets(text: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut in_eni = false;
    let mut id: Option<String> = None;
    let mut socket: Option<PathBuf> = None;
    let mut flush = |id: &mut Option<String>, socket: &mut Option<PathBuf>| -> Result<()> {
        match (id.take(), socket.take()) {
            (Some(i), Some(s)) => out.push((i, s)),
            (None, None) => {}
            (i, s) => bail!("an [[eni]] without both id and socket: {i:?} {s:?}"),
        }
        Ok(())
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            flush(&mut id, &mut socket)?;
            in_eni = line == "[[eni]]";
            continue;
        }
        if !in_eni {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().trim_matches('"').to_string();
            match key.trim() {
                "id" => id = Some(value),
                "socket" => socket = Some(PathBuf::from(value)),
                _ => {}
            }
        }
    }
    flush(&mut id, &mut socket)?;
    Ok(out)
}

/// Finds counter `name` of ENI `eni` in the card's metrics, whatever their
/// nesting: the numeric `name` inside the object that is keyed by the ENI id
/// or has `"id": eni` (or `"eni": eni`). Counters split by reason (an object
/// of numbers) are summed.
pub fn eni_counter(metrics: &Value, eni: &str, name: &str) -> Option<u64> {
    let scope = find_eni(metrics, eni)?;
    find_number(scope, name)
}

fn find_eni<'a>(v: &'a Value, eni: &str) -> Option<&'a Value> {
    match v {
        Value::Object(map) => {
            if let Some(inner) = map.get(eni) {
                return Some(inner);
            }
            let named = ["id", "eni"]
                .iter()
                .any(|k| map.get(*k).and_then(Value::as_str) == Some(eni));
            if named {
                return Some(v);
            }
            map.values().find_map(|x| find_eni(x, eni))
        }
        Value::Array(items) => items.iter().find_map(|x| find_eni(x, eni)),
        _ => None,
    }
}

fn find_number(v: &Value, name: &str) -> Option<u64> {
    match v {
        Value::Object(map) => {
            if let Some(x) = map.get(name) {
                if let Some(n) = x.as_u64() {
                    return Some(n);
                }
                if let Value::Object(parts) = x {
                    return Some(parts.values().filter_map(Value::as_u64).sum());
                }
            }
            map.values().find_map(|x| find_number(x, name))
        }
        Value::Array(items) => items.iter().find_map(|x| find_number(x, name)),
        _ => None,
    }
}

/// The first 2000 characters of a JSON value, for error messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(2000).collect()
}

/// Runs a host command; fails with its stderr unless it exits 0.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A name no other fixture of this process (or a concurrent test process)
/// uses: `prefix` + pid + a counter, at most 15 bytes (IFNAMSIZ - 1).
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}{n}", std::process::id() % 100_000);
    name.chars().take(15).collect()
}

/// Where the VXLAN underlay of a [`RemoteHost`] lives: a veth pair with a
/// /30 of 198.18.0.0/15 (the benchmarking range, RFC 2544: never routed, and
/// only these two ends exist).
#[derive(Debug, Clone)]
pub struct Underlay {
    /// The host side's address: the card's `[vxlan] listen` binds here.
    pub host_ip: std::net::Ipv4Addr,
    /// The namespace side's address: the card's `[[remote]] vtep` points here.
    pub remote_ip: std::net::Ipv4Addr,
}

/// A remote host reached across VXLAN: a network namespace with one end of a
/// veth pair (the underlay), a Linux `vxlan` device on it with the VPC's VNI
/// whose remote is the card, and an overlay address in the `[[remote]]` CIDR.
/// The namespace and everything in it go away on drop.
pub struct RemoteHost {
    pub netns: String,
    pub underlay: Underlay,
    /// The overlay address of the namespace's vxlan device.
    pub overlay_ip: std::net::Ipv4Addr,
    pub vni: u32,
    pub port: u16,
    host_veth: String,
    servers: Vec<KillOnDrop>,
}

impl RemoteHost {
    /// Makes the namespace. `overlay` is the vxlan device's address with its
    /// prefix (e.g. "10.0.2.5/24"); `routes` are the overlay CIDRs reached
    /// through the card (the VPC's subnets). The underlay /30
    /// (198.18.S.0/30) depends on the process id and a counter, so fixtures
    /// of concurrent test processes don't collide.
    pub fn create(overlay: &str, routes: &[&str], vni: u32, port: u16) -> Result<Self> {
        static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
        let n = std::process::id().wrapping_add(NEXT_SLOT.fetch_add(1, Ordering::Relaxed));
        let slot = u8::try_from(n % 250).unwrap_or(0) + 1;
        let netns = unique_name("csnet");
        let host_veth = unique_name("csvh");
        let ns_veth = "csvn0";
        let host_ip = std::net::Ipv4Addr::new(198, 18, slot, 1);
        let remote_ip = std::net::Ipv4Addr::new(198, 18, slot, 2);
        let overlay_ip = overlay
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("overlay address {overlay}"))?;
        run("ip", &["netns", "add", &netns])?;
        // From here on, drop cleans up whatever got made.
        let host = RemoteHost {
            netns: netns.clone(),
            underlay: Underlay { host_ip, remote_ip },
            overlay_ip,
            vni,
            port,
            host_veth: host_veth.clone(),
            servers: Vec::new(),
        };
        let n = netns.as_str();
        run(
            "ip",
            &[
                "link", "add", &host_veth, "type", "veth", "peer", "name", ns_veth, "netns", n,
            ],
        )?;
        // A jumbo underlay so a 1500-byte inner frame plus 50 bytes of
        // VXLAN/UDP/IP/Ethernet fits without fragmentation.
        run("ip", &["link", "set", &host_veth, "mtu", "9000", "up"])?;
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth],
        )?;
        let in_ns = |args: &[&str]| -> Result<String> {
            let mut all = vec!["netns", "exec", n];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        in_ns(&["ip", "link", "set", "lo", "up"])?;
        in_ns(&["ip", "link", "set", ns_veth, "mtu", "9000", "up"])?;
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{remote_ip}/30"),
            "dev",
            ns_veth,
        ])?;
        // A veth hands GSO super-frames and partial checksums straight to the
        // receiving socket; a wire would not. Without these offloads the
        // namespace segments and checksums each encapsulated frame, as a host
        // whose NIC lacks tunnel offloads does.
        in_ns(&[
            "ethtool", "-K", ns_veth, "tx", "off", "sg", "off", "tso", "off", "gso", "off",
        ])?;
        let (vni_s, port_s) = (vni.to_string(), port.to_string());
        in_ns(&[
            "ip",
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            &vni_s,
            "local",
            &remote_ip.to_string(),
            "remote",
            &host_ip.to_string(),
            "dstport",
            &port_s,
            "dev",
            ns_veth,
        ])?;
        in_ns(&["ip", "link", "set", "vx0", "mtu", "1500", "up"])?;
        in_ns(&["ip", "addr", "add", overlay, "dev", "vx0"])?;
        for route in routes {
            in_ns(&["ip", "route", "replace", route, "dev", "vx0"])?;
        }
        Ok(host)
    }

    /// Runs a command in the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.netns.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Starts `iperf3 -s` on `port` in the namespace (killed on drop) and
    /// waits until it listens.
    pub fn start_iperf3_server(&mut self, port: u16) -> Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "iperf3", "-s", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s in the namespace")?;
        self.servers.push(KillOnDrop(child));
        for _ in 0..100 {
            let listening = self.exec(&["ss", "-Hltn", &format!("sport = :{port}")])?;
            if !listening.trim().is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("iperf3 in {} did not listen on {port}", self.netns)
    }

    /// The namespace's vxlan device statistics (`ip -s link show vx0`), for
    /// error messages.
    pub fn vxlan_stats(&self) -> String {
        self.exec(&["ip", "-s", "link", "show", "vx0"])
            .unwrap_or_else(|e| format!("{e:#}"))
    }
}

impl Drop for RemoteHost {
    fn drop(&mut self) {
        self.servers.clear();
        // Deleting the namespace deletes its veth end, which takes the host
        // end with it; delete that too in case the namespace half failed.
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = run("ip", &["link", "del", &self.host_veth]);
    }
}

/// A Linux bridge with one tap per guest, no address on the host: the
/// guests' frames stay on the bridge. The baseline the card is measured
/// against (QEMU's tap netdev with `vhost=off`).
pub struct Bridge {
    pub name: String,
    pub taps: Vec<String>,
}

impl Bridge {
    pub fn create(taps: usize) -> Result<Self> {
        let mut bridge = Bridge {
            name: unique_name("csbr"),
            taps: Vec::new(),
        };
        run("ip", &["link", "add", &bridge.name, "type", "bridge"])?;
        run("ip", &["link", "set", &bridge.name, "up"])?;
        for _ in 0..taps {
            let tap = unique_name("cstap");
            run("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            bridge.taps.push(tap.clone());
            run("ip", &["link", "set", &tap, "master", &bridge.name])?;
            run("ip", &["link", "set", &tap, "up"])?;
        }
        Ok(bridge)
    }

    /// QEMU arguments attaching tap `index` to a guest with `mac` (virtio-net
    /// in QEMU, no vhost-net).
    pub fn qemu_args(&self, index: usize, mac: &str) -> Result<Vec<String>> {
        let tap = self
            .taps
            .get(index)
            .with_context(|| format!("the bridge has no tap {index}"))?;
        Ok(vec![
            "-netdev".into(),
            format!("tap,id=tap{index},ifname={tap},script=no,downscript=no,vhost=off"),
            "-device".into(),
            format!("virtio-net-pci,netdev=tap{index},mac={mac}"),
        ])
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for tap in &self.taps {
            let _ = run("ip", &["link", "del", tap]);
        }
        let _ = run("ip", &["link", "del", &self.name]);
    }
}

/// Guest shell that defines `dhcp IFACE`: busybox udhcpc with a script that
/// applies the lease (address, router, MTU) and prints
/// `DHCP-BOUND iface=… ip=… mask=… router=… mtu=…` on the console.
pub const GUEST_DHCP: &str = r#"
cat > /tmp/udhcpc.sh <<'EOF'
#!/bin/sh
case "$1" in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip addr flush dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    echo "DHCP-BOUND iface=$interface ip=$ip mask=$mask router=$router mtu=$mtu"
    ;;
esac
exit 0
EOF
chmod +x /tmp/udhcpc.sh
dhcp() {
    ip link set "$1" up
    udhcpc -i "$1" -q -n -t 5 -T 2 -O mtu -s /tmp/udhcpc.sh
}
# iperf_json NAME ARGS...: runs the iperf3 client with -J and prints its JSON
# on one console line: IPERF-JSON NAME {...}
iperf_json() {
    name=$1
    shift
    iperf3 -J "$@" > /tmp/iperf.json || { cat /tmp/iperf.json; return 1; }
    echo "IPERF-JSON $name $(tr -d '\n' < /tmp/iperf.json)"
}
"#;

/// The `DHCP-BOUND` line's fields from a console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpLease {
    pub ip: String,
    pub mask: String,
    pub router: String,
    pub mtu: String,
}

/// The lease a guest's udhcpc script printed (see [`GUEST_DHCP`]).
pub fn dhcp_lease(console: &str) -> Option<DhcpLease> {
    let line = console.lines().find(|l| l.contains("DHCP-BOUND "))?;
    let field = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_default()
    };
    Some(DhcpLease {
        ip: field("ip"),
        mask: field("mask"),
        router: field("router"),
        mtu: field("mtu"),
    })
}

/// iperf3's result named `name` on a console (see `iperf_json` in
/// [`GUEST_DHCP`]): received bits per second.
pub fn iperf_received_bps(console: &str, name: &str) -> Result<f64> {
    let json = iperf_json(console, name)?;
    json.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .with_context(|| format!("iperf3 {name}: no end.sum_received.bits_per_second"))
}

/// iperf3's whole JSON result named `name` on a console.
pub fn iperf_json(console: &str, name: &str) -> Result<Value> {
    let prefix = format!("IPERF-JSON {name} ");
    let line = console
        .lines()
        .find_map(|l| l.find(&prefix).map(|at| &l[at + prefix.len()..]))
        .with_context(|| format!("no iperf3 result {name} on the console"))?;
    serde_json::from_str(line).with_context(|| format!("iperf3 {name}: bad JSON"))
}

/// Two guests that talk across a network: a server (booted first; runs
/// `iperf3 -s` on 5201, then pings the client until it answers) and a client
/// that runs `client_body` once it has its address and can ping the server.
pub struct PairSpec {
    pub vmm: Vmm,
    /// vCPUs and MiB of each guest.
    pub smp: u32,
    pub mem_mib: u32,
    /// Shell that gives the server's eth0 its address (`dhcp eth0`, or `ip addr add …`).
    pub server_setup: String,
    pub client_setup: String,
    pub server_ip: String,
    pub client_ip: String,
    /// More shell for the server before it reports ready (e.g. another iperf3 -s).
    pub server_extra: String,
    /// The client's test: ping, iperf3 (`iperf_json NAME -c … `), …
    pub client_body: String,
    /// For each guest's whole run.
    pub timeout: Duration,
}

/// What a [`PairSpec`] run left: both consoles.
pub struct PairRun {
    pub server_console: String,
    pub client: GuestOutput,
}

/// A line the server prints when it is ready for the client.
pub const SERVER_READY: &str = "CARDSIM-SERVER-READY";
/// A line the server prints once it has pinged the client.
pub const SERVER_PINGED: &str = "CARDSIM-SERVER-PINGED-CLIENT";

/// Boots the server guest, waits until it is ready, boots the client, waits
/// for the client to finish and for the server to have pinged it, then stops
/// the server. `attach_*` add each guest's network device.
pub fn run_pair(
    spec: &PairSpec,
    attach_server: impl FnOnce(GuestBuilder) -> Result<GuestBuilder>,
    attach_client: impl FnOnce(GuestBuilder) -> Result<GuestBuilder>,
) -> Result<PairRun> {
    let server_script = format!(
        r#"{GUEST_DHCP}
{setup}
iperf3 -s -D -p 5201
{extra}
echo {SERVER_READY}
n=0
until ping -c 1 -W 1 {client} > /dev/null 2>&1; do
    n=$((n + 1))
    [ $n -lt 300 ] || {{ echo "server: no answer from {client}"; exit 1; }}
done
echo {SERVER_PINGED}
sleep 3600
"#,
        setup = spec.server_setup,
        extra = spec.server_extra,
        client = spec.client_ip,
    );
    let client_script = format!(
        r#"{GUEST_DHCP}
{setup}
n=0
until ping -c 1 -W 1 {server} > /dev/null 2>&1; do
    n=$((n + 1))
    [ $n -lt 30 ] || {{ echo "client: no answer from {server}"; exit 1; }}
done
ping -c 3 {server}
{body}
"#,
        setup = spec.client_setup,
        server = spec.server_ip,
        body = spec.client_body,
    );
    let server = Guest::builder(spec.vmm)
        .smp(spec.smp)
        .mem_mib(spec.mem_mib)
        .script(&server_script)
        .timeout(spec.timeout * 2);
    let mut server = attach_server(server)?.boot()?;
    server
        .wait_for_line(SERVER_READY, spec.timeout)
        .context("the server guest")?;
    let client = Guest::builder(spec.vmm)
        .smp(spec.smp)
        .mem_mib(spec.mem_mib)
        .script(&client_script)
        .timeout(spec.timeout);
    let client = attach_client(client)?
        .boot()?
        .wait()
        .context("the client guest")?;
    server
        .wait_for_line(SERVER_PINGED, Duration::from_secs(30))
        .context("the server guest pinging the client")?;
    Ok(PairRun {
        server_console: server.console().to_string(),
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eni_sockets_come_from_eni_tables_only() {
        let text = r#"
[vpc]
cidr = "10.0.0.0/16"
[[subnet]]
id = "subnet-a"
[[eni]]
id = "eni-a"
socket = "/x/a.sock"
mac = "02:00:00:00:00:01"
[[security_group]]
id = "sg"
[[eni]]
id = "eni-b"
socket = "/x/b.sock"
"#;
        let got = eni_sockets(text).unwrap();
        assert_eq!(
            got,
            vec![
                ("eni-a".to_string(), PathBuf::from("/x/a.sock")),
                ("eni-b".to_string(), PathBuf::from("/x/b.sock")),
            ]
        );
        assert!(eni_sockets("[[eni]]\nid = \"x\"\n").is_err());
    }

    #[test]
    fn counters_are_found_keyed_or_listed() {
        let keyed = json!({"enis": {"eni-a": {"tx": {"packets": 3}, "bw_out_allowance_exceeded": 7},
                                    "eni-b": {"bw_out_allowance_exceeded": 1}}});
        assert_eq!(
            eni_counter(&keyed, "eni-a", "bw_out_allowance_exceeded"),
            Some(7)
        );
        assert_eq!(
            eni_counter(&keyed, "eni-b", "bw_out_allowance_exceeded"),
            Some(1)
        );
        let listed = json!({"ports": [{"id": "eni-a", "drops": {"security_group": 2, "no_route": 1}},
                                      {"id": "eni-b", "drops": {"security_group": 5}}]});
        assert_eq!(eni_counter(&listed, "eni-b", "drops"), Some(5));
        assert_eq!(eni_counter(&listed, "eni-a", "drops"), Some(3));
        assert_eq!(eni_counter(&listed, "eni-c", "drops"), None);
    }

    #[test]
    fn console_results_are_parsed() {
        let console = "noise\nDHCP-BOUND iface=eth0 ip=10.0.1.10 mask=24 router=10.0.1.1 mtu=1500\n\
                       x IPERF-JSON up {\"end\": {\"sum_received\": {\"bits_per_second\": 1.5e9}}}\n";
        let lease = dhcp_lease(console).unwrap();
        assert_eq!(lease.ip, "10.0.1.10");
        assert_eq!(lease.router, "10.0.1.1");
        assert_eq!(lease.mtu, "1500");
        assert_eq!(iperf_received_bps(console, "up").unwrap(), 1.5e9);
        assert!(iperf_received_bps(console, "down").is_err());
    }
}
