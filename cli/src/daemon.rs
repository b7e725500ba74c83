//! `migrate daemon`: runs the node daemon (engine::daemon) until SIGINT or SIGTERM, with
//! podman as its runtime, or, given `--kubelet`, as a Kubernetes node's daemon that
//! checkpoints through the kubelet (engine::crio).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use engine::crio::CrioNode;
use engine::daemon::{Daemon, DaemonConfig};
use engine::kubelet::{KubeletAuth, KubeletClient};
use engine::memory_images::MemoryImages;
use engine::runtime::{Podman, Runtime};

use crate::output::{parse_size, Output};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  migrate daemon --listen 0.0.0.0:7400 --certs /etc/migrate/certs --state /var/lib/migrate
  # a Kubernetes node (deploy/daemonset.yaml runs it so):
  migrate daemon --certs /run/migrate/tls --kubelet https://10.0.0.5:10250 \\
      --kubelet-ca /var/run/secrets/kubernetes.io/serviceaccount/ca.crt \\
      --kubelet-token-file /var/run/secrets/kubernetes.io/serviceaccount/token
In the lab, `migrate lab up` starts one daemon per node.")]
pub struct DaemonArgs {
    /// UDP address to listen on (control and transfers).
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// This node's certificate folder (ca.crt, node.crt, node.key from `migrate certs init`).
    #[arg(long)]
    certs: PathBuf,
    /// State directory: chunk store and work files of migrations in progress (0700).
    #[arg(long, default_value = "/var/lib/migrate")]
    state: PathBuf,
    /// Cap of the chunk store (e.g. 20G); least recently used chunks go first.
    #[arg(long, value_parser = parse_size)]
    store_cap: Option<u64>,
    /// Seconds a transfer waits for a dropped connection to come back.
    #[arg(long, default_value_t = 20)]
    resume_timeout: u64,
    /// Seconds a silent peer keeps its connection (QUIC idle timeout).
    #[arg(long, default_value_t = 20)]
    idle_timeout: u64,
    /// zstd level of the chunks this node sends.
    #[arg(long, default_value_t = 1)]
    level: i32,
    /// Where checkpoint images lie while a migration runs, instead of the node's disk (a
    /// Podman checkpoint's CRIU images; an incoming migration's files): a folder on a
    /// memory-backed file system (created 0700), or `off`. By default /dev/shm/migrate-images
    /// when /dev/shm is a tmpfs. Used only when they fit there and in available memory; they
    /// are deleted once the migration is done with them.
    #[arg(long, value_name = "DIR|off")]
    images_in_memory: Option<PathBuf>,
    #[command(flatten)]
    kubelet: KubeletArgs,
}

/// A Kubernetes node's daemon: checkpoints through the kubelet. `--kubelet` needs its CA and
/// one kind of credentials; clap says so as bad usage (exit 2).
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("kubelet_credentials")
        .args(["kubelet_token_file", "kubelet_client_cert"])
        .requires("kubelet")
))]
struct KubeletArgs {
    /// The kubelet's URL (e.g. https://10.0.0.5:10250): this node runs Kubernetes with CRI-O,
    /// and checkpoints are taken through the kubelet's checkpoint API, not podman.
    #[arg(long, requires_all = ["kubelet_ca", "kubelet_credentials"])]
    kubelet: Option<String>,
    /// CA of the kubelet's serving certificate (the cluster CA when kubelet serving
    /// certificates are signed by it, as with kubeadm's serverTLSBootstrap).
    #[arg(long, requires = "kubelet")]
    kubelet_ca: Option<PathBuf>,
    /// A bearer token file (a ServiceAccount's, bound to RBAC nodes/checkpoint create).
    #[arg(long, requires = "kubelet", conflicts_with = "kubelet_client_cert")]
    kubelet_token_file: Option<PathBuf>,
    /// A client certificate the kubelet accepts (e.g. kubeadm's apiserver-kubelet-client.crt).
    #[arg(long, requires_all = ["kubelet", "kubelet_client_key"])]
    kubelet_client_cert: Option<PathBuf>,
    /// The key of --kubelet-client-cert.
    #[arg(long, requires = "kubelet_client_cert")]
    kubelet_client_key: Option<PathBuf>,
    /// Where the kubelet writes checkpoint archives (as this daemon sees it).
    #[arg(long, default_value = "/var/lib/kubelet/checkpoints")]
    kubelet_checkpoints: PathBuf,
    /// Seconds the kubelet may take for one checkpoint.
    #[arg(long, default_value_t = 600)]
    kubelet_timeout: u64,
}

impl KubeletArgs {
    /// The runtime these options ask for: podman (its kept checkpoints' images under
    /// `memory_images`), or CRI-O through the kubelet.
    fn runtime(&self, memory_images: Option<MemoryImages>) -> anyhow::Result<Arc<dyn Runtime>> {
        let Some(url) = &self.kubelet else {
            return Ok(Arc::new(Podman::local().with_memory_images(memory_images)));
        };
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
        };
        let ca_file = self.kubelet_ca.as_ref().context(
            "--kubelet-ca is needed with --kubelet (the kubelet serving certificate's CA)",
        )?;
        let ca = read(ca_file, "kubelet CA")?;
        let auth = match (
            &self.kubelet_token_file,
            &self.kubelet_client_cert,
            &self.kubelet_client_key,
        ) {
            (Some(token), _, _) => KubeletAuth::BearerTokenFile(token.clone()),
            (None, Some(cert), Some(key)) => KubeletAuth::ClientCertificate {
                cert_pem: read(cert, "kubelet client certificate")?,
                key_pem: read(key, "kubelet client key")?,
            },
            _ => anyhow::bail!(
                "--kubelet needs credentials: --kubelet-token-file, or --kubelet-client-cert and \
                 --kubelet-client-key"
            ),
        };
        let client = KubeletClient::direct(url, &ca, auth)
            .with_context(|| format!("setting up the kubelet client for {url}"))?
            .with_ca_file(ca_file);
        Ok(Arc::new(CrioNode::new(
            client,
            self.kubelet_checkpoints.clone(),
            Duration::from_secs(self.kubelet_timeout),
        )))
    }
}

/// The folder `--images-in-memory` names: none for `off`, the host's default when not given.
fn memory_images(arg: Option<PathBuf>) -> anyhow::Result<Option<MemoryImages>> {
    match arg {
        None => Ok(MemoryImages::host_default()),
        Some(off) if off.as_os_str() == "off" => Ok(None),
        Some(dir) => MemoryImages::at(&dir)
            .map(Some)
            .with_context(|| format!("creating the --images-in-memory folder {}", dir.display())),
    }
}

/// Runs the daemon in the foreground.
pub fn run(args: DaemonArgs, out: &Output) -> anyhow::Result<()> {
    let mut config = DaemonConfig::new(args.listen, args.certs, args.state);
    config.store_cap = args.store_cap;
    config.level = args.level;
    config.resume_timeout = Duration::from_secs(args.resume_timeout);
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let images = memory_images(args.images_in_memory)?;
        config.memory_images = images.clone();
        let runtime = args.kubelet.runtime(images)?;
        let daemon = Daemon::bind(config, runtime).context("starting the node daemon")?;
        out.line(format!(
            "migrate daemon of {} listening on {}",
            daemon.node().name,
            daemon.local_addr()?
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = daemon.serve() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
