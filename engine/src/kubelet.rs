//! The kubelet's checkpoint API, the Kubernetes way to checkpoint one container of a pod:
//! `POST /checkpoint/{namespace}/{pod}/{container}?timeout=SECONDS` on the kubelet (port 10250),
//! either straight to the node ([`KubeletClient::direct`]) or through the API server's node proxy
//! ([`KubeletClient::through_apiserver`]). The kubelet asks the runtime (CRI-O, which runs CRIU
//! with leave-running) to write an uncompressed archive into its checkpoints directory and answers
//! `{"items":["/var/lib/kubelet/checkpoints/checkpoint-<pod>_<namespace>-<container>-<RFC3339>.tar"]}`.
//! Every way this fails has a [`KubeletError`] variant that says what to check: the feature gate,
//! the names, the credentials, the RBAC rule, CRIU's `dump.log`, the network, the kubelet's serving
//! certificate. [`claim_archive`] then takes the reported file out of the checkpoints directory.
//!
//! HTTP, TLS and authentication are kube's client (one stack for the API server and the kubelet);
//! this module adds the request, a client-side deadline, and the reading of the kubelet's replies.
//! The bodies it recognises are those of `pkg/kubelet/server/server.go` (`checkpoint`): `pod does
//! not exist`, `container NAME does not exist` and `cannot parse value of timeout parameter` (all
//! 404), `checkpointing of NS/POD/CONTAINER failed (...)` (500), `Unauthorized` (401),
//! `Forbidden (user=..., ...)` (403); with the ContainerCheckpoint gate off the route is not
//! registered at all and Go's mux answers `404 page not found`.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use kube::api::PostParams;
use serde::Deserialize;

/// The kubelet's authenticated HTTPS port.
pub const KUBELET_PORT: u16 = 10250;

/// Where the kubelet has the runtime write checkpoint archives.
pub const CHECKPOINTS_DIR: &str = "/var/lib/kubelet/checkpoints";

/// How long after the requested timeout [`KubeletClient::checkpoint`] still waits for an answer:
/// the kubelet's own work and the runtime writing the archive come on top of CRIU's dump.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_secs(10);

/// Where CRI-O has runc/crun run CRIU (`--work-path` is the container's directory), so where
/// `dump.log` stays after a failed checkpoint.
const CRIO_DUMP_LOG: &str =
    "/var/lib/containers/storage/overlay-containers/<container ID>/userdata/dump.log";

/// How the client proves who it is to the kubelet.
pub enum KubeletAuth {
    /// A client certificate signed by the kubelet's client CA (`--client-ca-file`), such as
    /// kubeadm's `apiserver-kubelet-client`. Both PEM.
    ClientCertificate { cert_pem: Vec<u8>, key_pem: Vec<u8> },
    /// A bearer token the kubelet checks with the API server (webhook authentication).
    BearerToken(String),
    /// A bearer token read from a file and read again as it changes: a ServiceAccount's
    /// projected token, which the kubelet rotates.
    BearerTokenFile(PathBuf),
}

impl KubeletAuth {
    /// What kind of credential this is, for error messages.
    fn kind(&self) -> Credential {
        match self {
            KubeletAuth::ClientCertificate { .. } => Credential::ClientCertificate,
            KubeletAuth::BearerToken(_) | KubeletAuth::BearerTokenFile(_) => {
                Credential::BearerToken
            }
        }
    }
}

// Keys and tokens stay out of logs.
impl fmt::Debug for KubeletAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KubeletAuth::ClientCertificate { .. } => f.write_str("ClientCertificate { .. }"),
            KubeletAuth::BearerToken(_) => f.write_str("BearerToken(<redacted>)"),
            KubeletAuth::BearerTokenFile(path) => write!(f, "BearerTokenFile({path:?})"),
        }
    }
}

/// The credential a request carried, named in 401 errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    ClientCertificate,
    BearerToken,
    /// Whatever the kube client for the API server was configured with.
    ApiServerClient,
}

impl fmt::Display for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credential::ClientCertificate => "client certificate",
            Credential::BearerToken => "bearer token",
            Credential::ApiServerClient => "credentials of the API server client",
        })
    }
}

/// What a 404 from the kubelet said was missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// `pod does not exist`: no such pod on that node.
    Pod,
    /// `container NAME does not exist`: the pod has no container of that name.
    Container(String),
    /// `cannot parse value of timeout parameter`.
    TimeoutParameter,
    /// A 404 whose body says neither (for example the API server's `nodes "x" not found`).
    Unknown(String),
}

