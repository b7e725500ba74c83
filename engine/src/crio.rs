//! The runtime seam on a Kubernetes node ([`CrioNode`]): checkpoints go through the kubelet's
//! checkpoint API (CRI-O and CRIU do the work; the container keeps running), images through
//! podman on the containers-storage that CRI-O shares, so an imported checkpoint image is one
//! CRI-O can restore a Pod from.
//!
//! A container is named `NAMESPACE/POD/CONTAINER` here ([`PodContainer`]). What only the API
//! server knows (whether the Pod runs, its image) is not asked of this seam: the CLI checks it
//! with the user's kubeconfig and passes the image along. Restoring, stopping and removing
//! containers are the kubelet's business on such a node, and listing them the API server's;
//! those calls are refused with a message that says so.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kubelet::{self, KubeletClient};
use crate::runtime::{CheckpointOutcome, ListedContainer, Podman, Runtime, RuntimeError};

/// A container of a Pod, as the daemon is asked to checkpoint it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The Pod's namespace.
    pub namespace: String,
    /// The Pod.
    pub pod: String,
    /// The container in the Pod.
    pub container: String,
}

impl PodContainer {
    /// Parses `NAMESPACE/POD/CONTAINER`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('/');
        let (Some(namespace), Some(pod), Some(container), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if [namespace, pod, container].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(Self {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            container: container.to_string(),
        })
    }
}

impl fmt::Display for PodContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.pod, self.container)
    }
}

/// [`Runtime`] of a Kubernetes node running CRI-O.
#[derive(Debug)]
pub struct CrioNode {
    kubelet: KubeletClient,
    /// Where the kubelet writes checkpoint archives (`/var/lib/kubelet/checkpoints`).
    checkpoints: PathBuf,
    /// How long the kubelet may take for one checkpoint.
    timeout: Duration,
    /// podman on the node's containers-storage (shared with CRI-O), for images.
    podman: Podman,
}

impl CrioNode {
    /// A node whose kubelet is reached through `kubelet`, writing archives into `checkpoints`.
    pub fn new(kubelet: KubeletClient, checkpoints: PathBuf, timeout: Duration) -> Self {
        Self {
            kubelet,
            checkpoints,
            timeout,
            podman: Podman::local(),
        }
    }

    fn unsupported(&self, operation: &'static str) -> RuntimeError {
        RuntimeError::Unsupported {
            operation,
            runtime: self.describe(),
        }
    }
}

impl Runtime for CrioNode {
    fn describe(&self) -> String {
        format!(
            "CRI-O through the kubelet at {} (images: podman)",
            self.kubelet.endpoint()
        )
    }

    fn checkpoint(
        &self,
        container: &str,
        out: &Path,
        _leave_running: bool,
    ) -> Result<CheckpointOutcome, RuntimeError> {
        let target = PodContainer::parse(container).ok_or_else(|| RuntimeError::Kubelet {
            message: format!(
                "{container:?} does not name a Pod's container: expected NAMESPACE/POD/CONTAINER"
            ),
        })?;
        let started = Instant::now();
        // Runtime calls run on tokio's blocking threads, where blocking on a future is allowed.
        let reported = tokio::runtime::Handle::current()
            .block_on(self.kubelet.checkpoint(
                &target.namespace,
                &target.pod,
                &target.container,
                self.timeout,
            ))
            .map_err(|e| RuntimeError::Kubelet {
                message: e.to_string(),
            })?;
        kubelet::claim_archive(&reported, &self.checkpoints, out).map_err(|e| {
            RuntimeError::Kubelet {
                message: e.to_string(),
            }
        })?;
        Ok(CheckpointOutcome {
            container_id: target.to_string(),
            archive: out.to_path_buf(),
            // The kubelet always leaves the container running.
            left_running: true,
            elapsed: started.elapsed(),
            stats: None,
        })
    }

    fn import_image(&self, oci_archive: &Path) -> Result<String, RuntimeError> {
        self.podman.import_image(oci_archive)
    }

    fn tag_image(&self, image: &str, reference: &str) -> Result<(), RuntimeError> {
        self.podman.tag_image(image, reference)
    }

    fn restore(&self, _image_ref: &str, _name: Option<&str>) -> Result<String, RuntimeError> {
        Err(self.unsupported("restore (the kubelet restores when a Pod names the image)"))
    }

    fn restore_in_place(&self, _archive: &Path) -> Result<String, RuntimeError> {
        Err(self.unsupported("restore in place (the source Pod never stopped)"))
    }

    fn is_running(&self, _container: &str) -> Result<bool, RuntimeError> {
        Err(self.unsupported("is-running (the API server knows; the CLI asks it)"))
    }

    fn remove_container(&self, _container: &str) -> Result<(), RuntimeError> {
        Err(self.unsupported("remove a container (Pods are deleted through the API server)"))
    }

    fn remove_image(&self, image_ref: &str) -> Result<(), RuntimeError> {
        self.podman.remove_image(image_ref)
    }

    fn image_of(&self, _container: &str) -> Result<String, RuntimeError> {
        Err(self.unsupported("finding a container's image (the Pod's spec names it)"))
    }

    fn container_id(&self, _container: &str) -> Result<String, RuntimeError> {
        Err(self.unsupported("finding a container's ID"))
    }

    fn has_image(&self, image_ref: &str) -> Result<bool, RuntimeError> {
        self.podman.has_image(image_ref)
    }

    fn save_image(&self, image_ref: &str, out: &Path) -> Result<(), RuntimeError> {
        self.podman.save_image(image_ref, out)
    }

    fn list_containers(&self) -> Result<Vec<ListedContainer>, RuntimeError> {
        Err(self.unsupported(
            "list containers (a Kubernetes node's Pods are listed through the API server)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_containers_parse_from_three_parts() {
        let c = PodContainer::parse("default/web-0/nginx").expect("parses");
        assert_eq!(
            (c.namespace.as_str(), c.pod.as_str(), c.container.as_str()),
            ("default", "web-0", "nginx")
        );
        assert_eq!(c.to_string(), "default/web-0/nginx");
        for bad in ["nginx", "default/web", "a/b/c/d", "a//c", "/b/c", "a/b/"] {
            assert!(PodContainer::parse(bad).is_none(), "{bad:?} parsed");
        }
    }
}
