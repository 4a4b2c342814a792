//! The switch against real Linux network stacks: each ENI is a TAP device (IFF_VNET_HDR, 12-byte virtio-net
//! header, TSO and checksum offloads on) whose kernel side sits in its own network namespace and plays the
//! guest. The kernel writes vnet headers with the same `virtio_net_hdr_from_skb` a Linux virtio-net driver
//! uses, so this checks `check_tx` and GSO pass-through against real headers, busybox `udhcpc` against the
//! DHCP server, the kernel's ARP against the switch's answers, and the security groups on real TCP.
//!
//! Needs root (TAP devices, `ip netns`) and busybox, like the rest of cardsim's tests.
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use vpc::{DropReason, Egress, Switch, Verdict, VnetHeader, VpcConfig};

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
    drops: Vec<(usize, DropReason, VnetHeader, usize)>,
}

/// Forwards between the TAPs until `stop`: what the card process does, minus vhost-user.
fn forward(
    mut taps: [File; 2],
    sw: Arc<Mutex<Switch>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 70_000];
    let mut out = Vec::with_capacity(70_000);
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [0, 1].map(|i| libc::pollfd {
            fd: taps[i].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two pollfds we own.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) } <= 0 {
            continue;
        }
        for port in 0..2 {
            if fds[port].revents & libc::POLLIN == 0 {
                continue;
            }
            let Ok(n) = taps[port].read(&mut buf) else {
                continue;
            };
            let header = VnetHeader::parse(&buf[..n]).expect("the kernel writes whole headers");
            let frame = &buf[VnetHeader::LEN..n];
            let verdict = sw
                .lock()
                .unwrap()
                .from_port(port, &header, frame, Instant::now());
            let mut seen = seen.lock().unwrap();
            seen.frames += 1;
            if header.is_gso() {
                seen.gso_frames += 1;
            }
            out.clear();
            let to = match verdict {
                Verdict::ToPort {
                    port: to,
                    header,
                    frame_offset,
                    rewrite,
                } => {
                    out.extend_from_slice(&header.to_bytes());
                    out.extend_from_slice(&frame[frame_offset..]);
                    if let Some(r) = rewrite {
                        r.apply(&mut out[VnetHeader::LEN..]);
                    }
                    to
                }
                Verdict::Reply {
                    to: Egress::Port(to),
                    frame,
                } => {
                    out.extend_from_slice(&VnetHeader::plain().to_bytes());
                    out.extend_from_slice(&frame);
                    to
                }
                Verdict::Drop(reason) => {
                    seen.drops.push((port, reason, header, frame.len()));
                    continue;
                }
                other => panic!("unexpected verdict {other:?}"),
            };
            let _ = taps[to].write_all(&out);
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
        thread::spawn(move || forward(taps, sw, seen, stop))
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
    let received = in_netns(&peers.netns[1], || {
        let listener = TcpListener::bind("10.0.1.11:5201").unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
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
    let sent = in_netns(&peers.netns[0], || {
        let to: SocketAddr = (Ipv4Addr::new(10, 0, 1, 11), 5201).into();
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (mut hash, mut chunk) = (0xcbf2_9ce4_8422_2325u64, vec![0u8; 1 << 20]);
        for i in 0..32u32 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(31).wrapping_add(i) as u8;
            }
            fnv(&mut hash, &chunk);
            conn.write_all(&chunk).unwrap();
        }
        (hash, 32usize << 20)
    });
    let sent = sent.join().unwrap();
    assert_eq!(
        received.join().unwrap(),
        sent,
        "every byte arrived, in order"
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
    let header_drops: Vec<_> = seen
        .drops
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
        .collect();
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