/// Errors of [`KubeletClient`] and [`claim_archive`]. `at` names the kubelet (its URL, or the
/// node reached through the API server), `container` is `namespace/pod/container`.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// A namespace, pod, container or node name that is not a DNS-1123 name; nothing was sent.
    #[error("invalid {what} name {name:?}: {reason}; nothing was sent to the kubelet")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },
    /// The kubelet URL, CA or credentials could not be turned into a client.
    #[error("cannot set up a client for {at}: {reason}")]
    Config { at: String, reason: String },
    /// The route does not exist: the ContainerCheckpoint feature gate is off.
    #[error(
        "checkpoint of {container} on {at} failed: the ContainerCheckpoint feature gate is off on \
         that kubelet (on by default since Kubernetes 1.30; before that: \
         --feature-gates=ContainerCheckpoint=true) (404 {body:?})"
    )]
    GateOff {
        at: String,
        container: String,
        body: String,
    },
    /// The kubelet knows no such pod or container.
    #[error("checkpoint of {container} on {at} failed: {}", not_found_text(.missing, .container))]
    NotFound {
        at: String,
        container: String,
        missing: Missing,
    },
    /// 401, or the TLS handshake refused the client certificate.
    #[error(
        "checkpoint of {container} on {at} failed: the {credential} was not accepted ({detail}); {}",
        unauthorized_hint(*.credential)
    )]
    Unauthorized {
        at: String,
        container: String,
        credential: Credential,
        detail: String,
    },
    /// 403: authenticated, but RBAC does not allow it.
    #[error(
        "checkpoint of {container} on {at} failed: forbidden (403 {body:?}); grant {who} a \
         ClusterRole rule apiGroups [\"\"], resources [\"{resource}\"], verbs [\"create\"]{}",
        if *.resource == "nodes/proxy" {
            " (nodes/proxy also allows exec and logs on every node: prefer talking to the kubelet directly with nodes/checkpoint)"
        } else {
            ""
        }
    )]
    Forbidden {
        at: String,
        container: String,
        body: String,
        /// The user to grant the rule to, as far as the reply tells.
        who: String,
        /// `nodes/checkpoint` on the kubelet, `nodes/proxy` on the API server.
        resource: &'static str,
    },
    /// 500: the runtime (CRI-O/CRIU) could not checkpoint the container.
    #[error(
        "checkpoint of {container} on {at} failed in the container runtime: {message}; CRIU's log \
         is {dump_log} on that node"
    )]
    CheckpointFailed {
        at: String,
        container: String,
        message: String,
        /// Where `dump.log` is: the path from the message when it names one, else CRI-O's pattern.
        dump_log: String,
    },
    /// No answer within the requested timeout plus the margin.
    #[error(
        "checkpoint of {container} on {at} failed: no answer within {after:?} (the requested \
         timeout plus a margin); CRIU may still be running there: check the kubelet's and CRI-O's \
         logs on the node"
    )]
    Timeout {
        at: String,
        container: String,
        after: Duration,
    },
    /// Connection refused, DNS, TLS or a proxy that could not reach the node.
    #[error(
        "checkpoint of {container} failed: cannot reach {at}: {reason}; check the address, that \
         the kubelet's port ({KUBELET_PORT} by default) is open from here and that the node is up"
    )]
    Unreachable {
        at: String,
        container: String,
        reason: String,
    },
    /// The kubelet's serving certificate does not chain to the CA we were given.
    #[error(
        "checkpoint of {container} failed: the serving certificate of {at} was not trusted \
         ({reason}); check that {ca} is the CA that signed the kubelet's serving certificate \
         (kubelet --tls-cert-file, or the cluster CA with serverTLSBootstrap) and that it \
         names this address"
    )]
    UntrustedCertificate {
        at: String,
        container: String,
        ca: String,
        reason: String,
    },
    /// 200, but not `{"items":["<path>"]}`.
    #[error("checkpoint of {container} on {at}: unexpected reply {body:?}: {reason}")]
    BadReply {
        at: String,
        container: String,
        reason: String,
        body: String,
    },
    /// Any other status.
    #[error("checkpoint of {container} on {at} failed: HTTP {code}: {body}")]
    UnexpectedStatus {
        at: String,
        container: String,
        code: u16,
        body: String,
    },
    /// [`claim_archive`]: the reported path is not directly inside the checkpoints directory.
    #[error(
        "refusing to take {reported:?}: {reason}; the kubelet reports archives directly inside \
         {dir:?}"
    )]
    OutsideCheckpointsDir {
        reported: PathBuf,
        dir: PathBuf,
        reason: &'static str,
    },
    /// [`claim_archive`]: the reported path is a symlink, directory or other non-file.
    #[error("refusing to take {reported:?}: it is a {kind}, not a regular file")]
    NotRegularFile { reported: PathBuf, kind: String },
    /// [`claim_archive`]: reading, moving or syncing failed.
    #[error("cannot {op} {path:?} while taking the checkpoint archive: {source}")]
    ClaimIo {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn not_found_text(missing: &Missing, container: &str) -> String {
    let mut parts = container.splitn(3, '/');
    let ns = parts.next().unwrap_or_default();
    let pod = parts.next().unwrap_or_default();
    match missing {
        Missing::Pod => format!(
            "that kubelet has no pod {ns}/{pod} (\"pod does not exist\"); check the name and that \
             the pod runs on this node: kubectl get pod -n {ns} {pod} -o wide"
        ),
        Missing::Container(name) => format!(
            "pod {ns}/{pod} has no container {name:?} (\"container {name} does not exist\"); check \
             the pod's spec.containers: kubectl get pod -n {ns} {pod} -o \
             jsonpath='{{.spec.containers[*].name}}'"
        ),
        Missing::TimeoutParameter => {
            "the kubelet could not parse the timeout parameter (a bug in this client)".to_owned()
        }
        Missing::Unknown(body) => format!("404 {body:?}"),
    }
}

fn unauthorized_hint(credential: Credential) -> &'static str {
    match credential {
        Credential::ClientCertificate => {
            "check that the certificate is signed by the CA the kubelet trusts for clients \
             (--client-ca-file / authentication.x509.clientCAFile) and has not expired"
        }
        Credential::BearerToken => {
            "check that the token is valid and that the kubelet has webhook authentication on \
             (authentication.webhook.enabled)"
        }
        Credential::ApiServerClient => "check the kubeconfig or service account token in use",
    }
}

