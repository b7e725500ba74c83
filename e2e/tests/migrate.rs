//! Migrations for real, as a user runs them: a lab with a daemon in each node (real podman,
//! crun and CRIU; QUIC with mutual TLS between the nodes' network namespaces), and the `migrate`
//! binary asked to move a container. Root and the lab root are required; without them these
//! tests fail saying so, they never skip.
//!
//! 1. a counter continues on the destination from its checkpointed value and is gone from the
//!    source; 2. a file written into nginx is served by it on the destination (restored through
//!    the OCI checkpoint image, `--via-image`; the others restore from the archive); 3. redis holding
//!    more than 200 MiB in more than 100k keys has every key and value after the move (a digest
//!    computed inside redis), and 4. moving it back sends at most 10% of the archive; 5. the
//!    destination daemon killed mid-transfer, and a destination without room for the
//!    checkpoint (so for its image):
//!    the command fails clearly, the source runs on with its state, the destination holds
//!    nothing of the migration.
//!
//! Each test has its own lab (state directory, namespace prefix), so they run in parallel.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::lab::{count, start_counter, start_counter_named, start_nginx_with_note, Lab};
use e2e::wait_for;
use engine::lab;
use serde_json::Value;

/// The summary: the last event, which must be `done`.
fn summary(events: &[Value]) -> &Value {
    let last = events.last().expect("no events");
    assert_eq!(
        last["event"], "done",
        "the last event is not the summary: {last}"
    );
    for key in [
        "archive_bytes",
        "wire_bytes",
        "total_seconds",
        "downtime_seconds",
    ] {
        assert!(last[key].is_number(), "summary lacks {key}: {last}");
    }
    last
}

/// Waits until the counter in `node` passes `above`; returns the value seen.
fn count_above(lab: &Lab, node: &str, above: u64) -> u64 {
    wait_for(
        &format!("counter in {node} above {above}"),
        Duration::from_secs(30),
        || count(lab, node).filter(|&c| c > above),
    )
}

#[test]
fn counter_continues_on_the_destination() {
    let lab = Lab::up("c");
    let (a, b) = (&lab.a, &lab.b);
    start_counter(&lab, a);
    // By ID: refused in the plan, before anything stops.
    let id = lab.ok(a, &["podman", "inspect", "--format", "{{.Id}}", "counter"]);
    let (ok, events) = lab.migrate(&id.trim()[..12], a, b, &[]);
    assert!(!ok, "a migration by ID went ahead");
    let last = events.last().unwrap();
    assert_eq!(last["phase"], "plan", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("is a container ID"),
        "{last}"
    );
    let before = count_above(&lab, a, 20);
    let (ok, events) = lab.migrate("counter", a, b, &[]);
    assert!(ok, "migration failed");
    let s = summary(&events);
    assert_eq!(s["container"], "counter");
    assert_eq!(s["precopy_rounds"], 1, "pre-copy is on by default");
    assert_eq!(
        s["archive_made_here"], true,
        "Podman exported the archive: {s}"
    );
    assert_eq!(
        s["images_in_memory"], true,
        "the checkpoint images went to disk: {s}"
    );
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "phase")
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
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
    // Continues from where it was: at least the value seen before, never from 1 again.
    let first = count(&lab, b).expect("the counter runs on the destination");
    assert!(
        first >= before,
        "the counter restarted on {b}: {first} < {before}"
    );
    count_above(&lab, b, first);
    assert!(!lab.exists(a, "counter"), "the counter is still on {a}");
    assert_eq!(
        lab.migration_images(b),
        Vec::<String>::new(),
        "checkpoint image left on {b}"
    );
    wait_for("work folders empty", Duration::from_secs(30), || {
        (lab.work_files(a).is_empty() && lab.work_files(b).is_empty()).then_some(())
    });
    for node in [a, b] {
        assert_eq!(
            lab.memory_images(node),
            Vec::<String>::new(),
            "files left in memory on {node}"
        );
    }
}

