//! `migrate drain` in the lab, as a user runs it (real podman, CRIU and daemons; root and the
//! lab root are required, and without them these tests fail saying so, they never skip):
//!
//! 1. node a runs two counters, an nginx serving a file written into it after start, and a
//!    container with a bind mount of a host folder. `migrate drain a --to b --json` moves the
//!    three with their state (the counters go on above their pre-drain values on b, the file
//!    is served from b), reports the fourth as not movable with its reason, and exits 1; a
//!    keeps nothing of the three, and the fourth still runs there. Its JSON progress objects
//!    count the moved containers up to all three.
//! 2. `migrate drain a` (no `--to`: the lab's other node) on a node where nothing runs says
//!    so and exits 0, leaving a container that exists there without running, and b's own
//!    container, alone.
//!
//! Each test has its own lab (state directory, namespace prefix), so they run in parallel.

use std::process::Output;
use std::time::Duration;

use e2e::lab::{parse_events, start_counter_named, start_nginx_with_note, Lab, COUNTER_LOOP};
use e2e::wait_for;
use engine::lab;
use serde_json::Value;

/// The counter in container `name` of `node`, if it answers.
fn count_of(lab: &Lab, node: &str, name: &str) -> Option<u64> {
    let (code, out) = lab.run(node, &["podman", "exec", name, "cat", "/c"]);
    if code != 0 {
        return None;
    }
    out.trim().parse().ok()
}

/// Waits until the counter `name` in `node` passes `above`; returns the value seen.
fn count_above(lab: &Lab, node: &str, name: &str, above: u64) -> u64 {
    wait_for(
        &format!("counter {name} in {node} above {above}"),
        Duration::from_secs(30),
        || count_of(lab, node, name).filter(|&c| c > above),
    )
}

