//! Helpers shared by the loopback transfer tests: a lab of two nodes of one cluster CA, source
//! files shaped like memory dumps, and comparisons.

// Each test binary uses its own subset of these.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use transport::store::DiskStore;
use transport::tls::{init_certs, NodeIdentity};

/// The deadline of every whole-transfer wait.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A temporary directory with a cluster CA and two nodes, `sender` and `receiver`.
pub struct Lab {
    pub tmp: TempDir,
    pub sender: NodeIdentity,
    pub receiver: NodeIdentity,
}

impl Lab {
    pub fn new() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = init_certs(
            &tmp.path().join("certs"),
            &["sender".into(), "receiver".into()],
        )
        .unwrap();
        Lab {
            sender: NodeIdentity::load(&dirs[0]).unwrap(),
            receiver: NodeIdentity::load(&dirs[1]).unwrap(),
            tmp,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn store(&self) -> Arc<DiskStore> {
        Arc::new(DiskStore::open(&self.path("store"), None).unwrap())
    }
}

/// Mixed content like a memory dump: zero runs, repeated blocks, text and noise.
pub fn write_source(path: &Path, len: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let block: Vec<u8> = (0..100_000).map(|_| rng.u8(..)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut written = 0;
    while written < len {
        let run = 4096 * rng.usize(1..64);
        let bytes: Vec<u8> = match rng.u8(..4) {
            0 => vec![0; run],
            1 => block.iter().copied().cycle().take(run).collect(),
            2 => (0..run)
                .map(|i| b"lorem ipsum dolor sit amet "[i % 27])
                .collect(),
            _ => (0..run).map(|_| rng.u8(..)).collect(),
        };
        out.write_all(&bytes).unwrap();
        written += run;
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}
