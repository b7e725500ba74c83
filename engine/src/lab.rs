//! The local lab behind `migrate lab up|down|status|exec`: N nodes on one Linux machine, each
//! started with lab/enter.sh in its own mount, UTS, PID, cgroup and network namespace, sharing
//! the root filesystem that lab/rootfs.sh builds.
//!
//! Network layout: a "switch" network namespace `<prefix>-switch` holds a Linux bridge
//! `migrate-lab0` with no address; every node's namespace `<prefix>-<node>` is joined to it by a
//! veth pair (`eth0` in the node, `port<i>` on the bridge) and gets 10.231.0.(10+i)/24, with no
//! default route. Every link has the MTU `up` was given (default 1500, plain Ethernet; 9000
//! models a node network with jumbo frames). The host namespace is not touched at all, so lab
//! traffic can only go between lab addresses, and two labs with different prefixes (a user's
//! and a test's) never see each other. Deleting the switch namespace removes the bridge and
//! every veth with it.
//!
//! State lives in the state directory (default /var/lib/migrate-lab, 0700): `state.json` (0600)
//! records nodes, addresses, namespaces, node folders, certificate folders and init PIDs;
//! `nodes/<name>/` is each node's podman storage, `certs/` the lab CA and one certificate folder
//! per node (bound into the node at `/lab`), `shared/` is `/shared` in every node, `scripts/`
//! holds the lab scripts, embedded in this binary at build time. [`down`] finds what to remove by
//! naming convention as well as from the state file, so it works after a crash.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The bridge inside the switch namespace.
pub const BRIDGE: &str = "migrate-lab0";
/// Default state directory (also where lab/rootfs.sh puts the root by default).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/migrate-lab";
/// Default prefix of the lab's network namespace names.
pub const DEFAULT_PREFIX: &str = "migrate-lab";
/// The port of each node's daemon.
pub const DAEMON_PORT: u16 = 7400;
/// The certificate name `up` makes for the user's `migrate` commands (under `certs/`).
pub const OPERATOR: &str = "operator";
/// Where the daemon keeps its state inside a node (node-private: under the podman storage bind).
pub const DAEMON_STATE: &str = "/var/lib/containers/migrate";
/// Where the daemon binary is seen inside a node.
const DAEMON_BIN_DIR: &str = "/opt/migrate";
/// The daemon's PID file inside a node (/run is the node's own tmpfs).
const DAEMON_PID: &str = "/run/migrate-daemon.pid";

/// An image every node holds after `up`: busybox-static, CMD /bin/sh.
pub const BUSYBOX_IMAGE: &str = "localhost/lab/busybox";
/// An image every node holds after `up`: Debian's nginx (workers as root, `daemon off;`) serving
/// /var/www/html on port 80, with busybox.
pub const NGINX_IMAGE: &str = "localhost/lab/nginx";
/// An image every node holds after `up`: Debian's redis-server and redis-cli, listening on
/// 0.0.0.0:6379 with protected mode off and no persistence, DEBUG allowed from inside the
/// container (`DEBUG DIGEST` checks a dataset), with busybox.
pub const REDIS_IMAGE: &str = "localhost/lab/redis";

/// The lab links' MTU unless `up` is given another: plain Ethernet.
pub const DEFAULT_MTU: u32 = 1500;
/// The MTUs a lab link may have: from IPv6's minimum to the largest a veth takes.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 1280..=65535;

const STATE_VERSION: u32 = 1;
const ENTER_SH: &str = include_str!("../../lab/enter.sh");
const EXEC_SH: &str = include_str!("../../lab/exec.sh");
const STOP_SH: &str = include_str!("../../lab/stop.sh");
const ROOTFS_SH: &str = include_str!("../../lab/rootfs.sh");

