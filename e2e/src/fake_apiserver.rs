//! A fake Kubernetes API server for tests: hyper 1 over plain HTTP on 127.0.0.1, backed by an
//! in-memory map of JSON objects keyed by their REST path. A `kube::Client` reaches it with
//! `kube::Config::new(server.url().parse()?)`. It speaks the real paths and JSON for what a Pod
//! migration uses: GET of any stored object (`/api/v1/namespaces/{ns}/pods/{name}`,
//! `/api/v1/nodes/{name}`, `/apis/apps/v1/namespaces/{ns}/replicasets/{name}`,
//! `.../persistentvolumeclaims/{name}`, `/api/v1/persistentvolumes/{name}`); GET of a collection
//! (a list, filtered by `labelSelector` equality/existence terms and `fieldSelector` equality
//! terms such as `spec.nodeName=node-a`); POST to a collection (uid, resourceVersion and
//! creationTimestamp assigned; a Pod's status reset to `phase: Pending`; `409 AlreadyExists`);
//! PATCH with `application/merge-patch+json` (RFC 7386; other patch types get `415`; a
//! `metadata.resourceVersion` in the patch that is not the object's gets `409 Conflict`); DELETE.
//! Errors are real `Status` objects.
//!
//! For drains: a collection of a namespaced resource without a namespace (`/api/v1/pods`,
//! `/apis/cluster.x-k8s.io/v1beta1/machines`) lists it across all namespaces; Nodes are listed
//! and PATCHed like anything else (cordon: `spec.unschedulable`); the Eviction subresource
//! (`POST /api/v1/namespaces/{ns}/pods/{name}/eviction`, a policy/v1 `Eviction`) deletes the
//! Pod, unless a PodDisruptionBudget-style refusal was set for it
//! ([`FakeApiServer::refuse_eviction`]): then `429 TooManyRequests`, as the real server answers
//! when a budget does not allow the disruption. Cluster API Machines
//! (`cluster.x-k8s.io/v1beta1`, kind `Machine`) are stored, read, listed and PATCHed.
//!
//! Simplifications, on purpose: DELETE removes the object at once and answers it with a
//! `deletionTimestamp` (as if the kubelet confirmed termination instantly); no admission (no
//! service-account volume is added); the only controller is a minimal ReplicaSet reaction (after
//! a Pod POST or PATCH: an orphan Pod matching a ReplicaSet's selector is adopted; when its Pods
//! exceed `spec.replicas`, the excess is deleted ranked as the ReplicaSet controller does for
//! scheduled Running Pods: not Ready first, then the lowest
//! `controller.kubernetes.io/pod-deletion-cost`, then the newest). What a created Pod does next
//! is the test's [`PodReaction`], or a kubelet-like hook run on a blocking thread
//! ([`FakeApiServer::on_pod_create_run`]). Every request is recorded in order ([`Recorded`]), and an
//! error can be injected once for a (method, path) ([`FakeApiServer::fail_once`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The deletion-cost annotation the ReplicaSet reaction ranks by.
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// What a Pod created through POST does afterwards, as a kubelet would make it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodReaction {
    /// Becomes Running with condition Ready=True at the n-th GET of it (n ≥ 1), as if the
    /// kubelet had started it between two reads. The default, with n = 1.
    ReadyAfterGets(u32),
    /// Stays Pending with Ready=False.
    NeverReady,
    /// Every container waits with this reason and message (e.g. `CreateContainerError`).
    ContainersWaiting {
        /// The waiting reason.
        reason: String,
        /// The waiting message.
        message: String,
    },
}

/// A kubelet-like hook for created Pods ([`FakeApiServer::on_pod_create_run`]): runs on a
/// blocking thread after the POST was answered; `Ok` makes the Pod Running and Ready, `Err`
/// leaves its containers waiting with reason `CreateContainerError` and that message.
pub type PodCreateHook = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// The hook, with a Debug for [`State`].
#[derive(Clone)]
struct Hook(PodCreateHook);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodCreateHook")
    }
}

/// An HTTP answer of the fake.
type Reply = Response<Full<Bytes>>;

