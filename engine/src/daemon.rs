//! The node daemon (`migrate daemon`): one QUIC endpoint with mutual TLS that serves the
//! control protocol ([`crate::control`]) and the chunk transfers of incoming migrations.
//!
//! Each accepted connection is read request by request, one bidirectional stream each. A
//! `Migrate` request runs the source side of a migration ([`crate::migration`]) and streams its
//! events back; `Prepare`, `Transfer`, `Assemble`, `Restore`, `Verify`, `Abort` and `Finish` drive
//! the destination side ([`crate::destination`]); `ListContainers` answers a drain. Every
//! request is served in its own task, so one connection can carry several migrations at once
//! (a drain runs them side by side, each on its own stream). A connection that starts with `Transfer` is
//! handed, after the daemon's `Ok`, to the transport's receiver of that round.
//!
//! State directory layout (0700): `chunks/` the chunk store, which keeps the chunks of every
//! archive received and sent; `work/<migration>/` checkpoint archives and images of migrations
//! in progress (0600 files). `work/` is emptied at start: no migration survives a daemon restart,
//! and its checkpoints hold a container's whole memory.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn, Instrument};
use transport::quic::{self, TransferError};
use transport::store::DiskStore;
use transport::tls::NodeIdentity;

use crate::control::{self, ContainerList, ControlError, Event, Reply, Request};
use crate::destination::Destinations;
use crate::memory_images::MemoryImages;
use crate::runtime::Runtime;

/// How often incoming migrations are checked for a vanished source.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// How a daemon is set up.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Certificate folder of this node (ca.crt, node.crt, node.key).
    pub certs: PathBuf,
    /// State directory (chunk store, work files).
    pub state: PathBuf,
    /// Cap of the chunk store in bytes, `None` for no cap.
    pub store_cap: Option<u64>,
    /// zstd level of chunks sent.
    pub level: i32,
    /// How long a peer may stay silent before its connection is dropped.
    pub idle_timeout: Duration,
    /// How long a transfer waits for a dropped connection to come back.
    pub resume_timeout: Duration,
    /// Where incoming migrations keep their files when they fit in memory (see
    /// [`crate::memory_images`]); on disk under `state` otherwise.
    pub memory_images: Option<MemoryImages>,
}