/// Names of the containers running in `node`, sorted.
fn running(lab: &Lab, node: &str) -> Vec<String> {
    let mut names: Vec<String> = lab
        .ok(node, &["podman", "ps", "--format", "{{.Names}}"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// `migrate ARGS...` in the lab: the run's output, printed for the test log.
fn migrate(lab: &Lab, args: &[&str]) -> Output {
    let out = lab.migrate_command(args).output().unwrap();
    println!(
        "$ migrate {} (exit {:?})\n{}\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `"event":"container"` object of `name`.
fn outcome<'a>(events: &'a [Value], name: &str) -> &'a Value {
    let found: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "container" && e["container"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one outcome for {name}: {events:?}");
    found[0]
}

#[test]
fn drain_moves_what_can_move_and_reports_the_rest() {
    let lab = Lab::up("d");
    let (a, b) = (&lab.a, &lab.b);
    start_counter_named(&lab, a, "count-one");
    start_counter_named(&lab, a, "count-two");
    lab.ok(a, &["mkdir", "-p", "/var/tmp/drain-data"]);
    lab.ok(
        a,
        &[
            "podman",
            "run",
            "-d",
            "--name",
            "keeper",
            "-v",
            "/var/tmp/drain-data:/data",
            lab::BUSYBOX_IMAGE,
            "sh",
            "-c",
            COUNTER_LOOP,
        ],
    );
    start_nginx_with_note(&lab, a, "written-before-drain");
    let fetch = |from: &str, host: &str| lab.fetch_note(from, host);
    let (addr_a, addr_b) = (lab.address(a), lab.address(b));
    wait_for("nginx on the source", Duration::from_secs(20), || {
        (fetch(b, &addr_a).0 == 0).then_some(())
    });
    let before_one = count_above(&lab, a, "count-one", 20);
    let before_two = count_above(&lab, a, "count-two", 20);

    let out = migrate(&lab, &["drain", a, "--to", b, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "one container could not move, so the drain must exit 1"
    );
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));
    for name in ["count-one", "count-two", "web"] {
        let o = outcome(&events, name);
        assert_eq!(o["result"], "moved", "{o}");
        assert_eq!(
            (&o["from"], &o["to"]),
            (&a.as_str().into(), &b.as_str().into())
        );
        assert!(o["wire_bytes"].as_u64().unwrap() > 0, "{o}");
        assert!(o["seconds"].as_f64().unwrap() > 0.0, "{o}");
    }
    let keeper = outcome(&events, "keeper");
    assert_eq!(keeper["result"], "not_movable", "{keeper}");
    let reason = keeper["reason"].as_str().unwrap();
    assert!(
        reason.contains("bind mount of host path /var/tmp/drain-data at /data"),
        "{reason}"
    );
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary", "the summary comes last");
    assert_eq!(
        (
            &summary["containers"],
            &summary["moved"],
            &summary["not_movable"],
            &summary["failed"],
            &summary["drained"]
        ),
        (&4.into(), &3.into(), &1.into(), &0.into(), &false.into()),
        "{summary}"
    );
    let (progress, outcomes): (Vec<&Value>, Vec<&Value>) =
        events.iter().partition(|e| e["event"] == "progress");
    assert_eq!(outcomes.len(), 5, "four outcomes and a summary: {events:?}");
    // The drain's progress: one status at least as each of the three finished, the moved
    // count never going back, the last one all done.
    assert!(progress.len() >= 3, "{progress:?}");
    let moved: Vec<u64> = progress
        .iter()
        .map(|p| p["moved"].as_u64().unwrap())
        .collect();
    assert!(moved.windows(2).all(|w| w[0] <= w[1]), "{moved:?}");
    let last = progress.last().unwrap();
    assert_eq!(
        (&last["containers"], &last["moved"], &last["done_fraction"]),
        (&3.into(), &3.into(), &1.0.into()),
        "{last}"
    );

    // State intact on b: the counters go on from where they were, the page is served.
    for (name, before) in [("count-one", before_one), ("count-two", before_two)] {
        let first = count_of(&lab, b, name).unwrap_or_else(|| panic!("{name} runs on {b}"));
        assert!(
            first >= before,
            "{name} restarted on {b}: {first} < {before}"
        );
        count_above(&lab, b, name, first);
    }
    let (code, page) = fetch(a, &addr_b);
    assert_eq!(code, 0, "nginx on {b} does not answer {a}");
    assert_eq!(page.trim(), "written-before-drain");

    // a keeps only what could not move, and it still runs.
    assert_eq!(running(&lab, a), ["keeper"]);
    for name in ["count-one", "count-two", "web"] {
        assert!(!lab.exists(a, name), "{name} is still on {a}");
    }
    let seen = count_of(&lab, a, "keeper").expect("keeper answers on a");
    count_above(&lab, a, "keeper", seen);
    assert!(!lab.exists(b, "keeper"), "keeper was made on {b}");
}

#[test]
fn draining_an_empty_node_says_so_and_succeeds() {
    let lab = Lab::up("e");
    let (a, b) = (&lab.a, &lab.b);
    // Exists on a without running: not drained, not counted.
    lab.ok(
        a,
        &[
            "podman",
            "create",
            "--name",
            "idle",
            lab::BUSYBOX_IMAGE,
            "true",
        ],
    );
    start_counter_named(&lab, b, "elsewhere");

    let out = migrate(&lab, &["drain", a]);
    assert_eq!(out.status.code(), Some(0), "nothing to move is success");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("nothing to drain: no containers run on {a}")),
        "{stdout}"
    );
    assert!(lab.exists(a, "idle"), "the idle container left {a}");
    assert!(!lab.exists(b, "idle"), "the idle container was made on {b}");
    assert_eq!(running(&lab, b), ["elsewhere"]);

    let out = migrate(&lab, &["drain", a, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let events = parse_events(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(events.len(), 1, "only the summary: {events:?}");
    assert_eq!(
        (
            &events[0]["event"],
            &events[0]["containers"],
            &events[0]["to"],
            &events[0]["drained"]
        ),
        (
            &"summary".into(),
            &0.into(),
            &b.as_str().into(),
            &true.into()
        )
    );
}
