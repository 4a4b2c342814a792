//! Per-ENI allowances: Firecracker-shaped token buckets (hw-model) for
//! bandwidth and packets per second, one pair per direction.
//!
//! Outbound, a frame the buckets refuse is left in the guest's TX queue and
//! the queue is taken again when the buckets allow (the worker's timerfd), the
//! way Firecracker's net rate limiter does: TCP sees a smooth cap rather than
//! loss. Inbound, a refused frame is dropped (a NIC's allowance shaper drops
//! too; queueing would need a per-port backlog and only moves the loss).

use std::sync::Mutex;
use std::time::Duration;

use hw_model::token_bucket::{RateLimiter, RateLimiterConfig};

/// Which bucket refused a frame, and when it will have the tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    Bandwidth(Duration),
    Packets(Duration),
}

impl Exceeded {
    pub fn ready_at(self) -> Duration {
        match self {
            Exceeded::Bandwidth(t) | Exceeded::Packets(t) => t,
        }
    }
}

#[derive(Debug)]
pub struct Allowance {
    limiter: Option<Mutex<RateLimiter>>,
}

impl Allowance {
    pub fn new(config: Option<RateLimiterConfig>, now: Duration) -> Result<Self, String> {
        let limiter = match config {
            None => None,
            Some(c) => {
                let l = RateLimiter::new(c, now).map_err(|e| e.to_string())?;
                (!l.is_unlimited()).then(|| Mutex::new(l))
            }
        };
        Ok(Allowance { limiter })
    }

    pub fn unlimited() -> Self {
        Allowance { limiter: None }
    }

    /// Takes `bytes` from the bandwidth bucket and `packets` (a TSO frame
    /// is as many packets as it has segments on the wire) from the packet
    /// bucket, or nothing.
    pub fn take(&self, bytes: u64, packets: u64, now: Duration) -> Result<(), Exceeded> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let mut l = limiter.lock().unwrap_or_else(|p| p.into_inner());
        let bw = l.bandwidth.as_mut().and_then(|b| b.ready_at(bytes, now));
        let ops = l.ops.as_mut().and_then(|o| o.ready_at(packets, now));
        match (bw, ops) {
            (Some(b), Some(o)) => Err(Exceeded::Bandwidth(b.max(o))),
            (Some(b), None) => Err(Exceeded::Bandwidth(b)),
            (None, Some(o)) => Err(Exceeded::Packets(o)),
            (None, None) => {
                // Both said yes at `now`: these cannot fail.
                if let Some(b) = l.bandwidth.as_mut() {
                    b.try_take(bytes, now).map_err(Exceeded::Bandwidth)?;
                }
                if let Some(o) = l.ops.as_mut() {
                    o.try_take(packets, now).map_err(Exceeded::Packets)?;
                }
                Ok(())
            }
        }
    }
}

/// How many packets a frame is on the wire: a TSO frame's payload in
/// `gso_size` pieces, else one.
pub fn wire_packets(header: &vpc::vnet::VnetHeader, frame_len: usize) -> u64 {
    if !header.is_gso() || header.gso_size == 0 {
        return 1;
    }
    let payload = frame_len.saturating_sub(usize::from(header.hdr_len));
    payload.div_ceil(usize::from(header.gso_size)).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use hw_model::token_bucket::BucketConfig;

    fn config(bytes: u64, ops: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: Some(BucketConfig {
                size: bytes,
                one_time_burst: 0,
                refill_time: 100,
            }),
            ops: Some(BucketConfig {
                size: ops,
                one_time_burst: 0,
                refill_time: 100,
            }),
        }
    }

    #[test]
    fn names_the_bucket_that_refused() {
        let a = Allowance::new(Some(config(3000, 100)), Duration::ZERO).unwrap();
        a.take(1500, 1, Duration::ZERO).unwrap();
        a.take(1500, 1, Duration::ZERO).unwrap();
        let e = a.take(1500, 1, Duration::ZERO).unwrap_err();
        assert!(matches!(e, Exceeded::Bandwidth(_)));
        // 1500 bytes refill in 50 ms of the 100 ms period.
        assert_eq!(e.ready_at(), Duration::from_millis(50));
        a.take(1500, 1, Duration::from_millis(50)).unwrap();

        let p = Allowance::new(Some(config(1 << 30, 2)), Duration::ZERO).unwrap();
        p.take(60, 1, Duration::ZERO).unwrap();
        p.take(60, 1, Duration::ZERO).unwrap();
        assert!(matches!(
            p.take(60, 1, Duration::ZERO),
            Err(Exceeded::Packets(_))
        ));
    }

    #[test]
    fn a_tso_frame_counts_its_segments() {
        let p = Allowance::new(Some(config(1 << 30, 10)), Duration::ZERO).unwrap();
        let h = vpc::vnet::VnetHeader {
            gso_type: vpc::vnet::GSO_TCPV4,
            gso_size: 1448,
            hdr_len: 54,
            ..Default::default()
        };
        let n = wire_packets(&h, 54 + 4000);
        assert_eq!(n, 3);
        assert_eq!(wire_packets(&vpc::vnet::VnetHeader::plain(), 9000), 1);
        for _ in 0..3 {
            p.take(4054, n, Duration::ZERO).unwrap();
        }
        // 9 of 10 packets used: a fourth TSO frame must wait.
        assert!(matches!(
            p.take(4054, n, Duration::ZERO),
            Err(Exceeded::Packets(_))
        ));
    }

    #[test]
    fn no_config_is_unlimited() {
        let a = Allowance::new(None, Duration::ZERO).unwrap();
        for _ in 0..10_000 {
            a.take(65_000, 40, Duration::ZERO).unwrap();
        }
    }
}
