//! The NVMe card's agent operations: faults on its namespaces, and metrics.
//!
//! Operations (after the hello; see `card_firmware::agent`):
//! - `fault_add` (a fault spec, as hw-model's `FaultSpec` in JSON; io_error,
//!   latency and stall), applied to every namespace as `--fault` is, under
//!   one id; `fault_list`; `fault_clear` (`{"id": "fault-1"}` or
//!   `{"all": true}`);
//! - `metrics`: the document `--metrics` writes;
//! - `health` (answered by `card_firmware::agent`).

use std::sync::Arc;

use card_firmware::agent::{AgentHandler, CardKind, OpError};
use hw_model::fault::{FaultKind, FaultSpec};
use serde_json::{json, Value};

use crate::controller::Controller;

pub struct NvmeAgent {
    pub controller: Arc<Controller>,
}

/// Whether the NVMe card can apply `spec`: it has no power cut or crash
/// events (those are the block card's).
pub fn check_fault(spec: &FaultSpec) -> Result<(), String> {
    match spec.kind {
        FaultKind::IoError { .. } | FaultKind::Latency { .. } | FaultKind::Stall => Ok(()),
        _ => Err(format!(
            "{} faults are not supported by the NVMe card (io_error, latency, stall)",
            spec.kind.name()
        )),
    }
}

impl NvmeAgent {
    fn fault_add(&self, args: &Value) -> Result<Value, OpError> {
        let mut spec: FaultSpec = serde_json::from_value(args.clone())
            .map_err(|e| OpError::invalid(format!("fault spec: {e}")))?;
        check_fault(&spec).map_err(OpError::invalid)?;
        let namespaces = &self.controller.config.namespaces;
        // The first namespace names the fault; the others take that name,
        // so one id clears it everywhere.
        let mut added: Vec<usize> = Vec::new();
        for (i, ns) in namespaces.iter().enumerate() {
            match ns.middle.add_fault(spec.clone()) {
                Ok(id) => {
                    spec.id = id;
                    added.push(i);
                }
                Err(e) => {
                    for &j in &added {
                        let _ = namespaces[j].middle.clear_fault(&spec.id);
                    }
                    return Err(OpError::invalid(e.to_string()));
                }
            }
        }
        tracing::info!(id = spec.id, namespaces = added.len(), "fault added");
        Ok(json!({ "id": spec.id }))
    }

    fn fault_clear(&self, args: &Value) -> Result<Value, OpError> {
        let namespaces = &self.controller.config.namespaces;
        if args.get("all").and_then(Value::as_bool) == Some(true) {
            for ns in namespaces {
                ns.middle.clear_faults();
            }
            tracing::info!("all faults cleared");
            return Ok(json!({ "cleared": "all" }));
        }
        let id = args.get("id").and_then(Value::as_str).ok_or_else(|| {
            OpError::bad_request("fault_clear takes {\"id\": ...} or {\"all\": true}")
        })?;
        let mut cleared = 0;
        let mut last_error = None;
        for ns in namespaces {
            match ns.middle.clear_fault(id) {
                Ok(_) => cleared += 1,
                Err(e) => last_error = Some(e),
            }
        }
        if cleared == 0 {
            let message =
                last_error.map_or_else(|| format!("no fault with id {id}"), |e| e.to_string());
            return Err(OpError::not_found(message));
        }
        tracing::info!(id, "fault cleared");
        Ok(json!({ "cleared": id }))
    }
}

impl AgentHandler for NvmeAgent {
    fn card(&self) -> CardKind {
        CardKind::Nvme
    }

    fn firmware(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn handle(&self, op: &str, args: &Value) -> Result<Value, OpError> {
        match op {
            "fault_add" => self.fault_add(args),
            // Every namespace holds the same faults.
            "fault_list" => Ok(self
                .controller
                .config
                .namespaces
                .first()
                .map(|ns| serde_json::to_value(ns.middle.faults()).unwrap_or(Value::Null))
                .unwrap_or_else(|| json!([]))),
            "fault_clear" => self.fault_clear(args),
            "metrics" => Ok(self.controller.snapshot()),
            other => Err(OpError::bad_request(format!(
                "unknown operation {other:?} (health, metrics, fault_add, fault_list, fault_clear)"
            ))),
        }
    }
}
