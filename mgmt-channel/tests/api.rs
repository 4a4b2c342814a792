//! The API against a real daemon (`mgmt-channel` built by cargo) on a
//! temporary socket and state directory, with real card processes: the
//! card binaries beside it (`cargo build --workspace --bins`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use card_firmware::boot::{self, SigningKey};
use mgmt_channel::client::{Answer, Client, Endpoint};
use serde_json::{json, Value};

const DAEMON: &str = env!("CARGO_BIN_EXE_mgmt-channel");

struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    state: PathBuf,
    extra: Vec<String>,
}

/// Where cargo built the daemon and the cards.
fn bin_dir() -> &'static Path {
    Path::new(DAEMON).parent().unwrap()
}

const CARDS: [&str; 3] = ["vhost-blk-backend", "nvme-emulator", "vhost-net-backend"];

impl Daemon {
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let bin_dir = bin_dir();
        for card in CARDS {
            assert!(
                bin_dir.join(card).is_file(),
                "{card} is not built in {}: run `cargo build --workspace --bins` first",
                bin_dir.display()
            );
        }
        let mut d = Daemon {
            child: None,
            socket: dir.join("api.sock"),
            state: dir.join("state"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.with_extension("log"))
            .unwrap();
        let mut command = Command::new(DAEMON);
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(&self.extra);
        if !self.extra.iter().any(|a| a == "--trusted-keys") {
            command.arg("--card-bin-dir").arg(bin_dir());
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mgmt-channel");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client().get("/v1/volumes").is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mgmt-channel exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mgmt-channel did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }

    /// SIGTERM, and wait for the daemon (and so its cards) to be gone.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "mgmt-channel exited {status}: {}",
                self.log()
            );
        }
    }

    fn client(&self) -> Client {
        Client {
            endpoint: Endpoint::Unix(self.socket.clone()),
            timeout: Duration::from_secs(30),
        }
    }

    fn get(&self, path: &str) -> Answer {
        self.client().get(path).unwrap()
    }
    fn post(&self, path: &str, body: Value) -> Answer {
        self.client().post(path, &body).unwrap()
    }
    fn raw(&self, method: &str, path: &str, body: &str) -> Answer {
        self.client()
            .request(method, path, Some(body.as_bytes()))
            .unwrap()
    }
    fn delete(&self, path: &str) -> Answer {
        self.client().delete(path).unwrap()
    }

    fn created(&self, path: &str, body: Value) -> Value {
        let a = self.post(path, body);
        assert_eq!(a.status, 201, "POST {path}: {}", a.body);
        a.body
    }

    /// Every resource list: what a refused request must leave as it was.
    fn snapshot(&self) -> Value {
        let mut all = serde_json::Map::new();
        for kind in [
            "volumes",
            "namespaces",
            "subnets",
            "security-groups",
            "enis",
            "instances",
        ] {
            all.insert(kind.into(), self.get(&format!("/v1/{kind}")).body);
        }
        let cards: Vec<Value> = self
            .get("/v1/cards")
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|c| json!([c["name"], c["phase"], c["pid"]]))
            .collect();
        all.insert("cards".into(), json!(cards));
        Value::Object(all)
    }

    fn card(&self, name: &str) -> Value {
        self.get("/v1/cards")
            .body
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn wait_card(&self, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let card = self.card(name);
            if ok(&card) {
                return card;
            }
            assert!(
                Instant::now() < deadline,
                "card {name}: {what}: last seen {card}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in stop().
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

const GIB: u64 = 1 << 30;

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn every_resource_can_be_created_described_listed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket is private");

    // Volume: a block card per volume, serving on the volume's socket.
    let vol = d.created(
        "/v1/volumes",
        json!({"size_bytes": 8 * GIB, "volume_type": "gp3", "iops": 4000}),
    );
    let id = vol["id"].as_str().unwrap();
    assert!(id.starts_with("vol-"), "{vol}");
    assert_eq!(vol["state"], "available");
    assert_eq!(d.get(&format!("/v1/volumes/{id}")).body, vol);
    assert_eq!(d.get("/v1/volumes").body, json!([vol.clone()]));
    let card = d.card(&format!("blk-{id}"));
    assert_eq!(card["phase"], "healthy", "{card}");
    assert!(Path::new(vol["socket"].as_str().unwrap()).exists());
    let backing = d.state.join(format!("volumes/{id}.img"));
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8 * GIB);

    // Namespace: an NVMe card.
    let ns = d.created("/v1/namespaces", json!({"size_bytes": 64 << 20}));
    let ns_id = ns["id"].as_str().unwrap();
    assert!(ns_id.starts_with("ns-"));
    assert_eq!(d.card(&format!("nvme-{ns_id}"))["phase"], "healthy");

    // Network: subnet, group, ENI (the networking card starts with it).
    let subnet = d.created("/v1/subnets", json!({"cidr": "10.0.1.0/24"}));
    let subnet_id = subnet["id"].as_str().unwrap();
    assert_eq!(subnet["gateway"], "10.0.1.1");
    let sg = d.created(
        "/v1/security-groups",
        json!({"description": "iperf", "ingress": [{"proto": "tcp", "ports": "5201", "cidr": "10.0.0.0/16"}]}),
    );
    let sg_id = sg["id"].as_str().unwrap();
    assert_eq!(sg["egress"], json!([{"proto": "all", "cidr": "0.0.0.0/0"}]));
    assert_eq!(d.card("net"), Value::Null, "no ENI, no networking card");
    let eni = d.created(
        "/v1/enis",
        json!({"subnet_id": subnet_id, "security_groups": [sg_id]}),
    );
    let eni_id = eni["id"].as_str().unwrap();
    assert_eq!(eni["ip"], "10.0.1.10");
    assert_eq!(d.card("net")["phase"], "healthy");
    assert!(Path::new(eni["socket"].as_str().unwrap()).exists());

    // Live changes go to the cards' agents.
    let modified = d.raw(
        "PATCH",
        &format!("/v1/volumes/{id}"),
        r#"{"iops": 3500, "throughput_mibps": 200}"#,
    );
    assert_eq!(modified.status, 200, "{}", modified.body);
    let metrics = d.get(&format!("/v1/cards/blk-{id}/metrics"));
    assert_eq!(
        metrics.body["metrics"]["volume"]["limits"]["baseline_iops"], 3500,
        "{}",
        metrics.body
    );
    let rules = d.raw(
        "PUT",
        &format!("/v1/security-groups/{sg_id}/rules"),
        r#"{"ingress": [{"proto": "icmp", "cidr": "0.0.0.0/0"}], "egress": []}"#,
    );
    assert_eq!(rules.status, 200, "{}", rules.body);
    let eni2 = d.created(
        "/v1/enis",
        json!({"subnet_id": subnet_id, "allowance": {"bandwidth": {"size": 2_500_000, "refill_time": 100}}}),
    );
    let eni2_id = eni2["id"].as_str().unwrap();
    let groups = d.raw(
        "PATCH",
        &format!("/v1/enis/{eni2_id}"),
        &json!({"security_groups": [sg_id]}).to_string(),
    );
    assert_eq!(groups.status, 200, "{}", groups.body);
    let config = std::fs::read_to_string(d.state.join("run/vpc.toml")).unwrap();
    assert!(
        config.contains(eni2_id) && config.contains("proto = \"icmp\""),
        "{config}"
    );
    assert!(
        config.contains("allowance = { bandwidth = { size = 2500000, refill_time = 100 } }"),
        "{config}"
    );

    // In use: refused.
    let in_use = d.delete(&format!("/v1/security-groups/{sg_id}"));
    assert_eq!(
        (in_use.status, in_use.error_code()),
        (409, Some("conflict"))
    );
    let in_use = d.delete(&format!("/v1/subnets/{subnet_id}"));
    assert_eq!(in_use.status, 409);

    // Deletes, in dependency order; each card stops.
    let blk_pid = d.card(&format!("blk-{id}"))["pid"].as_u64().unwrap();
    assert_eq!(d.delete(&format!("/v1/volumes/{id}")).status, 204);
    assert_eq!(d.card(&format!("blk-{id}"))["phase"], "stopped");
    assert!(!pid_alive(blk_pid), "the volume's card is gone");
    assert!(!backing.exists());
    assert_eq!(d.get(&format!("/v1/volumes/{id}")).status, 404);
    assert_eq!(d.delete(&format!("/v1/namespaces/{ns_id}")).status, 204);
    assert_eq!(d.delete(&format!("/v1/enis/{eni_id}")).status, 204);
    assert_eq!(d.card("net")["phase"], "healthy", "one ENI left");
    assert_eq!(d.delete(&format!("/v1/enis/{eni2_id}")).status, 204);
    assert_eq!(d.card("net")["phase"], "stopped", "no ENI left");
    assert_eq!(
        d.delete(&format!("/v1/security-groups/{sg_id}")).status,
        204
    );
    assert_eq!(d.delete(&format!("/v1/subnets/{subnet_id}")).status, 204);
    for kind in [
        "volumes",
        "namespaces",
        "subnets",
        "security-groups",
        "enis",
    ] {
        assert_eq!(d.get(&format!("/v1/{kind}")).body, json!([]), "{kind}");
    }
    let events = d.get(&format!("/v1/events?resource={id}")).body;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["created", "modified", "deleted"]);
}