/// A hook to start for a created Pod: its path, the Pod as created, the hook.
type Started = (String, Value, Hook);

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    /// The Content-Type header, if any.
    pub content_type: Option<String>,
    /// The body parsed as JSON; `None` when empty (or not JSON).
    pub body: Option<Value>,
}

impl Recorded {
    /// `"METHOD /path"`, handy for comparing request sequences.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An error to answer once for a (method, path).
#[derive(Debug)]
struct Injected {
    method: String,
    path: String,
    code: u16,
    reason: String,
    message: String,
}

#[derive(Debug)]
struct State {
    /// REST path of each object → the object.
    objects: BTreeMap<String, Value>,
    /// REST path → creation order (ranks "newest").
    created: BTreeMap<String, u64>,
    /// REST path of a Pod → GETs left until it is Ready ([`PodReaction::ReadyAfterGets`]).
    ready_after: BTreeMap<String, u32>,
    reaction: PodReaction,
    /// Overrides `reaction` when set.
    hook: Option<Hook>,
    injected: Vec<Injected>,
    requests: Vec<Recorded>,
    /// Pods the ReplicaSet reaction deleted, by path, in order.
    controller_deletions: Vec<String>,
    /// Pod path → the message of the 429 its Eviction gets (a PodDisruptionBudget refusal).
    eviction_refusals: BTreeMap<String, String>,
    counter: u64,
}

impl State {
    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// Fills uid, resourceVersion and creationTimestamp, as the API server does on create.
    fn stamp_new(&mut self, path: &str, obj: &mut Value) {
        let n = self.next();
        let meta = &mut obj["metadata"];
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("00000000-0000-4000-8000-{n:012x}"));
        }
        meta["resourceVersion"] = json!(n.to_string());
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!(rfc3339_now());
        }
        self.created.insert(path.to_string(), n);
    }

    fn bump(&mut self, path: &str) {
        let n = self.next();
        if let Some(obj) = self.objects.get_mut(path) {
            obj["metadata"]["resourceVersion"] = json!(n.to_string());
        }
    }

    fn delete(&mut self, path: &str) -> Option<Value> {
        self.created.remove(path);
        self.ready_after.remove(path);
        let mut obj = self.objects.remove(path)?;
        obj["metadata"]["deletionTimestamp"] = json!(rfc3339_now());
        Some(obj)
    }
}

/// The fake API server; stops when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Starts the fake on 127.0.0.1 with a free port (inside a tokio runtime).
    pub async fn start() -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            objects: BTreeMap::new(),
            created: BTreeMap::new(),
            ready_after: BTreeMap::new(),
            reaction: PodReaction::ReadyAfterGets(1),
            hook: None,
            injected: Vec::new(),
            requests: Vec::new(),
            controller_deletions: Vec::new(),
            eviction_refusals: BTreeMap::new(),
            counter: 0,
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FakeApiServer { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores an object (Pod, Node, ReplicaSet, PersistentVolumeClaim, PersistentVolume) at the
    /// path its apiVersion, kind, namespace and name give; fills uid, resourceVersion and
    /// creationTimestamp when missing. Returns that path.
    pub fn seed(&self, mut obj: Value) -> String {
        let path = object_path(&obj);
        let mut state = self.lock();
        state.stamp_new(&path, &mut obj);
        state.objects.insert(path.clone(), obj);
        path
    }

    /// The object stored at `path`, if any.
    pub fn object(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    /// The Pod `namespace/name`, if it exists.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object(&pod_path(namespace, name))
    }

    /// The names of the Pods in `namespace`.
    pub fn pod_names(&self, namespace: &str) -> Vec<String> {
        let prefix = format!("/api/v1/namespaces/{namespace}/pods/");
        self.lock()
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }

    /// What Pods created from now on do ([`PodReaction`]).
    pub fn on_pod_create(&self, reaction: PodReaction) {
        self.lock().reaction = reaction;
    }

    /// Runs `hook` for every Pod created from now on, instead of a [`PodReaction`]: the Pod is
    /// Pending (containers `ContainerCreating`) until the hook returns, then Running and Ready
    /// (`Ok`) or waiting with `CreateContainerError` and the hook's message (`Err`), unless it
    /// was deleted meanwhile.
    pub fn on_pod_create_run(&self, hook: PodCreateHook) {
        self.lock().hook = Some(Hook(hook));
    }

    /// Answers the next `method path` request (path without query) with a `Status` error of
    /// `code`/`reason`/`message` instead of handling it.
    pub fn fail_once(&self, method: &str, path: &str, code: u16, reason: &str, message: &str) {
        self.lock().injected.push(Injected {
            method: method.to_string(),
            path: path.to_string(),
            code,
            reason: reason.to_string(),
            message: message.to_string(),
        });
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// `"METHOD /path"` of every request so far.
    pub fn lines(&self) -> Vec<String> {
        self.lock().requests.iter().map(Recorded::line).collect()
    }

    /// The Pods the ReplicaSet reaction deleted (their paths), in order.
    pub fn controller_deletions(&self) -> Vec<String> {
        self.lock().controller_deletions.clone()
    }

    /// Answers every Eviction of Pod `namespace/name` from now on with `429 TooManyRequests`
    /// and `message`, as the API server does when a PodDisruptionBudget forbids it; the Pod
    /// stays.
    pub fn refuse_eviction(&self, namespace: &str, name: &str, message: &str) {
        self.lock()
            .eviction_refusals
            .insert(pod_path(namespace, name), message.to_string());
    }
}

/// `/api/v1/nodes/{name}`.
pub fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}