impl DaemonConfig {
    /// Defaults for everything but where to listen and what with.
    pub fn new(listen: SocketAddr, certs: PathBuf, state: PathBuf) -> Self {
        Self {
            listen,
            certs,
            state,
            store_cap: None,
            level: 1,
            idle_timeout: quic::DEFAULT_IDLE_TIMEOUT,
            resume_timeout: Duration::from_secs(20),
            memory_images: None,
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The certificates or the endpoint.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The certificates.
    #[error(transparent)]
    Tls(#[from] transport::tls::TlsError),
    /// The chunk store.
    #[error(transparent)]
    Store(#[from] transport::store::StoreError),
    /// The state directory.
    #[error("preparing the state directory {path}: {source} (is it writable by this user?)")]
    State {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What every request handler shares.
#[derive(Debug)]
pub struct Node {
    /// This node's name, from its certificate.
    pub name: String,
    /// Its certificates.
    pub identity: NodeIdentity,
    /// The endpoint: serves, and dials other daemons.
    pub endpoint: quinn::Endpoint,
    /// The container engine.
    pub runtime: Arc<dyn Runtime>,
    /// The chunk store.
    pub store: Arc<DiskStore>,
    /// `work/` in the state directory.
    pub work: PathBuf,
    /// The configuration.
    pub config: DaemonConfig,
    /// Incoming migrations.
    pub destinations: Destinations,
    /// Held while the chunks of a sent archive go into the store; an incoming migration
    /// waits for it, so a container coming straight back finds them.
    pub ingesting: Arc<tokio::sync::Mutex<()>>,
}

impl Node {
    /// Client settings for dialing the daemon of node `peer` (its certificate must name it).
    pub fn client_config(&self, peer: &str) -> Result<quinn::ClientConfig, TransferError> {
        let mut config = self.identity.client_config(Some(peer))?;
        config.transport_config(Arc::new(quic::lan_transport_config(
            self.config.idle_timeout,
        )));
        Ok(config)
    }

    /// Whether this node's store holds a checkpoint of the container with ID `id`.
    pub fn knows_container(&self, id: &str) -> bool {
        self.known_path(id).exists() && !self.store.is_empty()
    }

    /// Records that this node's store now holds a checkpoint of container `id` (sent or
    /// received).
    pub fn remember_container(&self, id: &str) {
        let path = self.known_path(id);
        if let Some(dir) = path.parent() {
            let _ = private_dir(dir);
        }
        if let Err(e) = fs::write(&path, b"") {
            warn!(path = %path.display(), error = %e, "could not record the container");
        }
    }

    fn known_path(&self, id: &str) -> PathBuf {
        // IDs are hex; anything else is hex-encoded, so it is always one plain file name.
        let safe = if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            id.to_string()
        } else {
            id.bytes().map(|b| format!("{b:02x}")).collect()
        };
        self.config.state.join("known").join(safe)
    }

    /// The work folder of one migration (created 0700). With `in_memory` bytes to hold (an
    /// incoming migration's estimate), it links to a folder in memory when those fit there
    /// and in available memory (see [`crate::memory_images`]).
    pub fn work_dir(&self, migration_id: &str, in_memory: Option<u64>) -> std::io::Result<PathBuf> {
        let dir = self.work.join(migration_id);
        if let (Some(images), Some(bytes)) = (&self.config.memory_images, in_memory) {
            let name = format!("incoming-{migration_id}");
            match images.redirect(&dir, &name, bytes) {
                Ok(true) => return Ok(dir),
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, root = %images.root().display(), "the migration's files go to disk: linking its work folder into memory failed");
                    let _ = crate::memory_images::remove_images(&dir);
                }
            }
        }
        private_dir(&dir)?;
        Ok(dir)
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    node: Arc<Node>,
}

impl Daemon {
    /// Loads the certificates, opens the store, empties `work/` and binds the endpoint.
    pub fn bind(config: DaemonConfig, runtime: Arc<dyn Runtime>) -> Result<Self, DaemonError> {
        let identity = NodeIdentity::load(&config.certs)?;
        let state_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DaemonError::State { path, source }
        };
        private_dir(&config.state).map_err(state_err(&config.state))?;
        let work = config.state.join("work");
        crate::migration::recover_kept(&work, runtime.as_ref());
        if work.exists() {
            // Each migration's folder first: it may link to checkpoint images in memory.
            for dir in fs::read_dir(&work).map_err(state_err(&work))?.flatten() {
                let _ = crate::migration::remove_work_folder(&dir.path());
            }
            fs::remove_dir_all(&work).map_err(state_err(&work))?;
        }
        private_dir(&work).map_err(state_err(&work))?;
        let store = Arc::new(DiskStore::open(
            &config.state.join("chunks"),
            config.store_cap,
        )?);
        let endpoint = quic::server_endpoint(&identity, config.listen, config.idle_timeout)?;
        let node = Node {
            name: identity.name().to_string(),
            identity,
            endpoint,
            runtime,
            store,
            work,
            config,
            destinations: Destinations::default(),
            ingesting: Arc::default(),
        };
        Ok(Self {
            node: Arc::new(node),
        })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.node.endpoint.local_addr()
    }

    /// The shared node state.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves until the endpoint is closed.
    pub async fn serve(&self) {
        info!(node = %self.node.name, addr = ?self.local_addr().ok(), runtime = %self.node.runtime.describe(), "daemon listening");
        let reaper = {
            let node = self.node.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(REAP_EVERY);
                loop {
                    every.tick().await;
                    node.destinations.reap(&node).await;
                }
            })
        };
        while let Some(incoming) = self.node.endpoint.accept().await {
            let node = self.node.clone();
            tokio::spawn(async move {
                let addr = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => serve_connection(node, conn).await,
                    Err(e) => warn!(peer = %addr, error = %e, "refused a connection"),
                }
            });
        }
        reaper.abort();
    }
}

