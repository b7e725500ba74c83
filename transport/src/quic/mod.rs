//! The thin quinn driver: runs the [`crate::protocol`] state machines over one QUIC connection,
//! with one bidirectional control stream and several unidirectional chunk streams.
//!
//! - [`send`]: `send_file`, the sending node's side; it reconnects and resumes when the
//!   connection drops. `send_file_via` is the same over connections from a [`Dialer`].
//! - [`receive`]: `receive_file`, the receiving node's side; it waits for the sender to come
//!   back after a drop. `receive_file_from` is the same over connections handed over a channel.
//! - This file: endpoints, the LAN transport settings, frame IO on streams, and the error type.
//!
//! ## Sharing an endpoint
//! `send_file` and `receive_file` dial and accept on their endpoint themselves. A node daemon
//! that runs its control protocol and transfers on one endpoint dials and accepts instead, and
//! hands each transfer connection to `send_file_via` (through a [`Dialer`]) or
//! `receive_file_from` (over a channel). Before handing a connection over it may use
//! bidirectional streams of its own, such as a hello introducing the transfer: QUIC hands a
//! peer's bidirectional streams to `accept_bi` in the order they were opened, so once the
//! receiving daemon has accepted its hello stream, the transfer's `accept_bi` gets the sender's
//! control stream. From then on the connection belongs to the transfer, which closes it.
//!
//! ## Transport settings for a LAN
//! QUIC's defaults are tuned for the Internet: a 333 ms initial RTT estimate, 1.25 MB stream
//! windows and a conservative initial MTU. Between nodes of one cluster the RTT is well under a
//! millisecond and the bandwidth-delay product is small, but a 2-core node must not stall on
//! flow-control updates while it compresses. So:
//! - `initial_rtt` 2 ms: loss recovery and the first PTO react at LAN speed.
//! - stream receive window 8 MiB, connection receive and send windows 24 MiB: four chunk
//!   streams stay busy without waiting for window updates (a LAN's bandwidth-delay product is
//!   well under 1 MiB), and these windows bound what either side buffers, which keeps peak
//!   memory flat whatever the archive size.
//! - initial MTU 1452 (Ethernet 1500 minus IPv6 and UDP headers), with MTU discovery probing up
//!   to [`MAX_UDP_PAYLOAD`] (6,550 bytes) where the path has jumbo frames, and falling back on
//!   black holes. Each endpoint also advertises that size (QUIC's `max_udp_payload_size`):
//!   quinn's default, 1,472, would keep a peer's datagrams at Ethernet size on any path. Larger
//!   datagrams mean fewer packets to seal, send, receive and acknowledge for the same bytes, and
//!   the packet count is much of a transfer's CPU on a 2-core node. Why not 8,952: see
//!   [`MAX_UDP_PAYLOAD`].
//! - UDP socket buffers of 16 MiB (receive) and 4 MiB (send), forced past `net.core.rmem_max`
//!   when the process may (root, `CAP_NET_ADMIN`). The kernel's default receive buffer is about
//!   200 KiB: a few milliseconds of a LAN transfer. On a 2-core node busy decompressing and
//!   writing, the task that drains the socket is regularly not scheduled for that long, the
//!   kernel drops what does not fit, and every drop costs a loss recovery and a congestion
//!   window cut. Measured in the lab (single runs, noisy): 3,043 drops in two 1.3 GB
//!   transfers and pre-copy rounds of 6.7 s; with the larger buffer no drops and 5.3–6.5 s.
//! - idle timeout 20 s (configurable) with keep-alives every eighth of it: a vanished peer is
//!   noticed within seconds, and a long CRIU dump on the other side does not kill an idle
//!   connection.

pub mod receive;
pub mod send;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use crate::frame::{self, Frame, FrameError};
use crate::protocol::ProtocolError;
use crate::store::StoreError;
use crate::tls::{NodeIdentity, TlsError};

pub use crate::sink::Piece;
pub use receive::{receive_file, receive_file_from, ReceiveOptions, ReceiveReport};
pub use send::{
    send_file, send_file_via, send_files, send_files_via, DialError, Dialer, SendOptions,
    SendReport,
};

/// The largest UDP payload (one QUIC datagram) an endpoint sends or accepts, once MTU discovery
/// found the path carries it.
///
/// Not a jumbo frame's 8,952: quinn hands the kernel up to 10 datagrams in one GSO send, and a
/// send's payload must fit one UDP datagram's 16-bit length (65,507 bytes over IPv4). Ten
/// datagrams of 8,952 bytes make 89,520: the kernel refuses the whole batch (`EMSGSIZE`),
/// quinn-udp ignores that error (it expects it only from MTU probes), and the ten packets are
/// lost without a word. After a few such losses quinn decides the path is a black hole and
/// drops to 1,200-byte datagrams. Ten of 6,550 make 65,500.
pub const MAX_UDP_PAYLOAD: u16 = 6550;