/// Why a lab operation failed. Each message names what failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Namespaces, bridges and mounts need root.
    #[error(
        "the lab needs root (network namespaces, bridges, mounts): run it with sudo or as root"
    )]
    NotRoot,
    /// A node name or prefix that cannot be used.
    #[error("invalid lab name {name:?}: {reason}")]
    InvalidName {
        /// The refused name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Something of an earlier lab is still there, but no complete running lab.
    #[error("leftovers of an earlier lab are still present ({what}), maybe after a crash: run `migrate lab down` first")]
    Leftover {
        /// What was found.
        what: String,
    },
    /// The shared root filesystem has not been built.
    #[error(
        "the lab root at {0} is not built: run lab/rootfs.sh (`migrate lab up` and `make test` \
         build it)"
    )]
    NoRootfs(PathBuf),
    /// A link MTU outside [`MTU_RANGE`].
    #[error(
        "invalid lab MTU {0}: give 1280 (IPv6's minimum) to 65535; 1500 is plain Ethernet, \
         9000 a network with jumbo frames"
    )]
    InvalidMtu(u32),
    /// The lab is not up.
    #[error("the lab is not up (no {0}): start it with `migrate lab up`")]
    NotUp(PathBuf),
    /// `exec` named a node the lab does not have.
    #[error("no node {name:?} in the lab; its nodes are: {known}")]
    UnknownNode {
        /// The name asked for.
        name: String,
        /// The lab's nodes, comma-separated.
        known: String,
    },
    /// A node is recorded but its init is gone.
    #[error(
        "node {0} is not running (its init died): run `migrate lab down` and `migrate lab up`"
    )]
    NodeDead(String),
    /// A command the lab runs failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// The command, as typed.
        what: String,
        /// Exit status and the end of its output.
        detail: String,
    },
    /// A node did not come up in time.
    #[error("node {name} did not start within {secs} s; its log ({log}) ends with:\n{tail}")]
    NodeStart {
        /// The node.
        name: String,
        /// The deadline.
        secs: u64,
        /// Where enter.sh wrote its output.
        log: String,
        /// The last lines of that log.
        tail: String,
    },
    /// Creating the lab CA or node certificates failed.
    #[error("creating the lab certificates: {0}")]
    Certs(#[from] transport::tls::TlsError),
    /// A file or folder of the lab could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state file does not parse.
    #[error("the lab state {path} is unreadable ({source}): run `migrate lab down` to clean up")]
    BadState {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, LabError>;

/// Where the lab keeps its things and how it names them.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// State directory: state.json, node folders, certificates, scripts.
    pub state_dir: PathBuf,
    /// The shared root filesystem (built by lab/rootfs.sh when missing or out of date).
    pub rootfs: PathBuf,
    /// Prefix of the network namespace names (`<prefix>-switch`, `<prefix>-<node>`).
    pub prefix: String,
    /// How long a node may take to start.
    pub start_timeout: Duration,
    /// The `migrate` binary to run as each node's daemon; `None` starts no daemons.
    pub daemon_binary: Option<PathBuf>,
    /// The MTU of every lab link, in bytes ([`MTU_RANGE`]).
    pub mtu: u32,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            rootfs: PathBuf::from(DEFAULT_STATE_DIR).join("rootfs"),
            prefix: DEFAULT_PREFIX.to_string(),
            start_timeout: Duration::from_secs(30),
            daemon_binary: None,
            mtu: DEFAULT_MTU,
        }
    }
}

impl LabOptions {
    /// The defaults, overridden by `MIGRATE_LAB_DIR` (state directory), `MIGRATE_LAB_ROOTFS`
    /// and `MIGRATE_LAB_PREFIX`.
    pub fn from_env() -> Self {
        let mut o = LabOptions::default();
        if let Some(d) = std::env::var_os("MIGRATE_LAB_DIR") {
            o.state_dir = d.into();
        }
        if let Some(r) = std::env::var_os("MIGRATE_LAB_ROOTFS") {
            o.rootfs = r.into();
        }
        if let Ok(p) = std::env::var("MIGRATE_LAB_PREFIX") {
            o.prefix = p;
        }
        o
    }

    /// The state file.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    fn nodes_dir(&self) -> PathBuf {
        self.state_dir.join("nodes")
    }

    fn switch_netns(&self) -> String {
        format!("{}-switch", self.prefix)
    }

    fn script(&self, name: &str) -> PathBuf {
        self.state_dir.join("scripts").join(name)
    }

    /// A command running one lab script through bash. The script file is read, never exec'd:
    /// exec fails with "Text file busy" while any forked child (of a parallel test thread, say)
    /// still holds the descriptor that wrote it.
    fn script_command(&self, name: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(self.script(name));
        c
    }
}

/// What `up` recorded: everything needed to reach the nodes later.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabState {
    /// Format version of this file.
    pub version: u32,
    /// Namespace name prefix the lab was made with.
    pub prefix: String,
    /// The shared root filesystem.
    pub rootfs: PathBuf,
    /// The network namespace holding the bridge.
    pub switch_netns: String,
    /// The bridge's name inside `switch_netns`.
    pub bridge: String,
    /// The lab subnet (CIDR).
    pub subnet: String,
    /// The MTU of every lab link (state files from before it was recorded had 1500).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// The lab CA (ca.crt, ca.key); node certificate folders are below it.
    pub ca_dir: PathBuf,
    /// The nodes, in order.
    pub nodes: Vec<NodeState>,
}

impl LabState {
    /// The certificate folder of the user's commands (`migrate CONTAINER --from ...`).
    pub fn operator_certs(&self) -> PathBuf {
        self.ca_dir.join(OPERATOR)
    }
}

/// One node as recorded by `up`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeState {
    /// Node name; also its hostname and certificate name.
    pub name: String,
    /// Its address on the lab bridge.
    pub address: Ipv4Addr,
    /// Its network namespace (/run/netns/NAME).
    pub netns: String,
    /// Its folder on the host (podman storage, node.pid, node.cgroup).
    pub dir: PathBuf,
    /// Its certificate folder (ca.crt, node.crt, node.key), seen as /lab inside the node.
    pub certs: PathBuf,
    /// Its init's PID, as the host sees it.
    pub pid: u32,
    /// The init's start time (clock ticks after boot), which guards against a reused PID.
    pub start_time: u64,
}

impl NodeState {
    /// Where the node's daemon listens.
    pub fn daemon_addr(&self) -> std::net::SocketAddr {
        (self.address, DAEMON_PORT).into()
    }

