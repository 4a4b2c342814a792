//! The switch against real Linux network stacks: each ENI is a TAP device (IFF_VNET_HDR, 12-byte virtio-net
//! header, TSO and checksum offloads on) whose kernel side sits in its own network namespace and plays the
//! guest. The kernel writes vnet headers with the same `virtio_net_hdr_from_skb` a Linux virtio-net driver
//! uses, so this checks `check_tx` and GSO pass-through against real headers, busybox `udhcpc` against the
//! DHCP server, the kernel's ARP against the switch's answers, and the security groups on real TCP.
//!
//! Needs root (TAP devices, `ip netns`) and busybox, like the rest of cardsim's tests.
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use vpc::{offload, DropReason, Egress, Switch, Verdict, VnetHeader, VpcConfig};

const CONFIG: &str = r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
dns = "10.0.0.2"
mtu = 1500
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
[[security_group]]
id = "sg-web"
ingress = [ { proto = "tcp", ports = "5201", cidr = "10.0.0.0/16" }, { proto = "icmp", cidr = "0.0.0.0/0" } ]
[[eni]]
id = "eni-a"
socket = "/unused/a.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
security_groups = ["sg-web"]
[[eni]]
id = "eni-b"
socket = "/unused/b.sock"
mac = "02:00:0a:00:01:0b"
ip = "10.0.1.11"
subnet = "subnet-a"
security_groups = ["sg-web"]
"#;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TAP device with a 12-byte vnet header and TSO/checksum offloads.
fn tap(name: &str) -> File {
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "/dev/net/tun: {} (this test needs root)",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes) we own.
    let r = unsafe { libc::ioctl(fd, libc::TUNSETIFF, ifr.as_mut_ptr()) };
    assert!(
        r >= 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    let size: libc::c_int = VnetHeader::LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int.
    assert!(unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) } >= 0);
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    assert!(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, offloads as libc::c_ulong) } >= 0);
    file
}

/// Two namespaces with a TAP each, removed on drop.
struct Peers {
    netns: [String; 2],
}

impl Drop for Peers {
    fn drop(&mut self) {
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// What the forwarding thread saw.
#[derive(Default, Debug)]
struct Seen {
    frames: u64,
    gso_frames: u64,
    vxlan_datagrams: u64,
    drops: Vec<(Option<usize>, DropReason, VnetHeader, usize)>,
}

/// Forwards between the TAPs (port i is `taps[i]`) and the VXLAN socket until `stop`: what the card process
/// does, minus vhost-user. GSO frames for a VTEP are segmented to the MTU, partial checksums completed.
fn forward(
    mut taps: Vec<File>,
    udp: Option<UdpSocket>,
    sw: Arc<Mutex<Switch>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 70_000];
    let mut out = Vec::with_capacity(70_000);
    let mtu = sw.lock().unwrap().config().vpc.mtu;
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = taps
            .iter()
            .map(|t| t.as_raw_fd())
            .chain(udp.as_ref().map(|u| u.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pollfds we own.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) } <= 0 {
            continue;
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            let (from, header, input, verdict) = if i < taps.len() {
                let Ok(n) = taps[i].read(&mut buf) else {
                    continue;
                };
                let header = VnetHeader::parse(&buf[..n]).expect("the kernel writes whole headers");
                let frame = &buf[VnetHeader::LEN..n];
                let verdict = sw
                    .lock()
                    .unwrap()
                    .from_port(i, &header, frame, Instant::now());
                let mut seen = seen.lock().unwrap();
                seen.frames += 1;
                seen.gso_frames += u64::from(header.is_gso());
                (Some(i), header, frame, verdict)
            } else {
                let Some(u) = udp.as_ref() else { continue };
                let Ok((n, peer)) = u.recv_from(&mut buf) else {
                    continue;
                };
                let verdict = sw
                    .lock()
                    .unwrap()
                    .from_vxlan(&buf[..n], peer, Instant::now());
                seen.lock().unwrap().vxlan_datagrams += 1;
                (None, VnetHeader::plain(), &buf[..n], verdict)
            };
            match verdict {
                Verdict::ToPort {
                    port: to,
                    header,
                    frame_offset,
                    rewrite,
                } => {
                    out.clear();
                    out.extend_from_slice(&header.to_bytes());
                    out.extend_from_slice(&input[frame_offset..]);
                    if let Some(r) = rewrite {
                        r.apply(&mut out[VnetHeader::LEN..]);
                    }
                    let _ = taps[to].write_all(&out);
                }
                Verdict::ToVtep {
                    vtep,
                    vxlan_header,
                    header,
                    frame_offset,
                    rewrite,
                } => {
                    let mut frame = input[frame_offset..].to_vec();
                    if let Some(r) = rewrite {
                        r.apply(&mut frame);
                    }
                    let u = udp.as_ref().expect("a VXLAN socket");
                    offload::segment(&header, &frame, mtu, &mut |seg: &[u8]| {
                        out.clear();
                        out.extend_from_slice(&vxlan_header);
                        out.extend_from_slice(seg);
                        let _ = u.send_to(&out, vtep);
                    })
                    .expect("a frame check_tx accepted segments");
                }
                Verdict::Reply {
                    to: Egress::Port(to),
                    frame,
                } => {
                    out.clear();
                    out.extend_from_slice(&VnetHeader::plain().to_bytes());
                    out.extend_from_slice(&frame);
                    let _ = taps[to].write_all(&out);
                }
                Verdict::Reply {
                    to: Egress::Vtep(vtep),
                    frame,
                } => {
                    let _ = udp.as_ref().expect("a VXLAN socket").send_to(&frame, vtep);
                }
                Verdict::Drop(reason) => {
                    seen.lock()
                        .unwrap()
                        .drops
                        .push((from, reason, header, input.len()))
                }
                other => panic!("unexpected verdict {other:?}"),
            }
        }
    }
}

