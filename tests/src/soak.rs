//! Restarting the block card under a guest's load: kill -9, start it again
//! (the harness plays the supervisor), and count what the guest lost.
//!
//! The guest runs two loads at once on one vhost-user-blk device:
//!
//! - fio random writes at iodepth 16 with crc32c verification
//!   (`verify_backlog`, and the whole area again at the end of each run),
//!   logging every I/O's completion time: the longest gap between two
//!   completions is the longest I/O pause the guest saw;
//! - sequence writers: each 512-byte block they own is written as
//!   `block B seq S` and read back at once. A completed write whose data is
//!   not there on read-back is **lost**. At the end every block is read again:
//!   one that no longer holds what its read-back saw was overwritten later by
//!   an older request — a **duplicated** (stale, replayed) write.
//!
//! The kernel's own complaints count too: a request completed twice makes
//! virtio's ring code report "is not a head", an error status "I/O error".
//! The card runs with the EBS latency model and 5 ms more per request, so at every kill some requests
//! are held in the card: the restarted card must resubmit them.

use std::fmt;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::block_card::BlockCard;
use crate::{fio, target_dir, Guest, Vmm};

const VOLUME_SIZE: u64 = 128 << 20;
/// fio's area, from the start of the volume.
const FIO_SIZE: &str = "16M";
/// The sequence writers' area, in 512-byte sectors (at 96 MiB).
const SEQ_BASE_SECTOR: u64 = (96 << 20) / 512;
const SEQ_WRITERS: u32 = 4;
const SEQ_BLOCKS_PER_WRITER: u32 = 64;
/// The host writes this into the last sector to end the guest's loads.
const STOP_MARK: &str = "CARDSIM-SOAK-STOP";
/// Gaps between completions at least this long are reported by the guest.
const GAP_REPORT_MS: u32 = 30;
/// Writes each card serves (with fio running) before it is killed, so it
/// dies under load.
const WRITES_BEFORE_KILL: u64 = 100;

#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub vmm: Vmm,
    pub restarts: u32,
    /// Seeds the kill times and the card's latency model.
    pub seed: u64,
    /// Restart more (up to [`EXTRA_RESTARTS`]) until a kill has left requests
    /// in the card: a guest slowed by TCG sometimes has none there.
    pub until_resubmitted: bool,
}

/// The most restarts added by [`SoakConfig::until_resubmitted`].
pub const EXTRA_RESTARTS: u32 = 10;

#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub restarts: u32,
    /// Completed sequence writes whose data was not there on read-back.
    pub lost_writes: u64,
    /// Blocks overwritten after their read-back by an older write.
    pub duplicated_writes: u64,
    /// Sequence writes that failed (dd reported an error).
    pub failed_writes: u64,
    /// Sequence writes completed and read back.
    pub sequence_writes: u64,
    /// fio runs, and those that ended in an error (verification included).
    pub fio_runs: u64,
    pub fio_failures: u64,
    /// Blocks fio wrote and verified, over all runs.
    pub fio_writes: u64,
    /// Kernel complaints: a used entry for a head not in flight.
    pub duplicate_completions: u64,
    /// Kernel I/O errors on the device.
    pub io_errors: u64,
    /// Requests the restarted cards resubmitted from the inflight region.
    pub resubmitted: u64,
    /// Gaps between two completions seen by fio, longest first.
    pub pauses: Vec<Duration>,
    /// Card starts that ended at once and were made again.
    pub card_start_retries: u32,
    /// From kill to the new card answering on its agent socket, per restart.
    pub restart_times: Vec<Duration>,
}

impl SoakReport {
    /// The longest I/O pause the guest saw.
    pub fn longest_pause(&self) -> Option<Duration> {
        self.pauses.first().copied()
    }

    /// The pause of a typical restart: the median of the `restarts` longest
    /// gaps (each restart makes one).
    pub fn median_restart_pause(&self) -> Option<Duration> {
        let n = (self.restarts as usize).min(self.pauses.len());
        (n > 0).then(|| self.pauses[n / 2])
    }

    /// A percentile of the restarts' pauses (the `restarts` longest gaps).
    pub fn restart_pause_percentile(&self, percent: usize) -> Option<Duration> {
        let n = (self.restarts as usize).min(self.pauses.len());
        // Longest first: the p-th percentile is (100 - p)% from the top.
        (n > 0).then(|| self.pauses[(n * (100 - percent.min(100)) / 100).min(n - 1)])
    }

