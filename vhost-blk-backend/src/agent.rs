//! The block card's control socket: faults and metrics, live.
//!
//! Operations (one JSON object per line, see `card_firmware::control`):
//! `fault_add` (a fault spec, as hw-model's `FaultSpec` in JSON),
//! `fault_list`, `fault_clear` (`{"id": "fault-1"}` or `{"all": true}`),
//! `metrics`.

use std::sync::Arc;

use card_firmware::control::{ControlError, ControlHandler};
use hw_model::fault::FaultSpec;
use serde_json::{json, Value};

use crate::Volume;

pub struct BlockControl {
    pub volume: Arc<Volume>,
}

impl ControlHandler for BlockControl {
    fn handle(&self, op: &str, args: &Value) -> Result<Value, ControlError> {
        let middle = &self.volume.middle;
        match op {
            "fault_add" => {
                let spec: FaultSpec = serde_json::from_value(args.clone())
                    .map_err(|e| ControlError::new("invalid", format!("fault spec: {e}")))?;
                let id = middle
                    .add_fault(spec)
                    .map_err(|e| ControlError::new("invalid", e.to_string()))?;
                tracing::info!(id, "fault added");
                Ok(json!({ "id": id }))
            }
            "fault_list" => Ok(serde_json::to_value(middle.faults()).unwrap_or(Value::Null)),
            "fault_clear" => {
                if args.get("all").and_then(Value::as_bool) == Some(true) {
                    middle.clear_faults();
                    tracing::info!("all faults cleared");
                    return Ok(json!({ "cleared": "all" }));
                }
                let id = args.get("id").and_then(Value::as_str).ok_or_else(|| {
                    ControlError::new(
                        "invalid",
                        "fault_clear takes {\"id\": ...} or {\"all\": true}",
                    )
                })?;
                middle
                    .clear_fault(id)
                    .map_err(|e| ControlError::new("not_found", e.to_string()))?;
                tracing::info!(id, "fault cleared");
                Ok(json!({ "cleared": id }))
            }
            "metrics" => Ok(self.volume.snapshot()),
            other => Err(ControlError::new(
                "bad_request",
                format!(
                    "unknown operation {other:?} (fault_add, fault_list, fault_clear, metrics)"
                ),
            )),
        }
    }
}
