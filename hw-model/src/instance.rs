//! A small catalog of instance types and their EBS and network allowances.
//!
//! EBS figures are AWS's "Amazon EBS-optimized instance types" table
//! (baseline / maximum bandwidth in Mbps, throughput in MB/s, IOPS); the
//! bandwidth is stored here converted to MiB/s (rounded down) because the rest
//! of the model works in MiB/s. Network figures are the "Network performance"
//! column and the published baseline bandwidth ("up to 10 Gigabit" instances
//! have a lower baseline and burst with network I/O credits).
//!
//! AWS does not publish packets-per-second or connection-tracking allowances
//! (it only reports when they are exceeded: `pps_allowance_exceeded`,
//! `conntrack_allowance_exceeded`). The figures here are plausible values in
//! proportion to the baseline bandwidth and size, for the networking card to
//! enforce; they are not AWS's.

/// One instance type's allowances.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct InstanceType {
    pub name: &'static str,
    pub vcpus: u32,
    pub memory_gib: u32,
    pub ebs_baseline_iops: u64,
    pub ebs_burst_iops: u64,
    pub ebs_baseline_mibps: u64,
    pub ebs_burst_mibps: u64,
    pub network_baseline_gbps: f64,
    pub network_burst_gbps: f64,
    /// Not published by AWS: a plausible figure (see the module doc).
    pub pps_allowance: u64,
    /// Not published by AWS: a plausible figure (see the module doc).
    pub conntrack_allowance: u64,
}

impl InstanceType {
    /// Whether EBS can burst above the baseline (smaller sizes, for 30
    /// minutes a day per AWS).
    pub fn ebs_bursts(&self) -> bool {
        self.ebs_burst_iops > self.ebs_baseline_iops
            || self.ebs_burst_mibps > self.ebs_baseline_mibps
    }
}

/// AWS states EBS bandwidth in Mbps (10^6 bits/s); MiB/s = Mbps × 10^6 / 8 / 2^20.
const fn mbps_to_mibps(mbps: u64) -> u64 {
    mbps * 1_000_000 / 8 / (1 << 20)
}

#[allow(clippy::too_many_arguments)]
const fn it(
    name: &'static str,
    vcpus: u32,
    memory_gib: u32,
    // EBS: baseline Mbps, baseline IOPS, maximum Mbps, maximum IOPS.
    ebs: (u64, u64, u64, u64),
    // Network baseline and burst Gbps.
    net: (f64, f64),
    pps_allowance: u64,
    conntrack_allowance: u64,
) -> InstanceType {
    InstanceType {
        name,
        vcpus,
        memory_gib,
        ebs_baseline_iops: ebs.1,
        ebs_burst_iops: ebs.3,
        ebs_baseline_mibps: mbps_to_mibps(ebs.0),
        ebs_burst_mibps: mbps_to_mibps(ebs.2),
        network_baseline_gbps: net.0,
        network_burst_gbps: net.1,
        pps_allowance,
        conntrack_allowance,
    }
}

static CATALOG: [InstanceType; 9] = [
    // name, vCPU, GiB, EBS (base Mbps, base IOPS, max Mbps, max IOPS), net (base, burst Gbps), pps, conntrack
    it(
        "m5.large",
        2,
        8,
        (650, 3_600, 4_750, 18_750),
        (0.75, 10.0),
        120_000,
        65_536,
    ),
    it(
        "m5.xlarge",
        4,
        16,
        (1_150, 6_000, 4_750, 18_750),
        (1.25, 10.0),
        200_000,
        131_072,
    ),
    it(
        "m5.4xlarge",
        16,
        64,
        (4_750, 18_750, 4_750, 18_750),
        (5.0, 10.0),
        600_000,
        524_288,
    ),
    it(
        "c5.large",
        2,
        4,
        (650, 4_000, 4_750, 20_000),
        (0.75, 10.0),
        120_000,
        65_536,
    ),
    it(
        "c6i.large",
        2,
        4,
        (650, 3_600, 10_000, 40_000),
        (0.781, 12.5),
        130_000,
        65_536,
    ),
    it(
        "r5.large",
        2,
        16,
        (650, 3_600, 4_750, 18_750),
        (0.75, 10.0),
        120_000,
        65_536,
    ),
    // i3 does not burst EBS; its storage is the local NVMe.
    it(
        "i3.large",
        2,
        15,
        (425, 3_000, 425, 3_000),
        (0.75, 10.0),
        120_000,
        65_536,
    ),
    it(
        "i4i.large",
        2,
        16,
        (625, 2_500, 10_000, 40_000),
        (0.781, 12.5),
        130_000,
        65_536,
    ),
    it(
        "t3.micro",
        2,
        1,
        (87, 500, 2_085, 11_800),
        (0.064, 5.0),
        20_000,
        16_384,
    ),
];

pub fn catalog() -> &'static [InstanceType] {
    &CATALOG
}

pub fn lookup(name: &str) -> Option<&'static InstanceType> {
    CATALOG
        .iter()
        .find(|i| i.name.eq_ignore_ascii_case(name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_figures() {
        let m5 = lookup("m5.large").unwrap();
        // 650 Mbps = 81.25 MB/s = 77.5 MiB/s; 4,750 Mbps = 593.75 MB/s = 566.2 MiB/s.
        assert_eq!(
            (
                m5.ebs_baseline_iops,
                m5.ebs_burst_iops,
                m5.ebs_baseline_mibps,
                m5.ebs_burst_mibps
            ),
            (3_600, 18_750, 77, 566)
        );
        assert_eq!(
            (m5.network_baseline_gbps, m5.network_burst_gbps),
            (0.75, 10.0)
        );
        assert!(m5.ebs_bursts());
        let big = lookup("m5.4xlarge").unwrap();
        assert!(!big.ebs_bursts());
        assert_eq!(lookup("c6i.large").unwrap().ebs_burst_mibps, 1_192);
        assert!(!lookup("i3.large").unwrap().ebs_bursts());
        assert!(lookup("M5.Large").is_some());
        assert!(lookup("m5.metal").is_none());
    }

    #[test]
    fn catalog_is_consistent() {
        let names: std::collections::HashSet<_> = catalog().iter().map(|i| i.name).collect();
        assert_eq!(names.len(), catalog().len());
        for i in catalog() {
            assert!(i.ebs_burst_iops >= i.ebs_baseline_iops, "{}", i.name);
            assert!(i.ebs_burst_mibps >= i.ebs_baseline_mibps, "{}", i.name);
            assert!(
                i.network_burst_gbps >= i.network_baseline_gbps,
                "{}",
                i.name
            );
            assert!(
                i.pps_allowance > 0 && i.conntrack_allowance > 0,
                "{}",
                i.name
            );
        }
    }
}