    /// Everything the guest must not have seen.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                problems.push(format!("{n} {what}"));
            }
        };
        check(self.lost_writes, "lost writes");
        check(self.duplicated_writes, "duplicated (stale) writes");
        check(self.failed_writes, "failed sequence writes");
        check(self.fio_failures, "failed fio runs");
        check(self.duplicate_completions, "duplicate completions");
        check(self.io_errors, "guest I/O errors");
        if self.sequence_writes == 0 || self.fio_writes == 0 {
            problems.push("the guest's loads did not run".into());
        }
        problems
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
        let mut restart = self.restart_times.clone();
        restart.sort();
        writeln!(f, "restarts            {}", self.restarts)?;
        writeln!(f, "lost writes         {}", self.lost_writes)?;
        writeln!(f, "duplicated writes   {}", self.duplicated_writes)?;
        writeln!(f, "failed writes       {}", self.failed_writes)?;
        writeln!(f, "dup. completions    {}", self.duplicate_completions)?;
        writeln!(f, "guest I/O errors    {}", self.io_errors)?;
        writeln!(
            f,
            "fio                 {} runs, {} failed, {} blocks written and verified",
            self.fio_runs, self.fio_failures, self.fio_writes
        )?;
        writeln!(
            f,
            "sequence writes     {} written and read back",
            self.sequence_writes
        )?;
        writeln!(f, "resubmitted         {} requests", self.resubmitted)?;
        writeln!(
            f,
            "card restart        median {}, max {} (kill to answering), {} starts retried",
            ms(restart.get(restart.len() / 2).copied()),
            ms(restart.last().copied()),
            self.card_start_retries
        )?;
        write!(
            f,
            "guest I/O pause     median restart {}, 90th percentile {}, longest {} (then {})",
            ms(self.median_restart_pause()),
            ms(self.restart_pause_percentile(90)),
            ms(self.longest_pause()),
            self.pauses
                .iter()
                .skip(1)
                .take(4)
                .map(|d| format!("{} ms", d.as_millis()))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// A small deterministic generator for the kill times.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn guest_script() -> String {
    let stop_sector = VOLUME_SIZE / 512 - 1;
    let last = SEQ_BLOCKS_PER_WRITER - 1;
    format!(
        r#"
wait_dev /dev/vda
mkdir -p /tmp/exp /tmp/fio
BASE={SEQ_BASE_SECTOR}
seq_writer() {{
  w=$1; s=0
  while [ ! -e /tmp/stop ]; do
    for i in $(seq 0 {last}); do
      b=$((w + {SEQ_WRITERS} * i)); s=$((s + 1))
      printf '%-511s\n' "cardsim-seq block $b seq $s" > /tmp/w$w
      if dd if=/tmp/w$w of=/dev/vda bs=512 seek=$((BASE + b)) count=1 oflag=direct 2>/dev/null; then
        dd if=/dev/vda of=/tmp/r$w bs=512 skip=$((BASE + b)) count=1 iflag=direct 2>/dev/null
        if cmp -s /tmp/r$w /tmp/w$w; then echo ok >> /tmp/ok$w
        else echo "CARDSIM-LOST block $b seq $s"; fi
        cp /tmp/r$w /tmp/exp/$b
      else
        echo "CARDSIM-WRITE-FAILED block $b seq $s"
      fi
    done
  done
}}
fio_loop() {{
  n=0
  while [ ! -e /tmp/stop ]; do
    n=$((n + 1))
    echo "CARDSIM-FIO-RUN $n"
    fio --name=soak$n --filename=/dev/vda --size={FIO_SIZE} --rw=randwrite --bs=4k --iodepth=16 \
        --ioengine=libaio --direct=1 --verify=crc32c --verify_backlog=512 --verify_fatal=1 \
        --write_lat_log=/tmp/fio/lat$n --log_avg_msec=0 --output-format=json \
        --output=/tmp/fio/run$n.json > /dev/null 2>/tmp/fio/err$n || echo "CARDSIM-FIO-FAILED run $n: $(cat /tmp/fio/err$n)"
    awk -F, -v run=$n '{{ if (NR > 1 && $1 - p >= {GAP_REPORT_MS}) print "CARDSIM-GAP run " run " " $1 - p " ms"; p = $1 }}' /tmp/fio/lat${{n}}_lat.1.log
    rm -f /tmp/fio/lat$n*
  done
}}
stop_watch() {{
  while [ ! -e /tmp/stop ]; do
    if dd if=/dev/vda bs=512 skip={stop_sector} count=1 iflag=direct 2>/dev/null | grep -q {STOP_MARK}; then
      touch /tmp/stop
    fi
    sleep 1
  done
}}
stop_watch &
fio_loop &
for w in $(seq 0 {writers_last}); do seq_writer $w & done
echo CARDSIM-SOAK-RUNNING
wait
# The whole area in one read, against what each block's read-back saw
# (zeros where a writer never got to); block by block only on a difference.
head -c 512 /dev/zero > /tmp/zero
for b in $(seq 0 {blocks_last}); do
  if [ -e /tmp/exp/$b ]; then cat /tmp/exp/$b; else cat /tmp/zero; fi
done > /tmp/expected
dd if=/dev/vda of=/tmp/final bs=512 skip=$BASE count={blocks} iflag=direct 2>/dev/null
if ! cmp -s /tmp/final /tmp/expected; then
  for b in $(seq 0 {blocks_last}); do
    dd if=/tmp/final of=/tmp/fb bs=512 skip=$b count=1 2>/dev/null
    dd if=/tmp/expected of=/tmp/eb bs=512 skip=$b count=1 2>/dev/null
    cmp -s /tmp/fb /tmp/eb || echo "CARDSIM-DUPLICATED block $b now '$(head -c 60 /tmp/fb)' read back '$(head -c 60 /tmp/eb)'"
  done
fi
echo "CARDSIM-SEQ-WRITES $(cat /tmp/ok* 2>/dev/null | wc -l)"
for f in /tmp/fio/run*.json; do echo {json_begin}; cat $f; echo {json_end}; done
echo CARDSIM-SOAK-DONE
"#,
        writers_last = SEQ_WRITERS - 1,
        blocks = SEQ_WRITERS * SEQ_BLOCKS_PER_WRITER,
        blocks_last = SEQ_WRITERS * SEQ_BLOCKS_PER_WRITER - 1,
        json_begin = fio::BEGIN,
        json_end = fio::END,
    )
}

