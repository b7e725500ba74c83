//! The migration engine: node daemons that checkpoint a container, stream it with [`transport`],
//! assemble the restore image and restore it. Built so far: [`archive`] reads and validates a
//! checkpoint archive (and extracts it safely), [`inspect`] reports what one holds,
//! [`image`] turns one into the OCI checkpoint image that Podman and CRI-O restore from, and
//! [`runtime`] is the seam to the container engine on a node (checkpoint, import, restore,
//! is-running, cleanup), with its Podman CLI implementation, and [`lab`] brings up, inspects and
//! tears down the local lab of nodes (`migrate lab`). [`daemon`] is the node daemon: it speaks
//! [`control`] with the CLI and other daemons, runs the source side of a migration
//! ([`migration`]) and the destination side ([`destination`]). [`restart`] makes a checkpoint's
//! sleeps that CRIU interrupted restart when restored, instead of failing with `EINTR`.
//! [`pages`] has the final round's page images received as files, so a restore never untars them.
//! [`podman_archive`] makes the archive Podman's export would write from a checkpoint taken
//! without one, and [`tar_files`] streams it from the files where its members lie.
//!
//! On Kubernetes: [`kubelet`] is the client of the kubelet's checkpoint API, [`crio`] the
//! runtime seam of a CRI-O node built on it (checkpoints through the kubelet, images through
//! podman on the shared containers-storage), [`pod`] the rules of which Pods can move and what
//! their replacement looks like, and [`cluster`] the API-server side of a Pod migration
//! (checks, the new Pod pinned with `nodeName`, waiting for it, letting the source go, rollback).
//! [`drain`] drains a node by migration: target choice as the scheduler filters, cordon, the
//! node's Pods migrated several at once, `--evict-rest`, and the watch mode for drain marks.

pub mod archive;
pub mod cluster;
pub mod control;
pub mod crio;
pub mod cut_ahead;
pub mod daemon;
pub mod destination;
pub mod drain;
pub mod earlier_cuts;
pub mod image;
pub mod inspect;
pub mod kubelet;
pub mod lab;
pub mod memory_images;
pub mod migration;
pub mod pages;
pub mod pod;
pub mod podman_archive;
pub mod restart;
pub mod runtime;
pub mod tar_files;
