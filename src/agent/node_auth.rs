//! Authenticated SuperNodes (#17 item 4), with Flower 1.25's node authentication.
//!
//! A SuperNode's agent makes its own P-256 key pair at first boot (the private key never
//! leaves the VM: `certs/supernode.key`, 0640, group Flower), gives Flower the private key
//! (`flower-supernode --auth-supernode-private-key`) and publishes the public key as
//! `FL_NODE_PUBKEY` ([`crate::protocol::node_key`]). The SuperLink runs with
//! `--enable-supernode-auth`, so Flower refuses every SuperNode whose key was not registered
//! through its Control API (`No SuperNode found with the given public key.`); its agent
//! registers the keys of the SuperNode VMs its service has now, and unregisters the keys of
//! nodes that left the service — so a replaced node's key stops working. SuperNodes of the
//! cluster in other sites (another OpenNebula zone: this zone's OneGate cannot see them) are
//! handed over by the controller as `FL_SITE_NODE_KEYS` on the SuperLink's own VM, signed
//! with the cluster's key ([`site_keys`]): verified, they are wanted like the service's own,
//! registered and recorded as ours, and unregistered once the controller's set drops them.
//!
//! Owns: key generation and the key file, the wanted-vs-registered diff ([`plan`]), and
//! running `flwr supernode register|unregister` (no shell; the Flower user; the allow-listed
//! environment; a 60 s limit).
//! Must not: trust memory for what Flower has registered (the SuperLink's state is read each
//! time), unregister on a partial view (a failed OneGate read, an unreadable key, a site-key
//! set that is unreadable or not signed by the controller), register a key of a set the
//! controller did not sign for this VM, or
//! unregister a key it did not register itself: an operator's registration (a SuperNode in
//! another site, docs/multi-site.md) is not the agent's to revoke.
//!
//! Guarantees: [`plan`] registers exactly the wanted keys Flower does not hold and
//! unregisters exactly the held keys this agent registered that nobody wants any more, and
//! nothing at all is unregistered when the view is partial
//! (`tests::the_diff_registers_the_missing_and_unregisters_only_its_own_departed`). The
//! agent records a key as its own ([`owned_file`], root's) before it registers it, so a
//! crash between the two leaves at most a recorded key Flower never held, which is harmless.
//! Registration is idempotent: a key Flower holds is never registered again, and a restart
//! of the agent starts from Flower's state.
//! Assumptions (flwr 1.25, `superlink/servicer/control/control_servicer.py`, `cli/supernode/`):
//! `flwr supernode register` reads an OpenSSH public key of a NIST curve and stores it as PEM
//! SubjectPublicKeyInfo in the `node` table's `public_key`; `unregister` sets the row's
//! `status` to `unregistered` and its key can never be registered again (`PUBLIC_KEY_ALREADY_
//! IN_USE`), which is fine: a replacement VM makes a new key. Both exit 0 even on failure:
//! the JSON answer's `success` says. `flower-supernode` reads an OpenSSH private key.
//! Caveats: a peer can rewrite `FL_SITE_NODE_KEYS` through OneGate. It cannot add a key
//! (the signature binds this VM and the exact set), but it can erase the attribute or replay
//! an older set the controller signed for this VM, and so get a remote key unregistered —
//! for good, as Flower never registers an unregistered key again: a lock-out of that remote
//! SuperNode, the same class as a peer overwriting a local node's `FL_NODE_PUBKEY`
//! ([`crate::protocol::node_key`]). The controller writes its set again when the verified
//! value differs from the wanted one, but the revoked key stays revoked.
//! Caveats: needs TLS (Flower refuses node auth without it) and persistent state (the
//! registered keys are read from Flower's database); otherwise node authentication stays
//! off. On the Docker runtime the SuperNode's key file alone is mounted read-only into its
//! container, and the SuperLink's agent runs `docker exec flower-superlink flwr supernode …`
//! (the `flwr/superlink` image is `flwr/base` with `flwr` installed in its virtualenv, on
//! `PATH`: Flower's `src/docker/base/ubuntu/Dockerfile`, `src/docker/superlink/Dockerfile`),
//! its project directory mounted at `/app/node-auth`. That runtime is checked by its argv
//! only (`flwr_runs_in_the_superlink_container_on_docker_and_from_the_venv_on_process`,
//! `flower::tests::node_auth_in_docker_argv`): not run against a Docker engine here (none on
//! this machine).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

