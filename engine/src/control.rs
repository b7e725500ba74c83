//! The control protocol between the `migrate` CLI and node daemons, and between two daemons.
//!
//! It rides on the same QUIC endpoint (and mutual TLS) as the chunk transfer. Every request
//! opens its own bidirectional stream and sends one [`Request`]; the daemon answers on that
//! stream with one [`Reply`], or, for [`Request::Migrate`], with a sequence of [`Event`]s that
//! ends with [`Event::Done`] or [`Event::Failed`]. A message is a 4-byte big-endian length and
//! that many bytes of JSON, at most [`MAX_MESSAGE`]. A connection whose first request is
//! [`Request::Transfer`] belongs to the chunk transport after the daemon's `Ok` reply.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::pages::PageImage;
use crate::runtime::ListedContainer;

/// The largest control message, in bytes: requests and events are small.
pub const MAX_MESSAGE: usize = 1 << 20;

/// The UDP port node daemons listen on by default.
pub const DEFAULT_PORT: u16 = 7400;

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The stream failed (connection lost, peer reset it).
    #[error("control stream with {peer}: {detail}")]
    Stream {
        /// The peer.
        peer: String,
        /// What quinn said.
        detail: String,
    },
    /// A message could not be decoded, or was too long.
    #[error("malformed control message from {peer}: {detail}")]
    Malformed {
        /// The peer.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// The stream ended where a message was expected.
    #[error("{peer} closed the control stream without answering (see its daemon log)")]
    Ended {
        /// The peer.
        peer: String,
    },
}

/// What a client asks a daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// CLI → source daemon: migrate a container; answered with events.
    Migrate(MigrateRequest),
    /// Source → destination daemon: a migration is coming; check that it can be received.
    Prepare(PrepareRequest),
    /// Source → destination daemon: the rest of this connection carries one transfer round.
    Transfer(TransferHello),
    /// Source → destination daemon: load the base image sent in round [`BASE_IMAGE_ROUND`].
    StageImage(StepRequest),
    /// Source → destination daemon: build the OCI checkpoint image of the final round and
    /// import it into the node's image store.
    Assemble(StepRequest),
    /// Source → destination daemon: restore the container from the imported image.
    Restore(StepRequest),
    /// Source → destination daemon: validate the final round's archive and restore the
    /// container straight from it (`podman container restore --import`), with no image.
    RestoreArchive(StepRequest),
    /// Source → destination daemon: check that the restored container runs.
    Verify(StepRequest),
    /// Source (or, on Kubernetes, the CLI) → destination daemon: the migration failed; remove
    /// everything it made there.
    Abort {
        /// The migration.
        migration_id: String,
    },
    /// Source (or, on Kubernetes, the CLI) → destination daemon: the migration succeeded;
    /// delete its checkpoint files.
    Finish {
        /// The migration.
        migration_id: String,
        /// Keep the checkpoint image: a Pod restored by CRI-O names it as its image, and the
        /// kubelet needs it again if the container restarts.
        #[serde(default)]
        keep_image: bool,
    },
    /// Anyone → daemon: who and what are you (a readiness probe).
    Status,
    /// CLI → daemon: the containers running on this node, and whether each may move (what a
    /// drain asks first). Answered with `Reply::Ok` whose `detail` is a [`ContainerList`], or
    /// an error when the runtime cannot list them (on Kubernetes the API server lists Pods).
    ListContainers,
}

/// The answer to [`Request::ListContainers`] (the `detail` of its `Reply::Ok`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerList {
    /// The node that answered.
    pub node: String,
    /// Its running containers, sorted by name; see [`crate::runtime`] for the rules that
    /// keep one from moving.
    pub containers: Vec<ListedContainer>,
}

/// Migrate `container` from the daemon asked to the daemon at `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Container name on the source node (an ID is refused in the plan phase: the archive
    /// carries the name, and the container keeps it on the destination).
    pub container: String,
    /// The destination daemon's address.
    pub to: SocketAddr,
    /// The destination's node name; its certificate must carry it.
    pub to_node: String,
    /// Pre-copy rounds: checkpoints taken with the container left running, sent ahead of the
    /// final frozen one. 0 turns pre-copy off; `None` decides: one round, unless the
    /// destination already holds this container's chunks (it had it before), where a round
    /// would cost a checkpoint and save nothing.
    #[serde(default)]
    pub precopy: Option<u32>,
    /// Restore through the OCI checkpoint image (assembled and imported on the destination,
    /// as a Kubernetes node needs it) instead of straight from the archive.
    #[serde(default)]
    pub via_image: bool,
    /// Stop once the checkpoint image is imported on the destination, and report it
    /// ([`Summary::image`]): on Kubernetes the kubelet restores it, in a Pod the CLI creates.
    /// The source keeps running (the kubelet's checkpoint always leaves it running) and is
    /// never removed by the daemon. Pre-copy defaults to 0: with nothing frozen, a round
    /// would only add time.
    #[serde(default)]
    pub image_only: bool,
    /// The container's image, when the caller knows it better than the runtime (a Pod's spec
    /// names it; the kubelet does not say).
    #[serde(default)]
    pub base_image: Option<String>,
}