/// Serves the requests of one connection until it closes or becomes a transfer.
async fn serve_connection(node: Arc<Node>, conn: quinn::Connection) {
    let peer =
        transport::tls::peer_name(&conn).unwrap_or_else(|| conn.remote_address().to_string());
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, reason = %e, "control connection ended");
                return;
            }
        };
        let request: Request = match control::read_message(&mut recv, &peer).await {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                warn!(%peer, error = %e, "bad control request");
                let _ = control::write_message(
                    &mut send,
                    &Reply::Error {
                        message: e.to_string(),
                    },
                    &peer,
                )
                .await;
                let _ = send.finish();
                if matches!(e, ControlError::Malformed { .. }) {
                    conn.close(2u32.into(), b"malformed request");
                    return;
                }
                continue;
            }
        };
        match request {
            Request::Transfer(hello) => {
                // The connection now belongs to the transfer of that round.
                let reply = node
                    .destinations
                    .route_transfer(&node, &hello, conn.clone());
                let _ = control::write_message(&mut send, &reply, &peer).await;
                let _ = send.finish();
                return;
            }
            Request::Migrate(req) => {
                let node = node.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(64);
                    let id = crate::migration::new_id(&req.container);
                    let span = tracing::info_span!("migration", migration_id = %id);
                    let run =
                        tokio::spawn(crate::migration::run(node, id, req, tx).instrument(span));
                    // Events go to the client while it listens; the migration goes on to its
                    // end (success or rollback) even if the client went away.
                    let mut listening = true;
                    while let Some(event) = rx.recv().await {
                        if listening
                            && control::write_message(&mut send, &event, &peer)
                                .await
                                .is_err()
                        {
                            warn!(%peer, "the client stopped listening; the migration goes on");
                            listening = false;
                        }
                    }
                    let _ = run.await;
                    let _ = send.finish();
                });
            }
            other => {
                let node = node.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let reply = handle(&node, other).await;
                    let _ = control::write_message(&mut send, &reply, &peer).await;
                    let _ = send.finish();
                });
            }
        }
    }
}

/// Answers every request but `Migrate` and `Transfer`.
async fn handle(node: &Arc<Node>, request: Request) -> Reply {
    let d = &node.destinations;
    match request {
        Request::Status => Reply::Ok {
            detail: serde_json::json!({
                "node": node.name,
                "version": env!("CARGO_PKG_VERSION"),
                "runtime": node.runtime.describe(),
                "store_chunks": node.store.len(),
                "store_bytes": node.store.bytes(),
            }),
        },
        Request::Prepare(req) => d.prepare(node, req).await,
        Request::StageImage(req) => d.stage_image(node, req).await,
        Request::Assemble(req) => d.assemble(node, req).await,
        Request::Restore(req) => d.restore(node, req).await,
        Request::RestoreArchive(req) => d.restore_archive(node, req).await,
        Request::Verify(req) => d.verify(node, req).await,
        Request::Abort { migration_id } => d.abort(node, &migration_id).await,
        Request::Finish {
            migration_id,
            keep_image,
        } => d.finish(node, &migration_id, keep_image).await,
        Request::ListContainers => list_containers(node).await,
        Request::Migrate(_) | Request::Transfer(_) => unreachable!("handled by the caller"),
    }
}

/// The containers running on this node and whether each may move (a drain's first question).
async fn list_containers(node: &Arc<Node>) -> Reply {
    let runtime = node.runtime.clone();
    let listed = tokio::task::spawn_blocking(move || runtime.list_containers()).await;
    match listed {
        Ok(Ok(containers)) => Reply::Ok {
            detail: serde_json::to_value(ContainerList {
                node: node.name.clone(),
                containers,
            })
            .expect("container lists serialize"),
        },
        Ok(Err(e)) => Reply::Error {
            message: format!("listing the containers on {}: {e}", node.name),
        },
        Err(e) => Reply::Error {
            message: format!("listing the containers on {}: {e}", node.name),
        },
    }
}

/// Creates `p` (and parents) with mode 0700.
pub fn private_dir(p: &Path) -> std::io::Result<()> {
    fs::create_dir_all(p)?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o700))
}