use super::context::{Config, Role, Runtime};
use super::error::IoError;
use super::flower::FileView;
use super::paths::Paths;
use crate::one::onegate::GateService;
use crate::protocol::node_key::NodePublicKey;

/// Why a key could not be made, read or registered.
#[derive(Debug, thiserror::Error)]
pub enum NodeAuthError {
    /// A file.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The key generator failed.
    #[error("generating the SuperNode key: {0}")]
    Generate(String),
    /// The key file is not one this agent wrote.
    #[error("{}: not an OpenSSH P-256 key this agent wrote", path.display())]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
    },
    /// Flower's state could not be read.
    #[error("reading the registered SuperNode keys from {}: {source}", path.display())]
    State {
        /// The database.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// `flwr` could not be run or did not answer.
    #[error("flwr supernode {verb}: {why}")]
    Flwr {
        /// register or unregister.
        verb: &'static str,
        /// What went wrong (Flower's message, bounded).
        why: String,
    },
}

/// What Flower 1.25's SuperNode logs when the SuperLink does not know its key.
pub const REFUSED: &str = "No SuperNode found with the given public key.";

/// Whether node authentication is on for this node (see the module's Caveats): the
/// SuperLink enforces it; a SuperNode makes, publishes and mounts its key (and presents it
/// only as [`supernode_presents_key`] says).
pub fn enabled(cfg: &Config, role: Role) -> bool {
    cfg.tls && (role == Role::Supernode || cfg.persistent_state)
}

/// Whether a SuperNode gives Flower its key: it has one and its SuperLink authenticates
/// SuperNodes, as the SuperLink's `FL_NODE_AUTH` says (`discovered`; a SuperLink without
/// persistent state does not, and Flower 1.25 refuses a key it was not told about). A
/// SuperLink given by address alone (another site: no OneGate view of it) is taken to
/// authenticate, as a controller-managed one with persistent state does.
pub fn supernode_presents_key(cfg: &Config, discovered: Option<bool>) -> bool {
    enabled(cfg, Role::Supernode) && discovered.unwrap_or(true)
}

/// The `flwr` project directory the SuperLink's agent registers keys through (root's, with
/// Flower's group; its `.flwr/` is Flower's).
pub fn project_dir(paths: &Paths) -> PathBuf {
    paths.base().join("node-auth")
}

/// The SuperNode's private key file (Flower reads it; nobody else does).
pub fn key_file(paths: &Paths) -> PathBuf {
    paths.certs_dir().join("supernode.key")
}

/// The SuperNode's key: read from [`key_file`] when it is there, else made and written
/// (0640, group Flower). Returns the public half.
pub fn ensure_key(paths: &Paths) -> Result<NodePublicKey, NodeAuthError> {
    let path = key_file(paths);
    match std::fs::read(&path) {
        Ok(text) => public_of_file(&text).ok_or(NodeAuthError::BadKeyFile { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (public, private) = generate()?;
            super::tls::write_server_key(&path, &private)?;
            super::privilege::share_with_flower(&paths.certs_dir())
                .map_err(|e| NodeAuthError::Generate(e.to_string()))?;
            Ok(public)
        }
        Err(e) => Err(IoError::at(&path)(e).into()),
    }
}

/// The public half of the key in [`key_file`], if there is one of ours.
pub fn public_key(paths: &Paths) -> Option<NodePublicKey> {
    public_of_file(&std::fs::read(key_file(paths)).ok()?)
}

/// A new P-256 key pair: the public key and the private key as an OpenSSH private key file
/// (unencrypted: Flower reads it with no passphrase; the file mode protects it).
pub fn generate() -> Result<(NodePublicKey, String), NodeAuthError> {
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING as ALG};
    let rng = ring::rand::SystemRandom::new();
    let fail = |e: &dyn std::fmt::Display| NodeAuthError::Generate(e.to_string());
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ALG, &rng).map_err(|e| fail(&e))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ALG, pkcs8.as_ref(), &rng).map_err(|e| fail(&e))?;
    let public = NodePublicKey::from_point(pair.public_key().as_ref())
        .ok_or_else(|| fail(&"not an uncompressed point"))?;
    // ring's P-256 PKCS#8 holds the ECPrivateKey `version 1, OCTET STRING (32) d`.
    let der = pkcs8.as_ref();
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .ok_or_else(|| fail(&"unexpected PKCS#8 layout"))?;
    let d = der
        .get(at + 5..at + 37)
        .ok_or_else(|| fail(&"unexpected PKCS#8 layout"))?;
    let mut check = [0u8; 4];
    ring::rand::SecureRandom::fill(&rng, &mut check).map_err(|e| fail(&e))?;
    Ok((public.clone(), openssh_private(&public, d, check)))
}