/// How requests reach the kubelet.
#[derive(Debug, Clone)]
enum Route {
    /// Straight to the kubelet.
    Direct {
        url: String,
        credential: Credential,
        /// Where the CA came from, named when the serving certificate is not trusted.
        ca: String,
    },
    /// `/api/v1/nodes/{node}/proxy/...` on the API server.
    ApiServer { node: String },
}

impl Route {
    fn at(&self) -> String {
        match self {
            Route::Direct { url, .. } => format!("kubelet {url}"),
            Route::ApiServer { node } => format!("node {node} (through the API server)"),
        }
    }
}

/// A client for one kubelet's checkpoint endpoint.
pub struct KubeletClient {
    client: kube::Client,
    route: Route,
    margin: Duration,
}

impl fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeletClient")
            .field("route", &self.route)
            .field("margin", &self.margin)
            .finish_non_exhaustive()
    }
}

impl KubeletClient {
    /// Straight to a kubelet, e.g. `https://10.0.0.5:10250`, trusting `ca_pem` for its serving
    /// certificate. Needs RBAC `nodes/checkpoint` `create` for the identity in `auth`. Call it
    /// inside a Tokio runtime (kube's client starts its request buffer task).
    pub fn direct(url: &str, ca_pem: &[u8], auth: KubeletAuth) -> Result<Self, KubeletError> {
        use quinn::rustls::pki_types::{pem::PemObject, CertificateDer};

        let config_err = |reason: String| KubeletError::Config {
            at: format!("kubelet {url}"),
            reason,
        };
        if !url.starts_with("https://") {
            return Err(config_err(
                "the kubelet only serves the checkpoint API over https".to_owned(),
            ));
        }
        let mut config = kube::Config::new(
            url.parse()
                .map_err(|e| config_err(format!("not a URL: {e}")))?,
        );
        let roots = CertificateDer::pem_slice_iter(ca_pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| config_err(format!("the CA is not PEM: {e}")))?;
        if roots.is_empty() {
            return Err(config_err(
                "the CA PEM holds no CERTIFICATE block".to_owned(),
            ));
        }
        config.root_cert = Some(roots);
        // A checkpoint is not idempotent: never resend it on 503 or 429.
        config.default_retry = false;
        // The deadline is ours (`checkpoint`), sized to the requested timeout.
        config.read_timeout = None;
        let credential = auth.kind();
        match auth {
            KubeletAuth::ClientCertificate { cert_pem, key_pem } => {
                // kubeconfig semantics: the *-data fields are base64 of the PEM.
                config.auth_info.client_certificate_data = Some(base64(&cert_pem));
                config.auth_info.client_key_data = Some(base64(&key_pem).into());
            }
            KubeletAuth::BearerToken(token) => config.auth_info.token = Some(token.into()),
            KubeletAuth::BearerTokenFile(path) => {
                // kube reads it again when it changes (projected tokens rotate).
                config.auth_info.token_file = Some(path.to_string_lossy().into_owned())
            }
        }
        // kube builds its rustls config from the process-wide provider; ring is the only one
        // compiled in, so this only fails when it is already installed.
        let _ = quinn::rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_from(config).map_err(|e| config_err(error_chain(&e)))?;
        Ok(KubeletClient {
            client,
            route: Route::Direct {
                url: url.to_owned(),
                credential,
                ca: "the CA given for this kubelet".to_owned(),
            },
            margin: DEFAULT_DEADLINE_MARGIN,
        })
    }

