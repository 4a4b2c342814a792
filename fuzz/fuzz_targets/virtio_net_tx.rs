//! Guest TX frames with their vnet headers, and VXLAN datagrams from a peer,
//! through the networking card's VPC switch.
//!
//! The input is a sequence of records (see `vpc::fuzzing::virtio_net_tx`):
//! each picks a port (or the VXLAN socket), a 12-byte virtio-net header and a
//! frame. Every verdict's frame is then checksummed and segmented in
//! software, as the card does for a destination without offloads. Nothing may
//! panic, whatever the guest or the peer sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vpc::fuzzing::virtio_net_tx(data);
});
