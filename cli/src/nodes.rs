//! Where the nodes a command talks to are, and how their daemons are reached: the lab's nodes
//! (from its state file: daemon addresses, network namespaces, the operator certificate), or
//! nodes named with `--node NAME=ADDR:PORT` and `--certs`. Lab daemons live in the lab's
//! network namespaces, so in the lab a command re-runs itself inside a node's namespace
//! ([`run_inside`]) before it connects; the connection itself is
//! [`crate::migrate::connect`]. [`migrate_on`] runs one migration on a source daemon and
//! hands each of its events to the caller, which shows them as it likes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use engine::control::{self, Event, MigrateRequest, Request, Summary};
use engine::lab::{self, LabOptions};
use transport::quic;
use transport::tls::NodeIdentity;

/// Set in the environment of the command re-run inside a lab namespace (its value: the
/// namespace), so that it does not re-run itself again.
pub(crate) const IN_NETNS_ENV: &str = "MIGRATE_IN_NETNS";

/// Parses `--node NAME=ADDR:PORT`.
pub(crate) fn parse_node(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ADDR:PORT"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the node's name is missing before `=`"));
    }
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?}: not an ADDR:PORT ({e})"))?;
    Ok((name.to_string(), addr))
}

/// One node's daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeAddr {
    /// The node's name; its daemon's certificate carries it.
    pub(crate) name: String,
    /// Where its daemon listens.
    pub(crate) addr: SocketAddr,
    /// The lab network namespace its daemon is reachable from; `None` outside the lab.
    pub(crate) netns: Option<String>,
}

/// The nodes a command may name, and the certificate it talks to their daemons with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Nodes {
    /// Every node, in the order the lab or the `--node` options list them.
    pub(crate) nodes: Vec<NodeAddr>,
    /// This client's certificate folder (ca.crt, node.crt, node.key).
    pub(crate) certs: PathBuf,
    /// Whether these are the lab's nodes.
    pub(crate) lab: bool,
}

impl Nodes {
    /// The nodes named with `--node` (then `--certs` is required), or else the lab's (its
    /// operator certificate unless `--certs` says otherwise).
    pub(crate) fn find(
        named: &[(String, SocketAddr)],
        certs: Option<&Path>,
    ) -> anyhow::Result<Self> {
        if !named.is_empty() {
            let certs = certs
                .context("--certs is needed with --node (this client's certificate folder)")?;
            return Ok(Nodes {
                nodes: named
                    .iter()
                    .map(|(name, addr)| NodeAddr {
                        name: name.clone(),
                        addr: *addr,
                        netns: None,
                    })
                    .collect(),
                certs: certs.to_path_buf(),
                lab: false,
            });
        }
        let opts = LabOptions::from_env();
        let state = lab::read_state(&opts)?.with_context(|| {
            format!(
                "no lab is up ({} not found): run `migrate lab up`, or name the nodes with \
                 --node NAME=ADDR:PORT and --certs",
                opts.state_file().display()
            )
        })?;
        Ok(Nodes {
            nodes: state
                .nodes
                .iter()
                .map(|n| NodeAddr {
                    name: n.name.clone(),
                    addr: n.daemon_addr(),
                    netns: Some(n.netns.clone()),
                })
                .collect(),
            certs: certs
                .map(Path::to_path_buf)
                .unwrap_or_else(|| state.operator_certs()),
            lab: true,
        })
    }

    /// The node called `name`; the error lists the known ones.
    pub(crate) fn get(&self, name: &str) -> anyhow::Result<&NodeAddr> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            let known = self.names(None);
            if self.lab {
                format!("the lab has no node {name:?} (it has {known})")
            } else {
                format!("node {name:?} is not among the --node options ({known})")
            }
        })
    }

    /// The nodes' names, comma-separated, but for `except`.
    pub(crate) fn names(&self, except: Option<&str>) -> String {
        let names: Vec<&str> = self
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .filter(|n| Some(*n) != except)
            .collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }

    /// A QUIC client endpoint with this client's certificate, expecting `peer`'s daemon.
    pub(crate) fn client(&self, peer: &str) -> anyhow::Result<quinn::Endpoint> {
        let identity = NodeIdentity::load(&self.certs).with_context(|| {
            format!(
                "loading the client certificate from {}",
                self.certs.display()
            )
        })?;
        Ok(quic::client_endpoint(
            &identity,
            Some(peer),
            quic::DEFAULT_IDLE_TIMEOUT,
        )?)
    }
}