    /// Through the API server's node proxy: `/api/v1/nodes/{node}/proxy/checkpoint/...`. This
    /// needs RBAC `nodes/proxy` `create`, which also allows exec into and logs of every pod on
    /// every node; prefer [`KubeletClient::direct`] with `nodes/checkpoint` where the kubelet is
    /// reachable. The client's own read timeout (if any) also applies.
    pub fn through_apiserver(client: kube::Client, node: &str) -> Self {
        KubeletClient {
            client,
            route: Route::ApiServer {
                node: node.to_owned(),
            },
            margin: DEFAULT_DEADLINE_MARGIN,
        }
    }

    /// Where requests go: the kubelet's URL, or the node reached through the API server.
    pub fn endpoint(&self) -> String {
        match &self.route {
            Route::Direct { url, .. } => url.clone(),
            Route::ApiServer { node } => format!("node {node} through the API server"),
        }
    }

    /// Names the file the CA came from, for the error when the kubelet's serving certificate is
    /// not trusted. No effect through the API server.
    pub fn with_ca_file(mut self, path: &Path) -> Self {
        if let Route::Direct { ca, .. } = &mut self.route {
            *ca = path.display().to_string();
        }
        self
    }

    /// How long after the requested timeout to keep waiting ([`DEFAULT_DEADLINE_MARGIN`]).
    pub fn with_deadline_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// Asks the kubelet to checkpoint `container` of `namespace/pod`, giving the runtime
    /// `timeout` (rounded up to whole seconds); returns the archive path the kubelet reported,
    /// on the node. Gives up with [`KubeletError::Timeout`] after `timeout` plus the margin.
    pub async fn checkpoint(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        timeout: Duration,
    ) -> Result<PathBuf, KubeletError> {
        validate_label("namespace", namespace)?;
        validate_subdomain("pod", pod)?;
        validate_label("container", container)?;
        if let Route::ApiServer { node } = &self.route {
            validate_subdomain("node", node)?;
        }
        let secs = timeout_secs(timeout);
        let path = request_path(&self.route, namespace, pod, container, secs);
        let at = self.route.at();
        let full = format!("{namespace}/{pod}/{container}");
        // Validated names make a valid URI; this only guards against a bug here.
        let unexpected = |reason: String| KubeletError::Config {
            at: at.clone(),
            reason,
        };
        let mut request = kube::core::Request::new(path.as_str())
            .create(&PostParams::default(), Vec::new())
            .map_err(|e| unexpected(format!("cannot build the request: {e}")))?;
        *request.uri_mut() = path
            .parse()
            .map_err(|e| unexpected(format!("cannot build the request URI {path}: {e}")))?;
        let deadline = Duration::from_secs(secs) + self.margin;
        tracing::info!(%at, namespace, pod, container, timeout_secs = secs, "kubelet checkpoint");
        let reply = tokio::time::timeout(deadline, self.client.request_text(request)).await;
        let result = match reply {
            Err(_elapsed) => Err(KubeletError::Timeout {
                at,
                container: full,
                after: deadline,
            }),
            Ok(Ok(body)) => parse_reply(&body).map_err(|reason| KubeletError::BadReply {
                at,
                container: full,
                reason,
                body,
            }),
            Ok(Err(kube::Error::Api(status))) => Err(classify_status(
                &self.route,
                full,
                status.code,
                &status.message,
            )),
            Ok(Err(e)) => Err(classify_transport(&self.route, full, &error_chain(&e))),
        };
        match &result {
            Ok(archive) => {
                tracing::info!(archive = %archive.display(), "kubelet checkpoint written")
            }
            Err(e) => tracing::warn!(error = %e, "kubelet checkpoint failed"),
        }
        result
    }
}

/// The request's path and query; the names are validated, so they need no escaping.
fn request_path(route: &Route, namespace: &str, pod: &str, container: &str, secs: u64) -> String {
    let prefix = match route {
        Route::Direct { .. } => String::new(),
        Route::ApiServer { node } => format!("/api/v1/nodes/{node}/proxy"),
    };
    format!("{prefix}/checkpoint/{namespace}/{pod}/{container}?timeout={secs}")
}

/// Whole seconds for the kubelet's `timeout` parameter: rounded up, at least 1 (0 would mean
/// "the runtime's default").
fn timeout_secs(timeout: Duration) -> u64 {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    secs.max(1)
}

/// Reads `{"items":["<path>"]}`; the path must be absolute.
fn parse_reply(body: &str) -> Result<PathBuf, String> {
    #[derive(Deserialize)]
    struct Reply {
        items: Vec<String>,
    }
    let reply: Reply = serde_json::from_str(body)
        .map_err(|e| format!("not the kubelet's {{\"items\":[...]}} JSON: {e}"))?;
    let first = reply
        .items
        .into_iter()
        .next()
        .ok_or_else(|| "no archive in \"items\"".to_owned())?;
    let path = PathBuf::from(first);
    if !path.is_absolute() {
        return Err(format!("the archive path {path:?} is not absolute"));
    }
    Ok(path)
}