#[test]
fn bad_input_is_a_4xx_naming_the_field_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let vol = d.created(
        "/v1/volumes",
        json!({"size_bytes": 8 * GIB, "volume_type": "gp3"}),
    );
    let id = vol["id"].as_str().unwrap().to_string();
    let subnet = d.created("/v1/subnets", json!({"cidr": "10.0.1.0/24"}));
    let subnet_id = subnet["id"].as_str().unwrap().to_string();

    let vol_path = format!("/v1/volumes/{id}");
    let cases: Vec<(&str, String, String, u16, &str, &str)> = vec![
        // method, path, body, status, code, the field named
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 8589934592, "volume_type": "gp3""#.into(),
            400,
            "bad_request",
            "",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            "not json".into(),
            400,
            "bad_request",
            "",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 8589934592, "volume_type": "gp3", "colour": "red"}"#.into(),
            400,
            "bad_request",
            "colour",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"volume_type": "gp3"}"#.into(),
            400,
            "bad_request",
            "size_bytes",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": -1, "volume_type": "gp3"}"#.into(),
            400,
            "bad_request",
            "size_bytes",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 8589934592, "volume_type": "gp9"}"#.into(),
            400,
            "bad_request",
            "volume_type",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 0, "volume_type": "gp3"}"#.into(),
            422,
            "invalid_value",
            "size_bytes",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 8589934592, "volume_type": "gp3", "iops": 16001}"#.into(),
            422,
            "invalid_value",
            "iops",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 107374182400, "volume_type": "io2", "iops": 256001}"#.into(),
            422,
            "invalid_value",
            "iops",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 8589934592, "volume_type": "gp2", "iops": 300}"#.into(),
            422,
            "invalid_value",
            "iops",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            r#"{"size_bytes": 8589934592, "volume_type": "gp3", "throughput_mibps": 1001}"#.into(),
            422,
            "invalid_value",
            "throughput_mibps",
        ),
        (
            "PATCH",
            vol_path.clone(),
            r#"{"iops": 20000}"#.into(),
            422,
            "invalid_value",
            "iops",
        ),
        (
            "PATCH",
            vol_path.clone(),
            r#"{}"#.into(),
            422,
            "invalid_value",
            "volume_type",
        ),
        (
            "PATCH",
            vol_path.clone(),
            r#"{"size_bytes": 1}"#.into(),
            400,
            "bad_request",
            "size_bytes",
        ),
        (
            "PATCH",
            "/v1/volumes/vol-0000".into(),
            r#"{"iops": 3000}"#.into(),
            404,
            "not_found",
            "",
        ),
        (
            "POST",
            format!("{vol_path}/detach"),
            "{}".into(),
            409,
            "conflict",
            "",
        ),
        (
            "POST",
            format!("{vol_path}/attach"),
            r#"{"instance_id": "i-0123"}"#.into(),
            404,
            "not_found",
            "instance_id",
        ),
        (
            "POST",
            format!("{vol_path}/attach"),
            r#"{"instance": "i-0123"}"#.into(),
            400,
            "bad_request",
            "instance",
        ),
        (
            "POST",
            "/v1/namespaces".into(),
            r#"{"size_bytes": 4097}"#.into(),
            422,
            "invalid_value",
            "size_bytes",
        ),
        (
            "POST",
            "/v1/subnets".into(),
            r#"{"cidr": "10.0.1.0/24"}"#.into(),
            422,
            "invalid_value",
            "cidr",
        ),
        (
            "POST",
            "/v1/subnets".into(),
            r#"{"cidr": "192.168.0.0/24"}"#.into(),
            422,
            "invalid_value",
            "cidr",
        ),
        (
            "POST",
            "/v1/subnets".into(),
            r#"{"cidr": "10.0.2.1/24"}"#.into(),
            422,
            "invalid_value",
            "cidr",
        ),
        (
            "POST",
            "/v1/security-groups".into(),
            r#"{"ingress": [{"proto": "tcp", "ports": "70000", "cidr": "10.0.0.0/16"}]}"#.into(),
            422,
            "invalid_value",
            "ingress[0].ports",
        ),
        (
            "POST",
            "/v1/security-groups".into(),
            r#"{"ingress": [{"proto": "tcp", "cidr": "10.0.0.0/16", "port": 1}]}"#.into(),
            400,
            "bad_request",
            "ingress[0].port",
        ),
        (
            "POST",
            "/v1/enis".into(),
            format!(r#"{{"subnet_id": "{subnet_id}", "security_groups": ["sg-0abc"]}}"#),
            422,
            "invalid_value",
            "security_groups",
        ),
        (
            "POST",
            "/v1/enis".into(),
            format!(r#"{{"subnet_id": "{subnet_id}", "ip": "10.0.2.5"}}"#),
            422,
            "invalid_value",
            "ip",
        ),
        (
            "POST",
            "/v1/enis".into(),
            r#"{"subnet_id": "subnet-0abc"}"#.into(),
            422,
            "invalid_value",
            "subnet_id",
        ),
        (
            "POST",
            "/v1/enis".into(),
            format!(
                r#"{{"subnet_id": "{subnet_id}", "allowance": {{"ops": {{"size": 0, "refill_time": 100}}}}}}"#
            ),
            422,
            "invalid_value",
            "allowance.ops.size",
        ),
        (
            "POST",
            "/v1/instances".into(),
            r#"{"vcpus": 0}"#.into(),
            422,
            "invalid_value",
            "vcpus",
        ),
        (
            "POST",
            "/v1/instances".into(),
            format!(
                r#"{{"volumes": ["{id}", "{id}"], "kernel": "/etc/hostname", "initrd": "/etc/hostname"}}"#
            ),
            422,
            "invalid_value",
            "volumes",
        ),
        (
            "POST",
            "/v1/instances".into(),
            r#"{"kernel": "/nonexistent"}"#.into(),
            422,
            "invalid_value",
            "kernel",
        ),
        (
            "GET",
            "/v1/events?limit=0".into(),
            "".into(),
            422,
            "invalid_value",
            "limit",
        ),
        ("GET", "/v1/nothing".into(), "".into(), 404, "not_found", ""),
    ];
    let before = d.snapshot();
    let audit_before = d.audit().len();
    let mut mutating = 0;
    for (method, path, body, status, code, field) in &cases {
        let body = if body.is_empty() {
            None
        } else {
            Some(body.as_bytes())
        };
        let a = d.client().request(method, path, body).unwrap();
        let what = format!("{method} {path} {:?}", body.map(String::from_utf8_lossy));
        assert_eq!(a.status, *status, "{what}: {}", a.body);
        assert_eq!(a.error_code(), Some(*code), "{what}: {}", a.body);
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(!message.is_empty());
        if !field.is_empty() {
            assert_eq!(a.body["error"]["field"], *field, "{what}: {}", a.body);
            assert!(
                message.contains(field),
                "{what}: the message names {field}: {message}"
            );
        }
        assert_eq!(d.snapshot(), before, "{what} changed the state");
        if *method != "GET" {
            mutating += 1;
        }
    }
    // Every refused mutating call is in the audit log, with its result.
    let audit = d.audit();
    assert_eq!(audit.len() - audit_before, mutating);
    let last = audit.last().unwrap();
    assert_eq!(last["call"], "POST /v1/instances");
    assert_eq!(last["status"], 422);
    assert_eq!(last["result"], "invalid_value");
    assert_eq!(last["caller"], format!("uid:{}", unsafe { libc::getuid() }));
}