#[test]
fn base_image_is_sent_when_the_destination_lacks_it() {
    let lab = Lab::up("s");
    let (a, b) = (&lab.a, &lab.b);
    lab.ok(b, &["podman", "rmi", lab::BUSYBOX_IMAGE]);
    start_counter(&lab, a);
    let before = count_above(&lab, a, 10);
    let (ok, events) = lab.migrate("counter", a, b, &[]);
    assert!(ok, "migration failed");
    summary(&events);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "phase" && e["phase"] == "stage_image"),
        "the base image was not staged"
    );
    let first = count(&lab, b).expect("the counter runs on the destination");
    assert!(first >= before, "the counter restarted: {first} < {before}");
    lab.ok(b, &["podman", "image", "exists", lab::BUSYBOX_IMAGE]);
    // The next migration of a container on that image finds it there.
    start_counter_named(&lab, a, "counter2");
    let (ok, events) = lab.migrate("counter2", a, b, &[]);
    assert!(ok, "second migration failed");
    assert!(!events
        .iter()
        .any(|e| e["event"] == "phase" && e["phase"] == "stage_image"));
}

#[test]
fn nginx_serves_its_file_from_the_destination() {
    let lab = Lab::up("n");
    let (a, b) = (&lab.a, &lab.b);
    start_nginx_with_note(&lab, a, "written-before-migration");
    // A deletion travels too (as `deleted.files`).
    lab.ok(a, &["podman", "exec", "web", "rm", "/usr/bin/yes"]);
    let fetch = |from: &str, host: &str| lab.fetch_note(from, host);
    let addr_a = lab.address(a);
    wait_for("nginx on the source", Duration::from_secs(20), || {
        (fetch(b, &addr_a).0 == 0).then_some(())
    });
    // Through the OCI checkpoint image, the way a Kubernetes node restores.
    let (ok, events) = lab.migrate("web", a, b, &["--via-image"]);
    assert!(ok, "migration failed");
    let s = summary(&events);
    assert_eq!(
        s["archive_made_here"], true,
        "Podman exported the archive: {s}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "phase" && e["phase"] == "assemble"),
        "no assemble phase with --via-image"
    );
    assert_eq!(
        lab.migration_images(b),
        Vec::<String>::new(),
        "checkpoint image left on {b}"
    );
    let addr_b = lab.address(b);
    let (code, page) = fetch(a, &addr_b);
    assert_eq!(code, 0, "nginx on {b} does not answer {a}");
    assert_eq!(page.trim(), "written-before-migration");
    let gone = lab.ok(
        b,
        &[
            "podman",
            "exec",
            "web",
            "sh",
            "-c",
            "test -e /usr/bin/yes; echo $?",
        ],
    );
    assert_eq!(
        gone.trim(),
        "1",
        "a file deleted before the migration is back on {b}"
    );
    assert_ne!(fetch(b, &addr_a).0, 0, "nginx still answers on {a}");
}

/// Keys and value size of the redis test: 110k keys of 2 KiB, about 225 MB of values.
const REDIS_KEYS: u64 = 110_000;
const REDIS_VALUE: usize = 2048;

/// The key count and redis' own digest of every key and value (`DEBUG DIGEST`, which the lab
/// image allows from inside the container). It reads the dataset without allocating, so it
/// does not dirty the memory the migration back is measured on.
fn redis_digest(lab: &Lab, node: &str) -> (u64, String) {
    let n = lab
        .ok(node, &["podman", "exec", "kv", "redis-cli", "DBSIZE"])
        .trim()
        .parse()
        .expect("key count");
    let h = lab
        .ok(
            node,
            &["podman", "exec", "kv", "redis-cli", "DEBUG", "DIGEST"],
        )
        .trim()
        .to_string();
    assert_eq!(h.len(), 40, "not a digest: {h:?}");
    (n, h)
}

