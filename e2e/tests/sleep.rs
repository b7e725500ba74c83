//! A container whose PID 1 is a bare busybox `sleep` migrates, with the default pre-copy, in a
//! real lab (podman, crun, CRIU 4.2). CRIU cannot resume a task it interrupted in a sleep the
//! kernel restarts through its restart block (nanosleep, clock_nanosleep): it hands the call
//! EINTR, in the task it leaves running after a pre-copy checkpoint and in every copy restored
//! from the checkpoint. busybox `sleep` does not retry and exits 0, so the container used to
//! stop during the pre-copy round, the final checkpoint then failed, and the rollback had
//! nothing to bring back. The engine now makes its checkpoints restart such sleeps
//! (`engine::restart`), and when a pre-copy checkpoint ended the container it restores it in
//! place from that checkpoint's kept images before the final checkpoint. Checked here: 1. the
//! migration succeeds, the container runs on the destination with PID 1 sleeping again, and
//! is gone from the source; then it moves back with an explicit pre-copy round, as a
//! container restored once before; 2. when the migration fails after that (a destination
//! without room for the checkpoint), the rollback restores the source from its final
//! checkpoint, and it sleeps there again.
//!
//! Root and the lab root are required; without them this test fails saying so, it never skips.

use std::time::Duration;

use e2e::lab::Lab;
use e2e::wait_for;
use engine::lab;
use serde_json::Value;

/// The container's name.
const NAME: &str = "sleeper";

/// x86_64 `clock_nanosleep`, the call busybox `sleep` (glibc's sleep(3)) blocks in.
const CLOCK_NANOSLEEP: &str = "230";

/// The migration's phases in order, from its JSON events.
fn phases(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e["event"] == "phase")
        .map(|e| e["phase"].as_str().unwrap())
        .collect()
}

/// Waits until `NAME` runs in `node` with PID 1 blocked in clock_nanosleep: it sleeps, rather
/// than being about to exit from an interrupted sleep.
fn wait_sleeping(lab: &Lab, node: &str) {
    wait_for(
        &format!("{NAME} sleeping in {node}"),
        Duration::from_secs(30),
        || {
            let (code, state) = lab.run(
                node,
                &["podman", "inspect", "--format", "{{.State.Status}}", NAME],
            );
            if code != 0 || state.trim() != "running" {
                return None;
            }
            let (code, syscall) =
                lab.run(node, &["podman", "exec", NAME, "cat", "/proc/1/syscall"]);
            (code == 0 && syscall.split_whitespace().next() == Some(CLOCK_NANOSLEEP)).then_some(())
        },
    );
}

/// Asserts that a migration of `NAME` from `from` to `to` succeeded, left it sleeping in `to`
/// and nothing of it in `from`.
fn assert_moved(lab: &Lab, from: &str, to: &str, ok: bool, events: &[Value]) {
    let last = events.last().expect("no events");
    assert!(ok, "the migration {from} -> {to} failed: {last}");
    assert_eq!(last["event"], "done", "{last}");
    wait_sleeping(lab, to);
    let restored = lab.ok(
        to,
        &["podman", "inspect", "--format", "{{.State.Restored}}", NAME],
    );
    assert_eq!(restored.trim(), "true", "{NAME} in {to} was not restored");
    assert!(!lab.exists(from, NAME), "{NAME} is still on {from}");
}

/// Starts `NAME`, PID 1 `sleep 3600`, in `node`, and waits until it sleeps.
fn start_sleeper(lab: &Lab, node: &str) {
    lab.ok(
        node,
        &[
            "podman",
            "run",
            "-d",
            "--name",
            NAME,
            lab::BUSYBOX_IMAGE,
            "sleep",
            "3600",
        ],
    );
    wait_sleeping(lab, node);
}

#[test]
fn sleep_as_pid1_migrates_with_precopy() {
    let lab = Lab::up("sp");
    let (a, b) = (&lab.a, &lab.b);
    start_sleeper(&lab, a);

    let (ok, events) = lab.migrate(NAME, a, b, &[]);
    assert_moved(&lab, a, b, ok, &events);
    assert_eq!(
        phases(&events),
        [
            "plan",
            "precopy",
            "checkpoint",
            "transfer",
            "restore",
            "verify",
            "cleanup"
        ]
    );

    // Back, through a pre-copy round again: the sleep it restarted is interrupted once more.
    let (ok, events) = lab.migrate(NAME, b, a, &["--precopy", "1"]);
    assert_moved(&lab, b, a, ok, &events);
    assert!(
        phases(&events).contains(&"precopy"),
        "no pre-copy round on the way back"
    );
}

#[test]
fn sleep_as_pid1_is_restored_on_the_source_when_the_migration_fails() {
    let lab = Lab::up("sq");
    let (a, b) = (&lab.a, &lab.b);
    start_sleeper(&lab, a);
    // Room on the destination for a few KiB: the checkpoint (about 150 KiB) cannot land.
    let work = lab.limit_work_folder(b, 16 << 10);
    let (ok, events) = lab.migrate(NAME, a, b, &[]);
    assert!(!ok, "the migration succeeded on a full disk");
    let last = events.last().expect("no events");
    assert_eq!(last["event"], "failed", "{last}");
    assert_eq!(last["rolled_back"], true, "{last}");
    // The pre-copy checkpoint had ended it and it was restored in place; the final checkpoint
    // stopped it; the rollback restored it from that one.
    wait_sleeping(&lab, a);
    let restored = lab.ok(
        a,
        &["podman", "inspect", "--format", "{{.State.Restored}}", NAME],
    );
    assert_eq!(restored.trim(), "true", "{NAME} in {a} was not restored");
    assert!(!lab.exists(b, NAME), "{NAME} was left on {b}");
    lab.ok(b, &["umount", &work]);
}