/// `/apis/cluster.x-k8s.io/v1beta1/namespaces/{namespace}/machines/{name}`.
pub fn machine_path(namespace: &str, name: &str) -> String {
    format!("/apis/cluster.x-k8s.io/v1beta1/namespaces/{namespace}/machines/{name}")
}

/// A Ready Node labelled with its hostname, with `cpu` and `memory` allocatable (110 Pods).
pub fn node_object(name: &str, cpu: &str, memory: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}})
}

/// The migrate daemon's Pod on `node`, as its DaemonSet (`migrate-daemon`) makes it, on the
/// host's network with the address `ip`.
pub fn daemon_pod(node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("migrate-daemon-{node}"), "namespace": "migrate",
                     "labels": {"app.kubernetes.io/name": "migrate-daemon"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                         "name": "migrate-daemon", "uid": "ds-1", "controller": true}]},
        "spec": {"nodeName": node, "hostNetwork": true,
                 "containers": [{"name": "daemon", "image": "migrate:dev"}]},
        "status": {"phase": "Running", "podIP": ip}})
}

/// `/api/v1/namespaces/{namespace}/pods/{name}`.
pub fn pod_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{name}")
}

/// The REST path of an object from its apiVersion, kind, namespace and name.
fn object_path(obj: &Value) -> String {
    let api_version = obj["apiVersion"]
        .as_str()
        .expect("seeded objects have an apiVersion");
    let kind = obj["kind"].as_str().expect("seeded objects have a kind");
    let name = obj["metadata"]["name"]
        .as_str()
        .expect("seeded objects have a name");
    let plural = match kind {
        "Pod" => "pods",
        "Node" => "nodes",
        "ReplicaSet" => "replicasets",
        "PersistentVolumeClaim" => "persistentvolumeclaims",
        "PersistentVolume" => "persistentvolumes",
        "Machine" => "machines",
        other => panic!("the fake API server does not know kind {other}"),
    };
    let group = if api_version == "v1" {
        "/api/v1".to_string()
    } else {
        format!("/apis/{api_version}")
    };
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{group}/namespaces/{ns}/{plural}/{name}"),
        None => format!("{group}/{plural}/{name}"),
    }
}

/// The list kind of a resource's collection.
fn list_kind(plural: &str) -> String {
    let kind = match plural {
        "pods" => "Pod",
        "nodes" => "Node",
        "replicasets" => "ReplicaSet",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "persistentvolumes" => "PersistentVolume",
        "machines" => "Machine",
        _ => "Unknown",
    };
    format!("{kind}List")
}

