//! The kubelet checkpoint client (`engine::kubelet`) against the HTTPS fake kubelet
//! (`e2e::fake_kubelet`): real HTTP over real TLS on 127.0.0.1, with client certificates and
//! bearer tokens. Each test checks one answer of the kubelet turns into the error that says what
//! to do about it, and what the fake saw (method, path, `?timeout=`, identity); the last ones
//! check `claim_archive` on real files. No sleeps: the timeout test blocks the fake's handler on
//! a channel the test only releases at its end.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use e2e::fake_kubelet::{CheckpointCall, FakeKubelet, FakeKubeletConfig, Identity};
use engine::kubelet::{
    claim_archive, Credential, KubeletAuth, KubeletClient, KubeletError, Missing,
};

const NS: &str = "default";
const POD: &str = "web-0";
const CONTAINER: &str = "app";
const CN: &str = "migrate-daemon";
const TOKEN: &str = "good-token";

/// The archive path the real kubelet reports for a call.
fn archive_for(call: &CheckpointCall) -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/kubelet/checkpoints/checkpoint-{}_{}-{}-2024-05-01T10:00:00Z.tar",
        call.pod, call.namespace, call.container
    ))
}

/// A kubelet that knows pod `default/web-0` with container `app`, answering with the real
/// kubelet's 404 bodies otherwise, and records the calls that reached the runtime.
fn kubelet_with_pod() -> (FakeKubeletConfig, Arc<Mutex<Vec<CheckpointCall>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let config = FakeKubeletConfig::new(move |call| {
        seen.lock().unwrap().push(call.clone());
        if call.namespace != NS || call.pod != POD {
            return Err((404, "pod does not exist".to_owned()));
        }
        if call.container != CONTAINER {
            return Err((404, format!("container {} does not exist", call.container)));
        }
        Ok(archive_for(call))
    })
    .allow_cn(CN)
    .allow_token(TOKEN);
    (config, calls)
}

fn cert_client(kubelet: &FakeKubelet, cn: &str) -> KubeletClient {
    let (cert_pem, key_pem) = kubelet.client_identity(cn);
    KubeletClient::direct(
        &kubelet.url(),
        &kubelet.ca_pem(),
        KubeletAuth::ClientCertificate { cert_pem, key_pem },
    )
    .expect("client for the fake kubelet")
}

fn token_client(kubelet: &FakeKubelet, token: &str) -> KubeletClient {
    KubeletClient::direct(
        &kubelet.url(),
        &kubelet.ca_pem(),
        KubeletAuth::BearerToken(token.to_owned()),
    )
    .expect("client for the fake kubelet")
}

#[tokio::test]
async fn checkpoint_with_a_client_certificate() {
    let (config, calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config).await;
    let client = cert_client(&kubelet, CN);

    let archive = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(30))
        .await
        .expect("checkpoint");

    assert_eq!(
        archive,
        PathBuf::from(
            "/var/lib/kubelet/checkpoints/checkpoint-web-0_default-app-2024-05-01T10:00:00Z.tar"
        )
    );
    let requests = kubelet.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/checkpoint/default/web-0/app");
    assert_eq!(requests[0].query.as_deref(), Some("timeout=30"));
    assert_eq!(requests[0].identity, Identity::Certificate(CN.to_owned()));
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].timeout.as_deref(), Some("30"));
}

#[tokio::test]
async fn checkpoint_with_a_bearer_token() {
    let (config, _calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config).await;
    let client = token_client(&kubelet, TOKEN);

    // 1.5 s goes out as whole seconds, rounded up.
    let archive = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_millis(1500))
        .await
        .expect("checkpoint");

    assert!(archive.ends_with("checkpoint-web-0_default-app-2024-05-01T10:00:00Z.tar"));
    let requests = kubelet.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].query.as_deref(), Some("timeout=2"));
    assert_eq!(requests[0].identity, Identity::Token(TOKEN.to_owned()));
}

