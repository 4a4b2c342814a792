//! The block card's control socket and its `--fault` CLI form.
//!
//! JSON form: each line is answered the way `card_firmware::control` answers
//! a socket line (parse, one object with one key, `BlockControl::handle`),
//! and every fault it accepts is then judged against a few I/Os by the
//! volume's middle, as the data path would. CLI form: `FaultSpec::from_str`
//! must not panic, what it accepts must print back to an equal spec, and the
//! middle must take it and judge I/O with it without panicking.
#![no_main]

use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use card_firmware::control::ControlHandler;
use card_firmware::media::{FileMedia, MediaOptions};
use card_firmware::middle::{Middle, MiddleConfig};
use hw_model::ebs::{IoDirection, VolumeSpec, VolumeType};
use hw_model::fault::FaultSpec;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vhost_blk_backend::control::BlockControl;
use vhost_blk_backend::metrics::BlockMetrics;
use vhost_blk_backend::Volume;

/// The backing file, made once; a fresh volume (and middle) per input keeps
/// runs reproducible.
fn backing() -> &'static tempfile::NamedTempFile {
    static BACKING: OnceLock<tempfile::NamedTempFile> = OnceLock::new();
    BACKING.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
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

/// card_firmware::control's `answer`, which is private: the same steps.
fn answer(line: &[u8], control: &BlockControl) -> Option<Value> {
    let request: Value = serde_json::from_slice(line).ok()?;
    let object = request.as_object().filter(|o| o.len() == 1)?;
    let (op, args) = object.iter().next()?;
    let answer = control.handle(op, args).ok();
    // The answer goes back as one JSON line.
    if let Some(a) = &answer {
        assert!(!a.to_string().contains('\n'));
    }
    answer
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let control = BlockControl { volume: volume() };
    let middle = &control.volume.middle;
    if form % 2 == cardsim_fuzz::control::CLI {
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
    } else {
        for line in rest.split(|&b| b == b'\n') {
            let before = middle.faults().len();
            if answer(line, &control).is_some() && middle.faults().len() != before {
                exercise(middle);
            }
        }
        let _ = control.handle("fault_list", &Value::Null);
        let _ = control.handle("metrics", &Value::Null);
    }
});