/// Which resource a path names: (plural, is it a collection, collection path, object name).
struct Target {
    plural: String,
    collection: String,
    name: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Collections: api/v1/{plural}, api/v1/namespaces/{ns}/{plural}, apis/{g}/{v}/... likewise.
    let base = match *segments.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    let rest = segments.get(base..)?;
    let (plural, name) = match rest {
        ["namespaces", _, plural] => (*plural, None),
        ["namespaces", _, plural, name] => (*plural, Some(*name)),
        [plural] => (*plural, None),
        [plural, name] if *plural != "namespaces" => (*plural, Some(*name)),
        _ => return None,
    };
    let collection = match name {
        Some(_) => path.rsplit_once('/')?.0.to_string(),
        None => path.to_string(),
    };
    Some(Target {
        plural: plural.to_string(),
        collection,
        name: name.map(str::to_string),
    })
}

fn respond(code: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// A `Status` error as the API server sends it.
fn status(code: u16, reason: &str, message: &str, kind: &str, name: &str) -> Response<Full<Bytes>> {
    let mut details = json!({});
    if !name.is_empty() {
        details["name"] = json!(name);
    }
    if !kind.is_empty() {
        details["kind"] = json!(kind);
    }
    respond(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "details": details, "code": code
        }),
    )
}

fn not_found(plural: &str, name: &str) -> Response<Full<Bytes>> {
    status(
        404,
        "NotFound",
        &format!("{plural} \"{name}\" not found"),
        plural,
        name,
    )
}

async fn handle(shared: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(parse_query).unwrap_or_default();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return status(400, "BadRequest", &format!("reading the body: {e}"), "", ""),
    };
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
    state.requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: body.clone(),
    });
    if let Some(i) = state
        .injected
        .iter()
        .position(|i| i.method == method.as_str() && i.path == path)
    {
        let e = state.injected.remove(i);
        return status(e.code, &e.reason, &e.message, "", "");
    }
    if let Some(pod) = path.strip_suffix("/eviction") {
        if method != Method::POST {
            let message = format!("{method} is not supported on {path}");
            return status(405, "MethodNotAllowed", &message, "", "");
        }
        return evict(&mut state, pod, body);
    }
    let Some(target) = parse_target(&path) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            "",
            "",
        );
    };
    let plural = target.plural.as_str();
    match (&method, &target.name) {
        (&Method::GET, Some(name)) => {
            if let Some(left) = state.ready_after.get_mut(&path) {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    state.ready_after.remove(&path);
                    if let Some(pod) = state.objects.get_mut(&path) {
                        become_ready(pod);
                    }
                    state.bump(&path);
                }
            }
            match state.objects.get(&path) {
                Some(obj) => respond(200, obj),
                None => not_found(plural, name),
            }
        }
        (&Method::GET, None) => list(&state, &target, &query),
        (&Method::POST, None) => {
            let (response, started) =
                create(&mut state, &target, body).unwrap_or_else(|e| (*e, None));
            drop(state);
            if let Some((path, pod, Hook(hook))) = started {
                tokio::task::spawn_blocking(move || {
                    let result = hook(&pod);
                    let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(obj) = state.objects.get_mut(&path) else {
                        return;
                    };
                    match result {
                        Ok(()) => become_ready(obj),
                        Err(message) => {
                            set_not_ready(obj, Some(("CreateContainerError", &message)))
                        }
                    }
                    state.bump(&path);
                });
            }
            response
        }
        (&Method::PATCH, Some(name)) => {
            if content_type.as_deref() != Some("application/merge-patch+json") {
                let message = format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json (got {content_type:?})");
                return status(415, "UnsupportedMediaType", &message, "", "");
            }
            let Some(obj) = state.objects.get_mut(&path) else {
                return not_found(plural, name);
            };
            let body = body.unwrap_or(Value::Null);
            let expected = &body["metadata"]["resourceVersion"];
            if expected.is_string() && *expected != obj["metadata"]["resourceVersion"] {
                let message = format!("Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again");
                return status(409, "Conflict", &message, plural, name);
            }
            merge(obj, &body);
            state.bump(&path);
            // The answer is the patched object; controllers react after it, as they do on a
            // real cluster (through their watches).
            let patched = state.objects[&path].clone();
            if plural == "pods" {
                reconcile_replicasets(&mut state, &namespace_of(&path));
            }
            respond(200, &patched)
        }
        (&Method::DELETE, Some(name)) => match state.delete(&path) {
            Some(obj) => respond(200, &obj),
            None => not_found(plural, name),
        },
        _ => status(
            405,
            "MethodNotAllowed",
            &format!("{method} is not supported on {path}"),
            "",
            "",
        ),
    }
}