/// The QUIC idle timeout used unless a caller asks otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Transport parameters for nodes on one LAN; see the module documentation for the reasons.
/// `idle_timeout` is how long a silent peer is given before the connection counts as lost.
pub fn lan_transport_config(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.initial_rtt(Duration::from_millis(2));
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(24 << 20));
    t.send_window(24 << 20);
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4));
    t.initial_mtu(1452);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t.max_idle_timeout(idle_timeout.try_into().ok());
    t.keep_alive_interval(Some(idle_timeout / 8));
    t
}

/// A server endpoint on `addr` that accepts only peers with a certificate of our CA.
pub fn server_endpoint(
    identity: &NodeIdentity,
    addr: SocketAddr,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, TransferError> {
    let mut config = identity.server_config()?;
    config.transport_config(Arc::new(lan_transport_config(idle_timeout)));
    lan_endpoint(addr, Some(config))
}

/// A client endpoint (ephemeral port) that presents our certificate and checks the server's.
/// With `expect_peer`, the server's certificate must also name that node.
pub fn client_endpoint(
    identity: &NodeIdentity,
    expect_peer: Option<&str>,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, TransferError> {
    let mut config = identity.client_config(expect_peer)?;
    config.transport_config(Arc::new(lan_transport_config(idle_timeout)));
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("valid literal address");
    let mut endpoint = lan_endpoint(bind, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Receive buffer asked of the kernel for a QUIC socket (see the module documentation).
const SOCKET_RECV_BUFFER: usize = 16 << 20;
/// Send buffer asked of the kernel for a QUIC socket.
const SOCKET_SEND_BUFFER: usize = 4 << 20;

/// An endpoint on [`lan_socket`]`(addr)`, accepting connections when given a server config.
fn lan_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransferError> {
    let socket = lan_socket(addr)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("MAX_UDP_PAYLOAD is within QUIC's bounds");
    quinn::Endpoint::new(config, server, socket, runtime)
        .map_err(|source| TransferError::Bind { addr, source })
}

/// A UDP socket bound to `addr` with the buffers a LAN transfer needs: forced to
/// [`SOCKET_RECV_BUFFER`] and [`SOCKET_SEND_BUFFER`] where the process may, else as large as
/// `net.core.rmem_max` and `wmem_max` allow (a capped receive buffer is logged: drops follow).
fn lan_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransferError> {
    use rustix::net::sockopt;
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| TransferError::Bind { addr, source })?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_RECV_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&socket, SOCKET_RECV_BUFFER);
        let got = sockopt::socket_recv_buffer_size(&socket).unwrap_or(0);
        tracing::info!(
            asked = SOCKET_RECV_BUFFER,
            got,
            "UDP receive buffer capped by net.core.rmem_max (forcing it needs CAP_NET_ADMIN); \
             a busy receiver may drop packets: raise that sysctl"
        );
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_SEND_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&socket, SOCKET_SEND_BUFFER);
    }
    Ok(socket)
}