/// Fills redis in `node` with [`REDIS_KEYS`] keys: half random (hex), half text-like.
fn fill_redis(lab: &Lab, node: &str) {
    let mut resp = Vec::with_capacity((REDIS_KEYS as usize) * (REDIS_VALUE + 64));
    let mut rng = fastrand::Rng::with_seed(7);
    const WORDS: [&str; 8] = [
        "container ",
        "migration ",
        "checkpoint ",
        "memory ",
        "page ",
        "node ",
        "restore ",
        "redis ",
    ];
    for i in 0..REDIS_KEYS {
        let key = format!("key:{i:08}");
        let mut value = String::with_capacity(REDIS_VALUE);
        if i % 2 == 0 {
            while value.len() < REDIS_VALUE {
                value.push_str(&format!("{:016x}", rng.u64(..)));
            }
        } else {
            while value.len() < REDIS_VALUE {
                value.push_str(WORDS[rng.usize(..WORDS.len())]);
            }
        }
        value.truncate(REDIS_VALUE);
        resp.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                key.len(),
                value.len()
            )
            .as_bytes(),
        );
    }
    let mut child = lab::command(
        node,
        &["podman", "exec", "-i", "kv", "redis-cli", "--pipe"],
        &lab.opts,
    )
    .unwrap()
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&resp).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("redis-cli --pipe: {text}");
    assert!(out.status.success(), "redis-cli --pipe failed");
    assert!(
        text.contains("errors: 0"),
        "redis refused some writes: {text}"
    );
}

fn start_redis(lab: &Lab, node: &str) {
    run_redis(lab, node);
    fill_redis(lab, node);
}

/// Starts an empty redis `kv` in `node` (host network) and waits until it answers.
fn run_redis(lab: &Lab, node: &str) {
    lab.ok(
        node,
        &[
            "podman",
            "run",
            "-d",
            "--name",
            "kv",
            "--network=host",
            lab::REDIS_IMAGE,
        ],
    );
    wait_for("redis answering", Duration::from_secs(20), || {
        (lab.run(node, &["podman", "exec", "kv", "redis-cli", "PING"])
            .1
            .trim()
            == "PONG")
            .then_some(())
    });
}

