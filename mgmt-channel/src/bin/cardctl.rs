//! `cardctl`: the operator's CLI of mgmt-channel. Tables for people,
//! `--json` for scripts. Exit status: 0 done, 1 refused or failed (the
//! daemon's error is printed), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::{json, Value};

use mgmt_channel::client::{Answer, Client, Endpoint};

#[derive(Parser, Debug)]
#[command(version, about = "Operate cardsim's cards through mgmt-channel")]
struct Cli {
    /// The daemon's unix socket. Default: $XDG_RUNTIME_DIR/cardsim/mgmt.sock,
    /// else /run/cardsim/mgmt.sock.
    #[arg(long, global = true, env = "CARDCTL_SOCKET")]
    socket: Option<PathBuf>,
    /// Use the daemon's TCP listener instead (needs --token).
    #[arg(long, global = true, env = "CARDCTL_TCP")]
    tcp: Option<String>,
    /// Bearer token for --tcp.
    #[arg(long, global = true, env = "CARDCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the daemon's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// EBS-style volumes (one block card each).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Instance-store NVMe namespaces (one NVMe card each).
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    #[command(subcommand)]
    Subnet(SubnetCmd),
    /// Security groups.
    #[command(subcommand)]
    Sg(SgCmd),
    /// Network interfaces (ports of the networking card).
    #[command(subcommand)]
    Eni(EniCmd),
    /// Guests.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Describe any resource by its id (vol-, ns-, subnet-, sg-, eni-, i-).
    Describe { id: String },
    /// What happened: card starts, exits and restarts, operations.
    Events {
        /// Only about this resource or card.
        #[arg(long)]
        resource: Option<String>,
        /// Only after this sequence number.
        #[arg(long)]
        since: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The card processes and their health.
    Cards,
    /// A card's counters, from its agent.
    Metrics { card: String },
    /// The card image the cards run: show it, update it, the measured-boot log.
    #[command(subcommand)]
    Firmware(FirmwareCmd),
}

#[derive(Subcommand, Debug)]
enum FirmwareCmd {
    /// The image in use and each card's version and pid.
    Show,
    /// Verify IMAGE, then restart the cards on it one at a time.
    Update {
        /// The image's folder (manifest.json, manifest.sig, bin/).
        image: PathBuf,
    },
    /// The measured-boot log: every card binary started, hash-chained.
    /// Exit status 1 when the chain does not verify.
    Log,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    Create {
        /// Capacity, with K, M, G or T suffix (8G).
        #[arg(long, value_parser = card_firmware::media::parse_size)]
        size: u64,
        /// gp2, gp3, io1, io2, st1 or sc1.
        #[arg(long = "type", default_value = "gp3")]
        volume_type: String,
        #[arg(long)]
        iops: Option<u64>,
        /// MiB/s.
        #[arg(long)]
        throughput: Option<u64>,
    },
    List,
    Describe {
        id: String,
    },
    /// modify-volume: type, IOPS, throughput, applied live.
    Modify {
        id: String,
        #[arg(long = "type")]
        volume_type: Option<String>,
        #[arg(long)]
        iops: Option<u64>,
        #[arg(long)]
        throughput: Option<u64>,
    },
    /// Hot-plug into a running instance.
    Attach {
        id: String,
        #[arg(long)]
        instance: String,
    },
    /// Hot-unplug (waits for the guest to let go).
    Detach {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum NamespaceCmd {
    Create {
        #[arg(long, value_parser = card_firmware::media::parse_size)]
        size: u64,
    },
    List,
    Describe {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum SubnetCmd {
    Create {
        #[arg(long)]
        cidr: String,
    },
    List,
    Describe {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum SgCmd {
    /// Rules: `PROTO[:PORTS]:CIDR`, e.g. `tcp:5201:10.0.0.0/16`, `icmp:0.0.0.0/0`.
    Create {
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long = "ingress", value_parser = parse_rule)]
        ingress: Vec<Value>,
        /// Default: all traffic.
        #[arg(long = "egress", value_parser = parse_rule)]
        egress: Vec<Value>,
    },
    /// Replace a group's rules (live).
    SetRules {
        id: String,
        #[arg(long = "ingress", value_parser = parse_rule)]
        ingress: Vec<Value>,
        /// Default: all traffic.
        #[arg(long = "egress", value_parser = parse_rule)]
        egress: Vec<Value>,
    },
    List,
    Describe {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum EniCmd {
    Create {
        #[arg(long)]
        subnet: String,
        #[arg(long = "sg")]
        security_groups: Vec<String>,
        #[arg(long)]
        ip: Option<String>,
        /// Bandwidth allowance per direction, Firecracker's shape:
        /// `SIZE:REFILL_MS` (bytes per refill time).
        #[arg(long, value_parser = parse_bucket)]
        bandwidth: Option<Value>,
        /// Packet allowance per direction: `SIZE:REFILL_MS`.
        #[arg(long, value_parser = parse_bucket)]
        ops: Option<Value>,
    },
    /// Replace an ENI's security groups (live).
    Modify {
        id: String,
        #[arg(long = "sg")]
        security_groups: Vec<String>,
    },
    List,
    Describe {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum InstanceCmd {
    /// Launch a guest with volumes, ENIs and namespaces.
    Run {
        #[arg(long = "volume")]
        volumes: Vec<String>,
        #[arg(long = "eni")]
        enis: Vec<String>,
        #[arg(long = "namespace")]
        namespaces: Vec<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        /// MiB.
        #[arg(long)]
        memory: Option<u32>,
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// A shell script the guest runs after boot.
        #[arg(long)]
        user_data: Option<PathBuf>,
        /// Wait until the guest's console prints this (e.g. a line the
        /// user-data script echoes).
        #[arg(long)]
        wait_for: Option<String>,
        /// How long --wait-for may take, in seconds.
        #[arg(long, default_value_t = 120)]
        wait_timeout: u64,
    },
    /// Take over a VMM started elsewhere, by its QMP socket.
    Register {
        #[arg(long)]
        qmp_socket: PathBuf,
    },
    List,
    Describe {
        id: String,
    },
    /// Stop the guest and free its devices.
    Terminate {
        id: String,
    },
}

fn parse_bucket(text: &str) -> Result<Value, String> {
    let (size, refill) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not SIZE:REFILL_MS"))?;
    let size = card_firmware::media::parse_size(size)?;
    let refill: u64 = refill
        .parse()
        .map_err(|_| format!("{refill:?} is not a number of milliseconds"))?;
    Ok(json!({"size": size, "refill_time": refill}))
}

fn parse_rule(text: &str) -> Result<Value, String> {
    let parts: Vec<&str> = text.split(':').collect();
    match parts[..] {
        [proto, cidr] => Ok(json!({"proto": proto, "cidr": cidr})),
        [proto, ports, cidr] => Ok(json!({"proto": proto, "ports": ports, "cidr": cidr})),
        _ => Err(format!("{text:?} is not PROTO[:PORTS]:CIDR")),
    }
}

fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("cardsim/mgmt.sock"),
        None => PathBuf::from("/run/cardsim/mgmt.sock"),
    }
}

/// How a command's answer is shown.
enum Show {
    One(&'static [&'static str]),
    Many(&'static [&'static str]),
    Nothing(&'static str),
}

const VOLUME: &[&str] = &[
    "id",
    "volume_type",
    "size_bytes",
    "iops",
    "throughput_mibps",
    "state",
    "attached_to",
];
const NAMESPACE: &[&str] = &["id", "size_bytes", "state", "attached_to"];
const SUBNET: &[&str] = &["id", "cidr", "gateway"];
const SG: &[&str] = &["id", "description", "ingress", "egress"];
const ENI: &[&str] = &[
    "id",
    "subnet_id",
    "ip",
    "mac",
    "security_groups",
    "state",
    "attached_to",
];
const INSTANCE: &[&str] = &[
    "id",
    "origin",
    "state",
    "vcpus",
    "memory_mib",
    "volumes",
    "enis",
    "namespaces",
    "pid",
    "console_log",
];
/// `instance list`: the console log's path is for `describe`.
const INSTANCE_ROW: &[&str] = &[
    "id",
    "origin",
    "state",
    "vcpus",
    "memory_mib",
    "volumes",
    "enis",
    "namespaces",
    "pid",
];
const EVENT: &[&str] = &["seq", "time", "resource", "kind", "message"];
const CARD: &[&str] = &["name", "kind", "phase", "pid", "restarts", "last_failure"];
const FIRMWARE_CARD: &[&str] = &["name", "kind", "phase", "version", "pid"];
const BOOT_ENTRY: &[&str] = &["seq", "time", "card", "binary", "image_version", "sha256"];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let endpoint = match (&cli.tcp, &cli.token) {
        (Some(addr), token) => Endpoint::Tcp {
            addr: addr.clone(),
            token: token.clone(),
        },
        (None, _) => Endpoint::Unix(cli.socket.clone().unwrap_or_else(default_socket)),
    };
    let client = Client {
        endpoint,
        timeout: Duration::from_secs(300),
    };
    match run(&cli, &client) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cardctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn opt<T: serde::Serialize>(v: &Option<T>) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn run(cli: &Cli, client: &Client) -> anyhow::Result<ExitCode> {
    use Command::*;
    let (answer, show) = match &cli.command {
        Volume(cmd) => match cmd {
            VolumeCmd::Create {
                size,
                volume_type,
                iops,
                throughput,
            } => {
                let mut body = json!({"size_bytes": size, "volume_type": volume_type});
                if iops.is_some() {
                    body["iops"] = opt(iops);
                }
                if throughput.is_some() {
                    body["throughput_mibps"] = opt(throughput);
                }
                (client.post("/v1/volumes", &body)?, Show::One(VOLUME))
            }
            VolumeCmd::List => (client.get("/v1/volumes")?, Show::Many(VOLUME)),
            VolumeCmd::Describe { id } => {
                (client.get(&format!("/v1/volumes/{id}"))?, Show::One(VOLUME))
            }
            VolumeCmd::Modify {
                id,
                volume_type,
                iops,
                throughput,
            } => {
                let mut body = json!({});
                if let Some(t) = volume_type {
                    body["volume_type"] = json!(t);
                }
                if iops.is_some() {
                    body["iops"] = opt(iops);
                }
                if throughput.is_some() {
                    body["throughput_mibps"] = opt(throughput);
                }
                let body = body.to_string();
                (
                    client.request("PATCH", &format!("/v1/volumes/{id}"), Some(body.as_bytes()))?,
                    Show::One(VOLUME),
                )
            }
            VolumeCmd::Attach { id, instance } => {
                let answer = with_progress(cli, &format!("attaching {id} to {instance}"), || {
                    client.post(
                        &format!("/v1/volumes/{id}/attach"),
                        &json!({"instance_id": instance}),
                    )
                })?;
                (answer, Show::One(VOLUME))
            }
            VolumeCmd::Detach { id } => {
                let answer = with_progress(
                    cli,
                    &format!("detaching {id} (waiting for the guest)"),
                    || client.post(&format!("/v1/volumes/{id}/detach"), &json!({})),
                )?;
                (answer, Show::One(VOLUME))
            }
            VolumeCmd::Delete { id } => (
                client.delete(&format!("/v1/volumes/{id}"))?,
                Show::Nothing("deleted"),
            ),
        },
        Namespace(cmd) => match cmd {
            NamespaceCmd::Create { size } => (
                client.post("/v1/namespaces", &json!({"size_bytes": size}))?,
                Show::One(NAMESPACE),
            ),
            NamespaceCmd::List => (client.get("/v1/namespaces")?, Show::Many(NAMESPACE)),
            NamespaceCmd::Describe { id } => (
                client.get(&format!("/v1/namespaces/{id}"))?,
                Show::One(NAMESPACE),
            ),
            NamespaceCmd::Delete { id } => (
                client.delete(&format!("/v1/namespaces/{id}"))?,
                Show::Nothing("deleted"),
            ),
        },
        Subnet(cmd) => match cmd {
            SubnetCmd::Create { cidr } => (
                client.post("/v1/subnets", &json!({"cidr": cidr}))?,
                Show::One(SUBNET),
            ),
            SubnetCmd::List => (client.get("/v1/subnets")?, Show::Many(SUBNET)),
            SubnetCmd::Describe { id } => {
                (client.get(&format!("/v1/subnets/{id}"))?, Show::One(SUBNET))
            }
            SubnetCmd::Delete { id } => (
                client.delete(&format!("/v1/subnets/{id}"))?,
                Show::Nothing("deleted"),
            ),
        },
        Sg(cmd) => match cmd {
            SgCmd::Create {
                description,
                ingress,
                egress,
            } => {
                let mut body = json!({"description": description, "ingress": ingress});
                if !egress.is_empty() {
                    body["egress"] = json!(egress);
                }
                (client.post("/v1/security-groups", &body)?, Show::One(SG))
            }
            SgCmd::SetRules {
                id,
                ingress,
                egress,
            } => {
                let body = json!({"ingress": ingress, "egress": egress}).to_string();
                (
                    client.request(
                        "PUT",
                        &format!("/v1/security-groups/{id}/rules"),
                        Some(body.as_bytes()),
                    )?,
                    Show::One(SG),
                )
            }
            SgCmd::List => (client.get("/v1/security-groups")?, Show::Many(SG)),
            SgCmd::Describe { id } => (
                client.get(&format!("/v1/security-groups/{id}"))?,
                Show::One(SG),
            ),
            SgCmd::Delete { id } => (
                client.delete(&format!("/v1/security-groups/{id}"))?,
                Show::Nothing("deleted"),
            ),
        },
        Eni(cmd) => match cmd {
            EniCmd::Create {
                subnet,
                security_groups,
                ip,
                bandwidth,
                ops,
            } => {
                let mut body = json!({"subnet_id": subnet, "security_groups": security_groups});
                if ip.is_some() {
                    body["ip"] = opt(ip);
                }
                if bandwidth.is_some() || ops.is_some() {
                    let mut allowance = json!({});
                    if let Some(b) = bandwidth {
                        allowance["bandwidth"] = b.clone();
                    }
                    if let Some(o) = ops {
                        allowance["ops"] = o.clone();
                    }
                    body["allowance"] = allowance;
                }
                (client.post("/v1/enis", &body)?, Show::One(ENI))
            }
            EniCmd::Modify {
                id,
                security_groups,
            } => {
                let body = json!({"security_groups": security_groups}).to_string();
                (
                    client.request("PATCH", &format!("/v1/enis/{id}"), Some(body.as_bytes()))?,
                    Show::One(ENI),
                )
            }
            EniCmd::List => (client.get("/v1/enis")?, Show::Many(ENI)),
            EniCmd::Describe { id } => (client.get(&format!("/v1/enis/{id}"))?, Show::One(ENI)),
            EniCmd::Delete { id } => (
                client.delete(&format!("/v1/enis/{id}"))?,
                Show::Nothing("deleted"),
            ),
        },
        Instance(cmd) => match cmd {
            InstanceCmd::Run {
                volumes,
                enis,
                namespaces,
                vcpus,
                memory,
                kernel,
                initrd,
                user_data,
                wait_for,
                wait_timeout,
            } => {
                let mut body = json!({"volumes": volumes, "enis": enis, "namespaces": namespaces});
                if vcpus.is_some() {
                    body["vcpus"] = opt(vcpus);
                }
                if memory.is_some() {
                    body["memory_mib"] = opt(memory);
                }
                if let Some(k) = kernel {
                    body["kernel"] = json!(absolute(k)?);
                }
                if let Some(i) = initrd {
                    body["initrd"] = json!(absolute(i)?);
                }
                if let Some(path) = user_data {
                    let script = std::fs::read_to_string(path).map_err(|e| {
                        anyhow::anyhow!("reading --user-data {}: {e}", path.display())
                    })?;
                    body["user_data"] = json!(script);
                }
                let answer =
                    with_progress(cli, "launching", || client.post("/v1/instances", &body))?;
                if let (true, Some(marker)) = (answer.is_success(), wait_for) {
                    let log = answer.body["console_log"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    wait_for_console(cli, &log, marker, Duration::from_secs(*wait_timeout))?;
                }
                (answer, Show::One(INSTANCE))
            }
            InstanceCmd::Register { qmp_socket } => (
                client.post(
                    "/v1/instances/register",
                    &json!({"qmp_socket": absolute(qmp_socket)?}),
                )?,
                Show::One(INSTANCE),
            ),
            InstanceCmd::List => (client.get("/v1/instances")?, Show::Many(INSTANCE_ROW)),
            InstanceCmd::Describe { id } => (
                client.get(&format!("/v1/instances/{id}"))?,
                Show::One(INSTANCE),
            ),
            InstanceCmd::Terminate { id } => {
                let answer = with_progress(cli, &format!("terminating {id}"), || {
                    client.delete(&format!("/v1/instances/{id}"))
                })?;
                (answer, Show::Nothing("terminated"))
            }
        },
        Describe { id } => {
            let (path, fields) = match id.split('-').next().unwrap_or_default() {
                "vol" => ("volumes", VOLUME),
                "ns" => ("namespaces", NAMESPACE),
                "subnet" => ("subnets", SUBNET),
                "sg" => ("security-groups", SG),
                "eni" => ("enis", ENI),
                "i" => ("instances", INSTANCE),
                _ => {
                    eprintln!(
                        "cardctl: {id:?} is not a resource id (vol-, ns-, subnet-, sg-, eni-, i-)"
                    );
                    return Ok(ExitCode::from(2));
                }
            };
            (client.get(&format!("/v1/{path}/{id}"))?, Show::One(fields))
        }
        Events {
            resource,
            since,
            limit,
        } => {
            let mut path = format!("/v1/events?limit={limit}");
            if let Some(r) = resource {
                path.push_str(&format!("&resource={r}"));
            }
            if let Some(s) = since {
                path.push_str(&format!("&since={s}"));
            }
            (client.get(&path)?, Show::Many(EVENT))
        }
        Cards => (client.get("/v1/cards")?, Show::Many(CARD)),
        Metrics { card } => {
            let answer = client.get(&format!("/v1/cards/{card}/metrics"))?;
            if answer.is_success() && !cli.json {
                println!("{}", serde_json::to_string_pretty(&answer.body["metrics"])?);
                return Ok(ExitCode::SUCCESS);
            }
            (answer, Show::Nothing(""))
        }
        Firmware(cmd) => return firmware(cli, client, cmd),
    };
    Ok(print_answer(cli, &answer, show))
}

fn firmware(cli: &Cli, client: &Client, cmd: &FirmwareCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        FirmwareCmd::Show => {
            let answer = client.get("/v1/firmware")?;
            if !answer.is_success() || cli.json {
                return Ok(print_answer(cli, &answer, Show::Nothing("")));
            }
            print_firmware(&answer.body);
            Ok(ExitCode::SUCCESS)
        }
        FirmwareCmd::Update { image } => {
            let body = json!({"image": absolute(image)?});
            let answer = update_with_progress(cli, client, &body)?;
            if !answer.is_success() || cli.json {
                return Ok(print_answer(cli, &answer, Show::Nothing("")));
            }
            let done = &answer.body;
            println!(
                "updated {} -> {}: {} card(s) restarted one at a time",
                done["previous_version"].as_str().unwrap_or("-"),
                done["firmware"]["version"].as_str().unwrap_or("-"),
                done["restarted"].as_array().map_or(0, Vec::len)
            );
            print_firmware(&done["firmware"]);
            Ok(ExitCode::SUCCESS)
        }
        FirmwareCmd::Log => {
            let answer = client.get("/v1/firmware/boot-log")?;
            if !answer.is_success() {
                return Ok(print_answer(cli, &answer, Show::Nothing("")));
            }
            let verified = answer.body["verified"].as_bool() == Some(true);
            if cli.json {
                println!("{}", answer.body);
            } else {
                let mut table = Table::new();
                table.load_style(UTF8_FULL_CONDENSED);
                table.set_header(BOOT_ENTRY.iter().map(|f| f.to_uppercase()));
                for row in answer.body["entries"].as_array().into_iter().flatten() {
                    table.add_row(
                        BOOT_ENTRY
                            .iter()
                            .map(|f| match (*f, &row[*f]) {
                                // RFC 3339 already; the digest's start is enough to compare by eye.
                                ("time", Value::String(t)) => t.clone(),
                                ("sha256", Value::String(d)) => {
                                    format!("{}…", d.chars().take(16).collect::<String>())
                                }
                                _ => cell(row, f),
                            })
                            .collect::<Vec<_>>(),
                    );
                }
                println!("{table}");
                if verified {
                    println!("chain: verified ({})", cell(&answer.body, "path"));
                } else {
                    println!(
                        "chain: BROKEN: {}",
                        answer.body["problem"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(if verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Sends the update and, while the daemon restarts the cards, shows how
/// many already run the new image.
fn update_with_progress(cli: &Cli, client: &Client, body: &Value) -> anyhow::Result<Answer> {
    let request = {
        let client = client.clone();
        let body = body.clone();
        std::thread::spawn(move || client.post("/v1/firmware/update", &body))
    };
    let bar = if cli.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner().with_message("verifying the image")
    };
    bar.enable_steady_tick(Duration::from_millis(100));
    let before = client.get("/v1/firmware").ok().map(|a| a.body);
    while !request.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        let (Some(before), Ok(now)) = (&before, client.get("/v1/firmware")) else {
            continue;
        };
        let cards = now.body["cards"].as_array().cloned().unwrap_or_default();
        let old_pids: Vec<&Value> = before["cards"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| &c["pid"])
            .collect();
        let done = cards
            .iter()
            .filter(|c| !c["pid"].is_null() && !old_pids.contains(&&c["pid"]))
            .count();
        bar.set_message(format!(
            "restarting cards one at a time: {done} of {} restarted",
            cards.len()
        ));
    }
    bar.finish_and_clear();
    request
        .join()
        .map_err(|_| anyhow::anyhow!("the update request's thread panicked"))?
        .map_err(Into::into)
}

fn print_firmware(fw: &Value) {
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED);
    if fw["mode"] == "verified" {
        for f in ["mode", "image", "version", "signer"] {
            table.add_row(vec![f.to_string(), cell(fw, f)]);
        }
    } else {
        table.add_row(vec!["mode".to_string(), cell(fw, "mode")]);
        table.add_row(vec!["card_bin_dir".to_string(), cell(fw, "card_bin_dir")]);
    }
    println!("{table}");
    if fw["mode"] != "verified" {
        println!(
            "WARNING: cards are UNVERIFIED: plain binaries, no signature checked (start mgmt-channel with --trusted-keys and --image)"
        );
    }
    let mut cards = Table::new();
    cards.load_style(UTF8_FULL_CONDENSED);
    cards.set_header(FIRMWARE_CARD.iter().map(|f| f.to_uppercase()));
    for row in fw["cards"].as_array().into_iter().flatten() {
        cards.add_row(
            FIRMWARE_CARD
                .iter()
                .map(|f| cell(row, f))
                .collect::<Vec<_>>(),
        );
    }
    println!("{cards}");
}

fn absolute(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .display()
        .to_string())
}

/// Runs a request that waits (on a guest, a card), with a spinner on a
/// terminal.
fn with_progress<T>(cli: &Cli, message: &str, f: impl FnOnce() -> T) -> T {
    if cli.json {
        return f();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    let out = f();
    bar.finish_and_clear();
    out
}

fn wait_for_console(cli: &Cli, log: &str, marker: &str, timeout: Duration) -> anyhow::Result<()> {
    let bar = if cli.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
            .with_message(format!("booting: waiting for {marker:?}"))
    };
    bar.enable_steady_tick(Duration::from_millis(100));
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            bar.finish_and_clear();
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bar.finish_and_clear();
            anyhow::bail!("the guest did not print {marker:?} within {timeout:?} (console: {log})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_answer(cli: &Cli, answer: &Answer, show: Show) -> ExitCode {
    if !answer.is_success() {
        if cli.json {
            println!("{}", answer.body);
        }
        let message = answer.body["error"]["message"]
            .as_str()
            .unwrap_or("(no message)");
        let code = answer.error_code().unwrap_or("error");
        eprintln!("cardctl: {code} ({}): {message}", answer.status);
        return ExitCode::from(1);
    }
    if cli.json {
        println!(
            "{}",
            if answer.body.is_null() {
                json!({})
            } else {
                answer.body.clone()
            }
        );
        return ExitCode::SUCCESS;
    }
    match show {
        Show::One(fields) => {
            let mut table = Table::new();
            table.load_style(UTF8_FULL_CONDENSED);
            for f in fields {
                table.add_row(vec![f.to_string(), cell(&answer.body, f)]);
            }
            println!("{table}");
        }
        Show::Many(fields) => {
            let mut table = Table::new();
            table.load_style(UTF8_FULL_CONDENSED);
            table.set_header(fields.iter().map(|f| f.to_uppercase()));
            for row in answer.body.as_array().into_iter().flatten() {
                table.add_row(fields.iter().map(|f| cell(row, f)).collect::<Vec<_>>());
            }
            println!("{table}");
        }
        Show::Nothing(word) => {
            if !word.is_empty() {
                println!("{word}");
            }
        }
    }
    ExitCode::SUCCESS
}

/// One value for a table cell; `time` is shown from `time_ms`.
fn cell(row: &Value, field: &str) -> String {
    if field == "time" {
        let ms = row["time_ms"].as_u64().unwrap_or(0);
        let secs = ms / 1000;
        return format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            ms % 1000
        );
    }
    match &row[field] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Object(rule) => {
                    let mut s = rule
                        .get("proto")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string();
                    if let Some(p) = rule.get("ports").and_then(Value::as_str) {
                        s = format!("{s}:{p}");
                    }
                    format!(
                        "{s}:{}",
                        rule.get("cidr").and_then(Value::as_str).unwrap_or("?")
                    )
                }
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}