    /// Whether the node's init still runs.
    pub fn alive(&self) -> bool {
        start_time_of(self.pid) == Some(self.start_time)
    }
}

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

/// What `up` did.
#[derive(Debug)]
pub struct UpOutcome {
    /// The lab as it now is.
    pub state: LabState,
    /// True when the lab was already up and nothing was done.
    pub already_up: bool,
}

/// One node in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Its lab address.
    pub address: Ipv4Addr,
    /// Whether its init runs.
    pub alive: bool,
    /// Running containers (`podman ps -q`), when alive and podman answered.
    pub containers: Option<usize>,
}

/// The lab's status.
#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    /// Whether a state file exists.
    pub up: bool,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The MTU of the lab's links, when it is up.
    pub mtu: Option<u32>,
    /// Per node.
    pub nodes: Vec<NodeStatus>,
    /// Leftovers of a lab without state (namespaces, node folders), for `down` to remove.
    pub leftovers: Vec<String>,
}

/// What `down` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DownReport {
    /// Node folders stopped and removed.
    pub nodes: Vec<String>,
    /// Network namespaces deleted.
    pub netns: Vec<String>,
    /// Processes killed because they were still in a lab namespace.
    pub killed: usize,
}

/// Default node names: node1..nodeN.
pub fn default_nodes(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("node{i}")).collect()
}

/// Brings the lab up with `nodes`, or reports it when it is already up.
pub fn up(nodes: &[String], opts: &LabOptions) -> Result<UpOutcome> {
    require_root()?;
    validate(nodes, opts)?;
    if let Some(state) = read_state(opts)? {
        if !state.nodes.is_empty() && state.nodes.iter().all(NodeState::alive) {
            return Ok(UpOutcome {
                state,
                already_up: true,
            });
        }
        return Err(LabError::Leftover {
            what: format!(
                "{} with nodes that are not running",
                opts.state_file().display()
            ),
        });
    }
    let leftovers = leftovers(opts);
    if !leftovers.is_empty() {
        return Err(LabError::Leftover {
            what: leftovers.join(", "),
        });
    }

    private_dir(&opts.state_dir)?;
    write_scripts(opts)?;
    build_rootfs(opts)?;
    // Anything that fails from here on leaves pieces: clean them so a retry starts afresh.
    match start(nodes, opts) {
        Ok(state) => Ok(UpOutcome {
            state,
            already_up: false,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "lab up failed; removing what it made");
            let _ = down(opts);
            Err(e)
        }
    }
}