#[test]
fn tcp_needs_a_token_and_a_read_token_cannot_mutate() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# name secret access\nops 0123456789abcdef0123 write\nviewer fedcba9876543210fedc read\n",
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        dir.path(),
        &[
            "--listen-tcp",
            &addr,
            "--token-file",
            tokens.to_str().unwrap(),
        ],
    );
    let tcp = |token: Option<&str>| Client {
        endpoint: Endpoint::Tcp {
            addr: addr.clone(),
            token: token.map(String::from),
        },
        timeout: Duration::from_secs(60),
    };
    let body = json!({"cidr": "10.0.3.0/24"});
    let before = d.snapshot();
    let a = tcp(None).get("/v1/subnets").unwrap();
    assert_eq!((a.status, a.error_code()), (401, Some("unauthorized")));
    let a = tcp(Some("0123456789abcdef0124"))
        .post("/v1/subnets", &body)
        .unwrap();
    assert_eq!(a.status, 401);
    let viewer = tcp(Some("fedcba9876543210fedc"));
    assert_eq!(viewer.get("/v1/subnets").unwrap().status, 200);
    let a = viewer.post("/v1/subnets", &body).unwrap();
    assert_eq!(
        (a.status, a.error_code()),
        (403, Some("forbidden")),
        "{}",
        a.body
    );
    assert_eq!(d.snapshot(), before, "refused calls change nothing");

    let ops = tcp(Some("0123456789abcdef0123"));
    let a = ops.post("/v1/subnets", &body).unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    let id = a.body["id"].as_str().unwrap();
    assert_eq!(
        viewer.get(&format!("/v1/subnets/{id}")).unwrap().body,
        a.body
    );

    let audit = d.audit();
    let calls: Vec<(String, String, u64)> = audit
        .iter()
        .map(|r| {
            (
                r["caller"].as_str().unwrap().to_string(),
                r["result"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            ("anonymous".to_string(), "unauthorized".to_string(), 401),
            ("token:viewer".to_string(), "forbidden".to_string(), 403),
            ("token:ops".to_string(), "ok".to_string(), 201),
        ]
    );
    assert!(audit
        .iter()
        .all(|r| r["call"] == "POST /v1/subnets" && r["time_ms"].as_u64() > Some(0)));
    let mode = std::fs::metadata(d.state.join("audit.log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_bad_tokens_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ops short write\n").unwrap();
    let out = Command::new(DAEMON)
        .args(["--socket", dir.path().join("s").to_str().unwrap()])
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .args([
            "--listen-tcp",
            "127.0.0.1:0",
            "--token-file",
            tokens.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens:1"), "{stderr}");
}

#[test]
fn a_restarted_daemon_keeps_its_state_and_runs_every_card_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[]);
    let vol = d.created(
        "/v1/volumes",
        json!({"size_bytes": 8 * GIB, "volume_type": "gp3"}),
    );
    let vol_id = vol["id"].as_str().unwrap().to_string();
    let patched = d.raw(
        "PATCH",
        &format!("/v1/volumes/{vol_id}"),
        r#"{"iops": 3000, "throughput_mibps": 150}"#,
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    d.created("/v1/namespaces", json!({"size_bytes": 16 << 20}));
    let subnet = d.created("/v1/subnets", json!({"cidr": "10.0.1.0/24"}));
    let sg = d.created(
        "/v1/security-groups",
        json!({"ingress": [{"proto": "icmp", "cidr": "0.0.0.0/0"}]}),
    );
    d.created(
        "/v1/enis",
        json!({"subnet_id": subnet["id"], "security_groups": [sg["id"]]}),
    );
    let before = d.snapshot();
    let old_pids: Vec<u64> = d
        .get("/v1/cards")
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(old_pids.len(), 3);

    d.stop();
    for pid in &old_pids {
        assert!(!pid_alive(*pid), "card {pid} outlived the daemon");
    }
    d.spawn();

    let after = d.snapshot();
    for kind in [
        "volumes",
        "namespaces",
        "subnets",
        "security-groups",
        "enis",
        "instances",
    ] {
        assert_eq!(after[kind], before[kind], "{kind} after the restart");
    }
    let cards = d.get("/v1/cards").body;
    let cards = cards.as_array().unwrap();
    assert_eq!(cards.len(), 3, "{cards:?}");
    for card in cards {
        assert_eq!(card["phase"], "healthy", "{card}");
        assert!(!old_pids.contains(&card["pid"].as_u64().unwrap()));
    }
    // The volume's card runs with the modified spec.
    let metrics = d.get(&format!("/v1/cards/blk-{vol_id}/metrics")).body;
    assert_eq!(
        metrics["metrics"]["volume"]["limits"]["baseline_mibps"], 150,
        "{metrics}"
    );
}

#[test]
fn a_crashed_card_is_restarted_and_given_its_configuration_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let vol = d.created(
        "/v1/volumes",
        json!({"size_bytes": 8 * GIB, "volume_type": "gp3"}),
    );
    let id = vol["id"].as_str().unwrap();
    let card = format!("blk-{id}");
    // Modified live: the card's command line still says 3000 IOPS.
    let a = d.raw("PATCH", &format!("/v1/volumes/{id}"), r#"{"iops": 4000}"#);
    assert_eq!(a.status, 200, "{}", a.body);
    let pid = d.card(&card)["pid"].as_u64().unwrap();
    // SAFETY: kill(2) with a pid the daemon reported for its card.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let restarted = d.wait_card(&card, "restarted and healthy", |c| {
        c["restarts"] == 1 && c["phase"] == "healthy" && c["pid"].as_u64() != Some(pid)
    });
    assert!(pid_alive(restarted["pid"].as_u64().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = d.get(&format!("/v1/cards/{card}/metrics")).body;
        if metrics["metrics"]["volume"]["limits"]["baseline_iops"] == 4000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted card was not reconfigured: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = d.get(&format!("/v1/events?resource={card}")).body;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "card-exited",
        "card-restarting",
        "card-started",
        "card-healthy",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
}

/// A VMM started by someone else (QEMU 7.2, paused, no guest) taken over by
/// its QMP socket: a volume hot-plugs into it once; a second attach, here or
/// to another instance, is refused and changes nothing.
#[test]
fn a_registered_vmm_takes_a_hot_plugged_volume_once() {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    assert!(qemu.is_file(), "QEMU 7.2 is needed: cargo xtask deps");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let qmp = dir.path().join("qmp.sock");
    let mut vmm = Command::new(qemu)
        .args([
            "-machine",
            "pc",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-m",
            "128M",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qmp.exists() {
        assert!(
            Instant::now() < deadline,
            "QEMU did not open its QMP socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let relative = d.post("/v1/instances/register", json!({"qmp_socket": "qmp.sock"}));
    assert_eq!(relative.status, 422, "{}", relative.body);
    let instance = d.created(
        "/v1/instances/register",
        json!({"qmp_socket": qmp.to_str().unwrap()}),
    );
    let i = instance["id"].as_str().unwrap();
    assert_eq!(instance["origin"], "registered");
    let vol = d.created(
        "/v1/volumes",
        json!({"size_bytes": 8 * GIB, "volume_type": "gp3"}),
    );
    let v = vol["id"].as_str().unwrap();

    let attached = d.post(
        &format!("/v1/volumes/{v}/attach"),
        json!({"instance_id": i}),
    );
    assert_eq!(attached.status, 200, "{}", attached.body);
    assert_eq!(attached.body["attached_to"], i);
    assert_eq!(
        d.get(&format!("/v1/instances/{i}")).body["volumes"],
        json!([v])
    );

    let before = d.snapshot();
    let again = d.post(
        "/v1/instances/register",
        json!({"qmp_socket": qmp.to_str().unwrap()}),
    );
    assert_eq!(
        (again.status, again.error_code()),
        (409, Some("conflict")),
        "{}",
        again.body
    );
    let twice = d.post(
        &format!("/v1/volumes/{v}/attach"),
        json!({"instance_id": i}),
    );
    assert_eq!(
        (twice.status, twice.error_code()),
        (409, Some("conflict")),
        "{}",
        twice.body
    );
    assert!(twice.body["error"]["message"].as_str().unwrap().contains(i));
    let in_use = d.delete(&format!("/v1/volumes/{v}"));
    assert_eq!(in_use.status, 409, "{}", in_use.body);
    assert_eq!(d.snapshot(), before, "refused attaches change nothing");

    vmm.kill().unwrap();
    vmm.wait().unwrap();
}

/// A daemon killed outright leaves its cards running; the next one ends
/// them before it starts its own, so one card serves each volume.
#[test]
fn a_daemon_killed_outright_has_its_orphaned_cards_ended_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[]);
    let vol = d.created(
        "/v1/volumes",
        json!({"size_bytes": 8 * GIB, "volume_type": "gp3"}),
    );
    let card = format!("blk-{}", vol["id"].as_str().unwrap());
    let old = d.wait_card(&card, "healthy", |c| c["phase"] == "healthy")["pid"]
        .as_u64()
        .unwrap();
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(pid_alive(old), "the card outlives a SIGKILLed daemon");

    d.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(old) {
        assert!(
            Instant::now() < deadline,
            "the orphaned card {old} still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let new = d.wait_card(&card, "healthy again", |c| c["phase"] == "healthy");
    assert_ne!(new["pid"].as_u64(), Some(old));
    let events = d.get(&format!("/v1/events?resource={card}")).body;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "card-orphan-ended"),
        "{events}"
    );
}

// ------------------------------------------------------------------ firmware

/// A card image of the built card binaries at `dir`, signed by `key`.
fn card_image(dir: &Path, key: &SigningKey, version: &str) -> PathBuf {
    let bin = boot::create_bin_dir(dir).unwrap();
    for card in CARDS {
        std::fs::copy(bin_dir().join(card), bin.join(card)).unwrap();
    }
    boot::sign_image(dir, key, version).unwrap();
    dir.to_path_buf()
}

/// A trusted-keys file naming `key`.
fn trusted_keys(dir: &Path, key: &SigningKey) -> PathBuf {
    let path = dir.join("trusted-keys");
    std::fs::write(
        &path,
        format!("{}\n", boot::public_key_hex(&key.verifying_key())),
    )
    .unwrap();
    path
}

/// A volume, a namespace and an ENI: one card of each kind.
fn one_card_of_each_kind(d: &Daemon) {
    d.created(
        "/v1/volumes",
        json!({"size_bytes": 8 * GIB, "volume_type": "gp3"}),
    );
    d.created("/v1/namespaces", json!({"size_bytes": 16 << 20}));
    let subnet = d.created("/v1/subnets", json!({"cidr": "10.0.1.0/24"}));
    let sg = d.created("/v1/security-groups", json!({"ingress": []}));
    d.created(
        "/v1/enis",
        json!({"subnet_id": subnet["id"], "security_groups": [sg["id"]]}),
    );
}

/// Each card's name and pid, from `GET /v1/firmware`.
fn card_pids(firmware: &Value) -> Vec<(String, u64)> {
    firmware["cards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["pid"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_firmware_update_restarts_every_card_on_the_new_image_and_the_boot_log_chains_both() {
    let dir = tempfile::tempdir().unwrap();
    let key = boot::generate_signing_key().unwrap();
    let v1 = card_image(&dir.path().join("v1"), &key, "1.0.0");
    let v2 = card_image(&dir.path().join("v2"), &key, "2.0.0");
    let keys = trusted_keys(dir.path(), &key);
    let mut d = Daemon::start(
        dir.path(),
        &[
            "--trusted-keys",
            keys.to_str().unwrap(),
            "--image",
            v1.to_str().unwrap(),
        ],
    );
    one_card_of_each_kind(&d);
    let before = d.get("/v1/firmware").body;
    assert_eq!(before["mode"], "verified", "{before}");
    assert_eq!(before["version"], "1.0.0");
    assert_eq!(before["image"], v1.to_str().unwrap());
    assert_eq!(before["signer"], boot::public_key_hex(&key.verifying_key()));
    let old = card_pids(&before);
    assert_eq!(old.len(), 3, "{before}");
    for card in before["cards"].as_array().unwrap() {
        assert_eq!(card["version"], "1.0.0", "{card}");
    }

    let updated = d.post("/v1/firmware/update", json!({"image": v2}));
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.body["previous_version"], "1.0.0");
    assert_eq!(updated.body["restarted"].as_array().unwrap().len(), 3);
    let after = d.get("/v1/firmware").body;
    assert_eq!(after["version"], "2.0.0", "{after}");
    assert_eq!(after["image"], v2.to_str().unwrap());
    for (card, (name, old_pid)) in after["cards"].as_array().unwrap().iter().zip(&old) {
        assert_eq!(&card["name"], name.as_str());
        assert_eq!(card["version"], "2.0.0", "{card}");
        assert_eq!(card["phase"], "healthy", "{card}");
        let pid = card["pid"].as_u64().unwrap();
        assert_ne!(pid, *old_pid, "{name} was not restarted");
        assert!(
            !pid_alive(*old_pid),
            "{name}'s old process {old_pid} still runs"
        );
        let events = d.get(&format!("/v1/events?resource={name}")).body;
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "firmware-updated"
                    && e["message"].as_str().unwrap().contains("1.0.0 -> 2.0.0")),
            "{name}: {events}"
        );
    }

    // The measured-boot log: each card started on 1.0.0, then on 2.0.0,
    // in one valid chain.
    let log = d.get("/v1/firmware/boot-log").body;
    assert_eq!(log["verified"], true, "{log}");
    let entries = log["entries"].as_array().unwrap();
    let versions: Vec<&str> = entries
        .iter()
        .map(|e| e["image_version"].as_str().unwrap())
        .collect();
    assert_eq!(
        versions,
        ["1.0.0"; 3]
            .iter()
            .chain(&["2.0.0"; 3])
            .copied()
            .collect::<Vec<_>>()
    );
    for (name, _) in &old {
        for version in ["1.0.0", "2.0.0"] {
            assert!(
                entries
                    .iter()
                    .any(|e| e["card"] == name.as_str() && e["image_version"] == version),
                "{name} {version} not in {log}"
            );
        }
    }
    let cardctl = Command::new(env!("CARGO_BIN_EXE_cardctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["--json", "firmware", "log"])
        .output()
        .unwrap();
    assert!(cardctl.status.success(), "{cardctl:?}");
    let audit = d.audit();
    assert!(
        audit
            .iter()
            .any(|r| r["call"] == "POST /v1/firmware/update" && r["result"] == "ok"),
        "{audit:?}"
    );

    // Desired state: the next daemon runs 2.0.0 again (re-verified),
    // though its command line still names 1.0.0 as the first image.
    d.stop();
    d.spawn();
    let again = d.get("/v1/firmware").body;
    assert_eq!(again["version"], "2.0.0", "{again}");
    for card in again["cards"].as_array().unwrap() {
        assert_eq!(card["version"], "2.0.0", "{card}");
    }
    let log = d.get("/v1/firmware/boot-log").body;
    assert_eq!(log["verified"], true, "{log}");
    assert_eq!(log["entries"].as_array().unwrap().len(), 9, "{log}");
}

#[test]
fn a_tampered_or_unknown_key_image_is_refused_and_every_card_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let key = boot::generate_signing_key().unwrap();
    let v1 = card_image(&dir.path().join("v1"), &key, "1.0.0");
    let keys = trusted_keys(dir.path(), &key);
    let d = Daemon::start(
        dir.path(),
        &[
            "--trusted-keys",
            keys.to_str().unwrap(),
            "--image",
            v1.to_str().unwrap(),
        ],
    );
    one_card_of_each_kind(&d);

    let tampered = card_image(&dir.path().join("tampered"), &key, "2.0.0");
    let mut blk = std::fs::read(tampered.join("bin/vhost-blk-backend")).unwrap();
    let last = blk.len() - 1;
    blk[last] ^= 1;
    std::fs::write(tampered.join("bin/vhost-blk-backend"), blk).unwrap();
    let stranger = boot::generate_signing_key().unwrap();
    let unknown = card_image(&dir.path().join("unknown"), &stranger, "2.0.0");
    let stranger_hex = boot::public_key_hex(&stranger.verifying_key());

    let firmware = d.get("/v1/firmware").body;
    let before = d.snapshot();
    let log_before = d.get("/v1/firmware/boot-log").body;
    for (body, status, names) in [
        (
            json!({"image": tampered}),
            422,
            vec!["bin/vhost-blk-backend", "tampered"],
        ),
        (
            json!({"image": unknown}),
            422,
            vec!["unknown key", stranger_hex.as_str()],
        ),
        (json!({"image": "relative/v2"}), 422, vec!["absolute"]),
        (
            json!({"image": dir.path().join("absent")}),
            422,
            vec!["absent"],
        ),
        (json!({"image": v1, "force": true}), 400, vec!["force"]),
    ] {
        let a = d.post("/v1/firmware/update", body.clone());
        assert_eq!(a.status, status, "{body}: {}", a.body);
        let message = a.body["error"]["message"].as_str().unwrap();
        for name in names {
            assert!(message.contains(name), "{body}: {message}");
        }
        assert_eq!(d.get("/v1/firmware").body, firmware, "{body}");
        assert_eq!(d.snapshot(), before, "{body}");
        assert_eq!(d.get("/v1/firmware/boot-log").body, log_before, "{body}");
    }
    let cardctl = Command::new(env!("CARGO_BIN_EXE_cardctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["firmware", "update"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(cardctl.status.code(), Some(1), "{cardctl:?}");
    assert!(
        String::from_utf8_lossy(&cardctl.stderr).contains("unknown key"),
        "{cardctl:?}"
    );
    assert_eq!(d.get("/v1/firmware").body, firmware);
    let refused = d
        .audit()
        .iter()
        .filter(|r| r["call"] == "POST /v1/firmware/update" && r["status"] != 200)
        .count();
    assert_eq!(refused, 6);
}

#[test]
fn a_daemon_without_trusted_keys_runs_unverified_cards_and_cannot_update_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    one_card_of_each_kind(&d);
    let firmware = d.get("/v1/firmware").body;
    assert_eq!(firmware["mode"], "unverified", "{firmware}");
    assert_eq!(firmware["version"], Value::Null);
    for card in firmware["cards"].as_array().unwrap() {
        assert_eq!(card["version"], Value::Null, "{card}");
    }
    let shown = Command::new(env!("CARGO_BIN_EXE_cardctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["firmware", "show"])
        .output()
        .unwrap();
    assert!(shown.status.success(), "{shown:?}");
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("UNVERIFIED"),
        "{shown:?}"
    );
    let key = boot::generate_signing_key().unwrap();
    let v1 = card_image(&dir.path().join("v1"), &key, "1.0.0");
    let pids = card_pids(&firmware);
    let a = d.post("/v1/firmware/update", json!({"image": v1}));
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--trusted-keys"),
        "{}",
        a.body
    );
    assert_eq!(card_pids(&d.get("/v1/firmware").body), pids);
}

/// Runs the daemon to its exit: status and stderr.
fn daemon_exit(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(DAEMON)
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .arg("--state-dir")
        .arg(dir.join("refused-state"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_daemon_with_trusted_keys_refuses_to_start_without_a_good_image() {
    let dir = tempfile::tempdir().unwrap();
    let key = boot::generate_signing_key().unwrap();
    let keys = trusted_keys(dir.path(), &key);
    let keys = keys.to_str().unwrap();
    let tampered = card_image(&dir.path().join("tampered"), &key, "1.0.0");
    std::fs::write(tampered.join("bin/nvme-emulator"), b"#!/bin/sh\n").unwrap();
    let stranger = boot::generate_signing_key().unwrap();
    let unknown = card_image(&dir.path().join("unknown"), &stranger, "1.0.0");
    let empty_keys = dir.path().join("no-keys");
    std::fs::write(&empty_keys, "# nobody\n").unwrap();
    for (args, says) in [
        (
            vec![
                "--trusted-keys",
                keys,
                "--image",
                tampered.to_str().unwrap(),
            ],
            "bin/nvme-emulator",
        ),
        (
            vec!["--trusted-keys", keys, "--image", unknown.to_str().unwrap()],
            "unknown key",
        ),
        (vec!["--trusted-keys", keys], "--image"),
        (
            vec![
                "--trusted-keys",
                empty_keys.to_str().unwrap(),
                "--image",
                unknown.to_str().unwrap(),
            ],
            "no trusted keys",
        ),
        (vec![], "--trusted-keys"),
        (
            vec!["--trusted-keys", keys, "--card-bin-dir", "/usr/bin"],
            "cannot be used with",
        ),
    ] {
        let (code, stderr) = daemon_exit(dir.path(), &args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!dir.path().join("refused.sock").exists(), "{args:?}");
    }
}

/// A card that does not come up on the new image (here the NVMe card's
/// binary is `false`, signed by the trusted key) puts every card already
/// restarted back on the previous image, and the image in use stays.
#[test]
fn a_card_that_does_not_come_up_on_the_new_image_rolls_the_update_back() {
    let dir = tempfile::tempdir().unwrap();
    let key = boot::generate_signing_key().unwrap();
    let v1 = card_image(&dir.path().join("v1"), &key, "1.0.0");
    let broken = dir.path().join("broken");
    let bin = boot::create_bin_dir(&broken).unwrap();
    for card in CARDS {
        std::fs::copy(bin_dir().join(card), bin.join(card)).unwrap();
    }
    std::fs::copy("/bin/false", bin.join("nvme-emulator")).unwrap();
    boot::sign_image(&broken, &key, "2.0.0-broken").unwrap();
    let keys = trusted_keys(dir.path(), &key);
    let d = Daemon::start(
        dir.path(),
        &[
            "--trusted-keys",
            keys.to_str().unwrap(),
            "--image",
            v1.to_str().unwrap(),
        ],
    );
    one_card_of_each_kind(&d);
    let before = d.get("/v1/firmware").body;

    let a = d.post("/v1/firmware/update", json!({"image": broken}));
    assert_eq!(a.status, 503, "{}", a.body);
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("nvme-ns-") && message.contains("3 card(s) back on 1.0.0"),
        "{message}"
    );
    let after = d.get("/v1/firmware").body;
    assert_eq!(after["version"], "1.0.0", "{after}");
    assert_eq!(after["image"], before["image"]);
    for card in after["cards"].as_array().unwrap() {
        assert_eq!(card["version"], "1.0.0", "{card}");
        assert_eq!(card["phase"], "healthy", "{card}");
    }
    // The blk and net cards went to 2.0.0-broken and back: new pids.
    for ((name, old), (_, new)) in card_pids(&before).iter().zip(card_pids(&after)) {
        assert_ne!(*old, new, "{name}");
    }
    let events = d.get("/v1/events?resource=firmware").body;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "update-failed"),
        "{events}"
    );
}