/// Every read and write takes this long in the card: with the guest keeping 16 in
/// flight, the card holds some of them at any instant (the EBS model's 0.5 ms
/// median left it idle at some kills under TCG).
const WRITE_LATENCY: &str = "kind=latency,fixed_ms=5";

fn card_args(seed: u64) -> Vec<String> {
    ["--latency-model", "ebs", "--fault", WRITE_LATENCY, "--seed"]
        .iter()
        .map(|s| s.to_string())
        .chain([seed.to_string()])
        .collect()
}

fn start_card(dir: &Path, backing: &Path, seed: u64) -> Result<BlockCard> {
    let args = card_args(seed);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    BlockCard::start(dir, backing, &args)
}

fn counter(card: &BlockCard, name: &str) -> Result<u64> {
    let metrics = card.metrics()?;
    metrics["total"][name]
        .as_u64()
        .with_context(|| format!("no {name} in the card's metrics: {metrics}"))
}

/// fio's 4 KiB writes the card has served: the sequence writers write
/// 512 bytes at a time, so the byte count tells the two loads apart.
fn fio_writes(card: &BlockCard) -> Result<u64> {
    let ops = counter(card, "write_ops")?;
    let bytes = counter(card, "write_bytes")?;
    Ok(bytes.saturating_sub(512 * ops) / (4096 - 512))
}