#[tokio::test]
async fn gate_off_is_named() {
    let (config, calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config.gate_off()).await;
    let client = cert_client(&kubelet, CN);

    let err = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(matches!(err, KubeletError::GateOff { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("ContainerCheckpoint feature gate is off"),
        "{text}"
    );
    assert!(
        text.contains("--feature-gates=ContainerCheckpoint=true"),
        "{text}"
    );
    assert!(text.contains(&kubelet.url()), "{text}");
    assert!(text.contains("default/web-0/app"), "{text}");
    assert_eq!(kubelet.requests().len(), 1);
    assert!(calls.lock().unwrap().is_empty(), "the runtime was called");
}

#[tokio::test]
async fn unknown_container_and_pod_are_told_apart() {
    let (config, _calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config).await;
    let client = cert_client(&kubelet, CN);

    let err = client
        .checkpoint(NS, POD, "sidecar", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, KubeletError::NotFound { missing: Missing::Container(c), .. } if c == "sidecar"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("has no container \"sidecar\""), "{text}");
    assert!(!text.contains("feature gate"), "{text}");

    let err = client
        .checkpoint(NS, "web-9", CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            KubeletError::NotFound {
                missing: Missing::Pod,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("no pod default/web-9"), "{err}");
}

#[tokio::test]
async fn unknown_token_is_unauthorized() {
    let (config, calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config).await;
    let client = token_client(&kubelet, "stolen-token");

    let err = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(
        matches!(
            err,
            KubeletError::Unauthorized {
                credential: Credential::BearerToken,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("bearer token was not accepted"), "{text}");
    assert!(text.contains("401"), "{text}");
    assert_eq!(kubelet.requests()[0].identity, Identity::Anonymous);
    assert!(calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let (config, calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config).await;
    let other = FakeKubelet::start(FakeKubeletConfig::new(|_| Err((500, String::new())))).await;
    let (cert_pem, key_pem) = other.client_identity(CN);
    let client = KubeletClient::direct(
        &kubelet.url(),
        &kubelet.ca_pem(),
        KubeletAuth::ClientCertificate { cert_pem, key_pem },
    )
    .expect("client");

    let err = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(
        matches!(
            err,
            KubeletError::Unauthorized {
                credential: Credential::ClientCertificate,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("client certificate was not accepted"),
        "{err}"
    );
    assert!(kubelet.requests().is_empty(), "{:?}", kubelet.requests());
    assert!(calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn forbidden_names_the_rbac_rule() {
    let (config, calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config.forbid_token("viewer-token")).await;

    let err = cert_client(&kubelet, "intruder")
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Forbidden { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(r#"apiGroups [""], resources ["nodes/checkpoint"], verbs ["create"]"#),
        "{text}"
    );
    assert!(text.contains("user \"intruder\""), "{text}");

    let err = token_client(&kubelet, "viewer-token")
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeletError::Forbidden { .. }), "{err:?}");
    assert!(err.to_string().contains("nodes/checkpoint"), "{err}");

    let identities: Vec<Identity> = kubelet.requests().into_iter().map(|r| r.identity).collect();
    assert_eq!(
        identities,
        [
            Identity::Certificate("intruder".to_owned()),
            Identity::Token("viewer-token".to_owned())
        ]
    );
    assert!(calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn runtime_failure_carries_the_message_and_dump_log() {
    let crio = "checkpointing of default/web-0/app failed (rpc error: code = Unknown desc = \
                failed to checkpoint container 3f2a: running \"/usr/bin/crun checkpoint\" failed: \
                CRIU checkpoint failed: see /var/lib/containers/storage/overlay-containers/3f2a/userdata/dump.log)";
    let kubelet = FakeKubelet::start(
        FakeKubeletConfig::new(move |_| Err((500, crio.to_owned()))).allow_cn(CN),
    )
    .await;

    let err = cert_client(&kubelet, CN)
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();

    let KubeletError::CheckpointFailed { dump_log, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(
        dump_log,
        "/var/lib/containers/storage/overlay-containers/3f2a/userdata/dump.log"
    );
    let text = err.to_string();
    assert!(text.contains("CRIU checkpoint failed"), "{text}");
    assert!(text.contains("CRIU's log is /var/lib/containers"), "{text}");

    // A message naming no log still points at where CRI-O keeps it.
    let kubelet = FakeKubelet::start(
        FakeKubeletConfig::new(|_| {
            Err((
                500,
                "checkpointing of default/web-0/app failed (rpc error: code = Unknown desc = boom)"
                    .to_owned(),
            ))
        })
        .allow_cn(CN),
    )
    .await;
    let text = cert_client(&kubelet, CN)
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("desc = boom"), "{text}");
    assert!(
        text.contains("overlay-containers/<container ID>/userdata/dump.log"),
        "{text}"
    );
}

#[tokio::test]
async fn no_answer_is_a_timeout() {
    // The handler blocks until `release` is dropped at the end of the test.
    let (release, blocked) = mpsc::channel::<()>();
    let blocked = Mutex::new(blocked);
    let kubelet = FakeKubelet::start(
        FakeKubeletConfig::new(move |_| {
            let _ = blocked.lock().unwrap().recv();
            Err((500, "released".to_owned()))
        })
        .allow_cn(CN),
    )
    .await;
    let client = cert_client(&kubelet, CN).with_deadline_margin(Duration::from_millis(200));

    let err = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(1))
        .await
        .unwrap_err();

    assert!(
        matches!(err, KubeletError::Timeout { after, .. } if after == Duration::from_millis(1200)),
        "{err:?}"
    );
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert_eq!(kubelet.requests().len(), 1);
    drop(release);
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let kubelet = FakeKubelet::start(kubelet_with_pod().0).await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("https://127.0.0.1:{port}");
    let client = KubeletClient::direct(
        &url,
        &kubelet.ca_pem(),
        KubeletAuth::BearerToken(TOKEN.to_owned()),
    )
    .expect("client");

    let err = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(matches!(err, KubeletError::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&url), "{text}");
    assert!(text.to_lowercase().contains("connection refused"), "{text}");
}

#[tokio::test]
async fn serving_certificate_from_another_ca_is_not_trusted() {
    let (config, calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config).await;
    let other = FakeKubelet::start(kubelet_with_pod().0).await;
    let client = KubeletClient::direct(
        &kubelet.url(),
        &other.ca_pem(),
        KubeletAuth::BearerToken(TOKEN.to_owned()),
    )
    .expect("client")
    .with_ca_file(Path::new("/etc/kubernetes/pki/kubelet-ca.crt"));

    let err = client
        .checkpoint(NS, POD, CONTAINER, Duration::from_secs(5))
        .await
        .unwrap_err();

    assert!(
        matches!(err, KubeletError::UntrustedCertificate { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("serving certificate of kubelet https://127.0.0.1"),
        "{text}"
    );
    assert!(
        text.contains("/etc/kubernetes/pki/kubelet-ca.crt"),
        "{text}"
    );
    assert!(kubelet.requests().is_empty());
    assert!(calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn invalid_names_are_refused_before_sending() {
    let (config, _calls) = kubelet_with_pod();
    let kubelet = FakeKubelet::start(config).await;
    let client = cert_client(&kubelet, CN);

    for (ns, pod, container, what) in [
        ("Default", POD, CONTAINER, "namespace"),
        ("", POD, CONTAINER, "namespace"),
        (NS, "web_0", CONTAINER, "pod"),
        (NS, "a/b", CONTAINER, "pod"),
        (NS, "..", CONTAINER, "pod"),
        (NS, POD, "../x", "container"),
        (NS, POD, "app?timeout=1", "container"),
        (NS, POD, "", "container"),
    ] {
        let err = client
            .checkpoint(ns, pod, container, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, KubeletError::InvalidName { what: w, .. } if *w == what),
            "{ns}/{pod}/{container}: {err:?}"
        );
    }
    assert!(kubelet.requests().is_empty(), "{:?}", kubelet.requests());
}

/// A checkpoints directory holding `name` with `content`, mode 0644 like any new file.
fn checkpoints_with(name: &str, content: &[u8]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("checkpoints");
    fs::create_dir(&dir).unwrap();
    let file = dir.join(name);
    fs::write(&file, content).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    (root, dir, file)
}

const ARCHIVE: &str = "checkpoint-web-0_default-app-2024-05-01T10:00:00Z.tar";

#[test]
fn claim_moves_the_archive_and_makes_it_private() {
    let (root, dir, reported) = checkpoints_with(ARCHIVE, b"archive bytes");
    let dest = root.path().join("out.tar");

    let size = claim_archive(&reported, &dir, &dest).expect("claim");

    assert_eq!(size, 13);
    assert_eq!(fs::read(&dest).unwrap(), b"archive bytes");
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o600);
    assert!(!reported.exists(), "the kubelet's copy is still there");
}

#[test]
fn claim_copies_across_filesystems() {
    let (_root, dir, reported) = checkpoints_with(ARCHIVE, b"archive bytes");
    let other = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    assert_ne!(
        fs::metadata(other.path()).unwrap().dev(),
        fs::metadata(&dir).unwrap().dev(),
        "this test needs /dev/shm on another filesystem than the temporary directory"
    );
    let dest = other.path().join("out.tar");

    let size = claim_archive(&reported, &dir, &dest).expect("claim");

    assert_eq!(size, 13);
    assert_eq!(fs::read(&dest).unwrap(), b"archive bytes");
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o600);
    assert!(!reported.exists());
    assert_eq!(
        fs::read_dir(other.path()).unwrap().count(),
        1,
        "a partial file was left"
    );
}

/// Asserts `claim_archive` refused: `dest` not created, `untouched` still holds `content`.
fn assert_refused(
    result: Result<u64, KubeletError>,
    dest: &Path,
    untouched: &Path,
    content: &[u8],
) {
    assert!(result.is_err(), "claimed {untouched:?}");
    assert!(!dest.exists(), "{dest:?} was created");
    assert_eq!(fs::read(untouched).unwrap(), content);
    assert_eq!(fs::metadata(untouched).unwrap().mode() & 0o777, 0o644);
}

#[test]
fn claim_refuses_dot_dot() {
    let (root, dir, _) = checkpoints_with(ARCHIVE, b"inside");
    let outside = root.path().join("secret.tar");
    fs::write(&outside, b"secret").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
    let dest = root.path().join("out.tar");

    let result = claim_archive(&dir.join("../secret.tar"), &dir, &dest);

    assert!(
        matches!(result, Err(KubeletError::OutsideCheckpointsDir { .. })),
        "{result:?}"
    );
    assert_refused(result, &dest, &outside, b"secret");
}

#[test]
fn claim_refuses_a_path_outside_the_directory() {
    let (root, dir, _) = checkpoints_with(ARCHIVE, b"inside");
    let elsewhere = root.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let file = elsewhere.join(ARCHIVE);
    fs::write(&file, b"other").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let dest = root.path().join("out.tar");

    let result = claim_archive(&file, &dir, &dest);

    assert!(
        matches!(result, Err(KubeletError::OutsideCheckpointsDir { .. })),
        "{result:?}"
    );
    let text = result.as_ref().unwrap_err().to_string();
    assert!(text.contains("not directly inside"), "{text}");
    assert_refused(result, &dest, &file, b"other");
}

#[test]
fn claim_refuses_a_symlink() {
    let (root, dir, _) = checkpoints_with(ARCHIVE, b"inside");
    let target = root.path().join("target.tar");
    fs::write(&target, b"target").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.join("checkpoint-link.tar");
    symlink(&target, &link).unwrap();
    let dest = root.path().join("out.tar");

    let result = claim_archive(&link, &dir, &dest);

    assert!(
        matches!(&result, Err(KubeletError::NotRegularFile { kind, .. }) if kind == "symbolic link"),
        "{result:?}"
    );
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_refused(result, &dest, &target, b"target");
}

#[test]
fn claim_refuses_a_directory() {
    let (root, dir, inside) = checkpoints_with(ARCHIVE, b"inside");
    let sub = dir.join("checkpoint-dir.tar");
    fs::create_dir(&sub).unwrap();
    let dest = root.path().join("out.tar");

    let result = claim_archive(&sub, &dir, &dest);

    assert!(
        matches!(&result, Err(KubeletError::NotRegularFile { kind, .. }) if kind == "directory"),
        "{result:?}"
    );
    assert!(sub.is_dir());
    assert_refused(result, &dest, &inside, b"inside");
}