/// A migration announced to its destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// The migration.
    pub migration_id: String,
    /// The container's name on the source (and, after restore, on the destination).
    pub container: String,
    /// The image the container runs on; the destination says whether it holds it
    /// (`"has_base_image"` in its reply).
    #[serde(default)]
    pub base_image: Option<String>,
    /// The container's ID on the source: the destination says whether its store holds a
    /// checkpoint of this very container ([`KNOWS_CONTAINER`]).
    #[serde(default)]
    pub container_id: Option<String>,
    /// Only a checkpoint image is wanted here (Kubernetes): no container of that name will be
    /// made, so a clash with an existing one is not checked.
    #[serde(default)]
    pub image_only: bool,
    /// The container's memory as the source estimates it (what its checkpoint images will
    /// hold): the destination keeps the migration's files in memory when it has room for
    /// them and for the restored container.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// Its reply's `detail` says `"knows_container": true` when its chunk store already holds a
/// checkpoint of the container with that ID (it received or sent one), so pre-copy would not
/// pay. A new container under an old name is not known.
pub const KNOWS_CONTAINER: &str = "knows_container";

/// The transfer round that carries the base image (when the destination lacks it).
pub const BASE_IMAGE_ROUND: u32 = u32::MAX;

/// The first message of a transfer connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferHello {
    /// The migration (announced with [`Request::Prepare`]).
    pub migration_id: String,
    /// Round number: 1..=N for pre-copy rounds, 0 for the final checkpoint,
    /// [`BASE_IMAGE_ROUND`] for the base image.
    pub round: u32,
    /// Where the final round's archive holds its page images, for a destination that restores
    /// it straight from the archive: it receives them as files of their own (see
    /// [`crate::pages`]). Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageImage>,
}

/// One step of the destination's work on the final round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRequest {
    /// The migration.
    pub migration_id: String,
    /// The container's name, which it keeps on the destination.
    pub container: String,
}

/// A daemon's answer to every request but `Migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done; `detail` holds request-specific facts.
    Ok {
        /// Facts about what was done (timings, names), as JSON.
        #[serde(default)]
        detail: serde_json::Value,
    },
    /// Refused or failed.
    Error {
        /// What failed and what to check.
        message: String,
    },
}

/// The phases of one migration, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Check the container and the destination.
    Plan,
    /// Send the container's base image, which the destination lacks.
    StageImage,
    /// Checkpoint with the container left running and send it: warms the destination's store.
    Precopy,
    /// The final checkpoint: the container stops here.
    Checkpoint,
    /// Send the final checkpoint.
    Transfer,
    /// Build the OCI checkpoint image on the destination and import it.
    Assemble,
    /// Restore the container on the destination.
    Restore,
    /// Check that the restored container runs.
    Verify,
    /// Remove the source container and the checkpoint files.
    Cleanup,
    /// Undo after a failure: the source runs again, the destination holds nothing of it.
    Rollback,
}

impl Phase {
    /// The name used in logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::StageImage => "stage_image",
            Phase::Precopy => "precopy",
            Phase::Checkpoint => "checkpoint",
            Phase::Transfer => "transfer",
            Phase::Assemble => "assemble",
            Phase::Restore => "restore",
            Phase::Verify => "verify",
            Phase::Cleanup => "cleanup",
            Phase::Rollback => "rollback",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a migration reports while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A phase began. `round` numbers pre-copy rounds.
    Phase {
        /// The migration.
        migration_id: String,
        /// The phase.
        phase: Phase,
        /// The pre-copy round, for [`Phase::Precopy`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        round: Option<u32>,
    },
    /// Bytes of a transfer done so far.
    Progress {
        /// The phase (precopy or transfer).
        phase: Phase,
        /// Bytes of the archive chunked and offered so far.
        done: u64,
        /// The archive's size.
        total: u64,
    },
    /// One transfer round finished.
    Round {
        /// Round number (0 = final).
        round: u32,
        /// The archive's size.
        archive_bytes: u64,
        /// Bytes that went over the wire.
        wire_bytes: u64,
        /// Seconds the round took (checkpoint and transfer).
        seconds: f64,
    },
    /// The migration succeeded.
    Done(Summary),
    /// The migration failed; `rolled_back` says whether the source runs again.
    Failed {
        /// The migration.
        migration_id: String,
        /// The phase that failed.
        phase: Phase,
        /// What failed and what to check.
        message: String,
        /// Whether the source container runs again, as before the migration.
        rolled_back: bool,
        /// Whether the destination confirmed that it removed everything of the migration.
        /// When not (its daemon is unreachable), it does so when it restarts, or after
        /// [`crate::destination::IDLE_LIMIT`].
        destination_clean: bool,
    },
}

