//! The two-node lab as the end-to-end tests drive it: [`Lab`] brings up its own lab (state
//! directory and namespace prefix from a tag, so tests run in parallel), runs commands in its
//! nodes, runs the `migrate` binary of this build as a user types it, and tears it all down
//! on drop. Plus the counter container the migration tests move.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use engine::lab::{self, LabOptions, LabState};
use serde_json::Value;

/// The `migrate` binary of this build (target/<profile>/migrate, beside target/<profile>/deps).
pub fn migrate_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("migrate");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p cli`; `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// A lab of two nodes, with daemons, torn down on drop.
#[derive(Debug)]
pub struct Lab {
    /// Where its state lives and what its names start with.
    pub opts: LabOptions,
    /// Its nodes, as `lab up` recorded them.
    pub state: LabState,
    /// The first node's name (`<tag>1`).
    pub a: String,
    /// The second node's name (`<tag>2`).
    pub b: String,
}

impl Lab {
    pub fn up(tag: &str) -> Lab {
        lab::check_ready(&LabOptions::default()).unwrap_or_else(|e| panic!("{tag}: {e}"));
        let opts = LabOptions {
            state_dir: PathBuf::from(format!("/tmp/migrate-e2e-mig-{tag}")),
            prefix: format!("mlmig-{tag}"),
            daemon_binary: Some(migrate_binary()),
            ..LabOptions::default()
        };
        let _ = lab::down(&opts);
        let (a, b) = (format!("{tag}1"), format!("{tag}2"));
        let t = Instant::now();
        let state = lab::up(&[a.clone(), b.clone()], &opts)
            .expect("lab up")
            .state;
        println!("lab {tag} up: {:.1} s", t.elapsed().as_secs_f64());
        Lab { opts, state, a, b }
    }

    /// Runs `cmd` in `node`: (exit code, stdout).
    pub fn run(&self, node: &str, cmd: &[&str]) -> (i32, String) {
        let out = lab::command(node, cmd, &self.opts)
            .unwrap()
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let shown: String = stdout.chars().take(400).collect();
        println!("[{node}] $ {}\n{shown}{stderr}", cmd.join(" "));
        (out.status.code().unwrap_or(-1), stdout)
    }

    pub fn ok(&self, node: &str, cmd: &[&str]) -> String {
        let (code, out) = self.run(node, cmd);
        assert_eq!(code, 0, "`{}` failed in {node}", cmd.join(" "));
        out
    }