/// In the lab, runs this same command again inside `node`'s network namespace (`ip netns
/// exec`; its daemon is only reachable there) and returns that run's exit code. `None` when
/// there is nothing to do (outside the lab, or already inside): go on in this process.
pub(crate) fn run_inside(node: &NodeAddr) -> anyhow::Result<Option<ExitCode>> {
    let Some(ns) = &node.netns else {
        return Ok(None);
    };
    if std::env::var_os(IN_NETNS_ENV).as_deref() == Some(ns.as_ref()) {
        return Ok(None);
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(IN_NETNS_ENV, ns)
        .status()
        .with_context(|| {
            format!(
                "running `ip netns exec {ns}` to reach the daemon of {} (the lab needs root)",
                node.name
            )
        })?;
    Ok(Some(ExitCode::from(status.code().unwrap_or(1) as u8)))
}

/// Asks the source daemon behind `conn` to run one migration, on a stream of its own, and
/// passes each event to `on_event`. The summary when it succeeded; `None` when it failed
/// (the `Failed` event went to `on_event`). Several can run at once on one connection: the
/// daemon serves each stream in its own task.
pub(crate) async fn migrate_on(
    conn: &quinn::Connection,
    request: MigrateRequest,
    from: &str,
    mut on_event: impl FnMut(&Event),
) -> anyhow::Result<Option<Summary>> {
    let container = request.container.clone();
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .with_context(|| format!("opening a stream to the daemon of {from}"))?;
    control::write_message(&mut send, &Request::Migrate(request), from).await?;
    let _ = send.finish();
    loop {
        let event: Option<Event> = control::read_message(&mut recv, from).await?;
        let Some(event) = event else {
            bail!(
                "the daemon of {from} stopped reporting before the migration of {container} \
                 ended: see its log; check with `podman ps -a` on both nodes where the \
                 container is"
            );
        };
        on_event(&event);
        match event {
            Event::Done(summary) => return Ok(Some(summary)),
            Event::Failed { .. } => return Ok(None),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Nodes {
        Nodes {
            nodes: vec![
                NodeAddr {
                    name: "a".into(),
                    addr: "10.0.0.1:7400".parse().unwrap(),
                    netns: None,
                },
                NodeAddr {
                    name: "b".into(),
                    addr: "10.0.0.2:7400".parse().unwrap(),
                    netns: None,
                },
            ],
            certs: "certs/operator".into(),
            lab: false,
        }
    }

    #[test]
    fn node_options_parse() {
        assert_eq!(
            parse_node("a=10.0.0.1:7400"),
            Ok(("a".to_string(), "10.0.0.1:7400".parse().unwrap()))
        );
        assert!(parse_node("a").unwrap_err().contains("NAME=ADDR:PORT"));
        assert!(parse_node("=10.0.0.1:7400").is_err());
        assert!(parse_node("a=10.0.0.1")
            .unwrap_err()
            .contains("not an ADDR:PORT"));
    }

    #[test]
    fn named_nodes_need_certs_and_unknown_names_list_the_known() {
        let named = [("a".to_string(), "10.0.0.1:7400".parse().unwrap())];
        let err = Nodes::find(&named, None).unwrap_err();
        assert!(err.to_string().contains("--certs is needed"), "{err}");
        let nodes = Nodes::find(&named, Some(Path::new("c"))).unwrap();
        assert!(!nodes.lab);
        assert_eq!(nodes.get("a").unwrap().addr.port(), 7400);
        let nodes = two();
        let err = nodes.get("z").unwrap_err().to_string();
        assert!(err.contains("\"z\"") && err.contains("a, b"), "{err}");
        assert_eq!(nodes.names(Some("a")), "b");
    }

    #[test]
    fn outside_the_lab_nothing_is_re_run() {
        assert_eq!(run_inside(&two().nodes[0]).unwrap(), None);
    }
}