/// Waits until `card` has served `writes` of fio's writes: fio writes on it.
fn wait_for_fio(card: &BlockCard, writes: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // The agent may not answer yet right after a start.
        if fio_writes(card).is_ok_and(|served| served >= writes) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("fio's writes did not reach the card ({writes} within {timeout:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the card again after a kill, as a supervisor would: a card that
/// exits at once is started again. (The killed card's io_uring can keep the
/// volume's file, and so its lock, for a moment after the process is gone;
/// the new card then refuses the volume.)
fn restart_card(
    dir: &Path,
    backing: &Path,
    seed: u64,
    killed: Instant,
    retries: &mut u32,
) -> Result<BlockCard> {
    let give_up = Duration::from_secs(10);
    loop {
        // The socket files outlive the killed card: an answer on the agent
        // socket, not the socket file, says the new card is up.
        if let Ok(mut card) = start_card(dir, backing, seed) {
            loop {
                if card.metrics().is_ok() {
                    return Ok(card);
                }
                if card.process.0.try_wait()?.is_some() || killed.elapsed() > give_up {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if killed.elapsed() > give_up {
            bail!("the restarted card does not answer within {give_up:?}");
        }
        *retries += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots a guest, kills and restarts its block card `restarts` times under
/// load, and reports what the guest saw.
pub fn run(config: &SoakConfig) -> Result<SoakReport> {
    let dir = tempfile::tempdir_in(target_dir())?;
    let backing = dir.path().join("vol.img");
    fs::File::create(&backing)?.set_len(VOLUME_SIZE)?;
    let mut card = start_card(dir.path(), &backing, config.seed)?;
    let mut guest = Guest::builder(config.vmm)
        .smp(2)
        .mem_mib(512)
        .vhost_user_blk(&card.socket, 1, true)
        .script(&guest_script())
        .timeout(Duration::from_secs(180 + 15 * u64::from(config.restarts)))
        .boot()?;
    guest.wait_for_line("CARDSIM-SOAK-RUNNING", Duration::from_secs(120))?;

    let mut rng = XorShift(config.seed | 1);
    let mut report = SoakReport::default();
    // The first kill lands in fio's writes, not before they start; fio runs
    // back to back after that.
    guest.wait_for_line("CARDSIM-FIO-RUN", Duration::from_secs(60))?;
    let mut restart = 0u32;
    loop {
        // Each card, the restarted ones too, serves fio before anything else.
        let served = fio_writes(&card).unwrap_or(0);
        wait_for_fio(&card, served + WRITES_BEFORE_KILL, Duration::from_secs(60))
            .with_context(|| format!("after {restart} restarts"))?;
        let resubmitted = report.resubmitted + counter(&card, "resubmitted")?;
        let done = restart >= config.restarts
            && (!config.until_resubmitted
                || resubmitted > 0
                || restart >= config.restarts + EXTRA_RESTARTS);
        if done {
            report.resubmitted = resubmitted;
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.next() % 200));
        report.resubmitted += counter(&card, "resubmitted")?;
        // SIGKILL: no chance to finish anything, as in a crash.
        let killed = Instant::now();
        card.process.0.kill()?;
        card.process.0.wait()?;
        card = restart_card(
            dir.path(),
            &backing,
            config.seed.wrapping_add(u64::from(restart)),
            killed,
            &mut report.card_start_retries,
        )?;
        report.restart_times.push(killed.elapsed());
        restart += 1;
    }
    report.restarts = restart;

    let mut mark = [b' '; 512];
    mark[..STOP_MARK.len()].copy_from_slice(STOP_MARK.as_bytes());
    fs::OpenOptions::new()
        .write(true)
        .open(&backing)?
        .write_all_at(&mark, VOLUME_SIZE - 512)?;
    let out = guest.wait()?;
    if !out.console.contains("CARDSIM-SOAK-DONE") {
        bail!("the guest did not finish:\n{}", out.console_tail(40));
    }

    let count = |needle: &str| out.console.lines().filter(|l| l.contains(needle)).count() as u64;
    report.lost_writes = count("CARDSIM-LOST");
    report.duplicated_writes = count("CARDSIM-DUPLICATED");
    report.failed_writes = count("CARDSIM-WRITE-FAILED");
    report.fio_failures = count("CARDSIM-FIO-FAILED");
    report.duplicate_completions = count("is not a head");
    report.io_errors = count("I/O error");
    report.sequence_writes = out
        .console
        .lines()
        .find_map(|l| l.split("CARDSIM-SEQ-WRITES ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    for run in fio::reports(&out.console)? {
        report.fio_runs += 1;
        for job in run["jobs"].as_array().into_iter().flatten() {
            if job["error"].as_u64() != Some(0) {
                report.fio_failures += 1;
            }
            report.fio_writes += job["write"]["total_ios"].as_u64().unwrap_or(0);
        }
    }
    report.pauses = out
        .console
        .lines()
        .filter_map(|l| l.split("CARDSIM-GAP run ").nth(1))
        .filter_map(|rest| rest.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(Duration::from_millis)
        .collect();
    report.pauses.sort_by(|a, b| b.cmp(a));
    Ok(report)
}