/// Runs `f` on a thread inside network namespace `netns`.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let ns = File::open(format!("/var/run/netns/{netns}")).expect("netns file");
    thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f()
    })
}

/// Namespaces left by a run that was killed (a timeout skips `Drop`): their process is gone.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("vpcns")
            .and_then(|r| r.strip_suffix(['a', 'b']))
        else {
            continue;
        };
        if pid.bytes().all(|b| b.is_ascii_digit())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash = (*hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
}

/// Sends `mib` MiB over TCP from namespace `from` to a listener at `to` in namespace `to_ns` and checks that
/// every byte arrived in order. A stalled transfer fails on a timeout rather than hanging.
fn tcp_transfer(from: &str, to_ns: &str, to: SocketAddr, mib: u32) {
    let received = in_netns(to_ns, move || {
        let listener = TcpListener::bind(to).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (mut hash, mut total, mut buf) = (0xcbf2_9ce4_8422_2325u64, 0usize, vec![0u8; 1 << 16]);
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break (hash, total);
            }
            fnv(&mut hash, &buf[..n]);
            total += n;
        }
    });
    thread::sleep(Duration::from_millis(300));
    let sent = in_netns(from, move || {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (mut hash, mut chunk) = (0xcbf2_9ce4_8422_2325u64, vec![0u8; 1 << 20]);
        for i in 0..mib {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(31).wrapping_add(i) as u8;
            }
            fnv(&mut hash, &chunk);
            conn.write_all(&chunk).unwrap();
        }
        (hash, (mib as usize) << 20)
    });
    let sent = sent.join().unwrap();
    assert_eq!(
        received.join().unwrap(),
        sent,
        "every byte arrived, in order"
    );
}

/// Header-level drops: these must never hit what a real Linux stack sends.
fn header_drops(seen: &Seen) -> Vec<&(Option<usize>, DropReason, VnetHeader, usize)> {
    seen.drops
        .iter()
        .filter(|(_, r, _, _)| {
            matches!(
                r,
                DropReason::BadVnetHeader
                    | DropReason::GsoMismatch
                    | DropReason::Oversized
                    | DropReason::Truncated
            )
        })
        .collect()
}