fn put(buf: &mut Vec<u8>, part: &[u8]) {
    buf.extend_from_slice(&(part.len() as u32).to_be_bytes());
    buf.extend_from_slice(part);
}

const OPENSSH_MAGIC: &[u8] = b"openssh-key-v1\0";
const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
const END: &str = "-----END OPENSSH PRIVATE KEY-----";

/// OpenSSH's `PROTOCOL.key` format, unencrypted, one key.
fn openssh_private(public: &NodePublicKey, d: &[u8], check: [u8; 4]) -> String {
    let blob = public.ssh_blob();
    let mut private = Vec::new();
    private.extend_from_slice(&check);
    private.extend_from_slice(&check);
    private.extend_from_slice(&blob[..blob.len() - 69]); // type and curve
    put(&mut private, public.point());
    // mpint: no leading zeros, a zero byte before a set high bit.
    let d = &d[d.iter().position(|b| *b != 0).unwrap_or(d.len())..];
    let mut mpint = Vec::with_capacity(33);
    if d.first().is_some_and(|b| b & 0x80 != 0) {
        mpint.push(0);
    }
    mpint.extend_from_slice(d);
    put(&mut private, &mpint);
    put(&mut private, b""); // comment
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    let mut out = OPENSSH_MAGIC.to_vec();
    put(&mut out, b"none");
    put(&mut out, b"none");
    put(&mut out, b"");
    out.extend_from_slice(&1u32.to_be_bytes());
    put(&mut out, &blob);
    put(&mut out, &private);
    let b64 = base64::engine::general_purpose::STANDARD.encode(out);
    let mut text = format!("{BEGIN}\n");
    for line in b64.as_bytes().chunks(70) {
        text.push_str(std::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(END);
    text.push('\n');
    text
}

/// The public key of an OpenSSH private key file of ours (its unencrypted public blob).
fn public_of_file(text: &[u8]) -> Option<NodePublicKey> {
    if text.len() > 4096 {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?.trim();
    let body = text.strip_prefix(BEGIN)?.strip_suffix(END)?;
    let b64: String = body.split_whitespace().collect();
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let mut rest = raw.strip_prefix(OPENSSH_MAGIC)?;
    let (cipher, kdf, _opts) = (take(&mut rest)?, take(&mut rest)?, take(&mut rest)?);
    if cipher != b"none" || kdf != b"none" {
        return None;
    }
    let (count, tail) = rest.split_first_chunk::<4>()?;
    if u32::from_be_bytes(*count) != 1 {
        return None;
    }
    rest = tail;
    let blob = take(&mut rest)?;
    let line = format!(
        "ecdsa-sha2-nistp256 {}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    );
    NodePublicKey::parse(&line).ok()
}

/// One length-prefixed `string` of an OpenSSH key, taken off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, tail) = rest.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    let f = tail.get(..len)?;
    *rest = tail.get(len..)?;
    Some(f)
}

/// A node Flower holds registered (any status but `unregistered`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Flower's node id.
    pub node_id: u64,
    /// Its key; `None` when it is not a P-256 key (not one of ours).
    pub key: Option<NodePublicKey>,
}

/// What the SuperLink's agent does to make Flower's registrations match the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `flwr supernode register` this key.
    Register(NodePublicKey),
    /// `flwr supernode unregister` this node (its key is no longer wanted).
    Unregister {
        /// Flower's node id.
        node_id: u64,
        /// Its key, when readable (for the log).
        key: Option<NodePublicKey>,
    },
}

/// The registrations to add and remove. `wanted`: the keys of the service's SuperNode VMs;
/// `owned`: the keys this agent registered ([`read_owned`]); `complete`: whether every
/// SuperNode VM's key was read (a VM with no key yet is complete; one with an unreadable key
/// is not). Only owned keys are ever unregistered. Pure.
pub fn plan(
    wanted: &BTreeSet<NodePublicKey>,
    held: &[Registered],
    owned: &BTreeSet<NodePublicKey>,
    complete: bool,
) -> Vec<Action> {
    let held_keys: BTreeSet<&NodePublicKey> = held.iter().filter_map(|r| r.key.as_ref()).collect();
    let mut actions: Vec<Action> = wanted
        .iter()
        .filter(|k| !held_keys.contains(k))
        .cloned()
        .map(Action::Register)
        .collect();
    if complete {
        actions.extend(
            held.iter()
                .filter(|r| {
                    r.key
                        .as_ref()
                        .is_some_and(|k| owned.contains(k) && !wanted.contains(k))
                })
                .map(|r| Action::Unregister {
                    node_id: r.node_id,
                    key: r.key.clone(),
                }),
        );
    }
    actions
}

/// Where the agent records the keys it registered (in its root-only config directory:
/// neither Flower nor a peer can add a key there to get it revoked).
pub fn owned_file(paths: &Paths) -> PathBuf {
    paths.config_dir().join("node-keys-registered")
}

/// Most keys [`read_owned`] takes (far above any SuperNode role's history between restarts).
const MAX_OWNED: usize = 4096;

/// The keys this agent registered: one OpenSSH public-key line each; unreadable lines are
/// skipped (a key nobody can name is never unregistered), none when there is no file.
pub fn read_owned(paths: &Paths) -> BTreeSet<NodePublicKey> {
    std::fs::read_to_string(owned_file(paths))
        .unwrap_or_default()
        .lines()
        .take(MAX_OWNED)
        .filter_map(|l| NodePublicKey::parse(l).ok())
        .collect()
}

/// Records `owned` ([`read_owned`]); atomic, 0600.
pub fn write_owned(paths: &Paths, owned: &BTreeSet<NodePublicKey>) -> Result<(), NodeAuthError> {
    let text: String = owned.iter().map(|k| format!("{}\n", k.encode())).collect();
    super::tls::write_file(&owned_file(paths), text.as_bytes(), 0o600)?;
    Ok(())
}

/// Most `flwr` runs per supervisor round.
pub const ACTIONS_PER_ROUND: usize = 4;

/// The keys the service's SuperNode VMs publish, and whether that view is complete: every
/// listed node has its VM document with an `FL_NODE_PUBKEY` that parses. A VM with no key
/// (not published yet, or a OneGate that left the user templates out) makes the view
/// partial too: unregistering then waits, rather than act on what may be a blind spot.
/// No SuperNode role is no complete view either.
pub fn wanted(service: &GateService) -> (BTreeSet<NodePublicKey>, bool) {
    let Some(role) = service.role(Role::Supernode.as_str()) else {
        return (BTreeSet::new(), false);
    };
    let mut keys = BTreeSet::new();
    let mut complete = true;
    for node in &role.nodes {
        let key = node
            .vm
            .as_ref()
            .and_then(|vm| vm.attr(crate::protocol::FL_NODE_PUBKEY))
            .and_then(|v| NodePublicKey::parse(v).ok());
        match key {
            Some(k) => {
                keys.insert(k);
            }
            None => complete = false,
        }
    }
    (keys, complete)
}

/// The other sites' SuperNode keys the controller handed this SuperLink: `FL_SITE_NODE_KEYS`
/// and `FL_SITE_NODE_KEYS_SIG` of its own VM (`keys`, `sig`, untrusted), checked against
/// `controller_key` (`ONEAPP_FL_CONTROLLER_KEY`) for `vm_id`. No attribute: none (a
/// single-site cluster). `Err` (why, for the log): the set is unreadable or not the
/// controller's — ignored, and the view is partial (nothing unregistered). Pure.
pub fn site_keys(
    keys: Option<&str>,
    sig: Option<&str>,
    controller_key: Option<&[u8]>,
    vm_id: Option<u64>,
) -> Result<BTreeSet<NodePublicKey>, &'static str> {
    let Some(keys) = keys else {
        return Ok(BTreeSet::new());
    };
    let keys = crate::protocol::node_key::parse_set(keys)
        .map_err(|_| "FL_SITE_NODE_KEYS is not a valid key set")?;
    let (Some(pk), Some(id)) = (controller_key, vm_id) else {
        return Err(
            "no ONEAPP_FL_CONTROLLER_KEY (or VM id) in the context to check FL_SITE_NODE_KEYS_SIG",
        );
    };
    match sig {
        None => Err("FL_SITE_NODE_KEYS_SIG is missing"),
        Some(sig) if crate::protocol::signing::verify_site_keys(pk, sig, id, &keys) => Ok(keys),
        Some(_) => {
            Err("FL_SITE_NODE_KEYS_SIG is not the controller's signature of this set for this VM")
        }
    }
}

