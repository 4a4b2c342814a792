//! The block card's agent operations: faults, the volume's performance and
//! metrics, live.
//!
//! Operations (after the hello; see `card_firmware::agent`):
//! - `fault_add` (a fault spec, as hw-model's `FaultSpec` in JSON),
//!   `fault_list`, `fault_clear` (`{"id": "fault-1"}` or `{"all": true}`);
//! - `volume_modify` (`{"volume_type"?: "gp3", "iops"?: N, "throughput"?:
//!   MiB/s}`): the volume's type and performance, as EBS's ModifyVolume,
//!   checked as the command-line flags are;
//! - `metrics`: the document `--metrics` writes;
//! - `health` (answered by `card_firmware::agent`).

use std::sync::Arc;

use card_firmware::agent::{AgentHandler, CardKind, OpError};
use card_firmware::middle::{MiddleError, VolumeChange};
use hw_model::ebs::VolumeType;
use hw_model::fault::FaultSpec;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::Volume;

pub struct BlockAgent {
    pub volume: Arc<Volume>,
}

/// `volume_modify`'s arguments, as the flags name them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeModify {
    volume_type: Option<String>,
    iops: Option<u64>,
    throughput: Option<u64>,
}

impl BlockAgent {
    fn volume_modify(&self, args: &Value) -> Result<Value, OpError> {
        let request: VolumeModify = serde_json::from_value(args.clone()).map_err(|e| {
            OpError::bad_request(format!(
                "volume_modify takes {{\"volume_type\"?, \"iops\"?, \"throughput\"?}}: {e}"
            ))
        })?;
        if request.volume_type.is_none() && request.iops.is_none() && request.throughput.is_none() {
            return Err(OpError::bad_request(
                "volume_modify: give at least one of volume_type, iops, throughput",
            ));
        }
        let volume_type = match &request.volume_type {
            Some(text) => Some(
                text.parse::<VolumeType>()
                    .map_err(|e| OpError::invalid(format!("volume_type: {e}")))?,
            ),
            None => None,
        };
        let change = VolumeChange {
            volume_type,
            iops: request.iops,
            throughput_mibps: request.throughput,
        };
        let spec = self
            .volume
            .middle
            .modify_volume(self.volume.media.capacity(), &change)
            .map_err(|e| match e {
                MiddleError::Volume(e) => OpError::invalid(e.to_string()),
                other => OpError::invalid(other.to_string()),
            })?;
        tracing::info!(
            volume_type = %spec.volume_type,
            iops = ?spec.iops,
            throughput_mibps = ?spec.throughput_mibps,
            "volume modified"
        );
        Ok(self.volume.volume_document().unwrap_or(Value::Null))
    }
}

impl AgentHandler for BlockAgent {
    fn card(&self) -> CardKind {
        CardKind::Blk
    }

    fn firmware(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn handle(&self, op: &str, args: &Value) -> Result<Value, OpError> {
        let middle = &self.volume.middle;
        match op {
            "fault_add" => {
                let spec: FaultSpec = serde_json::from_value(args.clone())
                    .map_err(|e| OpError::invalid(format!("fault spec: {e}")))?;
                let id = middle
                    .add_fault(spec)
                    .map_err(|e| OpError::invalid(e.to_string()))?;
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
                    OpError::bad_request("fault_clear takes {\"id\": ...} or {\"all\": true}")
                })?;
                middle
                    .clear_fault(id)
                    .map_err(|e| OpError::not_found(e.to_string()))?;
                tracing::info!(id, "fault cleared");
                Ok(json!({ "cleared": id }))
            }
            "volume_modify" => self.volume_modify(args),
            "metrics" => Ok(self.volume.snapshot()),
            other => Err(OpError::bad_request(format!(
                "unknown operation {other:?} (health, metrics, fault_add, fault_list, fault_clear, volume_modify)"
            ))),
        }
    }
}
