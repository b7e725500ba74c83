//! An HTTPS fake of the kubelet's checkpoint endpoint for tests: hyper over tokio-rustls on
//! 127.0.0.1, with its own test PKI (a CA, a serving certificate for `localhost` and
//! `127.0.0.1`, client certificates on demand). It speaks the real kubelet's paths and bodies
//! (`pkg/kubelet/server/server.go`): `POST /checkpoint/{namespace}/{pod}/{container}?timeout=N`
//! answers `{"items":["<path>"]}`; `401 Unauthorized` without accepted credentials;
//! `403 Forbidden (user=..., verb=create, resource=nodes, subresource(s)=[checkpoint])` for an
//! authenticated identity that is not allowed; Go's `404 page not found` for every path when the
//! ContainerCheckpoint gate is off (the route is then not registered, so this comes before
//! authentication, as on a real kubelet); `405` for other methods. Client certificates are
//! optional in the handshake (so bearer tokens work) but must chain to the fake's CA when sent.
//! What a checkpoint does is the test's [`CheckpointHandler`], run on a blocking thread since a
//! real one (podman in a lab node) takes seconds. Every request is recorded for assertions.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// What the fake's checkpoint does: the archive path to report, or `(status, body)` to answer
/// (e.g. `(404, "container app does not exist")`, `(500, "checkpointing of ... failed (...)")`).
pub type CheckpointHandler =
    Arc<dyn Fn(&CheckpointCall) -> Result<PathBuf, (u16, String)> + Send + Sync>;

/// Who a request authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A client certificate signed by the fake's CA, by its CN.
    Certificate(String),
    /// A bearer token the fake knows (allowed or forbidden).
    Token(String),
    /// No certificate and no known token.
    Anonymous,
}

impl Identity {
    /// The user name a kubelet would print in its 403 body.
    fn user(&self) -> &str {
        match self {
            Identity::Certificate(cn) | Identity::Token(cn) => cn,
            Identity::Anonymous => "system:anonymous",
        }
    }
}

/// One authorized checkpoint request, as the handler sees it.
#[derive(Debug, Clone)]
pub struct CheckpointCall {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The last `timeout` query value, as sent.
    pub timeout: Option<String>,
    pub identity: Identity,
}

/// One request the fake received, whatever it answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub identity: Identity,
}

/// How a [`FakeKubelet`] authenticates, authorizes and checkpoints.
pub struct FakeKubeletConfig {
    /// Client-certificate CNs allowed to checkpoint. Any other certificate the CA signed is
    /// authenticated but forbidden (403), as with RBAC on a real kubelet.
    pub allowed_cns: Vec<String>,
    /// Bearer tokens allowed to checkpoint.
    pub allowed_tokens: Vec<String>,
    /// Bearer tokens that authenticate but are not allowed (403); any other token gets 401.
    pub forbidden_tokens: Vec<String>,
    /// The ContainerCheckpoint feature gate is off: every path answers Go's default 404.
    pub gate_off: bool,
    pub handler: CheckpointHandler,
}

impl FakeKubeletConfig {
    /// No identity allowed yet, gate on, checkpoints done by `handler`.
    pub fn new(
        handler: impl Fn(&CheckpointCall) -> Result<PathBuf, (u16, String)> + Send + Sync + 'static,
    ) -> Self {
        FakeKubeletConfig {
            allowed_cns: Vec::new(),
            allowed_tokens: Vec::new(),
            forbidden_tokens: Vec::new(),
            gate_off: false,
            handler: Arc::new(handler),
        }
    }

    pub fn allow_cn(mut self, cn: &str) -> Self {
        self.allowed_cns.push(cn.to_owned());
        self
    }

    pub fn allow_token(mut self, token: &str) -> Self {
        self.allowed_tokens.push(token.to_owned());
        self
    }

    pub fn forbid_token(mut self, token: &str) -> Self {
        self.forbidden_tokens.push(token.to_owned());
        self
    }

    pub fn gate_off(mut self) -> Self {
        self.gate_off = true;
        self
    }
}

impl fmt::Debug for FakeKubeletConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeKubeletConfig")
            .field("allowed_cns", &self.allowed_cns)
            .field("allowed_tokens", &self.allowed_tokens)
            .field("forbidden_tokens", &self.forbidden_tokens)
            .field("gate_off", &self.gate_off)
            .finish_non_exhaustive()
    }
}