fn namespace_of(path: &str) -> String {
    path.split("/namespaces/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string()
}

fn list(state: &State, target: &Target, query: &[(String, String)]) -> Response<Full<Bytes>> {
    let param = |key: &str| {
        query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let prefix = format!("{}/", target.collection);
    // A collection without a namespace also holds the namespaced objects of every namespace.
    let (group, _) = target
        .collection
        .rsplit_once('/')
        .unwrap_or((target.collection.as_str(), ""));
    let everywhere = format!("{group}/namespaces/");
    let suffix = format!("/{}/", target.plural);
    let mut items = Vec::new();
    for (path, obj) in &state.objects {
        let rest = match path.strip_prefix(&prefix) {
            Some(rest) => rest,
            None if !target.collection.contains("/namespaces/") => {
                match path
                    .strip_prefix(&everywhere)
                    .and_then(|r| r.split_once('/'))
                    .and_then(|(_, r)| r.strip_prefix(&suffix[1..]))
                {
                    Some(rest) => rest,
                    None => continue,
                }
            }
            None => continue,
        };
        if rest.contains('/') {
            continue;
        }
        if let Some(selector) = param("labelSelector") {
            if !label_selector_matches(selector, &obj["metadata"]["labels"]) {
                continue;
            }
        }
        if let Some(selector) = param("fieldSelector") {
            match field_selector_matches(selector, obj) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(message) => return status(400, "BadRequest", &message, "", ""),
            }
        }
        // Items of a list carry no kind or apiVersion, as from the real server.
        let mut item = obj.clone();
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        items.push(item);
    }
    let api_version = match target.collection.strip_prefix("/apis/") {
        Some(rest) => rest.split('/').take(2).collect::<Vec<_>>().join("/"),
        None => "v1".to_string(),
    };
    respond(
        200,
        &json!({
            "kind": list_kind(&target.plural), "apiVersion": api_version,
            "metadata": {"resourceVersion": state.counter.to_string()},
            "items": items
        }),
    )
}

/// The Eviction subresource of the Pod at `pod_path`: a 429 when a refusal was set for it, else
/// the Pod is deleted and the answer is a `Success` Status, as from the real server.
fn evict(state: &mut State, pod_path: &str, body: Option<Value>) -> Reply {
    let name = pod_path.rsplit('/').next().unwrap_or_default().to_string();
    let body = body.unwrap_or(Value::Null);
    if body["apiVersion"] != "policy/v1" || body["kind"] != "Eviction" {
        let message = format!("the body of an eviction must be a policy/v1 Eviction, got {body}");
        return status(400, "BadRequest", &message, "", "");
    }
    if body["metadata"]["name"] != name.as_str() {
        let message = "name in URL does not match name in Eviction object";
        return status(400, "BadRequest", message, "pods", &name);
    }
    if !state.objects.contains_key(pod_path) {
        return not_found("pods", &name);
    }
    if let Some(message) = state.eviction_refusals.get(pod_path) {
        let mut reply = status(429, "TooManyRequests", message, "pods", &name);
        if let Ok(v) = http::HeaderValue::from_str("10") {
            reply.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return reply;
    }
    state.delete(pod_path);
    respond(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    )
}

fn create(
    state: &mut State,
    target: &Target,
    body: Option<Value>,
) -> Result<(Reply, Option<Started>), Box<Reply>> {
    let plural = target.plural.as_str();
    let Some(mut obj) = body.filter(Value::is_object) else {
        return Err(Box::new(status(
            400,
            "BadRequest",
            "the body of the request is not a JSON object",
            "",
            "",
        )));
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
        let message = format!("{plural} \"\" is invalid: metadata.name: Required value: name or generateName is required");
        return Err(Box::new(status(422, "Invalid", &message, plural, "")));
    };
    let namespace = namespace_of(&target.collection);
    if !namespace.is_empty() {
        match obj["metadata"]["namespace"].as_str() {
            Some(ns) if ns != namespace => {
                let message = "the namespace of the provided object does not match the namespace sent on the request";
                return Err(Box::new(status(400, "BadRequest", message, plural, &name)));
            }
            _ => obj["metadata"]["namespace"] = json!(namespace),
        }
    }
    let path = format!("{}/{name}", target.collection);
    if state.objects.contains_key(&path) {
        return Err(Box::new(status(
            409,
            "AlreadyExists",
            &format!("{plural} \"{name}\" already exists"),
            plural,
            &name,
        )));
    }
    // The server owns these: whatever the client sent is replaced.
    if let Some(meta) = obj["metadata"].as_object_mut() {
        for field in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
        ] {
            meta.remove(field);
        }
    }
    state.stamp_new(&path, &mut obj);
    let mut started = None;
    let response = if plural == "pods" {
        obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        let response = obj.clone();
        if let Some(hook) = state.hook.clone() {
            set_not_ready(&mut obj, None);
            started = Some((path.clone(), obj.clone(), hook));
        } else {
            match state.reaction.clone() {
                PodReaction::ReadyAfterGets(n) => {
                    state.ready_after.insert(path.clone(), n.max(1));
                }
                PodReaction::NeverReady => set_not_ready(&mut obj, None),
                PodReaction::ContainersWaiting { reason, message } => {
                    set_not_ready(&mut obj, Some((&reason, &message)))
                }
            }
        }
        response
    } else {
        obj.clone()
    };
    state.objects.insert(path, obj);
    if plural == "pods" {
        reconcile_replicasets(state, &namespace);
    }
    Ok((respond(201, &response), started))
}

fn container_names(pod: &Value) -> Vec<String> {
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

fn container_status(pod: &Value, name: &str, state: Value, ready: bool) -> Value {
    let image = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .map(|c| c["image"].clone())
        .unwrap_or(Value::Null);
    json!({"name": name, "image": image, "imageID": "", "ready": ready, "restartCount": 0,
           "started": ready, "state": state})
}

/// What a kubelet reports once every container runs and is ready.
fn become_ready(pod: &mut Value) {
    let now = rfc3339_now();
    let statuses: Vec<Value> = container_names(pod)
        .iter()
        .map(|c| container_status(pod, c, json!({"running": {"startedAt": now}}), true))
        .collect();
    pod["status"] = json!({
        "phase": "Running", "qosClass": "BestEffort", "podIP": "10.244.1.10", "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now}
        ],
        "containerStatuses": statuses
    });
}

/// A Pending Pod whose containers are not ready (waiting with `reason` when given).
fn set_not_ready(pod: &mut Value, waiting: Option<(&str, &str)>) {
    let now = rfc3339_now();
    let state = match waiting {
        Some((reason, message)) => json!({"waiting": {"reason": reason, "message": message}}),
        None => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    let statuses: Vec<Value> = container_names(pod)
        .iter()
        .map(|c| container_status(pod, c, state.clone(), false))
        .collect();
    pod["status"] = json!({
        "phase": "Pending", "qosClass": "BestEffort", "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
             "message": "containers with unready status", "lastTransitionTime": now}
        ],
        "containerStatuses": statuses
    });
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The minimal ReplicaSet controller: adoption of matching orphans, then removal of the excess.
fn reconcile_replicasets(state: &mut State, namespace: &str) {
    let rs_prefix = format!("/apis/apps/v1/namespaces/{namespace}/replicasets/");
    let pod_prefix = format!("/api/v1/namespaces/{namespace}/pods/");
    let sets: Vec<Value> = state
        .objects
        .iter()
        .filter(|(k, _)| k.starts_with(&rs_prefix))
        .map(|(_, v)| v.clone())
        .collect();
    for rs in sets {
        let name = rs["metadata"]["name"].clone();
        let uid = rs["metadata"]["uid"].clone();
        let selector = &rs["spec"]["selector"];
        let pods: Vec<String> = state
            .objects
            .keys()
            .filter(|k| k.starts_with(&pod_prefix))
            .cloned()
            .collect();
        for path in &pods {
            let pod = &state.objects[path];
            let orphan = !pod["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o["controller"] == true);
            if orphan
                && pod["metadata"].get("deletionTimestamp").is_none()
                && selector_matches(selector, &pod["metadata"]["labels"])
            {
                let owner = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name,
                                    "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
                if let Some(pod) = state.objects.get_mut(path) {
                    pod["metadata"]["ownerReferences"] = owner;
                }
                state.bump(path);
            }
        }
        let mut owned: Vec<String> = pods
            .into_iter()
            .filter(|p| {
                state.objects[p]["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|o| o["controller"] == true && o["uid"] == uid)
            })
            .collect();
        let replicas = rs["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        // Deleted first: not Ready, then the lowest deletion cost, then the newest.
        let rank = |state: &State, path: &String| {
            let pod = &state.objects[path];
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let cost: i64 = pod["metadata"]["annotations"][DELETION_COST]
                .as_str()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let created = state.created.get(path).copied().unwrap_or(0);
            (ready, cost, std::cmp::Reverse(created))
        };
        owned.sort_by_key(|p| rank(state, p));
        let excess = owned.len().saturating_sub(replicas);
        for path in owned.into_iter().take(excess) {
            state.delete(&path);
            state.controller_deletions.push(path);
        }
    }
}

/// A `LabelSelector` object (matchLabels, matchExpressions) against a Pod's labels.
fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let by_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str().unwrap_or_default() {
                "In" => label(key).is_some_and(|v| values.contains(&v)),
                "NotIn" => label(key).is_none_or(|v| !values.contains(&v)),
                "Exists" => label(key).is_some(),
                "DoesNotExist" => label(key).is_none(),
                _ => false,
            }
        });
    by_labels && by_expressions
}

/// A `labelSelector` query (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated).
fn label_selector_matches(selector: &str, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
    selector
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k) == Some(v.trim())
            } else if let Some(k) = term.trim().strip_prefix('!') {
                label(k).is_none()
            } else {
                label(term).is_some()
            }
        })
}

