//! The networking card's agent operations and its metrics document.
//!
//! Operations (after the hello; see `card_firmware::agent`):
//! - `metrics`: the same document `--metrics` writes;
//! - `set_security_groups` (`{"eni": "eni-0a1", "groups": ["sg-web"]}`):
//!   replaces an ENI's security groups while it runs;
//! - `security_group_put` (`{"id": "sg-web", "ingress": [...], "egress":
//!   [...]}`, rules as in the TOML config): defines a group or replaces the
//!   group of that id, validated by the config's own code;
//! - `health` (answered by `card_firmware::agent`).
//!
//! Tracked flows stay allowed through either change (as on AWS); new flows
//! meet the new rules.

use std::sync::Arc;

use card_firmware::agent::{AgentHandler, CardKind, OpError};
use serde_json::{json, Value};
use vpc::config::RawSecurityGroup;

use crate::card::Card;

pub struct NetAgent {
    pub card: Arc<Card>,
}

impl NetAgent {
    fn set_security_groups(&self, args: &Value) -> Result<Value, OpError> {
        let eni = args["eni"]
            .as_str()
            .ok_or_else(|| OpError::bad_request("eni: a string is required"))?;
        let groups: Vec<String> = args["groups"]
            .as_array()
            .ok_or_else(|| OpError::bad_request("groups: a list is required"))?
            .iter()
            .map(|g| g.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| OpError::bad_request("groups: strings only"))?;
        let port = self
            .card
            .ports
            .iter()
            .find(|p| p.eni.id == eni)
            .ok_or_else(|| OpError::not_found(format!("no eni {eni}")))?;
        self.card
            .switch()
            .set_security_groups(port.id, &groups)
            .map_err(|e| OpError::not_found(e.to_string()))?;
        tracing::info!(eni, ?groups, "security groups set");
        Ok(json!({}))
    }

    fn security_group_put(&self, args: &Value) -> Result<Value, OpError> {
        let raw: RawSecurityGroup = serde_json::from_value(args.clone()).map_err(|e| {
            OpError::bad_request(format!(
                "security_group_put takes {{\"id\", \"ingress\"?, \"egress\"?}}: {e}"
            ))
        })?;
        // Checked and applied under one lock: no other change slips between.
        let mut switch = self.card.switch();
        let group = switch
            .config()
            .check_security_group(&raw)
            .map_err(|e| OpError::invalid(e.to_string()))?;
        let id = group.id.clone();
        let (ingress, egress) = (group.ingress.len(), group.egress.len());
        switch.put_security_group(group);
        tracing::info!(id, ingress, egress, "security group put");
        Ok(json!({ "id": id }))
    }
}

impl AgentHandler for NetAgent {
    fn card(&self) -> CardKind {
        CardKind::Net
    }

    fn firmware(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn handle(&self, op: &str, args: &Value) -> Result<Value, OpError> {
        match op {
            "metrics" => Ok(self.card.snapshot()),
            "set_security_groups" => self.set_security_groups(args),
            "security_group_put" => self.security_group_put(args),
            _ => Err(OpError::bad_request(format!(
                "unknown operation {op:?} (health, metrics, set_security_groups, security_group_put)"
            ))),
        }
    }
}