/// Why a transfer failed. Every message says what failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The UDP socket could not be bound.
    #[error("binding UDP socket {addr}: {source} (is the address local and the port free?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The certificates could not be loaded or turned into a TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No QUIC connection could be started towards the peer.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The TLS handshake failed: one side refused the other's certificate.
    #[error(
        "TLS handshake with {addr} failed: {detail}; both nodes need certificates from the same \
         cluster CA (`migrate certs init`), and with --peer the name must match"
    )]
    Handshake {
        /// The peer.
        addr: String,
        /// What the TLS layer said.
        detail: String,
    },
    /// No connection to the peer could be made at all.
    #[error(
        "no answer from {addr} within {waited:?} ({last}): is `migrate receive` (or the node \
         daemon) running there, and is its UDP port reachable from here?"
    )]
    Unreachable {
        /// The peer.
        addr: String,
        /// How long we tried.
        waited: Duration,
        /// The last error.
        last: String,
    },
    /// The peer's node daemon turned the transfer down before it began.
    #[error("{addr} refused the transfer: {reason}")]
    Refused {
        /// The peer.
        addr: String,
        /// Why, in the peer's words.
        reason: String,
    },
    /// The connection dropped and no new one completed the transfer in time.
    #[error("connection to {addr} lost and not resumed within {waited:?}: {last} (is the peer still running?)")]
    Lost {
        /// The peer.
        addr: String,
        /// How long we tried to resume.
        waited: Duration,
        /// The last connection error.
        last: String,
    },
    /// The protocol stopped: the peer misbehaved, aborted, or a check failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame from {peer}: {source}")]
    Frame {
        /// The peer.
        peer: String,
        /// What was wrong.
        source: FrameError,
    },
    /// Reading the source file failed.
    #[error("reading {path}: {source}")]
    Source {
        /// The source file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing the output file failed.
    #[error("writing {path}: {source}")]
    Output {
        /// The output file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The chunk store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a session ended badly: the connection went away (try again), or the transfer cannot
/// succeed as it stands (give up).
#[derive(Debug)]
enum SessionError {
    Lost(String),
    Fatal(TransferError),
}

impl From<TransferError> for SessionError {
    fn from(e: TransferError) -> Self {
        SessionError::Fatal(e)
    }
}

impl From<ProtocolError> for SessionError {
    fn from(e: ProtocolError) -> Self {
        SessionError::Fatal(TransferError::Protocol(e))
    }
}

/// Sorts a connection error into "lost, may resume" and "refused, give up".
fn classify(addr: &str, e: &quinn::ConnectionError) -> SessionError {
    use quinn::ConnectionError as C;
    match e {
        C::ConnectionClosed(close) if is_crypto(close.error_code) => {
            SessionError::Fatal(TransferError::Handshake {
                addr: addr.to_string(),
                detail: close.to_string(),
            })
        }
        C::TransportError(t) if is_crypto(t.code) => {
            SessionError::Fatal(TransferError::Handshake {
                addr: addr.to_string(),
                detail: t.to_string(),
            })
        }
        C::VersionMismatch => SessionError::Fatal(TransferError::Handshake {
            addr: addr.to_string(),
            detail: "no common QUIC version".into(),
        }),
        other => SessionError::Lost(other.to_string()),
    }
}

fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

fn read_error(addr: &str, e: quinn::ReadError) -> SessionError {
    match e {
        quinn::ReadError::ConnectionLost(c) => classify(addr, &c),
        other => SessionError::Lost(format!("stream from {addr} ended: {other}")),
    }
}

fn write_error(addr: &str, e: quinn::WriteError) -> SessionError {
    match e {
        quinn::WriteError::ConnectionLost(c) => classify(addr, &c),
        other => SessionError::Lost(format!("stream to {addr} ended: {other}")),
    }
}

/// Reads frames off one stream, holding at most one frame plus one read in memory.
struct FrameReader {
    stream: quinn::RecvStream,
    buf: BytesMut,
    peer: String,
}

impl FrameReader {
    fn new(stream: quinn::RecvStream, peer: &str) -> Self {
        FrameReader {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            peer: peer.to_string(),
        }
    }

    /// The next frame; `None` when the peer finished the stream between frames. Cancel-safe:
    /// bytes already read stay in the buffer.
    async fn next(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            let bad = |source| {
                SessionError::Fatal(TransferError::Frame {
                    peer: self.peer.clone(),
                    source,
                })
            };
            if let Some(frame) = frame::decode(&mut self.buf).map_err(bad)? {
                return Ok(Some(frame));
            }
            let want = frame::bytes_needed(&self.buf).map_err(bad)?;
            match self.stream.read_chunk(want.max(16 * 1024), true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(SessionError::Lost(format!(
                        "stream from {} ended inside a frame",
                        self.peer
                    )))
                }
                Err(e) => return Err(read_error(&self.peer, e)),
            }
        }
    }
}

/// Writes one frame; returns its encoded length.
async fn write_frame(
    stream: &mut quinn::SendStream,
    frame: &Frame,
    peer: &str,
) -> Result<usize, SessionError> {
    let mut buf = BytesMut::with_capacity(frame.encoded_len());
    frame.encode(&mut buf);
    stream
        .write_all(&buf)
        .await
        .map_err(|e| write_error(peer, e))?;
    Ok(buf.len())
}

/// Sleeps until `deadline`, or forever without one: the timeout arm of a driver's `select!`.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Peak resident memory of this process, from /proc (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_room_for_a_busy_receiver() {
        let socket = lan_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let got = rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap();
        // Root may force the size; anyone else gets what net.core.rmem_max allows.
        let want = if rustix::process::geteuid().is_root() {
            SOCKET_RECV_BUFFER
        } else {
            let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap();
            max.trim().parse::<usize>().unwrap().min(SOCKET_RECV_BUFFER)
        };
        assert!(
            got >= want,
            "receive buffer {got} B, wanted at least {want}"
        );
    }
}