/// The outcome of a migration, as `migrate CONTAINER --json` prints it last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The migration.
    pub migration_id: String,
    /// The container.
    pub container: String,
    /// The source node.
    pub from: String,
    /// The destination node.
    pub to: String,
    /// Size of the final checkpoint archive.
    pub archive_bytes: u64,
    /// Bytes over the wire for the final round.
    pub wire_bytes: u64,
    /// Bytes over the wire for all rounds, pre-copy included.
    pub wire_bytes_total: u64,
    /// Pre-copy rounds run.
    pub precopy_rounds: u32,
    /// From the request to the container running on the destination.
    pub total_seconds: f64,
    /// From the final checkpoint's start (the container freezes) to the container running on
    /// the destination.
    pub downtime_seconds: f64,
    /// Seconds per phase, in order.
    pub phases: Vec<(Phase, f64)>,
    /// The checkpoint image on the destination, for an `image_only` migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Whether the final archive was laid out here from the images the runtime kept (see
    /// [`crate::podman_archive`]) rather than exported by the runtime.
    #[serde(default)]
    pub archive_made_here: bool,
    /// Whether the final checkpoint's CRIU images were written to memory rather than to the
    /// container's disk (see [`crate::memory_images`]).
    #[serde(default)]
    pub images_in_memory: bool,
    /// Bytes of the final archive the destination found where they already lay, in the last
    /// pre-copy round's output it built the page images over: neither sent, copied nor
    /// written (see `transport::protocol::held`).
    #[serde(default)]
    pub bytes_in_place: u64,
}

/// Writes one message.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
    peer: &str,
) -> Result<(), ControlError> {
    let body = serde_json::to_vec(message).expect("control messages serialize");
    debug_assert!(body.len() <= MAX_MESSAGE);
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    send.write_all(&buf)
        .await
        .map_err(|e| ControlError::Stream {
            peer: peer.to_string(),
            detail: e.to_string(),
        })
}

/// Reads one message; `None` when the stream ended cleanly before one began.
pub async fn read_message<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    peer: &str,
) -> Result<Option<T>, ControlError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => {
            return Err(ControlError::Stream {
                peer: peer.to_string(),
                detail: e.to_string(),
            })
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(ControlError::Malformed {
            peer: peer.to_string(),
            detail: format!("message of {len} bytes (at most {MAX_MESSAGE})"),
        });
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| ControlError::Stream {
            peer: peer.to_string(),
            detail: e.to_string(),
        })?;
    decode(&body, peer).map(Some)
}

/// Decodes one message body.
pub fn decode<T: DeserializeOwned>(body: &[u8], peer: &str) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|e| ControlError::Malformed {
        peer: peer.to_string(),
        detail: e.to_string(),
    })
}

/// Reads a message that must be there.
pub async fn expect_message<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    peer: &str,
) -> Result<T, ControlError> {
    read_message(recv, peer)
        .await?
        .ok_or_else(|| ControlError::Ended {
            peer: peer.to_string(),
        })
}

/// Sends `request` on a new stream of `conn` and reads the one [`Reply`].
pub async fn call(conn: &quinn::Connection, request: &Request) -> Result<Reply, ControlError> {
    let peer = transport::tls::peer_name(conn).unwrap_or_else(|| conn.remote_address().to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| ControlError::Stream {
        peer: peer.clone(),
        detail: e.to_string(),
    })?;
    write_message(&mut send, request, &peer).await?;
    let _ = send.finish();
    expect_message(&mut recv, &peer).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let r = Request::Migrate(MigrateRequest {
            container: "web".into(),
            to: "10.0.0.2:7400".parse().unwrap(),
            to_node: "node2".into(),
            precopy: Some(1),
            via_image: false,
            image_only: true,
            base_image: Some("localhost/lab/busybox:latest".into()),
        });
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""request":"migrate""#), "{json}");
        assert_eq!(decode::<Request>(json.as_bytes(), "t").unwrap(), r);
        let e = Event::Phase {
            migration_id: "m".into(),
            phase: Phase::Checkpoint,
            round: None,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"event":"phase","migration_id":"m","phase":"checkpoint"}"#
        );
    }

    #[test]
    fn container_lists_round_trip() {
        let json = serde_json::to_string(&Request::ListContainers).unwrap();
        assert_eq!(json, r#"{"request":"list_containers"}"#);
        assert_eq!(
            decode::<Request>(json.as_bytes(), "t").unwrap(),
            Request::ListContainers
        );
        let list = ContainerList {
            node: "node1".into(),
            containers: vec![
                ListedContainer {
                    name: "web".into(),
                    id: "abc".into(),
                    image: "localhost/lab/nginx:latest".into(),
                    not_movable: None,
                    memory_bytes: Some(2_482_176),
                },
                ListedContainer {
                    name: "db".into(),
                    id: "def".into(),
                    image: "i".into(),
                    not_movable: Some("bind mount of host path /srv".into()),
                    memory_bytes: None,
                },
            ],
        };
        let value = serde_json::to_value(&list).unwrap();
        assert!(
            value["containers"][0].get("not_movable").is_none(),
            "{value}"
        );
        assert_eq!(
            value["containers"][1]["not_movable"],
            "bind mount of host path /srv"
        );
        assert_eq!(
            serde_json::from_value::<ContainerList>(value).unwrap(),
            list
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = decode::<Request>(b"{\"request\":\"explode\"}", "peer").unwrap_err();
        assert!(err
            .to_string()
            .contains("malformed control message from peer"));
    }
}
