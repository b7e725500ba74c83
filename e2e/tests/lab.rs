//! The lab for real (root and the lab root from lab/rootfs.sh are required; without them these
//! tests fail saying so, they never skip): `up` with two nodes, status, exec, traffic between
//! the nodes over the lab bridge, the recorded certificates, `down` leaving nothing behind; and
//! `down` after a simulated crash. Each test uses its own state directory, namespace prefix and
//! node names, so they run in parallel and never touch a user's lab.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::wait_for;
use engine::lab::{self, LabOptions, LabState};

const LAB_IMAGES: [&str; 3] = [lab::BUSYBOX_IMAGE, lab::NGINX_IMAGE, lab::REDIS_IMAGE];

/// Fails, saying why, unless this runs as root with the lab root built (`make test` builds it).
fn require_lab(test: &str) {
    lab::check_ready(&LabOptions::default()).unwrap_or_else(|e| panic!("{test}: {e}"));
}

fn options(tag: &str) -> LabOptions {
    let opts = LabOptions {
        state_dir: PathBuf::from(format!("/tmp/migrate-e2e-{tag}")),
        prefix: format!("mle2e-{tag}"),
        ..LabOptions::default()
    };
    // A leftover of an earlier failed run of this very test.
    let _ = lab::down(&opts);
    opts
}

