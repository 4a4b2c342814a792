//! Every card's agent socket, against the real card processes (jailed when
//! the tests run as root): the hello, and the live changes the control plane
//! makes through it — a block volume's performance, a networking card's
//! security groups, an NVMe card's faults. A refused change changes nothing.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use card_firmware::agent::{AgentClient, AgentError, CardKind};
use cardsim_tests::block_card::{BlockCard, AGENT_TIMEOUT};
use cardsim_tests::net_card::NetCard;
use cardsim_tests::nvme_card::NvmeCard;
use cardsim_tests::wait_for_socket;
use serde_json::{json, Value};

/// The card's error code, or a panic naming what came back instead.
fn refused(result: Result<Value, AgentError>) -> (String, String) {
    match result {
        Err(AgentError::Card { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A sparse 100 GiB file: a gp3 volume whose limits are the type's defaults.
fn backing(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("vol.img");
    fs::File::create(&path).unwrap().set_len(100 << 30).unwrap();
    path
}

#[test]
fn the_block_card_changes_its_volume_live() {
    let dir = tempfile::tempdir().unwrap();
    let card = BlockCard::start(
        dir.path(),
        &backing(dir.path()),
        &["--volume-type", "gp3", "--no-sandbox"],
    )
    .unwrap();
    wait_for_socket(&card.agent, None, Duration::from_secs(10)).unwrap();
    let mut agent = AgentClient::connect(&card.agent, AGENT_TIMEOUT).unwrap();
    let hello = agent.card();
    assert_eq!(hello.card, CardKind::Blk);
    assert_eq!((hello.version, hello.firmware.as_str()), (1, "0.1.0"));
    assert_eq!(hello.pid, card.process.id());
    assert_eq!(agent.call("health", json!({})).unwrap()["status"], "ok");

    let volume =
        |agent: &mut AgentClient| agent.call("metrics", json!({})).unwrap()["volume"].clone();
    let before = volume(&mut agent);
    assert_eq!(before["volume_type"], "gp3", "{before}");
    assert_eq!(before["limits"]["baseline_iops"], 3000, "{before}");
    assert_eq!(before["limits"]["baseline_mibps"], 125, "{before}");

    // Live: the answer and the card's metrics show the new allowance.
    let answer = agent
        .call("volume_modify", json!({"iops": 6000, "throughput": 500}))
        .unwrap();
    assert_eq!(answer["limits"]["baseline_iops"], 6000, "{answer}");
    let after = volume(&mut agent);
    assert_eq!(after["limits"]["baseline_iops"], 6000, "{after}");
    assert_eq!(after["limits"]["baseline_mibps"], 500, "{after}");
    assert_eq!(
        (after["iops"].clone(), after["throughput"].clone()),
        (json!(6000), json!(500))
    );

    // Above gp3's maximum: refused naming the field, nothing changed, and
    // the connection still serves.
    let (code, message) = refused(agent.call("volume_modify", json!({"iops": 20000})));
    assert_eq!(code, "invalid");
    assert!(message.contains("`iops`"), "{message}");
    for bad in [
        json!({"volume_type": "gp9"}),
        json!({"volume_type": "gp2", "iops": 3000}),
        json!({"throughput": 2000}),
    ] {
        let (code, message) = refused(agent.call("volume_modify", bad.clone()));
        assert_eq!(code, "invalid", "{bad}: {message}");
    }
    for bad in [json!({"iopz": 4000}), json!({}), json!({"iops": "many"})] {
        let (code, message) = refused(agent.call("volume_modify", bad.clone()));
        assert_eq!(code, "bad_request", "{bad}: {message}");
    }
    assert_eq!(volume(&mut agent), after);

    // Another type, live: io2 at 100 GiB takes up to 50,000 IOPS.
    let answer = agent
        .call(
            "volume_modify",
            json!({"volume_type": "io2", "iops": 20000}),
        )
        .unwrap();
    assert_eq!(answer["volume_type"], "io2", "{answer}");
    assert_eq!(volume(&mut agent)["limits"]["baseline_iops"], 20000);
}

#[test]
fn the_block_card_jailed_still_answers_its_agent() {
    // As root the card jails itself before it serves its agent: the protocol
    // must live within the sandbox's system calls.
    let dir = tempfile::tempdir().unwrap();
    let card =
        BlockCard::start(dir.path(), &backing(dir.path()), &["--volume-type", "gp3"]).unwrap();
    wait_for_socket(&card.agent, None, Duration::from_secs(10)).unwrap();
    let mut agent = AgentClient::connect(&card.agent, AGENT_TIMEOUT).unwrap();
    agent.call("health", json!({})).unwrap();
    agent.call("volume_modify", json!({"iops": 4000})).unwrap();
    let id = agent
        .call("fault_add", json!({"kind": "latency", "fixed_ms": 1}))
        .unwrap()["id"]
        .clone();
    agent.call("fault_clear", json!({"id": id})).unwrap();
    assert_eq!(
        agent.call("metrics", json!({})).unwrap()["volume"]["iops"],
        4000
    );
}

const VPC: &str = r#"
[vpc]
cidr = "10.0.0.0/16"
vni = 100
[[subnet]]
id = "subnet-a"
cidr = "10.0.1.0/24"
[[security_group]]
id = "sg-web"
ingress = [ { proto = "tcp", ports = "5201", cidr = "10.0.0.0/16" } ]
[[eni]]
id = "eni-0a1"
socket = "$DIR/eni-0a1.sock"
mac = "02:00:0a:00:01:0a"
ip = "10.0.1.10"
subnet = "subnet-a"
security_groups = ["sg-web"]
"#;

#[test]
fn the_networking_card_puts_security_groups_live() {
    let card = NetCard::start(VPC, &[]).unwrap();
    let mut agent = AgentClient::connect(&card.agent, AGENT_TIMEOUT).unwrap();
    assert_eq!(agent.card().card, CardKind::Net);
    assert_eq!(agent.card().pid, card.process.id());

    let assign = |agent: &mut AgentClient, groups: &[&str]| {
        agent.call(
            "set_security_groups",
            json!({"eni": "eni-0a1", "groups": groups}),
        )
    };
    // sg-db does not exist yet.
    assert_eq!(refused(assign(&mut agent, &["sg-db"])).0, "not_found");

    // A bad rule is refused with the config's own message, and defines nothing.
    let (code, message) = refused(agent.call(
        "security_group_put",
        json!({"id": "sg-db", "ingress": [{"proto": "tcp", "ports": "70000", "cidr": "10.0.0.0/16"}]}),
    ));
    assert_eq!(code, "invalid");
    assert!(
        message.contains("security_group (sg-db).ingress[0].ports") && message.contains("70000"),
        "{message}"
    );
    assert_eq!(refused(assign(&mut agent, &["sg-db"])).0, "not_found");
    for (bad, expected) in [
        (
            json!({"id": "sg-db", "ingress": [{"proto": "tcp", "cidr": "10.0.0.0/16", "colour": 1}]}),
            "bad_request",
        ),
        (json!({"ingress": []}), "bad_request"),
        (json!({"id": "sg db"}), "invalid"),
        (
            json!({"id": "sg-db", "egress": [{"proto": "udp", "source_group": "sg-nope"}]}),
            "invalid",
        ),
    ] {
        let (code, message) = refused(agent.call("security_group_put", bad.clone()));
        assert_eq!(code, expected, "{bad}: {message}");
    }

    // Defined live, it can be assigned; a rule may name the group itself.
    let answer = agent
        .call(
            "security_group_put",
            json!({"id": "sg-db", "ingress": [
                {"proto": "tcp", "ports": "5432", "source_group": "sg-db"},
                {"proto": "icmp", "cidr": "10.0.1.0/24"}
            ]}),
        )
        .unwrap();
    assert_eq!(answer, json!({"id": "sg-db"}));
    assign(&mut agent, &["sg-web", "sg-db"]).unwrap();
    // Replacing a group in use is allowed too.
    agent
        .call(
            "security_group_put",
            json!({"id": "sg-web", "ingress": [], "egress": []}),
        )
        .unwrap();
    agent.call("metrics", json!({})).unwrap();
}

#[test]
fn the_nvme_card_answers_its_agent_and_the_old_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ns1 = dir.path().join("ns1.img");
    let ns2 = dir.path().join("ns2.img");
    for ns in [&ns1, &ns2] {
        fs::File::create(ns).unwrap().set_len(16 << 20).unwrap();
    }
    let socket = dir.path().join("agent.sock");
    // `--control`, as old scripts spell it, is still the agent socket.
    let card = NvmeCard::start(
        dir.path(),
        &[ns1.to_str().unwrap(), ns2.to_str().unwrap()],
        &["--control", socket.to_str().unwrap()],
    )
    .unwrap();
    wait_for_socket(&socket, None, Duration::from_secs(10)).unwrap();
    let mut agent = AgentClient::connect(&socket, AGENT_TIMEOUT).unwrap();
    assert_eq!(agent.card().card, CardKind::Nvme);
    assert_eq!(agent.card().pid, card.process.id());
    assert_eq!(agent.call("health", json!({})).unwrap()["status"], "ok");
    assert!(agent.call("metrics", json!({})).unwrap().is_object());

    let id = agent
        .call(
            "fault_add",
            json!({"kind": "io_error", "scope": {"range": [0, 1048576]}}),
        )
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let list = agent.call("fault_list", json!({})).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    // A kind the NVMe card cannot apply is refused and adds nothing.
    let (code, message) = refused(agent.call("fault_add", json!({"kind": "power_cut"})));
    assert_eq!(code, "invalid", "{message}");
    assert_eq!(agent.call("fault_list", json!({})).unwrap(), list);
    // One id clears it from every namespace.
    agent.call("fault_clear", json!({"id": id})).unwrap();
    assert_eq!(
        refused(agent.call("fault_clear", json!({"id": id}))).0,
        "not_found"
    );
    assert_eq!(agent.call("fault_list", json!({})).unwrap(), json!([]));
    assert_eq!(
        refused(agent.call("volume_modify", json!({"iops": 1}))).0,
        "bad_request"
    );
}