/// The nodes Flower's state `db` holds registered (read-only; bounded).
pub fn registered(db: &Path) -> Result<Vec<Registered>, NodeAuthError> {
    let fail = |source| NodeAuthError::State {
        path: db.to_path_buf(),
        source,
    };
    let conn = super::linkstate::open(db).map_err(fail)?;
    let mut stmt = conn
        .prepare(
            "SELECT node_id, public_key FROM node WHERE status != 'unregistered' \
             ORDER BY node_id LIMIT ?1",
        )
        .map_err(fail)?;
    let rows = stmt
        .query_map([crate::protocol::nodes::MAX_NODES as i64 * 4], |r| {
            Ok(Registered {
                // Flower's int64_to_uint64: the two's-complement reinterpretation.
                node_id: r.get::<_, i64>(0)? as u64,
                key: r
                    .get::<_, Option<Vec<u8>>>(1)?
                    .and_then(|pem| NodePublicKey::from_spki_pem(&pem)),
            })
        })
        .map_err(fail)?;
    rows.collect::<Result<_, _>>().map_err(fail)
}

/// How one `flwr supernode register|unregister` runs: `argv` (no shell) and the project
/// file it reads (`pyproject.toml` in [`project_dir`]: the federation `local`, the Control
/// API's address and the CA, as Flower sees them). Process runtime: the image's `flwr`,
/// dialling the Control API's host bind. Docker runtime: `docker exec` in the SuperLink's
/// container (the `flwr/superlink` image installs the `flwr` CLI with Flower, in its
/// virtualenv on `PATH`), dialling 127.0.0.1 inside it, the project mounted at
/// [`FileView::container`]'s `node_auth_dir`. Pure.
pub fn flwr_argv(cfg: &Config, paths: &Paths, action: &Action) -> (Vec<String>, String) {
    let docker = cfg.runtime == Runtime::Docker;
    let (view, control) = if docker {
        let view = FileView::container();
        let control = crate::protocol::endpoint::HostPort::from_ip(
            std::net::IpAddr::from([127, 0, 0, 1]),
            cfg.control_port,
        );
        (view, control)
    } else {
        let control = crate::protocol::endpoint::HostPort::from_ip(
            super::flower::Binds::host(cfg).control,
            cfg.control_port,
        );
        (FileView::host(paths), control)
    };
    let ca = format!("{}/ca.crt", view.certs_dir);
    let project = format!(
        "[project]\nname = \"node-auth\"\nversion = \"1.0.0\"\n\n[tool.flwr.app]\npublisher = \"flower-agent\"\n\n\
         [tool.flwr.app.components]\nserverapp = \"none:app\"\nclientapp = \"none:app\"\n\n\
         [tool.flwr.federations]\ndefault = \"local\"\n\n[tool.flwr.federations.local]\n\
         address = \"{control}\"\nroot-certificates = {}\n",
        toml_edit::Value::from(ca)
    );
    let dir = view.node_auth_dir;
    let (verb, target) = match action {
        Action::Register(_) => ("register", format!("{dir}/node.pub")),
        Action::Unregister { node_id, .. } => ("unregister", node_id.to_string()),
    };
    let mut argv: Vec<String> = if docker {
        vec![
            "/usr/bin/docker".into(),
            "exec".into(),
            "-w".into(),
            dir.clone(),
            super::flower::unit_name(Role::Superlink),
            "flwr".into(),
        ]
    } else {
        let bin_dir = cfg
            .flower_bin_dir
            .clone()
            .unwrap_or_else(|| paths.venv_bin());
        vec![bin_dir.join("flwr").display().to_string()]
    };
    argv.extend(["supernode".into(), verb.into(), target, dir]);
    argv.extend(["local".into(), "--format".into(), "json".into()]);
    (argv, project)
}