/// Turns an HTTP error status and its body into an error.
fn classify_status(route: &Route, container: String, code: u16, body: &str) -> KubeletError {
    let at = route.at();
    let body = body.trim();
    let name = container.rsplit('/').next().unwrap_or_default().to_owned();
    match code {
        404 if body == "404 page not found" => KubeletError::GateOff {
            at,
            container,
            body: body.to_owned(),
        },
        404 => {
            let missing = if body == "pod does not exist" {
                Missing::Pod
            } else if body == format!("container {name} does not exist") {
                Missing::Container(name)
            } else if body == "cannot parse value of timeout parameter" {
                Missing::TimeoutParameter
            } else {
                Missing::Unknown(body.to_owned())
            };
            KubeletError::NotFound {
                at,
                container,
                missing,
            }
        }
        401 => KubeletError::Unauthorized {
            at,
            container,
            credential: match route {
                Route::Direct { credential, .. } => *credential,
                Route::ApiServer { .. } => Credential::ApiServerClient,
            },
            detail: format!("401 {body:?}"),
        },
        403 => {
            // The kubelet's own refusal reads "Forbidden (user=NAME, verb=..."; through the proxy
            // that refusal is of the API server's kubelet client, anything else is the API server
            // refusing the caller `nodes/proxy`.
            let kubelet_user = body
                .strip_prefix("Forbidden (user=")
                .and_then(|rest| rest.split([',', ')']).next())
                .map(str::to_owned);
            let (who, resource) = match (route, kubelet_user) {
                (_, Some(user)) => (format!("user {user:?}"), "nodes/checkpoint"),
                (Route::Direct { .. }, None) => {
                    ("the client's identity".to_owned(), "nodes/checkpoint")
                }
                (Route::ApiServer { .. }, None) => {
                    ("the API server client's identity".to_owned(), "nodes/proxy")
                }
            };
            KubeletError::Forbidden {
                at,
                container,
                body: body.to_owned(),
                who,
                resource,
            }
        }
        500 if !body.starts_with("Authorization error") => KubeletError::CheckpointFailed {
            at,
            container,
            message: body.to_owned(),
            dump_log: dump_log_in(body).unwrap_or_else(|| {
                format!("{CRIO_DUMP_LOG} (container ID: crictl ps -a --name {name})")
            }),
        },
        502 | 503 if matches!(route, Route::ApiServer { .. }) => KubeletError::Unreachable {
            at,
            container,
            reason: format!("the API server answered {code}: {body}"),
        },
        _ => KubeletError::UnexpectedStatus {
            at,
            container,
            code,
            body: body.to_owned(),
        },
    }
}

/// Turns a failure to get any HTTP answer (the whole error chain as text) into an error.
fn classify_transport(route: &Route, container: String, chain: &str) -> KubeletError {
    let at = route.at();
    if chain.contains("invalid peer certificate") {
        let ca = match route {
            Route::Direct { ca, .. } => ca.clone(),
            Route::ApiServer { .. } => "the API server's CA".to_owned(),
        };
        return KubeletError::UntrustedCertificate {
            at,
            container,
            ca,
            reason: chain.to_owned(),
        };
    }
    // A server that rejects the client certificate in the handshake sends one of these alerts
    // (DecryptError: a CA of the same name but another key, as two kubeadm CAs "kubernetes").
    let refused_cert = [
        "BadCertificate",
        "UnknownCA",
        "CertificateRequired",
        "CertificateUnknown",
        "DecryptError",
    ]
    .iter()
    .any(|alert| chain.contains(&format!("received fatal alert: {alert}")));
    if let (
        true,
        Route::Direct {
            credential: Credential::ClientCertificate,
            ..
        },
    ) = (refused_cert, route)
    {
        return KubeletError::Unauthorized {
            at,
            container,
            credential: Credential::ClientCertificate,
            detail: format!("the TLS handshake was refused: {chain}"),
        };
    }
    KubeletError::Unreachable {
        at,
        container,
        reason: chain.to_owned(),
    }
}

/// The `.../dump.log` path a runtime error message names, if any.
fn dump_log_in(message: &str) -> Option<String> {
    message
        .split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '(' | ')' | ',' | ';'))
        .map(|token| token.trim_end_matches([':', '.']))
        .find(|token| token.starts_with('/') && token.ends_with("/dump.log"))
        .map(str::to_owned)
}

