//! Lab nodes for the engine's tests against the real thing: two nodes started with
//! lab/enter.sh (each with its own mount, UTS, cgroup and network namespace, sharing the lab
//! root and a `/shared` folder), commands run in them with lab/exec.sh, a busybox image and a
//! counter container. `Drop` removes containers, nodes, namespaces and the work folder (set
//! `KEEP=1` to keep the folder). Waits are on conditions with deadlines, never bare sleeps.

#![allow(dead_code)] // each test binary uses its own part of this

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine::runtime::Podman;

/// The lab root that lab/rootfs.sh builds.
pub const ROOTFS: &str = "/var/lib/migrate-lab/rootfs";

/// Fails, saying why, unless this runs as root with the lab root built: `make test` builds it,
/// and a test that needs the real thing must not pass without it.
pub fn require_lab(test: &str) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    assert!(root, "{test} needs root: run `make test` as root");
    assert!(
        Path::new(ROOTFS).join("etc/migrate-lab/stamp").exists(),
        "{test}: the lab root at {ROOTFS} is missing: build it with lab/rootfs.sh (make test does)"
    );
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `deadline`.
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two lab nodes and their shared folder.
pub struct Lab {
    lab: PathBuf,
    work: PathBuf,
    names: Vec<String>,
    /// Node folder and network namespace of each node.
    nodes: Vec<(PathBuf, String)>,
    /// The `setsid enter.sh` processes, reaped after stop.sh kills the nodes.
    children: Vec<std::process::Child>,
}