/// A `fieldSelector` query of equality terms on dotted paths (`spec.nodeName=x`).
fn field_selector_matches(selector: &str, obj: &Value) -> Result<bool, String> {
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (f, v, true)
        } else {
            return Err(format!(
                "invalid selector: '{selector}'; can't understand '{term}'"
            ));
        };
        let actual = field
            .split('.')
            .fold(obj, |v, part| &v[part])
            .as_str()
            .unwrap_or_default();
        if (actual == value) != equal {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Decodes `application/x-www-form-urlencoded` query pairs.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current time as RFC 3339 in UTC, to the second (as the API server writes timestamps).
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    engine::inspect::rfc3339(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded() {
        assert_eq!(
            parse_query("labelSelector=app.kubernetes.io%2Fname%3Dmigrate-daemon&fieldSelector=spec.nodeName%3Dnode-a"),
            vec![
                ("labelSelector".into(), "app.kubernetes.io/name=migrate-daemon".into()),
                ("fieldSelector".into(), "spec.nodeName=node-a".into())
            ]
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut doc, &json!({"a": "z", "c": {"f": null}, "n": [1]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
    }

    #[test]
    fn selectors_match_labels() {
        let labels = json!({"app": "web", "tier": "front"});
        assert!(label_selector_matches("app=web,tier==front", &labels));
        assert!(!label_selector_matches("app=web,tier!=front", &labels));
        assert!(label_selector_matches("app,!canary", &labels));
        let selector = json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]});
        assert!(selector_matches(&selector, &labels));
        assert!(!selector_matches(&selector, &json!({"app": "web"})));
    }

    #[test]
    fn dates_are_rfc3339() {
        let now = rfc3339_now();
        assert_eq!(now.len(), "2025-01-01T00:00:00Z".len(), "{now}");
        assert!(now.starts_with("20"), "{now}");
    }
}