/// An error and its sources as one line, skipping a source its parent already printed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Standard base64 with padding (kubeconfig's `*-data` fields).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Checks a DNS-1123 label: 1 to 63 of `a-z`, `0-9`, `-`, starting and ending alphanumeric.
/// Namespaces and container names are labels.
fn validate_label(what: &'static str, name: &str) -> Result<(), KubeletError> {
    label_problem(name, 63).map_or(Ok(()), |reason| {
        Err(KubeletError::InvalidName {
            what,
            name: name.to_owned(),
            reason: format!(
                "{reason} (a DNS-1123 label: lowercase letters, digits and '-', at most 63)"
            ),
        })
    })
}

/// Checks a DNS-1123 subdomain: at most 253 characters of dot-separated labels. Pod and node
/// names are subdomains.
fn validate_subdomain(what: &'static str, name: &str) -> Result<(), KubeletError> {
    let problem = if name.len() > 253 {
        Some("longer than 253 characters".to_owned())
    } else {
        name.split('.').find_map(|label| label_problem(label, 253))
    };
    problem.map_or(Ok(()), |reason| {
        Err(KubeletError::InvalidName {
            what,
            name: name.to_owned(),
            reason: format!(
                "{reason} (a DNS-1123 subdomain: dot-separated lowercase letters, digits and '-')"
            ),
        })
    })
}

fn label_problem(label: &str, max: usize) -> Option<String> {
    let bytes = label.as_bytes();
    if bytes.is_empty() {
        return Some("empty (or an empty part between dots)".to_owned());
    }
    if bytes.len() > max {
        return Some(format!("longer than {max} characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!("contains {c:?}"));
    }
    if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return Some("must start and end with a letter or digit".to_owned());
    }
    None
}

/// Moves the archive the kubelet reported out of its checkpoints directory into `dest` (mode
/// 0600; an existing `dest` is replaced, as `rename` does), refusing a reported path that is not a regular file
/// directly inside `checkpoints_dir` (no `..`, no symlink). Renames when both are on one
/// filesystem, else copies, fsyncs and removes the original. Returns the archive's size.
/// A refused path is left untouched.
pub fn claim_archive(
    reported: &Path,
    checkpoints_dir: &Path,
    dest: &Path,
) -> Result<u64, KubeletError> {
    let outside = |reason| KubeletError::OutsideCheckpointsDir {
        reported: reported.to_owned(),
        dir: checkpoints_dir.to_owned(),
        reason,
    };
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| KubeletError::ClaimIo { op, path, source }
    };
    if reported
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(outside("it contains '..' or '.'"));
    }
    let parent = match (reported.parent(), reported.file_name()) {
        (Some(parent), Some(_)) => parent,
        _ => return Err(outside("it names no file")),
    };
    if !same_path(parent, checkpoints_dir) {
        return Err(outside(
            "it is not directly inside the checkpoints directory",
        ));
    }

    let lstat = fs::symlink_metadata(reported).map_err(io_err("inspect", reported))?;
    let kind = file_kind(&lstat.file_type());
    if kind != "regular file" {
        return Err(KubeletError::NotRegularFile {
            reported: reported.to_owned(),
            kind: kind.to_owned(),
        });
    }
    // O_NOFOLLOW: the file checked above cannot be swapped for a symlink before it is opened.
    let source = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(reported)
        .map_err(io_err("open", reported))?;
    let opened = source.metadata().map_err(io_err("inspect", reported))?;
    if (opened.dev(), opened.ino()) != (lstat.dev(), lstat.ino()) || !opened.is_file() {
        return Err(KubeletError::NotRegularFile {
            reported: reported.to_owned(),
            kind: "file replaced while being checked".to_owned(),
        });
    }
    let size = match fs::rename(reported, dest) {
        Ok(()) => {
            let moved = fs::symlink_metadata(dest).map_err(io_err("inspect", dest))?;
            if (moved.dev(), moved.ino()) != (lstat.dev(), lstat.ino()) {
                return Err(KubeletError::NotRegularFile {
                    reported: reported.to_owned(),
                    kind: "file replaced while being moved".to_owned(),
                });
            }
            fs::set_permissions(dest, fs::Permissions::from_mode(0o600))
                .map_err(io_err("set the mode of", dest))?;
            File::open(dest)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync", dest))?;
            moved.len()
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_then_remove(source, reported, dest)?
        }
        Err(e) => return Err(io_err("move", reported)(e)),
    };
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", dir))?;
    }
    Ok(size)
}

/// The cross-filesystem half of [`claim_archive`].
fn copy_then_remove(mut source: File, reported: &Path, dest: &Path) -> Result<u64, KubeletError> {
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| KubeletError::ClaimIo { op, path, source }
    };
    // Copy next to `dest` and rename over it, so `dest` is never a partial archive.
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = fs::remove_file(&partial);
    let mut out = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io_err("create", &partial))?;
    let copied = io::copy(&mut source, &mut out)
        .and_then(|n| {
            // The umask may have narrowed the mode, never widened it; make it exactly 0600.
            out.set_permissions(fs::Permissions::from_mode(0o600))?;
            out.sync_all()?;
            Ok(n)
        })
        .and_then(|n| fs::rename(&partial, dest).map(|()| n));
    let size = match copied {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(io_err("copy", reported)(e));
        }
    };
    fs::remove_file(reported).map_err(io_err("remove", reported))?;
    Ok(size)
}