    /// `migrate ARGS...` as a user types it, in this lab.
    pub fn migrate_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(migrate_binary());
        c.args(args)
            .env("MIGRATE_LAB_DIR", &self.opts.state_dir)
            .env("MIGRATE_LAB_PREFIX", &self.opts.prefix)
            .stdin(Stdio::null());
        c
    }

    /// Runs `migrate CONTAINER --from FROM --to TO --json EXTRA...`: (success, events).
    pub fn migrate(
        &self,
        container: &str,
        from: &str,
        to: &str,
        extra: &[&str],
    ) -> (bool, Vec<Value>) {
        let mut args = vec![container, "--from", from, "--to", to, "--json"];
        args.extend_from_slice(extra);
        let out: Output = self.migrate_command(&args).output().unwrap();
        let events = parse_events(&String::from_utf8_lossy(&out.stdout));
        println!(
            "$ migrate {}\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), events)
    }

    pub fn exists(&self, node: &str, container: &str) -> bool {
        self.run(node, &["podman", "container", "exists", container])
            .0
            == 0
    }

    /// Images the migrations imported into `node` (`localhost/migrate/...`).
    pub fn migration_images(&self, node: &str) -> Vec<String> {
        self.ok(
            node,
            &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        )
        .lines()
        .filter(|l| l.starts_with("localhost/migrate/"))
        .map(str::to_string)
        .collect()
    }

    /// What lies under the default folder of checkpoint images in memory in `node`
    /// (`engine::memory_images::DEFAULT_ROOT`, in the node's own /dev/shm).
    pub fn memory_images(&self, node: &str) -> Vec<String> {
        let root = engine::memory_images::DEFAULT_ROOT;
        let (code, listing) = self.run(node, &["find", root, "-mindepth", "1"]);
        // 1: no such folder (nothing went to memory yet).
        assert!(
            code == 0 || code == 1,
            "listing {root} in {node}: exit {code}"
        );
        listing.lines().map(str::to_string).collect()
    }

    /// Bytes of the files in the chunk store of `node`'s daemon, seen from the host.
    pub fn store_bytes(&self, node: &str) -> u64 {
        walk(&self.daemon_folder(node, "chunks"))
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Files in the daemon's work folder of `node`, seen from the host.
    pub fn work_files(&self, node: &str) -> Vec<String> {
        walk(&self.daemon_folder(node, "work"))
    }

    /// `name` in the state directory of `node`'s daemon ([`lab::DAEMON_STATE`] inside the
    /// node, whose /var/lib is the node's folder), seen from the host.
    fn daemon_folder(&self, node: &str, name: &str) -> PathBuf {
        self.node(node).dir.join("containers/migrate").join(name)
    }

    /// The recorded state of `node`.
    fn node(&self, node: &str) -> &lab::NodeState {
        self.state.nodes.iter().find(|n| n.name == node).unwrap()
    }

    pub fn address(&self, node: &str) -> String {
        self.node(node).address.to_string()
    }

    /// Gives the daemon of `node` a work folder of `bytes` (a tmpfs over it), and as much room
    /// for files in memory, so a checkpoint larger than that cannot land; returns the work
    /// folder, for [`Lab::ok`] `umount` at the end.
    pub fn limit_work_folder(&self, node: &str, bytes: u64) -> String {
        let work = lab::DAEMON_STATE.to_string() + "/work";
        let options = format!("size={bytes},mode=0700");
        self.ok(
            node,
            &["mount", "-t", "tmpfs", "-o", &options, "tmpfs", &work],
        );
        // As little room in memory, where an incoming migration's files go when they fit.
        let memory = engine::memory_images::DEFAULT_ROOT;
        self.ok(node, &["mkdir", "-p", memory]);
        self.ok(
            node,
            &["mount", "-t", "tmpfs", "-o", &options, "tmpfs", memory],
        );
        work
    }

    /// The name of `node`'s network namespace (in /run/netns).
    pub fn netns(&self, node: &str) -> String {
        self.node(node).netns.clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.opts) {
            eprintln!("lab down: {e}");
        }
    }
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

/// The JSON events `migrate --json` printed, one per line.
pub fn parse_events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A shell loop writing an incrementing counter to /c, 20 times a second.
pub const COUNTER_LOOP: &str =
    "i=0; while :; do i=$((i+1)); echo $i > /c.tmp; mv /c.tmp /c; sleep 0.05; done";

/// Starts the counter container `counter` in `node`.
pub fn start_counter(lab: &Lab, node: &str) {
    start_counter_named(lab, node, "counter");
}

/// Starts the counter container `name` in `node`.
pub fn start_counter_named(lab: &Lab, node: &str, name: &str) {
    lab.ok(
        node,
        &[
            "podman",
            "run",
            "-d",
            "--name",
            name,
            lab::BUSYBOX_IMAGE,
            "sh",
            "-c",
            COUNTER_LOOP,
        ],
    );
}

/// The value of the counter in container `counter` of `node`, if it answers.
pub fn count(lab: &Lab, node: &str) -> Option<u64> {
    let (code, out) = lab.run(node, &["podman", "exec", "counter", "cat", "/c"]);
    if code != 0 {
        return None;
    }
    out.trim().parse().ok()
}

/// Starts nginx `web` (host network) in `node` and writes `text` into its page `note.txt`.
pub fn start_nginx_with_note(lab: &Lab, node: &str, text: &str) {
    lab.ok(
        node,
        &[
            "podman",
            "run",
            "-d",
            "--name",
            "web",
            "--network=host",
            lab::NGINX_IMAGE,
        ],
    );
    let write = format!("echo {text} > /var/www/html/note.txt");
    lab.ok(node, &["podman", "exec", "web", "sh", "-c", &write]);
}

impl Lab {
    /// Fetches `http://HOST/note.txt` from `node`: (exit code, page).
    pub fn fetch_note(&self, node: &str, host: &str) -> (i32, String) {
        self.run(
            node,
            &[
                "busybox",
                "wget",
                "-q",
                "-T",
                "2",
                "-O",
                "-",
                &format!("http://{host}/note.txt"),
            ],
        )
    }
}
