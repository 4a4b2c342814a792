//! mgmt-channel: cardsim's control plane, the only way a card is configured.
//!
//! The daemon (`mgmt-channel`) keeps the desired state of a host's cloud
//! resources in an embedded SQLite database under `--state-dir` and makes
//! the host match it: one block card (`vhost-blk-backend`) per volume, one
//! NVMe card (`nvme-emulator`) per instance-store namespace, one networking
//! card (`vhost-net-backend`) serving every ENI, and QEMU guests wired to
//! them. It answers REST/JSON on a unix socket (0600) and, optionally, on
//! TCP for holders of a bearer token. `cardctl` is its CLI.
//!
//! Design, in brief:
//! - [`server`]: routes, strict request parsing (unknown fields refused,
//!   errors name the field), callers (SO_PEERCRED uid on the unix socket,
//!   token name on TCP), read-only tokens, the audit log of every mutating
//!   call. The OpenAPI document is generated from the handlers (utoipa)
//!   and checked in as `openapi.json`; a unit test fails when it drifts.
//! - [`daemon`]: the operations. Each checks the whole request before it
//!   touches anything, so a refused request changes nothing; mutations are
//!   serialized; the database is written only after the cards and the VMM
//!   did what was asked.
//! - Cards are started and watched by `host_runtime::card::Supervisor`
//!   (restart with backoff); every card event is recorded, and a card that
//!   becomes healthy is given the desired state over its agent socket
//!   (`card_firmware::agent`, versioned JSON lines): a volume modified
//!   since the card's command line was made gets `volume_modify` again.
//! - Live changes go over the agent: modify-volume → `volume_modify`,
//!   security-group rules → `security_group_put`, an ENI's groups →
//!   `set_security_groups`. An ENI created or deleted changes the
//!   networking card's port set: its VPC config is regenerated, checked
//!   with `--check-config`, and the card restarted (guests reconnect).
//! - Instances are QEMU guests launched with `host_runtime::instance`, or
//!   VMMs registered by their QMP socket; volumes hot-plug over QMP.
//! - Firmware: with `--trusted-keys` cards run only from a verified card
//!   image (`card_firmware::boot`) as `CardProgram::Image`, every start
//!   measured into `STATE/boot.log`; the image in use is a setting in the
//!   database. `POST /v1/firmware/update` verifies a new image, then
//!   restarts the cards on it one at a time (rolled back if one fails).
//!   Without keys, plain binaries from an explicit `--card-bin-dir`.
//! - On restart the daemon reconciles: every volume's, namespace's and the
//!   ENIs' cards are started again, and instances are found again by their
//!   QMP sockets (launched guests outlive a daemon restart).

pub mod auth;
pub mod client;
pub mod daemon;
pub mod error;
pub mod model;
pub mod netconfig;
pub mod server;
pub mod store;
