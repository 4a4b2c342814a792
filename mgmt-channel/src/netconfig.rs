//! The networking card's VPC config (README "The VPC config file"), made
//! from the desired state: the subnets, every security group, and the
//! ENIs, one vhost-user-net socket each.

use std::fmt::Write;

use serde_json::json;

use crate::model::{Cidr, Eni, RateLimiter, Rule, SecurityGroup, Subnet, TokenBucket};

fn bucket(b: &TokenBucket) -> String {
    let mut out = format!("{{ size = {}, refill_time = {}", b.size, b.refill_time);
    if let Some(burst) = b.one_time_burst {
        let _ = write!(out, ", one_time_burst = {burst}");
    }
    out.push_str(" }");
    out
}

fn allowance(limiter: &RateLimiter) -> String {
    let mut parts = Vec::new();
    if let Some(b) = &limiter.bandwidth {
        parts.push(format!("bandwidth = {}", bucket(b)));
    }
    if let Some(o) = &limiter.ops {
        parts.push(format!("ops = {}", bucket(o)));
    }
    format!("{{ {} }}", parts.join(", "))
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn rules(list: &[Rule]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|r| {
            let mut item = format!("{{ proto = {}", quote(&r.proto));
            if let Some(ports) = &r.ports {
                let _ = write!(item, ", ports = {}", quote(ports));
            }
            let _ = write!(item, ", cidr = {} }}", quote(&r.cidr));
            item
        })
        .collect();
    format!("[{}]", items.join(", "))
}

pub fn render(
    vpc: Cidr,
    vni: u32,
    subnets: &[Subnet],
    groups: &[SecurityGroup],
    enis: &[Eni],
) -> String {
    let mut out =
        String::from("# Written by mgmt-channel from its desired state; edits are lost.\n");
    let _ = writeln!(
        out,
        "[vpc]\ncidr = {}\nvni = {vni}",
        quote(&vpc.to_string())
    );
    for s in subnets {
        let _ = writeln!(
            out,
            "[[subnet]]\nid = {}\ncidr = {}\ngateway = {}",
            quote(&s.id),
            quote(&s.cidr),
            quote(&s.gateway)
        );
    }
    for g in groups {
        let _ = writeln!(
            out,
            "[[security_group]]\nid = {}\ningress = {}\negress = {}",
            quote(&g.id),
            rules(&g.ingress),
            rules(&g.egress)
        );
    }
    for e in enis {
        let groups: Vec<String> = e.security_groups.iter().map(|g| quote(g)).collect();
        let _ = writeln!(
            out,
            "[[eni]]\nid = {}\nsocket = {}\nmac = {}\nip = {}\nsubnet = {}\nsecurity_groups = [{}]",
            quote(&e.id),
            quote(&e.socket),
            quote(&e.mac),
            quote(&e.ip),
            quote(&e.subnet_id),
            groups.join(", ")
        );
        if let Some(limiter) = e
            .allowance
            .as_ref()
            .filter(|l| l.bandwidth.is_some() || l.ops.is_some())
        {
            let _ = writeln!(out, "allowance = {}", allowance(limiter));
        }
    }
    out
}

/// The agent's `security_group_put` arguments for a group.
pub fn group_args(group: &SecurityGroup) -> serde_json::Value {
    json!({"id": group.id, "ingress": group.ingress, "egress": group.egress})
}