/// Compares two paths component by component (so `/a/b/` equals `/a/b`).
fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

fn file_kind(t: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "symbolic link"
    } else if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular file"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else {
        "device"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct() -> Route {
        Route::Direct {
            url: "https://10.0.0.5:10250".to_owned(),
            credential: Credential::ClientCertificate,
            ca: "/etc/kubernetes/pki/kubelet-ca.crt".to_owned(),
        }
    }

    fn proxied() -> Route {
        Route::ApiServer {
            node: "node-1".to_owned(),
        }
    }

    fn classify(route: &Route, code: u16, body: &str) -> KubeletError {
        classify_status(route, "default/web-0/app".to_owned(), code, body)
    }

    #[test]
    fn reply_parsing() {
        let path =
            "/var/lib/kubelet/checkpoints/checkpoint-web-0_default-app-2024-05-01T10:00:00Z.tar";
        assert_eq!(
            parse_reply(&format!("{{\"items\":[\"{path}\"]}}")).unwrap(),
            PathBuf::from(path)
        );
        assert!(parse_reply("{\"items\":[]}")
            .unwrap_err()
            .contains("no archive"));
        assert!(parse_reply("{\"items\":[\"relative.tar\"]}")
            .unwrap_err()
            .contains("not absolute"));
        assert!(parse_reply("ok").unwrap_err().contains("JSON"));
        assert!(parse_reply("{\"paths\":[\"/x.tar\"]}").is_err());
    }

    #[test]
    fn names_are_dns_1123() {
        for ok in ["default", "a", "kube-system", "x1"] {
            assert!(validate_label("namespace", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Default",
            "-a",
            "a-",
            "a.b",
            "a/b",
            "..",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(validate_label("namespace", bad).is_err(), "{bad:?}");
        }
        for ok in ["web-0", "web.example.com", "a"] {
            assert!(validate_subdomain("pod", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            ".a",
            "a.",
            "a/b",
            "a?b",
            "A",
            &"a".repeat(254),
        ] {
            assert!(validate_subdomain("pod", bad).is_err(), "{bad:?}");
        }
        let e = validate_label("container", "App").unwrap_err().to_string();
        assert!(
            e.contains("container") && e.contains("\"App\"") && e.contains("'A'"),
            "{e}"
        );
    }

    #[test]
    fn timeout_rounds_up_to_whole_seconds() {
        assert_eq!(timeout_secs(Duration::from_secs(30)), 30);
        assert_eq!(timeout_secs(Duration::from_millis(1500)), 2);
        assert_eq!(timeout_secs(Duration::ZERO), 1);
    }

    #[test]
    fn go_default_404_is_the_gate() {
        let e = classify(&direct(), 404, "404 page not found\n");
        assert!(matches!(e, KubeletError::GateOff { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("ContainerCheckpoint feature gate is off"),
            "{text}"
        );
        assert!(text.contains("https://10.0.0.5:10250"), "{text}");
        assert!(text.contains("default/web-0/app"), "{text}");
    }

    #[test]
    fn kubelet_404_bodies_say_what_is_missing() {
        let e = classify(&direct(), 404, "pod does not exist");
        assert!(
            matches!(
                &e,
                KubeletError::NotFound {
                    missing: Missing::Pod,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("no pod default/web-0"), "{e}");
        let e = classify(&direct(), 404, "container app does not exist");
        assert!(
            matches!(&e, KubeletError::NotFound { missing: Missing::Container(c), .. } if c == "app"),
            "{e:?}"
        );
        assert!(e.to_string().contains("has no container \"app\""), "{e}");
        let e = classify(&direct(), 404, "cannot parse value of timeout parameter");
        assert!(matches!(
            &e,
            KubeletError::NotFound {
                missing: Missing::TimeoutParameter,
                ..
            }
        ));
        let e = classify(&proxied(), 404, "nodes \"node-1\" not found");
        assert!(matches!(
            &e,
            KubeletError::NotFound {
                missing: Missing::Unknown(_),
                ..
            }
        ));
    }

    #[test]
    fn auth_errors_name_the_credential_and_the_rule() {
        let e = classify(&direct(), 401, "Unauthorized").to_string();
        assert!(e.contains("client certificate was not accepted"), "{e}");
        let token = Route::Direct {
            url: "https://k:10250".to_owned(),
            credential: Credential::BearerToken,
            ca: "ca.crt".to_owned(),
        };
        let e = classify(&token, 401, "Unauthorized").to_string();
        assert!(e.contains("bearer token was not accepted"), "{e}");

        let body =
            "Forbidden (user=migrate, verb=create, resource=nodes, subresource(s)=[checkpoint])";
        let e = classify(&direct(), 403, body);
        let text = e.to_string();
        assert!(
            text.contains(r#"resources ["nodes/checkpoint"], verbs ["create"]"#),
            "{text}"
        );
        assert!(text.contains("user \"migrate\""), "{text}");
        let e = classify(
            &proxied(),
            403,
            "nodes \"node-1\" is forbidden: User \"bob\" cannot create resource \"nodes/proxy\"",
        )
        .to_string();
        assert!(e.contains(r#"resources ["nodes/proxy"]"#), "{e}");
        // Through the proxy, the kubelet refusing the API server's client is about nodes/checkpoint.
        let e = classify(&proxied(), 403, "Forbidden (user=kube-apiserver-kubelet-client, verb=create, resource=nodes, subresource=checkpoint)").to_string();
        assert!(
            e.contains(r#"["nodes/checkpoint"]"#) && e.contains("kube-apiserver-kubelet-client"),
            "{e}"
        );
    }

    #[test]
    fn runtime_failure_points_at_dump_log() {
        let body = "checkpointing of default/web-0/app failed (rpc error: code = Unknown desc = \
                    failed to checkpoint container abc: `/usr/bin/crun checkpoint` failed: \
                    CRIU checkpoint failed; see /var/lib/containers/storage/overlay-containers/abc/userdata/dump.log)";
        let e = classify(&direct(), 500, body);
        let KubeletError::CheckpointFailed { dump_log, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(
            dump_log,
            "/var/lib/containers/storage/overlay-containers/abc/userdata/dump.log"
        );
        assert!(e.to_string().contains("rpc error"), "{e}");
        let e = classify(
            &direct(),
            500,
            "checkpointing of default/web-0/app failed (boom)",
        );
        let text = e.to_string();
        assert!(
            text.contains(CRIO_DUMP_LOG) && text.contains("--name app"),
            "{text}"
        );
        let e = classify(&direct(), 500, "Authorization error (user=x, verb=create)");
        assert!(
            matches!(e, KubeletError::UnexpectedStatus { code: 500, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn other_statuses() {
        let e = classify(
            &proxied(),
            503,
            "error trying to reach service: dial tcp 10.0.0.5:10250: connect: connection refused",
        );
        assert!(matches!(e, KubeletError::Unreachable { .. }), "{e:?}");
        let e = classify(&direct(), 405, "405: Method Not Allowed");
        assert!(
            matches!(e, KubeletError::UnexpectedStatus { code: 405, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn transport_errors() {
        let e = classify_transport(
            &direct(),
            "ns/p/c".to_owned(),
            "client error (Connect): invalid peer certificate: UnknownIssuer",
        );
        let text = e.to_string();
        assert!(
            matches!(e, KubeletError::UntrustedCertificate { .. }),
            "{text}"
        );
        assert!(
            text.contains("/etc/kubernetes/pki/kubelet-ca.crt"),
            "{text}"
        );
        let e = classify_transport(
            &direct(),
            "ns/p/c".to_owned(),
            "connection error: received fatal alert: DecryptError",
        );
        assert!(
            matches!(
                e,
                KubeletError::Unauthorized {
                    credential: Credential::ClientCertificate,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = classify_transport(
            &direct(),
            "ns/p/c".to_owned(),
            "tcp connect error: Connection refused (os error 111)",
        );
        assert!(matches!(e, KubeletError::Unreachable { .. }), "{e:?}");
    }

    #[test]
    fn dump_log_extraction() {
        assert_eq!(
            dump_log_in("see '/x/y/dump.log'."),
            Some("/x/y/dump.log".to_owned())
        );
        assert_eq!(
            dump_log_in("log file: /a/dump.log: no such"),
            Some("/a/dump.log".to_owned())
        );
        assert_eq!(dump_log_in("no log named here (dump.log)"), None);
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let token = format!("{:?}", KubeletAuth::BearerToken("s3cret".to_owned()));
        assert!(!token.contains("s3cret"), "{token}");
        let cert = KubeletAuth::ClientCertificate {
            cert_pem: b"CERT".to_vec(),
            key_pem: b"PRIVATE".to_vec(),
        };
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn request_paths() {
        assert_eq!(
            request_path(&direct(), "ns", "web-0", "app", 5),
            "/checkpoint/ns/web-0/app?timeout=5"
        );
        assert_eq!(
            request_path(&proxied(), "ns", "web-0", "app", 30),
            "/api/v1/nodes/node-1/proxy/checkpoint/ns/web-0/app?timeout=30"
        );
    }
}
