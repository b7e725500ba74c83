//! Helpers the end-to-end tests in `tests/` share: [`wait_for`], the lab ([`lab`]), HTTP fakes
//! of the two Kubernetes parts that cannot run on this machine, the API server
//! ([`fake_apiserver`]) and the kubelet's checkpoint endpoint ([`fake_kubelet`]), and both in
//! front of lab nodes as one process ([`fake_cluster`]).

pub mod fake_apiserver;
pub mod fake_cluster;
pub mod fake_kubelet;
pub mod lab;

use std::time::{Duration, Instant};

/// Polls `f` every 100 ms until it gives a value, failing with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