fn start(nodes: &[String], opts: &LabOptions) -> Result<LabState> {
    let shared = opts.state_dir.join("shared");
    let ca_dir = opts.state_dir.join("certs");
    private_dir(&opts.nodes_dir())?;
    private_dir(&shared)?;
    let mut names = nodes.to_vec();
    names.push(OPERATOR.to_string());
    let cert_dirs = transport::tls::init_certs(&ca_dir, &names)?;
    let bin_dir = install_daemon_binary(opts)?;

    let sw = opts.switch_netns();
    ip(&["netns", "add", &sw])?;
    ip(&["-n", &sw, "link", "set", "lo", "up"])?;
    ip(&["-n", &sw, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", &sw, "link", "set", BRIDGE, "up"])?;
    let mtu = opts.mtu.to_string();

    let mut state = LabState {
        version: STATE_VERSION,
        prefix: opts.prefix.clone(),
        rootfs: opts.rootfs.clone(),
        switch_netns: sw.clone(),
        bridge: BRIDGE.to_string(),
        subnet: "10.231.0.0/24".to_string(),
        mtu: opts.mtu,
        ca_dir: ca_dir.clone(),
        nodes: Vec::new(),
    };
    for (i, name) in nodes.iter().enumerate() {
        let ns = format!("{}-{name}", opts.prefix);
        let address = Ipv4Addr::new(10, 231, 0, 10 + i as u8);
        let port = format!("port{i}");
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        // The bridge takes the smallest MTU of its ports, so setting both ends sets the link.
        ip(&["-n", &sw, "link", "set", &port, "mtu", &mtu])?;
        ip(&["-n", &ns, "link", "set", "eth0", "mtu", &mtu])?;
        ip(&["-n", &sw, "link", "set", &port, "master", BRIDGE, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;

        let dir = opts.nodes_dir().join(name);
        let (pid, start_time) = start_node(
            opts,
            name,
            &ns,
            &dir,
            &cert_dirs[i],
            &shared,
            bin_dir.as_deref(),
        )?;
        state.nodes.push(NodeState {
            name: name.clone(),
            address,
            netns: ns,
            dir,
            certs: cert_dirs[i].clone(),
            pid,
            start_time,
        });
    }
    // Recorded before the image import, so that `down` finds the nodes whatever happens next.
    write_state(opts, &state)?;
    import_images(opts, &state)?;
    if opts.daemon_binary.is_some() {
        for node in &state.nodes {
            start_daemon(&node.name, opts)?;
        }
    }
    Ok(state)
}

/// Copies the daemon binary into `<state>/bin` (bound into every node at /opt/migrate), so
/// rebuilding it does not change what running nodes see.
fn install_daemon_binary(opts: &LabOptions) -> Result<Option<PathBuf>> {
    let Some(binary) = &opts.daemon_binary else {
        return Ok(None);
    };
    let dir = opts.state_dir.join("bin");
    private_dir(&dir)?;
    let target = dir.join("migrate");
    let tmp = dir.join(".migrate.tmp");
    fs::copy(binary, &tmp).map_err(io("copying the daemon binary from", binary))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, &target).map_err(io("renaming to", &target))?;
    Ok(Some(dir))
}

/// Starts `migrate daemon` in `node` (listening on its lab address, port [`DAEMON_PORT`],
/// with the node's certificate and state in [`DAEMON_STATE`]) and waits until it listens. Its
/// output goes to `nodes/<node>.daemon.log`. Used by `up`, and by tests that restart a daemon.
pub fn start_daemon(node: &str, opts: &LabOptions) -> Result<()> {
    start_daemon_with(node, opts, &[])
}

/// [`start_daemon`] with more options for `migrate daemon` (e.g. `--kubelet URL ...`, which
/// makes the node a Kubernetes node's daemon), each a single word.
pub fn start_daemon_with(node: &str, opts: &LabOptions, extra: &[&str]) -> Result<()> {
    let state = read_state(opts)?.ok_or_else(|| LabError::NotUp(opts.state_file()))?;
    let n = find_node(&state, node)?;
    write_scripts(opts)?;
    let log_path = opts.nodes_dir().join(format!("{node}.daemon.log"));
    let log = fs::File::create(&log_path).map_err(io("creating", &log_path))?;
    let log2 = log.try_clone().map_err(io("opening", &log_path))?;
    let mut inner = format!(
        "echo $$ > {DAEMON_PID}; exec {DAEMON_BIN_DIR}/migrate -v daemon --listen {} --certs /lab \
         --state {DAEMON_STATE} --idle-timeout 10 --resume-timeout 10",
        n.daemon_addr()
    );
    for word in extra {
        // Single-quoted for sh: a `'` inside becomes `'\''`.
        inner.push_str(&format!(" '{}'", word.replace('\'', "'\\''")));
    }
    let status = Command::new("setsid")
        .args(["--fork", "bash"])
        .arg(opts.script("exec.sh"))
        .arg(&n.dir)
        .args(["--", "sh", "-c", &inner])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .status()
        .map_err(io("running setsid for", &opts.script("exec.sh")))?;
    if !status.success() {
        return Err(LabError::Command {
            what: format!("starting the daemon of {node}"),
            detail: format!("{status}; see {}", log_path.display()),
        });
    }
    let deadline = Instant::now() + opts.start_timeout;
    loop {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("listening on") {
            tracing::info!(node, "lab daemon started");
            return Ok(());
        }
        if Instant::now() >= deadline || text.contains("error:") {
            return Err(LabError::NodeStart {
                name: format!("{node} (its daemon)"),
                secs: opts.start_timeout.as_secs(),
                log: log_path.display().to_string(),
                tail: tail(&text, 10),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the daemon of `node` at once (SIGKILL), as a crash would.
pub fn kill_daemon(node: &str, opts: &LabOptions) -> Result<()> {
    let script = format!("kill -KILL \"$(cat {DAEMON_PID})\"");
    let mut c = command(node, &["sh", "-c", &script], opts)?;
    run_cmd(&mut c).map(drop)
}

fn start_node(
    opts: &LabOptions,
    name: &str,
    ns: &str,
    dir: &Path,
    certs: &Path,
    shared: &Path,
    bin_dir: Option<&Path>,
) -> Result<(u32, u64)> {
    private_dir(dir)?;
    let log_path = opts.nodes_dir().join(format!("{name}.log"));
    let log = fs::File::create(&log_path).map_err(io("creating", &log_path))?;
    let log2 = log.try_clone().map_err(io("opening", &log_path))?;
    // setsid --fork: the node lives on in its own session after this process exits.
    let status = Command::new("setsid")
        .args(["--fork", "bash"])
        .arg(opts.script("enter.sh"))
        .args(["--netns", ns, "--hostname", name])
        .arg("--bind")
        .arg(format!("{}:/shared", shared.display()))
        .arg("--bind")
        .arg(format!("{}:/lab", certs.display()))
        .args(
            bin_dir
                .map(|b| {
                    [
                        "--bind".to_string(),
                        format!("{}:{DAEMON_BIN_DIR}", b.display()),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .arg(&opts.rootfs)
        .arg(dir)
        .args(["--", "catatonit", "-P"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .status()
        .map_err(io("running setsid for", &opts.script("enter.sh")))?;
    if !status.success() {
        return Err(LabError::Command {
            what: format!("starting node {name} (setsid enter.sh)"),
            detail: format!("{status}; see {}", log_path.display()),
        });
    }
    // Up means: node.pid written, and a command runs inside.
    let deadline = Instant::now() + opts.start_timeout;
    loop {
        if let Some((pid, st)) = read_pid_file(dir) {
            if start_time_of(pid) == Some(st)
                && opts
                    .script_command("exec.sh")
                    .arg(dir)
                    .args(["--", "true"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            {
                tracing::info!(node = name, pid, "lab node started");
                return Ok((pid, st));
            }
        }
        if Instant::now() >= deadline {
            return Err(LabError::NodeStart {
                name: name.to_string(),
                secs: opts.start_timeout.as_secs(),
                log: log_path.display().to_string(),
                tail: tail(&fs::read_to_string(&log_path).unwrap_or_default(), 10),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One image `up` builds in the first node and imports in every node.
struct LabImage {
    /// Its name in every node's storage.
    name: &'static str,
    /// The tar built in /shared.
    tar: &'static str,
    /// Shell that fills the root at `$d` (after the common part: busybox and its applets,
    /// /etc/passwd, /tmp); it may use `copy PATH...` and `libs BINARY`.
    fill: &'static str,
    /// The `podman import --change` instruction.
    cmd: &'static str,
}

const LAB_IMAGES: [LabImage; 3] = [
    LabImage {
        name: BUSYBOX_IMAGE,
        tar: "busybox-rootfs.tar",
        fill: "",
        cmd: "CMD /bin/sh",
    },
    LabImage {
        name: NGINX_IMAGE,
        tar: "nginx-rootfs.tar",
        fill: r#"b=/usr/sbin/nginx
copy "$b" $(libs "$b")
mkdir -p "$d/etc/nginx/conf.d" "$d/etc/nginx/modules-enabled" "$d/etc/nginx/sites-enabled" \
  "$d/var/log/nginx" "$d/var/lib/nginx" "$d/var/www/html"
cp /etc/nginx/mime.types "$d/etc/nginx/mime.types"
for f in /etc/nginx/modules-enabled/*.conf; do [ ! -e "$f" ] || cp -L "$f" "$d/etc/nginx/modules-enabled/"; done
# Workers run as root: CRIU cannot dump www-data workers here (lab/README.md, pitfall 9).
sed -e 's/^user .*/user root;/' /etc/nginx/nginx.conf > "$d/etc/nginx/nginx.conf"
printf 'daemon off;\n' >> "$d/etc/nginx/nginx.conf"
grep -qx 'user root;' "$d/etc/nginx/nginx.conf" || { echo "no user line in /etc/nginx/nginx.conf" >&2; exit 1; }
printf 'server {\n\tlisten 80 default_server;\n\troot /var/www/html;\n\tindex index.html;\n}\n' > "$d/etc/nginx/sites-enabled/default"
echo 'hello from the lab nginx' > "$d/var/www/html/index.html"
chroot "$d" /usr/sbin/nginx -t
rm -rf "$d/var/log/nginx/"* "$d/var/lib/nginx/"* "$d/run/"*"#,
        cmd: r#"CMD ["/usr/sbin/nginx"]"#,
    },
    LabImage {
        name: REDIS_IMAGE,
        tar: "redis-rootfs.tar",
        fill: r#"copy /usr/bin/redis-server /usr/bin/redis-cli $(libs /usr/bin/redis-server) $(libs /usr/bin/redis-cli)
mkdir -p "$d/etc/redis" "$d/data"
printf '%s\n' 'bind 0.0.0.0' 'protected-mode no' 'port 6379' 'daemonize no' 'save ""' \
  'appendonly no' 'dir /data' 'logfile ""' 'enable-debug-command local' \
  > "$d/etc/redis/redis.conf"
chroot "$d" /usr/bin/redis-server --version
chroot "$d" /usr/bin/redis-cli --version"#,
        cmd: r#"CMD ["/usr/bin/redis-server","/etc/redis/redis.conf"]"#,
    },
];

/// Shell run before each image's `fill`: a root at `$d` with the lab root's merged-/usr layout,
/// busybox-static and its applets, root in /etc/passwd; `copy` copies files (links resolved) to
/// the same path in it, `libs` lists the shared libraries `ldd` finds for a binary.
const IMAGE_PRELUDE: &str = r#"d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
for l in bin sbin lib lib64; do
  if [ -L "/$l" ]; then mkdir -p "$d/usr/$l"; ln -s "usr/$l" "$d/$l"; fi
done
mkdir -p "$d/bin" "$d/tmp" "$d/etc" "$d/proc" "$d/sys" "$d/dev" "$d/root" "$d/run"
chmod 1777 "$d/tmp"
copy() { for f in "$@"; do mkdir -p "$d$(dirname "$f")"; cp -L "$f" "$d$f"; done; }
libs() { ldd "$1" | sed -n -e 's/.*=> \(\/[^ ]*\) .*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) .*/\1/p' | sort -u; }
echo 'root:x:0:0:root:/root:/bin/sh' > "$d/etc/passwd"
echo 'root:x:0:' > "$d/etc/group"
"#;

/// Shell run after `fill`: busybox applets for what is still missing, then the tar.
const IMAGE_EPILOGUE: &str = r#"
cp /bin/busybox "$d/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$d/bin/$a" ] || ln -s busybox "$d/bin/$a"; done
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$d" -cf "$out.tmp" .
mv "$out.tmp" "$out""#;

/// Builds the lab images (busybox, nginx, redis) from the lab root in the first node, as
/// reproducible tars in /shared, and imports them in every node: the same tar gives the same
/// image ID everywhere.
fn import_images(opts: &LabOptions, state: &LabState) -> Result<()> {
    let first = &state.nodes[0];
    for img in &LAB_IMAGES {
        let script = format!(
            "out=/shared/{}\n{IMAGE_PRELUDE}{}{IMAGE_EPILOGUE}",
            img.tar, img.fill
        );
        image_step(
            opts,
            first,
            img,
            "building the root tar",
            &["sh", "-euc", &script],
        )?;
    }
    for node in &state.nodes {
        for img in &LAB_IMAGES {
            let tar = format!("/shared/{}", img.tar);
            image_step(
                opts,
                node,
                img,
                "podman import",
                &[
                    "podman", "import", "-q", "--change", img.cmd, &tar, img.name,
                ],
            )?;
        }
    }
    Ok(())
}

fn image_step(
    opts: &LabOptions,
    node: &NodeState,
    img: &LabImage,
    step: &str,
    cmd: &[&str],
) -> Result<()> {
    run_in(opts, node, cmd).map(drop).map_err(|e| match e {
        LabError::Command { detail, .. } => LabError::Command {
            what: format!("lab image {}: {step} in node {}", img.name, node.name),
            detail,
        },
        other => other,
    })
}

fn run_in(opts: &LabOptions, node: &NodeState, cmd: &[&str]) -> Result<String> {
    let out = node_command(opts, &node.dir, cmd)
        .stdin(Stdio::null())
        .output()
        .map_err(io("running", &opts.script("exec.sh")))?;
    if !out.status.success() {
        return Err(LabError::Command {
            what: format!("`{}` in node {}", cmd.join(" "), node.name),
            detail: format!(
                "{}: {}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 5)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn node_command<S: AsRef<std::ffi::OsStr>>(opts: &LabOptions, dir: &Path, cmd: &[S]) -> Command {
    let mut c = opts.script_command("exec.sh");
    c.arg(dir).arg("--").args(cmd);
    c
}

/// The node named `name`, or an error listing the lab's nodes.
fn find_node<'a>(state: &'a LabState, name: &str) -> Result<&'a NodeState> {
    state
        .nodes
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| LabError::UnknownNode {
            name: name.to_string(),
            known: state
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A command that runs `cmd` in `node` (through lab/exec.sh); the caller chooses its stdio.
pub fn command<S: AsRef<std::ffi::OsStr>>(
    node: &str,
    cmd: &[S],
    opts: &LabOptions,
) -> Result<Command> {
    require_root()?;
    let state = read_state(opts)?.ok_or_else(|| LabError::NotUp(opts.state_file()))?;
    let n = find_node(&state, node)?;
    if !n.alive() {
        return Err(LabError::NodeDead(n.name.clone()));
    }
    write_scripts(opts)?;
    Ok(node_command(opts, &n.dir, cmd))
}

/// Runs `cmd` in `node` with this process's stdin, stdout and stderr; returns its exit code
/// (128 + signal number when a signal ended it).
pub fn exec<S: AsRef<std::ffi::OsStr>>(node: &str, cmd: &[S], opts: &LabOptions) -> Result<i32> {
    let status = command(node, cmd, opts)?
        .status()
        .map_err(io("running", &opts.script("exec.sh")))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// The lab's nodes: address, liveness, running containers; and leftovers when there is no state.
pub fn status(opts: &LabOptions) -> Result<LabStatus> {
    require_root()?;
    let state = read_state(opts)?;
    let mut st = LabStatus {
        up: state.is_some(),
        state_dir: opts.state_dir.clone(),
        mtu: state.as_ref().map(|s| s.mtu),
        nodes: Vec::new(),
        leftovers: Vec::new(),
    };
    match state {
        None => st.leftovers = leftovers(opts),
        Some(state) => {
            write_scripts(opts)?;
            for n in &state.nodes {
                let alive = n.alive();
                let containers = alive
                    .then(|| run_in(opts, n, &["podman", "ps", "-q"]).ok())
                    .flatten()
                    .map(|out| out.lines().filter(|l| !l.trim().is_empty()).count());
                st.nodes.push(NodeStatus {
                    name: n.name.clone(),
                    address: n.address,
                    alive,
                    containers,
                });
            }
        }
    }
    Ok(st)
}

/// Removes every node, namespace, bridge, node folder, certificate and the state, from the state
/// file and by naming convention (namespaces `<prefix>-*`, folders under `<state>/nodes`), so
/// it also cleans up after a crash. The root filesystem stays. Safe to run twice.
pub fn down(opts: &LabOptions) -> Result<DownReport> {
    require_root()?;
    let mut report = DownReport::default();
    // A broken state file must not stop the cleanup: the naming convention finds the rest.
    let state = read_state(opts).ok().flatten();
    // The namespaces of this prefix, and those the state file recorded (made with another
    // prefix, when MIGRATE_LAB_PREFIX changed since `up`).
    let mut namespaces = lab_netns(opts);
    if let Some(s) = &state {
        for ns in std::iter::once(&s.switch_netns).chain(s.nodes.iter().map(|n| &n.netns)) {
            if !namespaces.contains(ns) && Path::new("/run/netns").join(ns).exists() {
                namespaces.push(ns.clone());
            }
        }
    }

    // 1. Kill every process still in a lab namespace: node inits (and with them their PID
    //    namespaces) even when node.pid is gone.
    let mut victims = Vec::new();
    for ns in &namespaces {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            victims.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .filter(|&p| p > 1 && p != std::process::id() as i32),
            );
        }
    }
    if !victims.is_empty() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(victims.iter().map(|p| p.to_string()))
            .stderr(Stdio::null())
            .status();
        report.killed = victims.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while victims
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // 2. Stop every node folder (kills a node outside the namespaces too, removes cgroups).
    let mut dirs: Vec<PathBuf> = state
        .iter()
        .flat_map(|s| s.nodes.iter().map(|n| n.dir.clone()))
        .collect();
    if let Ok(entries) = fs::read_dir(opts.nodes_dir()) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && !dirs.contains(&e.path()) {
                dirs.push(e.path());
            }
        }
    }
    let mut errors = Vec::new();
    if !dirs.is_empty() {
        write_scripts(opts)?;
    }
    for dir in &dirs {
        match run_cmd(opts.script_command("stop.sh").arg(dir)) {
            Ok(_) => report.nodes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            Err(e) => errors.push(e.to_string()),
        }
    }

    // 3. Namespaces: the switch's deletion takes the bridge and every veth with it.
    for ns in &namespaces {
        match ip(&["netns", "del", ns]) {
            Ok(()) => report.netns.push(ns.clone()),
            Err(e) => errors.push(e.to_string()),
        }
    }

    // 4. Files: node folders, certificates, shared folder, scripts, state.
    if errors.is_empty() {
        for sub in ["nodes", "certs", "shared", "scripts", "bin"] {
            let p = opts.state_dir.join(sub);
            if p.exists() {
                fs::remove_dir_all(&p).map_err(io("removing", &p))?;
            }
        }
        let sf = opts.state_file();
        if sf.exists() {
            fs::remove_file(&sf).map_err(io("removing", &sf))?;
        }
        // Gone when empty (it keeps the root filesystem by default).
        let _ = fs::remove_dir(&opts.state_dir);
        Ok(report)
    } else {
        Err(LabError::Command {
            what: "lab down".into(),
            detail: format!(
                "{}; the state is kept, fix that and run `migrate lab down` again",
                errors.join("; ")
            ),
        })
    }
}

/// What of a lab exists without a state file: namespaces by prefix, node folders.
fn leftovers(opts: &LabOptions) -> Vec<String> {
    let mut found: Vec<String> = lab_netns(opts)
        .into_iter()
        .map(|n| format!("network namespace {n}"))
        .collect();
    if let Ok(entries) = fs::read_dir(opts.nodes_dir()) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                found.push(format!("node folder {}", e.path().display()));
            }
        }
    }
    found
}

fn lab_netns(opts: &LabOptions) -> Vec<String> {
    let want = format!("{}-", opts.prefix);
    fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&want))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the state file; `None` when there is none.
pub fn read_state(opts: &LabOptions) -> Result<Option<LabState>> {
    let path = opts.state_file();
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LabError::BadState { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LabError::Io {
            what: "reading",
            path,
            source: e,
        }),
    }
}

fn write_state(opts: &LabOptions, state: &LabState) -> Result<()> {
    let path = opts.state_file();
    let tmp = opts.state_dir.join("state.json.tmp");
    let json = serde_json::to_vec_pretty(state).expect("lab state serializes");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("writing", &tmp))?;
    f.write_all(&json).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("writing", &tmp))?;
    fs::rename(&tmp, &path).map_err(io("renaming to", &path))
}

fn validate(nodes: &[String], opts: &LabOptions) -> Result<()> {
    let bad = |name: &str, reason: &str| {
        Err(LabError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if nodes.is_empty() {
        return bad("", "give at least one node");
    }
    if nodes.len() > 200 {
        return bad("", "at most 200 nodes");
    }
    if !MTU_RANGE.contains(&opts.mtu) {
        return Err(LabError::InvalidMtu(opts.mtu));
    }
    transport::tls::validate_node_name(&opts.prefix).map_err(|e| LabError::InvalidName {
        name: opts.prefix.clone(),
        reason: e.to_string(),
    })?;
    for n in nodes {
        transport::tls::validate_node_name(n).map_err(|e| LabError::InvalidName {
            name: n.clone(),
            reason: e.to_string(),
        })?;
        if n == "switch" {
            return bad(n, "the switch namespace has that name");
        }
        if n == OPERATOR {
            return bad(n, "the certificate of the user's commands has that name");
        }
    }
    Ok(())
}

fn build_rootfs(opts: &LabOptions) -> Result<()> {
    let first = !rootfs_built(opts);
    if first {
        eprintln!(
            "lab: building the root filesystem at {} (about 75 s, needs the Debian mirror)",
            opts.rootfs.display()
        );
    }
    let mut c = opts.script_command("rootfs.sh");
    c.arg(&opts.rootfs);
    if first {
        let status = c
            .status()
            .map_err(io("running", &opts.script("rootfs.sh")))?;
        if !status.success() {
            return Err(LabError::Command {
                what: format!(
                    "building the lab root (lab/rootfs.sh {})",
                    opts.rootfs.display()
                ),
                detail: format!(
                    "{status}: see the messages above and {}.apt.log",
                    opts.rootfs.display()
                ),
            });
        }
        Ok(())
    } else {
        run_cmd(&mut c).map(drop)
    }
}

fn write_scripts(opts: &LabOptions) -> Result<()> {
    let dir = opts.state_dir.join("scripts");
    private_dir(&opts.state_dir)?;
    private_dir(&dir)?;
    for (name, text) in [
        ("enter.sh", ENTER_SH),
        ("exec.sh", EXEC_SH),
        ("stop.sh", STOP_SH),
        ("rootfs.sh", ROOTFS_SH),
    ] {
        let p = dir.join(name);
        if fs::read_to_string(&p).is_ok_and(|t| t == text) {
            continue;
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).map_err(io("writing", &tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700)).map_err(io("chmod", &tmp))?;
        fs::rename(&tmp, &p).map_err(io("renaming to", &p))?;
    }
    Ok(())
}

fn private_dir(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(io("creating", p))?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o700)).map_err(io("chmod", p))
}

/// Whether lab/rootfs.sh has finished building the root (it writes its stamp last).
fn rootfs_built(opts: &LabOptions) -> bool {
    opts.rootfs.join("etc/migrate-lab/stamp").exists()
}

/// Checks that a lab can run here without building anything first: root, and a built root
/// filesystem. `up` builds a missing root itself; tests call this to fail early and say why.
pub fn check_ready(opts: &LabOptions) -> Result<()> {
    require_root()?;
    if !rootfs_built(opts) {
        return Err(LabError::NoRootfs(opts.rootfs.clone()));
    }
    Ok(())
}

fn require_root() -> Result<()> {
    // The effective uid, from /proc: no unsafe, no extra crate.
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned));
    if euid.as_deref() == Some("0") {
        Ok(())
    } else {
        Err(LabError::NotRoot)
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run_cmd(Command::new("ip").args(args)).map(drop)
}

fn run_cmd(c: &mut Command) -> Result<String> {
    let what = format!("{c:?}").replace('"', "");
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            what: what.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            what,
            detail: format!(
                "{}: {}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 5).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LabError {
    let path = path.to_path_buf();
    move |source| LabError::Io { what, path, source }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// NODE_DIR/node.pid: "PID STARTTIME", written by enter.sh.
fn read_pid_file(dir: &Path) -> Option<(u32, u64)> {
    let text = fs::read_to_string(dir.join("node.pid")).ok()?;
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Field 22 of /proc/PID/stat (start time), read after the command name's closing parenthesis.
fn start_time_of(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id();
        let a = start_time_of(me).expect("own stat");
        assert_eq!(start_time_of(me), Some(a));
    }

    #[test]
    fn names_are_checked() {
        let o = LabOptions::default();
        assert!(validate(&default_nodes(2), &o).is_ok());
        assert!(validate(&[], &o).is_err());
        assert!(validate(&["switch".into()], &o).is_err());
        assert!(validate(&["Bad_Name".into()], &o).is_err());
    }

    #[test]
    fn mtus_outside_the_range_are_refused() {
        let with = |mtu| LabOptions {
            mtu,
            ..LabOptions::default()
        };
        for ok in [1280, 1500, 9000, 65535] {
            assert!(validate(&default_nodes(2), &with(ok)).is_ok(), "{ok}");
        }
        for bad in [0, 576, 1279, 65536] {
            let err = validate(&default_nodes(2), &with(bad)).unwrap_err();
            assert!(
                matches!(err, LabError::InvalidMtu(m) if m == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn state_round_trips() {
        let s = LabState {
            version: STATE_VERSION,
            prefix: "p".into(),
            rootfs: "/r".into(),
            switch_netns: "p-switch".into(),
            bridge: BRIDGE.into(),
            subnet: "10.231.0.0/24".into(),
            mtu: 9000,
            ca_dir: "/s/certs".into(),
            nodes: vec![NodeState {
                name: "node1".into(),
                address: Ipv4Addr::new(10, 231, 0, 10),
                netns: "p-node1".into(),
                dir: "/s/nodes/node1".into(),
                certs: "/s/certs/node1".into(),
                pid: 1,
                start_time: 2,
            }],
        };
        let back: LabState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);

        // A state file written before the MTU was recorded: its lab had 1500.
        let mut old = serde_json::to_value(&s).unwrap();
        old.as_object_mut().unwrap().remove("mtu");
        let back: LabState = serde_json::from_value(old).unwrap();
        assert_eq!(back.mtu, 1500);
    }
}
