//! fio inside a guest, read from the host: each run prints its JSON report
//! between markers on the console, since the console is the guest's only
//! way out.

use anyhow::{Context, Result};
use serde_json::Value;

pub const BEGIN: &str = "CARDSIM-JSON-BEGIN";
pub const END: &str = "CARDSIM-JSON-END";

/// Guest script lines running fio on /dev/vda with JSON output between markers.
pub fn job(name: &str, args: &str) -> String {
    format!(
        "echo {BEGIN}\nfio --name={name} --filename=/dev/vda --ioengine=libaio --direct=1 \
         --output-format=json {args}\necho {END}\n"
    )
}

/// Every fio report on `console`, in order.
pub fn reports(console: &str) -> Result<Vec<Value>> {
    let mut reports = Vec::new();
    let mut current: Option<String> = None;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if line.contains(BEGIN) {
            current = Some(String::new());
        } else if line.contains(END) {
            if let Some(text) = current.take() {
                let start = text
                    .find('{')
                    .with_context(|| format!("fio printed no JSON:\n{text}"))?;
                reports.push(
                    serde_json::from_str(&text[start..])
                        .with_context(|| format!("fio printed unexpected output:\n{text}"))?,
                );
            }
        } else if let Some(text) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_found_between_markers_among_kernel_noise() {
        let console = "boot\r\nCARDSIM-JSON-BEGIN\r\nnote: noise\r\n{\"jobs\": [{\"jobname\": \"a\"}]}\r\nCARDSIM-JSON-END\r\n[ 1.0] kernel\r\nCARDSIM-JSON-BEGIN\r\n{\"jobs\": []}\r\nCARDSIM-JSON-END\r\n";
        let r = reports(console).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["jobs"][0]["jobname"], "a");
        assert!(reports("CARDSIM-JSON-BEGIN\nnot json\nCARDSIM-JSON-END\n").is_err());
    }
}