impl Lab {
    /// Starts one node per name under `work` (emptied first).
    pub fn start(work: &str, names: &[&str]) -> Lab {
        let lab = fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab")).unwrap();
        let _ = fs::remove_dir_all(work);
        fs::create_dir_all(Path::new(work).join("shared")).unwrap();
        let mut me = Lab {
            lab,
            work: PathBuf::from(work),
            names: names.iter().map(|n| n.to_string()).collect(),
            nodes: Vec::new(),
            children: Vec::new(),
        };
        for name in names {
            let ns = format!("migrate-{name}");
            let dir = me.work.join(name);
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            run("ip", &["netns", "add", &ns]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            me.nodes.push((dir.clone(), ns.clone()));
            let log = fs::File::create(me.work.join(format!("{name}.log"))).unwrap();
            let child = Command::new("setsid")
                .arg(me.lab.join("enter.sh"))
                .args(["--netns", &ns, "--hostname", name, "--bind"])
                .arg(format!("{}:/shared", me.shared().display()))
                .arg(ROOTFS)
                .arg(&dir)
                .args(["--", "catatonit", "-P"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            me.children.push(child);
            wait_for(
                &format!("node {name} to start"),
                Duration::from_secs(10),
                || dir.join("node.pid").exists(),
            );
        }
        me
    }

    /// The folder every node sees as `/shared`.
    pub fn shared(&self) -> PathBuf {
        self.work.join("shared")
    }

    /// Podman in node `i`, through lab/exec.sh.
    pub fn podman(&self, i: usize) -> Podman {
        Podman::new([
            self.lab.join("exec.sh").into_os_string(),
            self.nodes[i].0.clone().into_os_string(),
            "--".into(),
        ])
    }

    /// Runs CMD in node `i`, echoing it and what it printed; panics unless it succeeds.
    pub fn exec(&self, i: usize, cmd: &[&str]) -> String {
        let out = self.try_exec(i, cmd);
        assert!(
            out.status.success(),
            "{} failed in {}",
            cmd.join(" "),
            self.names[i]
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_exec(&self, i: usize, cmd: &[&str]) -> std::process::Output {
        let out = Command::new(self.lab.join("exec.sh"))
            .arg(&self.nodes[i].0)
            .arg("--")
            .args(cmd)
            .output()
            .unwrap();
        println!(
            "[{}] $ {}\n{}{}",
            self.names[i],
            cmd.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Builds a busybox-static root in node 0 and imports it as `localhost/lab/busybox` in
    /// every node (the lab has no registry).
    pub fn import_busybox(&self) {
        self.exec(
            0,
            &[
                "sh",
                "-euc",
                r#"d=$(mktemp -d)
mkdir -p "$d/bin" "$d/tmp" "$d/etc" "$d/proc" "$d/sys" "$d/dev" "$d/root"
cp /bin/busybox "$d/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$d/bin/$a" ] || ln -s busybox "$d/bin/$a"; done
chmod 1777 "$d/tmp"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$d" -cf /shared/busybox-rootfs.tar .
rm -rf "$d""#,
            ],
        );
        for i in 0..self.nodes.len() {
            self.exec(
                i,
                &[
                    "podman",
                    "import",
                    "-q",
                    "--change",
                    "CMD=/bin/sh",
                    "/shared/busybox-rootfs.tar",
                    "localhost/lab/busybox",
                ],
            );
        }
    }

    /// Runs a counter container `name` on node `i` and waits until it has counted to 5.
    pub fn start_counter(&self, i: usize, name: &str) {
        self.exec(
            i,
            &[
                "podman",
                "run",
                "-d",
                "--name",
                name,
                "--network=host",
                "localhost/lab/busybox",
                "sh",
                "-c",
                // Written aside and renamed, so a checkpoint never catches a half-written file.
                "i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/count; sleep 0.2; done",
            ],
        );
        wait_for(
            &format!("{name} to count to 5"),
            Duration::from_secs(20),
            || self.try_count(i, name).is_some_and(|n| n >= 5),
        );
    }

    fn try_count(&self, i: usize, container: &str) -> Option<u64> {
        let out = self.try_exec(i, &["podman", "exec", container, "cat", "/tmp/count"]);
        out.status.success().then_some(())?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// The counter value /tmp/count in `container` on node `i`.
    pub fn count(&self, i: usize, container: &str) -> u64 {
        self.try_count(i, container)
            .unwrap_or_else(|| panic!("no count in {container} on {}", self.names[i]))
    }

    /// Asserts the counter in `container` on node `i` went on from `from` (a restarted one
    /// would start again near 1) and keeps counting.
    pub fn assert_continues(&self, i: usize, container: &str, from: u64) {
        let first = self.count(i, container);
        assert!(
            first >= from,
            "{container} on {} restarted instead of continuing: checkpointed at {from}, now {first}",
            self.names[i]
        );
        wait_for(
            &format!("{container} to keep counting past {first}"),
            Duration::from_secs(10),
            || self.count(i, container) > first,
        );
        println!("{container}: checkpointed at {from}, continued at {first}, still counting");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (dir, ns) in &self.nodes {
            if dir.join("node.pid").exists() {
                let _ = Command::new(self.lab.join("exec.sh"))
                    .arg(dir)
                    .args(["--", "podman", "rm", "-a", "-f", "-t", "0"])
                    .output();
            }
            let _ = Command::new(self.lab.join("stop.sh")).arg(dir).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
        if std::env::var_os("KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

fn run(prog: &str, args: &[&str]) {
    assert!(
        Command::new(prog).args(args).status().unwrap().success(),
        "{prog} {args:?}"
    );
}

/// The counter value in a checkpoint archive's rootfs-diff.tar (`tmp/count`).
pub fn checkpointed_count(archive: &Path) -> u64 {
    let mut outer = tar::Archive::new(fs::File::open(archive).unwrap());
    for e in outer.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_str() == Some("rootfs-diff.tar") {
            let mut inner = tar::Archive::new(e);
            for f in inner.entries().unwrap() {
                let mut f = f.unwrap();
                if f.path().unwrap().to_string_lossy().trim_start_matches("./") == "tmp/count" {
                    let mut s = String::new();
                    f.read_to_string(&mut s).unwrap();
                    return s.trim().parse().unwrap();
                }
            }
        }
    }
    panic!("no tmp/count in rootfs-diff.tar of {}", archive.display());
}