#[test]
fn linux_peers_get_dhcp_exchange_tso_traffic_and_meet_the_security_groups() {
    let config = VpcConfig::parse(CONFIG).unwrap();
    remove_stale_namespaces();
    let tag = std::process::id();
    let names = [format!("vpct{tag}a"), format!("vpct{tag}b")];
    let peers = Peers {
        netns: [format!("vpcns{tag}a"), format!("vpcns{tag}b")],
    };
    let taps = [tap(&names[0]), tap(&names[1])];
    for (i, eni) in config.enis.iter().enumerate() {
        let (n, dev) = (peers.netns[i].as_str(), names[i].as_str());
        run("ip", &["netns", "add", n]);
        run("ip", &["link", "set", dev, "netns", n]);
        run("ip", &["-n", n, "link", "set", "lo", "up"]);
        run(
            "ip",
            &["-n", n, "link", "set", dev, "address", &eni.mac.to_string()],
        );
        run("ip", &["-n", n, "link", "set", dev, "up"]);
    }
    let sw = Arc::new(Mutex::new(Switch::new(&config)));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let forwarder = {
        let (sw, seen, stop) = (sw.clone(), seen.clone(), stop.clone());
        thread::spawn(move || forward(taps.into(), None, sw, seen, stop))
    };

    // busybox udhcpc gets the ENI's address, mask, router, DNS and MTU; its script configures the interface.
    let dir = std::env::temp_dir().join(format!("vpc-linux-peers-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n\
         echo \"ip=$ip subnet=$subnet router=$router dns=$dns mtu=$mtu serverid=$serverid\" > \"$0.$interface\"\n\
         ip addr add \"$ip/$mask\" dev \"$interface\"\nip link set \"$interface\" mtu \"$mtu\"\n",
    )
    .unwrap();
    run("chmod", &["+x", script.to_str().unwrap()]);
    for (netns, dev) in peers.netns.iter().zip(&names) {
        let script = script.to_str().unwrap();
        run(
            "ip",
            &[
                "netns", "exec", netns, "busybox", "udhcpc", "-i", dev, "-n", "-q", "-f", "-t",
                "5", "-s", script,
            ],
        );
    }
    let lease_a = std::fs::read_to_string(dir.join(format!("udhcpc.sh.{}", names[0]))).unwrap();
    assert_eq!(
        lease_a.trim(),
        "ip=10.0.1.10 subnet=255.255.255.0 router=10.0.1.1 dns=10.0.0.2 mtu=1500 serverid=10.0.1.1"
    );

    // 32 MiB of TCP from A to B's allowed port: the kernel sends TSO frames; all pass, bytes intact.
    tcp_transfer(
        &peers.netns[0],
        &peers.netns[1],
        (Ipv4Addr::new(10, 0, 1, 11), 5201).into(),
        32,
    );

    // A port the security group does not allow: the SYN is dropped (never answered, so the connect times out).
    let refused = in_netns(&peers.netns[0], || {
        TcpStream::connect_timeout(
            &(Ipv4Addr::new(10, 0, 1, 11), 22).into(),
            Duration::from_secs(2),
        )
        .map(|_| ())
    });
    let err = refused.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    stop.store(true, Ordering::Relaxed);
    forwarder.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.gso_frames > 0, "the kernel sent TSO frames: {seen:?}");
    let header_drops = header_drops(&seen);
    assert!(
        header_drops.is_empty(),
        "real vnet headers refused: {header_drops:?}"
    );
    let sw = sw.lock().unwrap();
    assert!(
        sw.port_counters(1)
            .unwrap()
            .drops(DropReason::SecurityGroup)
            >= 1,
        "the SYN to port 22 was counted"
    );
    let a = sw.port_counters(0).unwrap();
    assert_eq!((a.dhcp_offers, a.dhcp_acks), (1, 1));
    assert!(a.arp_replies >= 1);
    eprintln!(
        "{} frames, {} of them GSO; drops: {:?}",
        seen.frames,
        seen.gso_frames,
        seen.drops.iter().map(|d| d.1).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn linux_vxlan_peer_and_an_eni_resolve_each_other_and_exchange_tcp_both_ways() {
    remove_stale_namespaces();
    let pid = std::process::id();
    let slot = u8::try_from(pid % 250).unwrap() + 1;
    let port = 20_000 + u16::try_from(pid % 20_000).unwrap();
    let (host_ip, remote_ip) = (
        Ipv4Addr::new(198, 19, slot, 1),
        Ipv4Addr::new(198, 19, slot, 2),
    );
    let one_eni = CONFIG.split("[[eni]]\nid = \"eni-b\"").next().unwrap();
    let text = format!(
        "{one_eni}\n[[remote]]\ncidr = \"10.0.2.0/24\"\nvtep = \"{remote_ip}:{port}\"\n[vxlan]\nlisten = \"{host_ip}:{port}\"\n"
    );
    let config = VpcConfig::parse(&text).unwrap();
    assert_eq!(config.enis.len(), 1);
    let peers = Peers {
        netns: [format!("vpcns{pid}a"), format!("vpcns{pid}b")],
    };
    let (eni_ns, remote_ns) = (peers.netns[0].as_str(), peers.netns[1].as_str());
    let dev = format!("vpct{pid}a");
    let (veth_host, veth_remote) = (format!("vpcv{pid}h"), format!("vpcv{pid}r"));
    let tap_a = tap(&dev);
    run("ip", &["netns", "add", eni_ns]);
    run("ip", &["netns", "add", remote_ns]);
    run("ip", &["link", "set", &dev, "netns", eni_ns]);
    run("ip", &["-n", eni_ns, "link", "set", "lo", "up"]);
    run(
        "ip",
        &[
            "-n",
            eni_ns,
            "link",
            "set",
            &dev,
            "address",
            &config.enis[0].mac.to_string(),
        ],
    );
    run(
        "ip",
        &["-n", eni_ns, "addr", "add", "10.0.1.10/24", "dev", &dev],
    );
    run("ip", &["-n", eni_ns, "link", "set", &dev, "up"]);
    run(
        "ip",
        &["-n", eni_ns, "route", "add", "default", "via", "10.0.1.1"],
    );
    // The remote host: a veth underlay to this namespace and a Linux vxlan device whose remote is the switch.
    // (Deleting its namespace deletes the veth pair.)
    run(
        "ip",
        &[
            "link",
            "add",
            &veth_host,
            "type",
            "veth",
            "peer",
            "name",
            &veth_remote,
            "netns",
            remote_ns,
        ],
    );
    run(
        "ip",
        &["addr", "add", &format!("{host_ip}/30"), "dev", &veth_host],
    );
    run("ip", &["link", "set", &veth_host, "up"]);
    run("ip", &["-n", remote_ns, "link", "set", "lo", "up"]);
    run(
        "ip",
        &[
            "-n",
            remote_ns,
            "addr",
            "add",
            &format!("{remote_ip}/30"),
            "dev",
            &veth_remote,
        ],
    );
    run("ip", &["-n", remote_ns, "link", "set", &veth_remote, "up"]);
    let (p, h, r) = (port.to_string(), host_ip.to_string(), remote_ip.to_string());
    let vxlan = [
        "-n", remote_ns, "link", "add", "vxlan0", "type", "vxlan", "id", "100", "dstport", &p,
    ];
    run(
        "ip",
        &[
            &vxlan[..],
            &["remote", &h, "local", &r, "dev", &veth_remote],
        ]
        .concat(),
    );
    run(
        "ip",
        &[
            "-n",
            remote_ns,
            "addr",
            "add",
            "10.0.2.5/24",
            "dev",
            "vxlan0",
        ],
    );
    run("ip", &["-n", remote_ns, "link", "set", "vxlan0", "up"]);
    // Through its gateway (10.0.2.1): the switch answers ARP for the remote block's first host.
    run(
        "ip",
        &[
            "-n",
            remote_ns,
            "route",
            "add",
            "10.0.1.0/24",
            "via",
            "10.0.2.1",
        ],
    );
    let udp = UdpSocket::bind((host_ip, port)).unwrap();

    let sw = Arc::new(Mutex::new(Switch::new(&config)));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let forwarder = {
        let (sw, seen, stop) = (sw.clone(), seen.clone(), stop.clone());
        thread::spawn(move || forward(vec![tap_a], Some(udp), sw, seen, stop))
    };

    // Ping from the ENI: the switch asks the remote by ARP over VXLAN (the first echo is lost to that).
    let ping = [
        "netns", "exec", eni_ns, "busybox", "ping", "-c", "4", "-W", "1", "10.0.2.5",
    ];
    let out = Command::new("ip").args(ping).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("3 packets received") || text.contains("4 packets received"),
        "{text}"
    );
    assert!(sw
        .lock()
        .unwrap()
        .neighbor(Ipv4Addr::new(10, 0, 2, 5))
        .is_some());
    // TCP both ways: the remote's vxlan device does TSO, so frames above the MTU arrive (as GSO) with
    // partial checksums; frames from the ENI are segmented and completed for the remote.
    tcp_transfer(
        eni_ns,
        remote_ns,
        (Ipv4Addr::new(10, 0, 2, 5), 5201).into(),
        8,
    );
    tcp_transfer(
        remote_ns,
        eni_ns,
        (Ipv4Addr::new(10, 0, 1, 10), 5201).into(),
        8,
    );

    stop.store(true, Ordering::Relaxed);
    forwarder.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.vxlan_datagrams > 0);
    assert!(
        header_drops(&seen).is_empty(),
        "refused: {:?}",
        header_drops(&seen)
    );
    eprintln!(
        "{} frames from the ENI ({} GSO), {} datagrams; drops: {:?}",
        seen.frames,
        seen.gso_frames,
        seen.vxlan_datagrams,
        seen.drops.iter().map(|d| d.1).collect::<Vec<_>>()
    );
}
