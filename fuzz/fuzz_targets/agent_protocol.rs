//! The block card's agent socket and its `--fault` CLI form.
//!
//! Agent forms: lines are answered by `card_firmware::agent::Session`, what
//! the socket runs for each connection, over the block card's real handler
//! (`BlockAgent`) — after the hello a control plane says (JSON form) or from
//! the connection's first line (raw form, the hello itself fuzzed). Every
//! answer must be one JSON line holding `ok` or `error`; a refused request
//! must leave the faults and the volume's performance as they were; a
//! connection the session closes takes no more lines. Every fault accepted is
//! then judged against a few I/Os by the volume's middle, as the data path
//! would. CLI form: `FaultSpec::from_str` must not panic, what it accepts must
//! print back to an equal spec, and the middle must take it and judge I/O
//! with it without panicking.
#![no_main]

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use card_firmware::agent::{AgentHandler, Next, Session};
use card_firmware::media::{FileMedia, MediaOptions};
use card_firmware::middle::{Middle, MiddleConfig};
use cardsim_fuzz::agent::{CLI, JSON};
use hw_model::ebs::{IoDirection, VolumeSpec, VolumeType};
use hw_model::fault::FaultSpec;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vhost_blk_backend::agent::BlockAgent;
use vhost_blk_backend::metrics::BlockMetrics;
use vhost_blk_backend::Volume;

/// The backing file, made once; a fresh volume (and middle) per input keeps
/// runs reproducible. 1 GiB sparse: large enough for every gp2/gp3 size rule.
fn backing() -> &'static tempfile::NamedTempFile {
    static BACKING: OnceLock<tempfile::NamedTempFile> = OnceLock::new();
    BACKING.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 30).unwrap();
        f
    })
}

fn volume() -> Arc<Volume> {
    let media = FileMedia::open(backing().path(), &MediaOptions::default()).unwrap();
    let middle = Middle::new(&MiddleConfig {
        volume: Some(VolumeSpec::gib(VolumeType::from_str("gp2").unwrap(), 1)),
        ..MiddleConfig::default()
    })
    .unwrap();
    Arc::new(Volume {
        media,
        serial: *b"fuzz0123456789abcdef",
        num_queues: 1,
        queue_size: 16,
        seg_max: 8,
        metrics: BlockMetrics::new(1),
        middle,
    })
}

/// What the data path asks the middle about each request.
fn exercise(middle: &Middle) {
    for (dir, offset, len) in [
        (IoDirection::Read, 0, 4096),
        (IoDirection::Write, 512 * 1024, 65536),
        (IoDirection::Write, 0, 0),
    ] {
        let _ = middle.admit(dir, offset, len);
        let _ = middle.still_stalled(dir, offset, len);
        middle.completed(dir, len);
    }
    let _ = middle.due_events();
    let _ = middle.power_cut_pending();
    let _ = middle.volume_metrics();
}

/// Feeds `lines` to one session as the socket would, checking each answer.
fn connection(agent: &BlockAgent, hello: bool, lines: &[u8]) {
    let middle = &agent.volume.middle;
    let mut session = Session::new(agent, Instant::now());
    if hello {
        let (answer, next) = session.answer(br#"{"hello": {"version": 1}}"#);
        assert!(answer.get("ok").is_some() && next == Next::KeepOpen, "{answer}");
    }
    for line in lines.split(|&b| b == b'\n') {
        let (faults, volume) = (middle.faults(), middle.volume());
        let (answer, next) = session.answer(line);
        assert!(!answer.to_string().contains('\n'), "{answer}");
        let ok = answer.get("ok").is_some();
        assert!(ok != answer.get("error").is_some(), "{answer}");
        if ok {
            if middle.faults() != faults || middle.volume() != volume {
                exercise(middle);
            }
        } else {
            assert_eq!(middle.faults(), faults, "refused, yet faults changed: {answer}");
            assert_eq!(middle.volume(), volume, "refused, yet the volume changed: {answer}");
        }
        if next == Next::Close {
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let agent = BlockAgent { volume: volume() };
    let middle = &agent.volume.middle;
    match form % 3 {
        CLI => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let Ok(spec) = FaultSpec::from_str(text) else {
                return;
            };
            let printed = spec.to_string();
            assert_eq!(
                FaultSpec::from_str(&printed).as_ref(),
                Ok(&spec),
                "{text:?} printed as {printed:?}"
            );
            if middle.add_fault(spec).is_ok() {
                exercise(middle);
            }
        }
        JSON => {
            connection(&agent, true, rest);
            let _ = agent.handle("fault_list", &Value::Null);
            let _ = agent.handle("metrics", &Value::Null);
        }
        _ => connection(&agent, false, rest),
    }
});
