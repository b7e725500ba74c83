//! Mutual TLS over real quinn endpoints on the loopback: nodes of one CA talk; a peer with a
//! foreign certificate, with none, or with an unexpected name is refused before data moves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, Endpoint};
use tempfile::TempDir;
use tokio::time::timeout;
use transport::tls::{init_certs, peer_name, NodeIdentity, ALPN, SERVER_NAME};

/// Every network step must finish by then; a refusal shows up as an error, never as a hang.
const DEADLINE: Duration = Duration::from_secs(10);

/// A CA and its node directories, kept on disk while the test runs.
struct Cluster {
    _tmp: TempDir,
    dirs: Vec<PathBuf>,
}

impl Cluster {
    fn new(names: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let dirs = init_certs(&tmp.path().join("certs"), &names).unwrap();
        Self { _tmp: tmp, dirs }
    }

    fn node(&self, i: usize) -> NodeIdentity {
        NodeIdentity::load(&self.dirs[i]).unwrap()
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn server_endpoint(id: &NodeIdentity) -> (Endpoint, SocketAddr) {
    let endpoint = Endpoint::server(id.server_config().unwrap(), loopback()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

fn client_endpoint() -> Endpoint {
    Endpoint::client(loopback()).unwrap()
}

/// Whether the connection ended because the TLS handshake failed (a QUIC CRYPTO_ERROR,
/// 0x100-0x1ff, sent or received), rather than a timeout or a reset.
fn is_tls_refusal(err: &ConnectionError) -> bool {
    let code = match err {
        ConnectionError::TransportError(e) => e.code,
        ConnectionError::ConnectionClosed(close) => close.error_code,
        _ => return false,
    };
    (u64::from(code) & !0xff) == 0x100
}

#[tokio::test]
async fn nodes_of_one_ca_exchange_data_and_see_each_others_names() {
    let cluster = Cluster::new(&["node-a", "node-b"]);
    let a = cluster.node(0);
    let b = cluster.node(1);
    assert_eq!(a.name(), "node-a");
    assert_eq!(b.name(), "node-b");

    let (server, addr) = server_endpoint(&b);
    let client = client_endpoint();

    // Once trusting any node of the CA, once requiring node-b by name.
    for expect_peer in [None, Some("node-b")] {
        let server_side = async {
            let incoming = server.accept().await.expect("endpoint open");
            let conn = incoming.await.expect("server handshake");
            assert_eq!(peer_name(&conn).as_deref(), Some("node-a"));
            let (mut send, mut recv) = conn.accept_bi().await.expect("accept stream");
            let got = recv.read_to_end(1024).await.expect("read request");
            assert_eq!(got, b"ping from a");
            send.write_all(b"pong from b").await.expect("write reply");
            send.finish().expect("finish reply");
            // Keep the connection until the client has read the reply and closed it.
            conn.closed().await;
        };
        let client_side = async {
            let config = a.client_config(expect_peer).unwrap();
            let conn = client
                .connect_with(config, addr, SERVER_NAME)
                .unwrap()
                .await
                .expect("client handshake");
            assert_eq!(peer_name(&conn).as_deref(), Some("node-b"));
            assert_eq!(
                conn.handshake_data()
                    .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|d| d.protocol),
                Some(ALPN.to_vec())
            );
            let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
            send.write_all(b"ping from a").await.expect("write request");
            send.finish().expect("finish request");
            let got = recv.read_to_end(1024).await.expect("read reply");
            assert_eq!(got, b"pong from b");
            conn.close(0u32.into(), b"done");
        };
        timeout(DEADLINE, async { tokio::join!(server_side, client_side) })
            .await
            .expect("exchange finished in time");
    }
    client.wait_idle().await;
}

/// Connects with `config` and checks that the connection is refused on both sides: the
/// server's handshake fails (so it never gets a connection to accept a stream or read data
/// from), and the client's handshake or its first stream operation fails.
async fn assert_refused(server: &Endpoint, addr: SocketAddr, config: quinn::ClientConfig) {
    let client = client_endpoint();
    let server_side = async {
        let incoming = server.accept().await.expect("endpoint open");
        match incoming.await {
            Ok(conn) => panic!("server accepted a connection from {:?}", peer_name(&conn)),
            Err(err) => err,
        }
    };
    let client_side = async {
        let conn = match client
            .connect_with(config, addr, SERVER_NAME)
            .unwrap()
            .await
        {
            Err(err) => return err,
            Ok(conn) => conn,
        };
        // In TLS 1.3 the client finishes its side of the handshake before the server has
        // checked the client's certificate, so the refusal can surface only here.
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"secret memory").await?;
            send.finish()?;
            let reply = recv.read_to_end(1024).await?;
            Ok::<_, Box<dyn std::error::Error>>(reply)
        };
        match attempt.await {
            Ok(reply) => panic!("refused client got a reply: {reply:?}"),
            Err(_) => conn.closed().await,
        }
    };
    let (server_err, client_err) =
        timeout(DEADLINE, async { tokio::join!(server_side, client_side) })
            .await
            .expect("refusal happened in time, not by a hang");
    eprintln!("refused: server side: {server_err}; client side: {client_err}");
    assert!(is_tls_refusal(&server_err), "server side: {server_err}");
    assert!(is_tls_refusal(&client_err), "client side: {client_err}");
}

#[tokio::test]
async fn client_of_another_ca_is_refused() {
    let ours = Cluster::new(&["node-a", "node-b"]);
    let theirs = Cluster::new(&["node-a"]);
    let (server, addr) = server_endpoint(&ours.node(1));
    // Same node name, but signed by another CA.
    let intruder = theirs.node(0);
    assert_eq!(intruder.name(), "node-a");
    assert_refused(&server, addr, intruder.client_config(None).unwrap()).await;
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let ours = Cluster::new(&["node-b"]);
    let b = ours.node(0);
    let (server, addr) = server_endpoint(&b);

    // A client that trusts our CA (so the server is fine by it) but presents no certificate.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(b.ca_certificate().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    assert_refused(&server, addr, quinn::ClientConfig::new(Arc::new(quic))).await;
}

#[tokio::test]
async fn server_of_another_ca_is_refused_by_the_client() {
    let ours = Cluster::new(&["node-a"]);
    let theirs = Cluster::new(&["node-b"]);
    let (server, addr) = server_endpoint(&theirs.node(0));
    let a = ours.node(0);
    assert_refused(&server, addr, a.client_config(None).unwrap()).await;
    // Naming the peer does not help a server of another CA either.
    assert_refused(&server, addr, a.client_config(Some("node-b")).unwrap()).await;
}

#[tokio::test]
async fn server_with_another_name_than_expected_is_refused() {
    let cluster = Cluster::new(&["node-a", "node-b", "node-c"]);
    let (server, addr) = server_endpoint(&cluster.node(1));
    let a = cluster.node(0);
    assert_refused(&server, addr, a.client_config(Some("node-c")).unwrap()).await;
}
