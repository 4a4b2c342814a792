//! Address types the VPC needs beyond `std::net`: an Ethernet MAC address and an IPv4 CIDR block.
//! Small and dependency-free on purpose; both parse from and print as the usual text forms.
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Group (multicast or broadcast) addresses have the I/G bit set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// Locally administered: the U/L bit is set (as cloud providers' ENI MACs are, e.g. 02:…).
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// The address at `bytes[..6]`, if there are six bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<MacAddr> {
        bytes.get(..6)?.try_into().ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex octets like 02:00:0a:00:01:0a)")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(|| MacParseError(s.to_owned()))?;
            if part.len() != 2 {
                return Err(MacParseError(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

/// An IPv4 CIDR block, e.g. `10.0.1.0/24`. The address must be the network address (host bits zero),
/// because a block written with host bits set is almost always a typo for a different block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrParseError {
    #[error("{0:?} is not a CIDR block (expected a.b.c.d/len)")]
    Syntax(String),
    #[error("{0:?}: prefix length must be 0..=32")]
    Prefix(String),
    #[error("{text:?} has host bits set (the block is {network}/{prefix})")]
    HostBits {
        text: String,
        network: Ipv4Addr,
        prefix: u8,
    },
}

impl Ipv4Cidr {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Ipv4Cidr> {
        if prefix > 32 {
            return None;
        }
        let cidr = Ipv4Cidr { network, prefix };
        (u32::from(network) & cidr.mask() == u32::from(network)).then_some(cidr)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as a host-order integer.
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether `other` lies wholly inside this block.
    pub fn contains_cidr(&self, other: &Ipv4Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.network)
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains_cidr(other) || other.contains_cidr(self)
    }

    /// The `n`th address of the block (0 is the network address), if inside it.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let ip = Ipv4Addr::from(u32::from(self.network).checked_add(n)?);
        self.contains(ip).then_some(ip)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| CidrParseError::Syntax(s.to_owned()))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| CidrParseError::Syntax(s.to_owned()))?;
        if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrParseError::Syntax(s.to_owned()));
        }
        let prefix: u8 = len
            .parse()
            .map_err(|_| CidrParseError::Prefix(s.to_owned()))?;
        if prefix > 32 {
            return Err(CidrParseError::Prefix(s.to_owned()));
        }
        let any = Ipv4Cidr {
            network: ip,
            prefix,
        };
        let network = Ipv4Addr::from(u32::from(ip) & any.mask());
        Ipv4Cidr::new(ip, prefix).ok_or(CidrParseError::HostBits {
            text: s.to_owned(),
            network,
            prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints() {
        let mac: MacAddr = "02:00:0A:00:01:0a".parse().unwrap();
        assert_eq!(mac.0, [2, 0, 10, 0, 1, 10]);
        assert_eq!(mac.to_string(), "02:00:0a:00:01:0a");
        assert!(mac.is_locally_administered());
        assert!(!mac.is_multicast());
        for bad in [
            "",
            "02:00:0a:00:01",
            "02:00:0a:00:01:0a:00",
            "2:00:0a:00:01:0a",
            "zz:00:0a:00:01:0a",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_parses_and_checks_host_bits() {
        let c: Ipv4Cidr = "10.0.1.0/24".parse().unwrap();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 0, 1, 255));
        assert!(c.contains(Ipv4Addr::new(10, 0, 1, 77)));
        assert!(!c.contains(Ipv4Addr::new(10, 0, 2, 1)));
        assert_eq!(c.nth(1), Some(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(c.nth(256), None);
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(all.overlaps(&c));
        assert!(matches!(
            "10.0.1.5/24".parse::<Ipv4Cidr>(),
            Err(CidrParseError::HostBits { .. })
        ));
        for bad in [
            "10.0.1.0",
            "10.0.1.0/33",
            "10.0.1.0/",
            "10.0.1/24",
            "10.0.1.0/+4",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        let vpc: Ipv4Cidr = "10.0.0.0/16".parse().unwrap();
        assert!(vpc.contains_cidr(&c));
        assert!(!c.contains_cidr(&vpc));
    }
}
