//! Lab nodes for the engine's tests against the real thing, started with `engine::lab` (each
//! with its own mount, UTS, cgroup and network namespace, sharing the lab root, a `/shared`
//! folder and the busybox image), plus a counter container and a reader of the counter inside
//! a checkpoint. `Drop` takes the lab down (set `KEEP=1` to keep its folder). Waits are on
//! conditions with deadlines, never bare sleeps.

#![allow(dead_code)] // each test binary uses its own part of this

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engine::lab::{self, LabOptions};
use engine::runtime::Podman;

/// Fails, saying why, unless this runs as root with the lab root built: `make test` builds it,
/// and a test that needs the real thing must not pass without it.
pub fn require_lab(test: &str) {
    lab::check_ready(&LabOptions::default()).unwrap_or_else(|e| panic!("{test}: {e}"));
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

/// Lab nodes of this test, started with [`engine::lab`] under a state directory and a namespace
/// prefix of their own, so tests never touch a user's lab or each other.
pub struct Lab {
    opts: LabOptions,
    names: Vec<String>,
}

impl Lab {
    /// Starts one node per name (each with `localhost/lab/busybox` imported); `tag` keeps this
    /// test's state directory and namespaces apart.
    pub fn start(tag: &str, names: &[&str]) -> Lab {
        let opts = LabOptions {
            state_dir: PathBuf::from(format!("/var/tmp/migrate-test-{tag}")),
            prefix: format!("mlt-{tag}"),
            ..LabOptions::default()
        };
        // A leftover of an earlier, interrupted run of this very test.
        let _ = lab::down(&opts);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        lab::up(&names, &opts).unwrap_or_else(|e| panic!("lab up for {tag}: {e}"));
        Lab { opts, names }
    }

    /// The folder every node sees as `/shared`.
    pub fn shared(&self) -> PathBuf {
        self.opts.state_dir.join("shared")
    }

    /// Podman in node `i`, through the lab's exec script.
    pub fn podman(&self, i: usize) -> Podman {
        let cmd = lab::command(&self.names[i], &[] as &[&str], &self.opts).unwrap();
        Podman::new(
            std::iter::once(cmd.get_program().to_os_string())
                .chain(cmd.get_args().map(|a| a.to_os_string())),
        )
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
        let out = lab::command(&self.names[i], cmd, &self.opts)
            .unwrap()
            .stdin(std::process::Stdio::null())
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
                lab::BUSYBOX_IMAGE,
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
        if let Err(e) = lab::down(&self.opts) {
            eprintln!("lab down for {}: {e}", self.opts.state_dir.display());
        }
        if std::env::var_os("KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.opts.state_dir);
        }
    }
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
