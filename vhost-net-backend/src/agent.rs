//! The card's control socket (`--control`) and its metrics document.
//!
//! Operations (one JSON object per line, see `card_firmware::control`):
//! - `{"metrics": {}}`: the same document `--metrics` writes;
//! - `{"set_security_groups": {"eni": "eni-0a1", "groups": ["sg-web"]}}`:
//!   replaces an ENI's security groups while it runs.

use std::sync::Arc;

use card_firmware::control::{ControlError, ControlHandler};
use serde_json::{json, Value};

use crate::card::Card;

pub struct NetControl {
    pub card: Arc<Card>,
}

impl ControlHandler for NetControl {
    fn handle(&self, op: &str, args: &Value) -> Result<Value, ControlError> {
        match op {
            "metrics" => Ok(self.card.snapshot()),
            "set_security_groups" => {
                let eni = args["eni"]
                    .as_str()
                    .ok_or_else(|| ControlError::new("bad_request", "eni: a string is required"))?;
                let groups: Vec<String> = args["groups"]
                    .as_array()
                    .ok_or_else(|| ControlError::new("bad_request", "groups: a list is required"))?
                    .iter()
                    .map(|g| g.as_str().map(str::to_owned))
                    .collect::<Option<_>>()
                    .ok_or_else(|| ControlError::new("bad_request", "groups: strings only"))?;
                let port = self
                    .card
                    .ports
                    .iter()
                    .find(|p| p.eni.id == eni)
                    .ok_or_else(|| ControlError::new("not_found", format!("no eni {eni}")))?;
                self.card
                    .switch()
                    .set_security_groups(port.id, &groups)
                    .map_err(|e| ControlError::new("bad_request", e.to_string()))?;
                Ok(json!({}))
            }
            _ => Err(ControlError::new(
                "bad_request",
                format!("unknown operation {op} (metrics, set_security_groups)"),
            )),
        }
    }
}
