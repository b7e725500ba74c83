//! The migration engine: node daemons that checkpoint a container, stream it with [`transport`],
//! assemble the restore image and restore it. Built so far: [`archive`] reads and validates a
//! checkpoint archive (and extracts it safely), [`inspect`] reports what one holds,
//! [`image`] turns one into the OCI checkpoint image that Podman and CRI-O restore from, and
//! [`runtime`] is the seam to the container engine on a node (checkpoint, import, restore,
//! is-running, cleanup), with its Podman CLI implementation, and [`lab`] brings up, inspects and
//! tears down the local lab of nodes (`migrate lab`). [`daemon`] is the node daemon: it speaks
//! [`control`] with the CLI and other daemons, runs the source side of a migration
//! ([`migration`]) and the destination side ([`destination`]).

pub mod archive;
pub mod cluster;
pub mod control;
pub mod daemon;
pub mod destination;
pub mod image;
pub mod inspect;
pub mod kubelet;
pub mod lab;
pub mod migration;
pub mod pod;
pub mod runtime;