/// Runs [`flwr_argv`] against the SuperLink's own Control API. The project directory is
/// root's with Flower's group (root writes the files in a directory Flower cannot change,
/// under root-owned parents), and only its `.flwr/`, where `flwr` keeps credentials, is
/// Flower's. Process runtime: as the Flower user with the allow-listed environment; Docker:
/// `docker exec` (root's, as the agent), which runs as the container's user.
pub async fn apply(cfg: &Config, paths: &Paths, action: &Action) -> Result<(), NodeAuthError> {
    let verb = match action {
        Action::Register(_) => "register",
        Action::Unregister { .. } => "unregister",
    };
    let fail = |why: String| NodeAuthError::Flwr { verb, why };
    let dir = project_dir(paths);
    super::privilege::share_with_flower(&dir).map_err(|e| fail(e.to_string()))?;
    super::privilege::give_to_flower(&dir.join(".flwr")).map_err(|e| fail(e.to_string()))?;
    let (argv, project) = flwr_argv(cfg, paths, action);
    super::tls::write_file(&dir.join("pyproject.toml"), project.as_bytes(), 0o644)?;
    if let Action::Register(key) = action {
        let text = format!("{}\n", key.encode());
        super::tls::write_file(&dir.join("node.pub"), text.as_bytes(), 0o644)?;
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    if cfg.runtime == Runtime::Docker {
        cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    } else {
        if let Some((uid, gid)) = super::privilege::run_as() {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        let bin_dir = cfg
            .flower_bin_dir
            .clone()
            .unwrap_or_else(|| paths.venv_bin());
        cmd.envs(super::process::process_env(
            cfg,
            Role::Superlink,
            &Default::default(),
            paths,
            &bin_dir,
        ));
    }
    cmd.current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| fail("no answer within 60 s".into()))?
        .map_err(|e| fail(format!("{}: {e}", argv[0])))?;
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        fail(format!(
            "no JSON answer ({}): {}",
            out.status,
            super::node::error_line(&String::from_utf8_lossy(&out.stderr))
        ))
    })?;
    if answer["success"] == true {
        return Ok(());
    }
    let msg = answer["error-message"].as_str().unwrap_or("no message");
    Err(fail(super::node::error_line(msg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> NodePublicKey {
        let mut p = [seed; 65];
        p[0] = 0x04;
        NodePublicKey::from_point(&p).unwrap()
    }

    fn held(id: u64, k: Option<NodePublicKey>) -> Registered {
        Registered {
            node_id: id,
            key: k,
        }
    }

    #[test]
    fn the_diff_registers_the_missing_and_unregisters_only_its_own_departed() {
        let wanted: BTreeSet<_> = [key(1), key(2)].into();
        // Ours: 1 and 3 (3's node left the service). 4 is an operator's registration (a
        // SuperNode in another site); 12's key is not P-256, so not one of ours either.
        let owned: BTreeSet<_> = [key(1), key(3)].into();
        let listed = [
            held(10, Some(key(1))),
            held(11, Some(key(3))),
            held(12, None),
            held(14, Some(key(4))),
        ];
        assert_eq!(
            plan(&wanted, &listed, &owned, true),
            [
                Action::Register(key(2)),
                Action::Unregister {
                    node_id: 11,
                    key: Some(key(3))
                },
            ]
        );
        // A partial view registers, never unregisters.
        assert_eq!(
            plan(&wanted, &listed, &owned, false),
            [Action::Register(key(2))]
        );
        // In step: nothing to do (idempotent: what Flower holds is not registered again).
        let same = [held(10, Some(key(1))), held(13, Some(key(2)))];
        let ours: BTreeSet<_> = [key(1), key(2)].into();
        assert!(plan(&wanted, &same, &ours, true).is_empty());
        // An empty service unregisters everything of ours and nothing else.
        assert_eq!(plan(&BTreeSet::new(), &same, &ours, true).len(), 2);
        assert!(plan(&BTreeSet::new(), &same, &BTreeSet::new(), true).is_empty());
        assert!(plan(&BTreeSet::new(), &[], &ours, true).is_empty());
    }

    #[test]
    fn site_keys_count_only_when_the_controller_signed_them_for_this_vm() {
        use crate::protocol::node_key::encode_set;
        use crate::protocol::signing::{parse_public_key, SigningSeed};
        let seed = SigningSeed::generate().unwrap();
        let pk = parse_public_key(&seed.public_key()).unwrap();
        let set: BTreeSet<_> = [key(1), key(2)].into();
        let text = encode_set(&set);
        let sig = seed.sign_site_keys(7, &set);
        let check =
            |keys: Option<&str>, sig: Option<&str>| site_keys(keys, sig, Some(&pk), Some(7));
        assert_eq!(check(None, None), Ok(BTreeSet::new()), "single-site: none");
        assert_eq!(check(Some(&text), Some(&sig)), Ok(set.clone()));
        // The controller's empty set (the last remote key dropped).
        let none = seed.sign_site_keys(7, &BTreeSet::new());
        assert_eq!(check(Some("NONE"), Some(&none)), Ok(BTreeSet::new()));
        // Forged by a peer: unsigned, signed by another key, for another VM, another set.
        let peer = SigningSeed::generate().unwrap();
        let more: BTreeSet<_> = [key(1), key(2), key(3)].into();
        for (keys, sig) in [
            (text.clone(), None),
            (text.clone(), Some(peer.sign_site_keys(7, &set))),
            (text.clone(), Some(seed.sign_site_keys(8, &set))),
            (encode_set(&more), Some(sig.clone())),
            ("garbage".into(), Some(sig.clone())),
        ] {
            assert!(
                check(Some(&keys), sig.as_deref()).is_err(),
                "{keys:.30} accepted"
            );
        }
        assert!(
            site_keys(Some(&text), Some(&sig), None, Some(7)).is_err(),
            "no key: nothing trusted"
        );
        // A refused set is a partial view: wanted keys are still registered, none revoked.
        let owned: BTreeSet<_> = [key(1), key(5)].into();
        let held = [held(10, Some(key(1))), held(11, Some(key(5)))];
        assert_eq!(plan(&set, &held, &owned, false), [Action::Register(key(2))]);
        // A verified set that dropped key 5 revokes it (ours); the same set again does nothing.
        assert_eq!(
            plan(&set, &held, &owned, true),
            [
                Action::Register(key(2)),
                Action::Unregister {
                    node_id: 11,
                    key: Some(key(5))
                }
            ]
        );
    }

    #[test]
    fn flwr_runs_in_the_superlink_container_on_docker_and_from_the_venv_on_process() {
        use crate::agent::context::Context;
        use crate::protocol::context as ctx;
        let cfg = |runtime: &str| {
            Config::from_context(&Context::from_pairs([
                ("ETH0_IP", "10.0.0.5"),
                (ctx::RUNTIME, runtime),
            ]))
            .unwrap()
        };
        let paths = Paths::new("/");
        let register = Action::Register(key(1));
        let unregister = Action::Unregister {
            node_id: 42,
            key: None,
        };
        let docker = cfg("docker");
        let (argv, project) = flwr_argv(&docker, &paths, &register);
        assert_eq!(
            argv,
            [
                "/usr/bin/docker",
                "exec",
                "-w",
                "/app/node-auth",
                "flower-superlink",
                "flwr",
                "supernode",
                "register",
                "/app/node-auth/node.pub",
                "/app/node-auth",
                "local",
                "--format",
                "json"
            ]
        );
        // Inside the container: its own loopback (the Control API binds 0.0.0.0 there, and
        // the certificate names 127.0.0.1), the CA where the certificates are mounted.
        assert!(
            project.contains("address = \"127.0.0.1:9093\""),
            "{project}"
        );
        assert!(
            project.contains("root-certificates = \"/app/certificates/ca.crt\""),
            "{project}"
        );
        let (argv, _) = flwr_argv(&docker, &paths, &unregister);
        assert_eq!(argv[6..9], ["supernode", "unregister", "42"]);
        // The process runtime is unchanged: the venv's flwr on the host's paths.
        let process = cfg("process");
        let (argv, project) = flwr_argv(&process, &paths, &register);
        assert_eq!(
            argv,
            [
                &paths.venv_bin().join("flwr").display().to_string(),
                "supernode",
                "register",
                "/opt/flower/node-auth/node.pub",
                "/opt/flower/node-auth",
                "local",
                "--format",
                "json"
            ]
        );
        assert!(
            project.contains("root-certificates = \"/opt/flower/certs/ca.crt\""),
            "{project}"
        );
        // Both are TOML that names one federation, `local`.
        for p in [project, flwr_argv(&docker, &paths, &register).1] {
            let doc: toml_edit::DocumentMut = p.parse().unwrap();
            assert!(doc["tool"]["flwr"]["federations"]["local"]["address"].is_str());
        }
    }

    #[test]
    fn the_owned_keys_survive_a_restart_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        std::fs::create_dir_all(paths.config_dir()).unwrap();
        assert!(read_owned(&paths).is_empty(), "no file: nothing is ours");
        let owned: BTreeSet<_> = [key(1), key(2)].into();
        write_owned(&paths, &owned).unwrap();
        assert_eq!(read_owned(&paths), owned);
        let mut text = std::fs::read_to_string(owned_file(&paths)).unwrap();
        text.push_str("ssh-rsa AAAA\ngarbage\n");
        std::fs::write(owned_file(&paths), text).unwrap();
        assert_eq!(read_owned(&paths), owned);
    }

    #[test]
    fn the_wanted_keys_come_from_the_supernode_role_and_a_keyless_node_makes_the_view_partial() {
        use crate::one::onegate::parse_service_document;
        use serde_json::json;
        let vm = |id: u64, key: Option<&str>| {
            let mut ut = serde_json::Map::new();
            if let Some(k) = key {
                ut.insert("FL_NODE_PUBKEY".into(), json!(k));
            }
            json!({"deploy_id": id, "running": null, "vm_info": {"VM": {"ID": id.to_string(), "NAME": format!("vm-{id}"), "USER_TEMPLATE": ut}}})
        };
        let service = |nodes: Vec<serde_json::Value>| {
            parse_service_document(&json!({"SERVICE": {"name": "fl", "id": "5", "state": 2, "roles": [
                {"name": "superlink", "cardinality": 1, "state": 2, "nodes": [vm(3, Some(&key(9).encode()))]},
                {"name": "supernode", "cardinality": nodes.len(), "state": 2, "nodes": nodes}
            ]}}))
            .unwrap()
        };
        let (k1, k2) = (key(1).encode(), key(2).encode());
        let s = service(vec![vm(7, Some(&k1)), vm(8, Some(&k2))]);
        assert_eq!(
            wanted(&s),
            ([key(1), key(2)].into(), true),
            "the SuperLink's own is not wanted"
        );
        let s = service(vec![vm(7, Some(&k1)), vm(8, None)]);
        assert_eq!(wanted(&s), ([key(1)].into(), false));
        let s = service(vec![vm(7, Some(&k1)), vm(8, Some("ssh-rsa AAAA"))]);
        assert_eq!(wanted(&s), ([key(1)].into(), false));
    }

    #[test]
    fn a_generated_key_file_reads_back_and_is_one_ssh_keygen_reads() {
        let (public, private) = generate().unwrap();
        assert_eq!(public_of_file(private.as_bytes()), Some(public.clone()));
        assert!(public_of_file(
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----"
        )
        .is_none());
        // OpenSSH itself derives the same public key from the private one (the private
        // scalar, its check words and padding are all well formed).
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, &private).unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&f)
            .output()
            .expect("ssh-keygen (openssh-client) is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        assert_eq!(NodePublicKey::parse(line.trim()), Ok(public));
    }

    #[test]
    fn ensure_key_makes_one_key_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let first = ensure_key(&paths).unwrap();
        assert_eq!(
            ensure_key(&paths).unwrap(),
            first,
            "a second boot keeps the key"
        );
        let mode = std::fs::metadata(key_file(&paths)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o640
        );
        std::fs::write(key_file(&paths), "garbage").unwrap();
        assert!(matches!(
            ensure_key(&paths),
            Err(NodeAuthError::BadKeyFile { .. })
        ));
    }
}