/// What the connection tasks share.
struct State {
    config: FakeKubeletConfig,
    /// DER of every client certificate [`FakeKubelet::client_identity`] issued → its CN. The
    /// verifier only lets through certificates the CA signed, and only this fake signs with it.
    issued: Mutex<HashMap<Vec<u8>, String>>,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// A running fake kubelet; stops (with its connections) when dropped.
pub struct FakeKubelet {
    addr: SocketAddr,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// Makes the PKI, binds 127.0.0.1:0 and serves until dropped.
    pub async fn start(config: FakeKubeletConfig) -> FakeKubelet {
        let ca_key = KeyPair::generate().expect("fake kubelet: CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A name of its own, so another fake's CA is unknown rather than a namesake.
        static NEXT_CA: AtomicU64 = AtomicU64::new(1);
        let serial = NEXT_CA.fetch_add(1, Ordering::Relaxed);
        dn.push(
            DnType::CommonName,
            format!("fake-kubelet-ca {}-{serial}", std::process::id()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key).expect("fake kubelet: CA");

        let serving_key = KeyPair::generate().expect("fake kubelet: serving key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("fake kubelet: serving names");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "fake-kubelet");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = params
            .signed_by(&serving_key, &ca_cert, &ca_key)
            .expect("fake kubelet: serving certificate");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(ca_cert.der().clone())
            .expect("fake kubelet: CA into the root store");
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .expect("fake kubelet: client verifier");
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("fake kubelet: protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![serving.der().clone(), ca_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(serving_key.serialize_der())),
            )
            .expect("fake kubelet: serving certificate and key");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake kubelet: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake kubelet: local address");
        let state = Arc::new(State {
            config,
            issued: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
        });
        let server = tokio::spawn(serve(
            listener,
            TlsAcceptor::from(Arc::new(tls)),
            state.clone(),
        ));
        FakeKubelet {
            addr,
            ca_cert,
            ca_key,
            state,
            server,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA that signed the serving certificate and the client certificates, PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        self.ca_cert.pem().into_bytes()
    }

    /// A client certificate for `cn` signed by the CA, and its key: `(cert_pem, key_pem)`.
    pub fn client_identity(&self, cn: &str) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().expect("fake kubelet: client key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("fake kubelet: client certificate");
        self.state
            .issued
            .lock()
            .unwrap()
            .insert(cert.der().to_vec(), cn.to_owned());
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts the connection tasks.
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _peer)) = listener.accept().await else {
            continue;
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let acceptor = acceptor.clone();
        let state = state.clone();
        connections.spawn(async move {
            // A failed handshake (untrusted client certificate, client rejecting our
            // certificate) just ends the connection, as on a real kubelet.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let peer_der = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c: &CertificateDer<'_>| c.to_vec());
            let cn = peer_der.and_then(|der| state.issued.lock().unwrap().get(&der).cloned());
            let service = service_fn(move |request| {
                let state = state.clone();
                let cn = cn.clone();
                async move { Ok::<_, Infallible>(handle(&state, cn, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Authentication as the kubelet does it: the certificate first, then the bearer token.
fn authenticate(state: &State, cn: Option<String>, request: &Request<Incoming>) -> Identity {
    if let Some(cn) = cn {
        return Identity::Certificate(cn);
    }
    let token = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t)
            if state.config.allowed_tokens.iter().any(|a| a == t)
                || state.config.forbidden_tokens.iter().any(|f| f == t) =>
        {
            Identity::Token(t.to_owned())
        }
        _ => Identity::Anonymous,
    }
}

fn authorized(config: &FakeKubeletConfig, identity: &Identity) -> bool {
    match identity {
        Identity::Certificate(cn) => config.allowed_cns.contains(cn),
        Identity::Token(t) => config.allowed_tokens.contains(t),
        Identity::Anonymous => false,
    }
}

async fn handle(
    state: &Arc<State>,
    cn: Option<String>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let identity = authenticate(state, cn, &request);
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    state.requests.lock().unwrap().push(RecordedRequest {
        method: request.method().to_string(),
        path: path.clone(),
        query: query.clone(),
        identity: identity.clone(),
    });

    // Go's ServeMux: without the gate there is no /checkpoint/ route, and no other route here.
    if state.config.gate_off || !path.starts_with("/checkpoint/") {
        return go_not_found();
    }
    // The kubelet's authentication and authorization filter.
    if identity == Identity::Anonymous {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    if !authorized(&state.config, &identity) {
        return text(
            StatusCode::FORBIDDEN,
            &format!(
                "Forbidden (user={}, verb=create, resource=nodes, subresource(s)=[checkpoint])",
                identity.user()
            ),
        );
    }
    // go-restful's routing: POST /checkpoint/{podNamespace}/{podID}/{containerName}.
    let segments: Vec<&str> = path["/checkpoint/".len()..].split('/').collect();
    let [namespace, pod, container] = segments[..] else {
        return text(StatusCode::NOT_FOUND, "404: Page Not Found");
    };
    if segments.iter().any(|s| s.is_empty()) {
        return text(StatusCode::NOT_FOUND, "404: Page Not Found");
    }
    if request.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "405: Method Not Allowed");
    }
    let timeout = query.as_deref().and_then(|q| {
        // The kubelet takes the last value when there are several.
        q.split('&')
            .rev()
            .find_map(|pair| pair.strip_prefix("timeout="))
            .map(str::to_owned)
    });
    if let Some(t) = &timeout {
        if t.parse::<i64>().is_err() {
            return text(
                StatusCode::NOT_FOUND,
                "cannot parse value of timeout parameter",
            );
        }
    }
    let call = CheckpointCall {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        container: container.to_owned(),
        timeout,
        identity,
    };
    let handler = state.config.handler.clone();
    let outcome = match tokio::task::spawn_blocking(move || handler(&call)).await {
        Ok(outcome) => outcome,
        Err(e) => Err((
            500,
            format!("fake kubelet: the checkpoint handler panicked: {e}"),
        )),
    };
    match outcome {
        Ok(archive) => {
            let body = serde_json::json!({ "items": [archive.to_string_lossy()] }).to_string();
            Response::builder()
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("fake kubelet: response")
        }
        Err((code, body)) => text(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &body,
        ),
    }
}

/// Go's `http.NotFound`.
fn go_not_found() -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::NOT_FOUND, "404 page not found\n");
    response.headers_mut().insert(
        "x-content-type-options",
        http::HeaderValue::from_static("nosniff"),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("fake kubelet: response")
}