#[test]
fn redis_keeps_every_key_and_comes_back_cheaply() {
    let lab = Lab::up("r");
    let (a, b) = (&lab.a, &lab.b);
    start_redis(&lab, a);
    let used: u64 = lab
        .ok(a, &["podman", "exec", "kv", "redis-cli", "INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    println!(
        "redis used_memory: {:.1} MiB",
        used as f64 / (1 << 20) as f64
    );
    assert!(used >= 200 << 20, "redis holds less than 200 MiB");
    let before = redis_digest(&lab, a);
    assert_eq!(before.0, REDIS_KEYS);

    let (ok, events) = lab.migrate("kv", a, b, &[]);
    assert!(ok, "migration failed");
    let there = summary(&events).clone();
    assert_eq!(
        redis_digest(&lab, b),
        before,
        "keys or values differ on {b}"
    );
    assert!(!lab.exists(a, "kv"));
    // Its memory barely changed since the pre-copy round: the destination left most of the
    // final archive where that round had written it.
    let (archive, in_place) = (
        there["archive_bytes"].as_u64().unwrap(),
        there["bytes_in_place"].as_u64().unwrap(),
    );
    assert!(
        in_place * 2 >= archive,
        "only {in_place} B of the {archive} B final archive were found in place on {b}"
    );
    // What the destination received stays in its chunk store (issue 3: each node keeps the
    // chunks it sends and receives), so a container coming to it again sends little.
    let (stored, wire) = (
        lab.store_bytes(b),
        there["wire_bytes_total"].as_u64().unwrap(),
    );
    assert!(
        stored * 2 >= wire,
        "{b} keeps {stored} B of chunks after receiving {wire} B"
    );

    // 4. Back to where it came from: that node kept the chunks it sent.
    let (ok, events) = lab.migrate("kv", b, a, &[]);
    assert!(ok, "migration back failed");
    let back = summary(&events);
    assert_eq!(there["precopy_rounds"], 1, "a first migration pre-copies");
    assert_eq!(
        back["precopy_rounds"], 0,
        "{a} had the container before: auto pre-copy skips it"
    );
    assert_eq!(
        redis_digest(&lab, a),
        before,
        "keys or values differ after coming back"
    );
    let archive = back["archive_bytes"].as_u64().unwrap();
    let wire = back["wire_bytes_total"].as_u64().unwrap();
    println!(
        "there: archive {} B, wire {} B, in place {in_place} B; back: archive {archive} B, wire \
         {wire} B ({:.2}%)",
        there["archive_bytes"],
        there["wire_bytes_total"],
        100.0 * wire as f64 / archive as f64
    );
    assert!(
        wire * 10 <= archive,
        "coming back sent {wire} B of a {archive} B archive (more than 10%)"
    );
}

/// A server with clients: one connected (redis-cli blocked in `DEBUG SLEEP`) and one whose
/// connection waits, not yet accepted, in the listener's backlog. CRIU refuses to dump either
/// unless told what to do (the lab's /etc/criu/default.conf: tcp-established, tcp-close,
/// skip-in-flight); with that the migration goes through and the data is there.
#[test]
fn open_and_in_flight_connections_do_not_stop_the_migration() {
    let lab = Lab::up("i");
    let (a, b) = (&lab.a, &lab.b);
    run_redis(&lab, a);
    lab.ok(a, &["podman", "exec", "kv", "redis-cli", "SET", "k", "v"]);
    // Redis busy for 30 s; a client from the other node connects and waits in the backlog.
    let mut sleeper = lab::command(
        a,
        &["podman", "exec", "kv", "redis-cli", "DEBUG", "SLEEP", "30"],
        &lab.opts,
    )
    .unwrap()
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let target = format!("{}:6379", lab.address(a));
    let mut client = lab::command(b, &["busybox", "nc", &target], &lab.opts)
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The connection is established (in the listener's backlog) once the kernel shows it.
    wait_for(
        "a connection in redis' backlog",
        Duration::from_secs(10),
        || {
            let (_, out) = lab.run(a, &["busybox", "netstat", "-tn"]);
            out.lines()
                .any(|l| l.contains(":6379") && l.contains("ESTABLISHED"))
                .then_some(())
        },
    );
    let (ok, events) = lab.migrate("kv", a, b, &["--precopy", "0"]);
    for child in [&mut client, &mut sleeper] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        ok,
        "the in-flight connection stopped the migration: {:?}",
        events.last()
    );
    wait_for(
        "redis answering on the destination",
        Duration::from_secs(60),
        || {
            (lab.run(b, &["podman", "exec", "kv", "redis-cli", "GET", "k"])
                .1
                .trim()
                == "v")
                .then_some(())
        },
    );
}

/// Waits for the lab's daemon on `node` to be restartable and restarts it.
fn restart_daemon(lab: &Lab, node: &str) {
    lab::start_daemon(node, &lab.opts).expect("restarting the daemon");
}

#[test]
fn destination_killed_mid_transfer_rolls_back() {
    let lab = Lab::up("k");
    let (a, b) = (&lab.a, &lab.b);
    start_redis(&lab, a);
    let before = redis_digest(&lab, a);
    // Slow the source's link so the transfer lasts long enough to be interrupted.
    let ns_a = &lab.state.nodes[0].netns;
    let tc = Command::new("ip")
        .args([
            "netns", "exec", ns_a, "tc", "qdisc", "add", "dev", "eth0", "root",
        ])
        .args([
            "tbf", "rate", "200mbit", "burst", "256kb", "latency", "100ms",
        ])
        .status()
        .unwrap();
    assert!(tc.success(), "tc could not slow the lab link");

    let mut child = lab
        .migrate_command(&["kv", "--from", a, "--to", b, "--json", "--precopy", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = Vec::new();
    let mut killed = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        println!("{line}");
        let e: Value = serde_json::from_str(&line).unwrap();
        if !killed
            && e["event"] == "progress"
            && e["phase"] == "transfer"
            && e["done"].as_u64() > Some(0)
        {
            lab::kill_daemon(b, &lab.opts).expect("killing the destination daemon");
            killed = true;
        }
        events.push(e);
    }
    let out = child.wait_with_output().unwrap();
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(killed, "the transfer ended before it could be interrupted");
    assert!(
        !out.status.success(),
        "the command succeeded without its destination"
    );
    let last = events.last().unwrap();
    assert_eq!(last["event"], "failed", "{last}");
    assert_eq!(last["phase"], "transfer", "{last}");
    assert_eq!(last["rolled_back"], true, "{last}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: the migration failed in phase transfer"),
        "{stderr}"
    );

    // The source runs, with every key.
    assert_eq!(redis_digest(&lab, a), before);
    assert_eq!(
        lab.memory_images(a),
        Vec::<String>::new(),
        "images left on {a}"
    );
    // The destination has nothing of it, also after its daemon comes back.
    assert!(!lab.exists(b, "kv"), "a container on {b}");
    assert_eq!(lab.migration_images(b), Vec::<String>::new());
    restart_daemon(&lab, b);
    assert_eq!(lab.work_files(b), Vec::<String>::new(), "files left on {b}");
    // And the next attempt works.
    let _ = Command::new("ip")
        .args([
            "netns", "exec", ns_a, "tc", "qdisc", "del", "dev", "eth0", "root",
        ])
        .status();
    let (ok, events) = lab.migrate("kv", a, b, &[]);
    assert!(ok, "the migration after the restart failed");
    summary(&events);
    assert_eq!(redis_digest(&lab, b), before);
}

#[test]
fn destination_without_room_for_the_checkpoint_rolls_back() {
    let lab = Lab::up("f");
    let (a, b) = (&lab.a, &lab.b);
    start_counter(&lab, a);
    count_above(&lab, a, 10);
    // How big the checkpoint is: one taken now, the container left running.
    lab.ok(
        a,
        &[
            "podman",
            "container",
            "checkpoint",
            "--leave-running",
            "--compress=none",
            "--export=/tmp/probe.tar",
            "counter",
        ],
    );
    let size: u64 = lab
        .ok(a, &["stat", "-c", "%s", "/tmp/probe.tar"])
        .trim()
        .parse()
        .unwrap();
    lab.ok(a, &["rm", "/tmp/probe.tar"]);
    // Room for half the checkpoint: the image cannot be made there.
    let work = lab.limit_work_folder(b, size / 2);
    let before = count(&lab, a).unwrap();
    let (ok, events) = lab.migrate("counter", a, b, &["--precopy", "0"]);
    assert!(!ok, "the migration succeeded on a full disk");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "failed", "{last}");
    assert_eq!(last["rolled_back"], true, "{last}");
    assert_eq!(last["phase"], "transfer", "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.to_lowercase().contains("no space") || message.contains("No space"),
        "the message does not say the disk is full: {message}"
    );
    // The source continues from its state.
    let after = count_above(&lab, a, before);
    assert!(after > before);
    assert!(!lab.exists(b, "counter"));
    assert_eq!(
        lab.memory_images(a),
        Vec::<String>::new(),
        "images left on {a}"
    );
    assert_eq!(lab.migration_images(b), Vec::<String>::new());
    assert_eq!(lab.work_files(b), Vec::<String>::new());
    let (code, listing) = lab.run(b, &["ls", "-A", &work]);
    assert_eq!(code, 0);
    assert_eq!(
        listing.trim(),
        "",
        "files left in the destination's work folder"
    );
    lab.ok(b, &["umount", &work]);
}

