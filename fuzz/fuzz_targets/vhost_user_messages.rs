//! A hostile VMM on the block card's vhost-user socket.
//!
//! Each input is a fresh connection to a fresh backend, as the card makes
//! one per VMM connection (`card_firmware::vhost::serve_forever`): the
//! vhost-user-backend daemon with our `BlockDevice`, its io_uring and timer
//! listeners registered. The input's frames (see `cardsim_fuzz::vhost_user`)
//! are vhost-user messages, with a guest memory memfd and eventfds attached
//! as the frame chooses, writes to guest memory, and kicks; so a fuzzed
//! session can set up a queue and push requests through the data path.
//! Then the VMM hangs up, and the card must wind the connection down.
//!
//! The daemon runs the connection on its own thread (and one thread per
//! queue); a panic on any of them aborts the process, which libFuzzer
//! reports as a crash.
#![no_main]

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use card_firmware::media::{FileMedia, MediaOptions};
use card_firmware::middle::{Middle, MiddleConfig};
use card_firmware::vhost::{CardBackend, GuestMemory};
use cardsim_fuzz::vhost_user::{decode, Frame, FD_A, FD_B, FD_MEM, MEM_SIZE};
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::Listener;
use vhost_blk_backend::device::BlockDevice;
use vhost_blk_backend::metrics::BlockMetrics;
use vhost_blk_backend::Volume;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: Mutex<Listener>,
    volume: Arc<Volume>,
}

/// The socket, the backing file and the volume outlive connections, as in
/// the card; everything per connection is made fresh for each input.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.sock");
        let listener = Listener::from(UnixListener::bind(&path).unwrap());
        let backing = dir.path().join("vol.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let volume = Arc::new(Volume {
            media: FileMedia::open(&backing, &MediaOptions::default()).unwrap(),
            serial: *b"fuzz0123456789abcdef",
            num_queues: 1,
            queue_size: 16,
            seg_max: 8,
            metrics: BlockMetrics::new(1),
            middle: Middle::new(&MiddleConfig::default()).unwrap(),
        });
        Fixture {
            _dir: dir,
            path,
            listener: Mutex::new(listener),
            volume,
        }
    })
}

fn memfd() -> OwnedFd {
    // SAFETY: a fresh fd from memfd_create, owned from here on.
    let fd = unsafe { libc::memfd_create(c"guest-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    // Sparse and as long as a file can be. A region the VMM maps past the
    // end of its fd kills the card with SIGBUS on first touch (vhost's
    // `mmap_region` does not check the length; see the fuzz report in
    // docs/SECURITY.md); a hostile VMM can always do that by truncating
    // the file later, so the fuzzer gives it no end to map past, and
    // looks for other bugs.
    file.set_len(i64::MAX as u64).unwrap();
    file.into()
}

/// One sendmsg of `bytes` with `fds` as SCM_RIGHTS.
fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> bool {
    let iov = [IoSlice::new(bytes)];
    let mut cmsg = [0u64; 8];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        // SAFETY: the control buffer has room for one header and 3 fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    // SAFETY: msg points at live buffers for the call's duration.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    n >= 0
}

fuzz_target!(|data: &[u8]| {
    let frames = decode(data);
    let fixture = fixture();
    let mut listener = fixture.listener.lock().unwrap();

    let memory: GuestMemory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(BlockDevice::new(fixture.volume.clone(), memory.clone()).unwrap());
    let mut daemon = VhostUserDaemon::new("fuzz".into(), backend.clone(), memory).unwrap();
    let handlers = daemon.get_epoll_handlers();
    for (thread, fd, id) in backend.listeners() {
        handlers[thread]
            .register_listener(fd, EventSet::IN, id)
            .unwrap();
    }
    let vmm = UnixStream::connect(&fixture.path).unwrap();
    daemon.start(&mut listener).unwrap();

    let guest = std::fs::File::from(memfd());
    let kick_a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick_b = EventFd::new(libc::EFD_NONBLOCK).unwrap();

    for frame in frames {
        match frame {
            Frame::Message {
                fds,
                request,
                flags,
                size,
                body,
            } => {
                let mut bytes = Vec::with_capacity(12 + body.len());
                bytes.extend_from_slice(&request.to_le_bytes());
                bytes.extend_from_slice(&flags.to_le_bytes());
                bytes.extend_from_slice(&size.to_le_bytes());
                bytes.extend_from_slice(&body);
                let mut attach = Vec::new();
                if fds & FD_MEM != 0 {
                    attach.push(guest.as_raw_fd());
                }
                if fds & FD_A != 0 {
                    attach.push(kick_a.as_raw_fd());
                }
                if fds & FD_B != 0 {
                    attach.push(kick_b.as_raw_fd());
                }
                if !send(&vmm, &bytes, &attach) {
                    // The card hung up on us: the session is over.
                    break;
                }
            }
            Frame::Write { offset, bytes } => {
                use std::os::unix::fs::FileExt;
                let offset = u64::from(offset) % MEM_SIZE;
                let len = bytes.len().min((MEM_SIZE - offset) as usize);
                guest.write_all_at(&bytes[..len], offset).unwrap();
            }
            Frame::Kick { b } => {
                let _ = if b { &kick_b } else { &kick_a }.write(1);
            }
        }
    }
    // The VMM stops sending; the card answers what it has (replies fit in
    // the socket buffer: inputs are small), sees the end and hangs up.
    // Reading to that end also waits for it. Then the card winds the
    // connection down as serve_forever does.
    let _ = vmm.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!((&vmm).read(&mut sink), Ok(n) if n > 0) {}
    let _ = daemon.wait();
    backend.quiesce();
    for handler in &handlers {
        handler.send_exit_event();
    }
});