/// Runs `cmd` in `node`, returning (exit code, stdout).
fn run(opts: &LabOptions, node: &str, cmd: &[&str]) -> (i32, String) {
    let out = lab::command(node, cmd, opts)
        .unwrap()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "[{node}] $ {}\n{stdout}{}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts nothing of the lab is left: namespaces, node processes, their cgroups, state.
fn assert_gone(opts: &LabOptions, state: &LabState, cgroups: &[String]) {
    assert_eq!(
        netns_with_prefix(&opts.prefix),
        Vec::<String>::new(),
        "network namespaces left"
    );
    assert!(
        !Path::new(&format!("/run/netns/{}", state.switch_netns)).exists(),
        "switch namespace (and its bridge) left"
    );
    let bridge_on_host = Command::new("ip")
        .args(["link", "show", lab::BRIDGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(
        !bridge_on_host,
        "a {} link is in the host namespace",
        lab::BRIDGE
    );
    for n in &state.nodes {
        assert!(!n.alive(), "node {} (pid {}) still runs", n.name, n.pid);
        assert!(!n.dir.exists(), "node folder {} left", n.dir.display());
    }
    for cg in cgroups {
        assert!(!Path::new(cg).exists(), "cgroup {cg} left");
    }
    assert!(!opts.state_file().exists(), "state file left");
}

fn node_cgroups(state: &LabState) -> Vec<String> {
    state
        .nodes
        .iter()
        .flat_map(|n| {
            std::fs::read_to_string(n.dir.join("node.cgroup"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn lab_up_status_exec_reach_certs_down() {
    require_lab("lab_up_status_exec_reach_certs_down");
    // Links with jumbo frames (the other labs of these tests have the default 1500).
    let opts = LabOptions {
        mtu: 9000,
        ..options("a")
    };
    let names = vec!["e2ea-node1".to_string(), "e2ea-node2".to_string()];

    let t = Instant::now();
    let up = lab::up(&names, &opts).expect("lab up");
    println!("lab up: {:.2} s", t.elapsed().as_secs_f64());
    assert!(!up.already_up);
    let state = up.state;
    assert_eq!(state.nodes.len(), 2);
    assert_eq!(state.nodes[0].address.to_string(), "10.231.0.10");
    assert_eq!(state.nodes[1].address.to_string(), "10.231.0.11");
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&opts.state_file()), 0o600);
    assert_eq!(mode(&opts.state_dir), 0o700);

    // Idempotent: a second up reports the lab as it is.
    let again = lab::up(&names, &opts).expect("second lab up");
    assert!(again.already_up);
    assert_eq!(again.state, state);

    let st = lab::status(&opts).expect("status");
    assert!(st.up);
    assert_eq!((state.mtu, st.mtu), (9000, Some(9000)));
    for (n, want) in st.nodes.iter().zip(&state.nodes) {
        assert_eq!(n.name, want.name);
        assert_eq!(n.address, want.address);
        assert!(n.alive, "{} not alive", n.name);
        assert_eq!(n.containers, Some(0));
    }

    let (code, out) = run(&opts, &names[0], &["hostname"]);
    assert_eq!((code, out.trim()), (0, names[0].as_str()));
    let (_, mtu) = run(&opts, &names[0], &["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "9000", "node1's link");
    // exec passes exit codes through.
    assert_eq!(run(&opts, &names[0], &["sh", "-c", "exit 7"]).0, 7);
    // Only the lab subnet is routed in a node.
    let (_, routes) = run(&opts, &names[0], &["ip", "route"]);
    assert!(
        !routes.contains("default"),
        "node has a default route: {routes}"
    );

    // node1 reaches node2's address: ping, then TCP to a listener in node2.
    let peer = state.nodes[1].address.to_string();
    let (code, _) = run(
        &opts,
        &names[0],
        &["busybox", "ping", "-c", "1", "-W", "2", &peer],
    );
    assert_eq!(code, 0, "node1 cannot ping node2 at {peer}");
    let mut listener = lab::command(
        &names[1],
        &["sh", "-c", "echo hello-from-node2 | busybox nc -l -p 7070"],
        &opts,
    )
    .unwrap()
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let start = Instant::now();
    let got = loop {
        let (_, out) = run(
            &opts,
            &names[0],
            &[
                "sh",
                "-c",
                &format!("busybox nc -w 2 {peer} 7070 </dev/null"),
            ],
        );
        if out.contains("hello-from-node2") {
            break out;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no TCP answer from node2's listener"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("TCP node1 -> node2: {}", got.trim());
    let _ = listener.wait();

    // Every lab image is present in every node, with the same ID.
    for image in LAB_IMAGES {
        let ids: Vec<String> = names
            .iter()
            .map(|n| {
                run(
                    &opts,
                    n,
                    &["podman", "image", "inspect", "-f", "{{.Id}}", image],
                )
            })
            .map(|(code, out)| {
                assert_eq!(code, 0, "{image} missing");
                out.trim().to_string()
            })
            .collect();
        assert!(!ids[0].is_empty());
        assert_eq!(ids[0], ids[1], "{image} has different IDs in the nodes");
    }

    for n in &state.nodes {
        let id = transport::tls::NodeIdentity::load(&n.certs)
            .unwrap_or_else(|e| panic!("certs of {} at {}: {e}", n.name, n.certs.display()));
        println!("{}: certificate loads ({id:?})", n.name);
        let (code, _) = run(&opts, &n.name, &["test", "-s", "/lab/node.key"]);
        assert_eq!(code, 0, "{}: certificates not at /lab in the node", n.name);
    }

    let cgroups = node_cgroups(&state);
    let t = Instant::now();
    lab::down(&opts).expect("lab down");
    println!("lab down: {:.2} s", t.elapsed().as_secs_f64());
    assert_gone(&opts, &state, &cgroups);
    lab::down(&opts).expect("lab down twice");
}

#[test]
fn lab_down_after_crash() {
    require_lab("lab_down_after_crash");
    let opts = options("b");
    let names = vec!["e2eb-node1".to_string(), "e2eb-node2".to_string()];
    let state = lab::up(&names, &opts).expect("lab up").state;
    let cgroups = node_cgroups(&state);
    // A container running in node2 must go too.
    let (code, _) = run(
        &opts,
        &names[1],
        &[
            "podman",
            "run",
            "-d",
            "--name",
            "c",
            lab::BUSYBOX_IMAGE,
            "sleep",
            "1000",
        ],
    );
    assert_eq!(code, 0);

    // The crash: node1's init killed, node2's left running, the state file gone.
    let killed = Command::new("kill")
        .args(["-KILL", &state.nodes[0].pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::fs::remove_file(opts.state_file()).unwrap();

    let st = lab::status(&opts).expect("status");
    assert!(!st.up);
    assert!(!st.leftovers.is_empty(), "status shows no leftovers");
    let err = lab::up(&names, &opts).expect_err("up over leftovers");
    assert!(err.to_string().contains("migrate lab down"), "{err}");

    let t = Instant::now();
    let report = lab::down(&opts).expect("lab down after a crash");
    println!(
        "lab down after crash: {:.2} s, {report:?}",
        t.elapsed().as_secs_f64()
    );
    assert_gone(&opts, &state, &cgroups);
}

#[test]
fn lab_images_nginx_and_redis_serve_across_nodes() {
    require_lab("lab_images_nginx_and_redis_serve_across_nodes");
    let opts = options("c");
    let names = vec!["e2ec-node1".to_string(), "e2ec-node2".to_string()];
    let t = Instant::now();
    let state = lab::up(&names, &opts).expect("lab up").state;
    println!(
        "lab up (with the three images): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    for image in LAB_IMAGES {
        let (code, out) = run(
            &opts,
            &names[0],
            &["podman", "image", "inspect", "-f", "{{.Size}}", image],
        );
        assert_eq!(code, 0, "{image} missing");
        let size: u64 = out.trim().parse().expect("image size");
        println!("image {image}: {:.2} MB", size as f64 / 1e6);
    }
    let (client, server) = (&names[0], &names[1]);
    let addr = state.nodes[1].address.to_string();

    // nginx in node2 on the host network; a page written into the container is fetched from
    // node1 over the lab bridge.
    let (code, _) = run(
        &opts,
        server,
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
    assert_eq!(code, 0, "nginx does not start in {server}");
    let (code, _) = run(
        &opts,
        server,
        &[
            "podman",
            "exec",
            "web",
            "sh",
            "-c",
            "echo page-written-in-node2 > /var/www/html/t.html",
        ],
    );
    assert_eq!(code, 0);
    let url = format!("http://{addr}/t.html");
    let page = wait_for(
        "nginx in node2 answering node1",
        Duration::from_secs(20),
        || {
            let (code, out) = run(
                &opts,
                client,
                &["busybox", "wget", "-q", "-T", "2", "-O", "-", &url],
            );
            (code == 0).then_some(out)
        },
    );
    assert_eq!(page.trim(), "page-written-in-node2");
    // The same from a container in node1 (busybox image, host network).
    let (code, index) = run(
        &opts,
        client,
        &[
            "podman",
            "run",
            "--rm",
            "--network=host",
            lab::BUSYBOX_IMAGE,
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{addr}/"),
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(index.trim(), "hello from the lab nginx");

    // redis in node2; redis-cli from a redis container in node1.
    let (code, _) = run(
        &opts,
        server,
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
    assert_eq!(code, 0, "redis does not start in {server}");
    let (code, _) = run(
        &opts,
        client,
        &[
            "podman",
            "run",
            "-d",
            "--name",
            "cli",
            "--network=host",
            lab::REDIS_IMAGE,
            "sleep",
            "1000",
        ],
    );
    assert_eq!(code, 0);
    let cli = |args: &[&str]| {
        let mut cmd = vec!["podman", "exec", "cli", "redis-cli", "-h", &addr];
        cmd.extend_from_slice(args);
        run(&opts, client, &cmd)
    };
    wait_for(
        "redis in node2 answering node1",
        Duration::from_secs(20),
        || {
            let (code, out) = cli(&["ping"]);
            (code == 0 && out.trim() == "PONG").then_some(())
        },
    );
    let (code, out) = cli(&["set", "k", "v"]);
    assert_eq!((code, out.trim()), (0, "OK"));
    let (code, out) = cli(&["get", "k"]);
    assert_eq!((code, out.trim()), (0, "v"));

    let cgroups = node_cgroups(&state);
    lab::down(&opts).expect("lab down");
    assert_gone(&opts, &state, &cgroups);
}

/// Two labs whose nodes have the same names (a user's and a test's, say) do not share
/// anything: each node's cgroup carries its lab's namespace prefix, so taking one lab down
/// leaves the other running.
#[test]
fn two_labs_with_the_same_node_names_coexist() {
    require_lab("two_labs_with_the_same_node_names_coexist");
    let names = vec!["twin1".to_string()];
    let (first, second) = (options("d"), options("e"));
    let state1 = lab::up(&names, &first).expect("first lab up").state;
    let state2 = lab::up(&names, &second).expect("second lab up").state;
    let (cg1, cg2) = (node_cgroups(&state1), node_cgroups(&state2));
    for cg in &cg1 {
        assert!(!cg2.contains(cg), "both labs use cgroup {cg}");
    }
    lab::down(&first).expect("first lab down");
    assert_gone(&first, &state1, &cg1);
    assert!(
        state2.nodes[0].alive(),
        "the second lab's node died with the first lab"
    );
    let (code, out) = run(&second, "twin1", &["hostname"]);
    assert_eq!((code, out.trim()), (0, "twin1"));
    lab::down(&second).expect("second lab down");
    assert_gone(&second, &state2, &cg2);
}