/// A source daemon that dies after the final checkpoint moved the container's images into its
/// work folder: on its next start it puts them back and restores the container in place,
/// instead of emptying the folder of the container's only copy. The state is made by hand
/// here as the migration leaves it: `checkpoint --keep` stopped the container, its images
/// moved into the work folder beside the record of where they came from.
#[test]
fn a_source_daemon_restarted_after_the_final_checkpoint_restores_the_container() {
    let lab = Lab::up("r");
    let a = &lab.a;
    start_counter(&lab, a);
    let before = count_above(&lab, a, 5);
    lab::kill_daemon(a, &lab.opts).expect("killing the source daemon");
    let home = lab.ok(
        a,
        &["podman", "inspect", "--format", "{{.StaticDir}}", "counter"],
    );
    let home = format!("{}/checkpoint", home.trim());
    lab.ok(
        a,
        &["podman", "container", "checkpoint", "--keep", "counter"],
    );
    let work = format!("{}/work/m-1", lab::DAEMON_STATE);
    let record = format!(r#"{{"container":"counter","home":"{home}"}}"#);
    lab.ok(
        a,
        &[
            "sh",
            "-c",
            &format!(
                "mkdir -p {work} && printf '%s' '{record}' > {work}/kept.json && mv {home} \
                 {work}/images"
            ),
        ],
    );
    assert_eq!(
        count(&lab, a),
        None,
        "the counter still runs after its checkpoint"
    );

    restart_daemon(&lab, a);
    let after = count_above(&lab, a, before);
    assert!(after > before, "the counter started again from 0");
    assert_eq!(
        lab.work_files(a),
        Vec::<String>::new(),
        "work folder not emptied"
    );
}
