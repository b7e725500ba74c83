//! The connection-level API a node daemon uses, over real QUIC on the loopback: a sender whose
//! [`Dialer`] introduces the transfer on a stream of its own before handing the connection over,
//! a receiver fed connections over a channel by a caller that read that hello first, a dialer
//! that gives up at once or keeps failing, a closed channel, and the progress counters. Every
//! wait has a deadline; nothing sleeps to synchronise.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{loopback, same_file, write_source, Lab, DEADLINE};
use tokio::sync::mpsc;
use tokio::time::timeout;
use transport::quic::{self, DialError, Dialer, ReceiveOptions, SendOptions, TransferError};
use transport::tls::SERVER_NAME;

const HELLO: &[u8] = b"transfer hello: ckpt.tar";
const WELCOME: &[u8] = b"go ahead";

/// Dials like a node daemon: connects, then introduces the transfer on a bidirectional stream
/// before handing the connection to the transport; with `answered`, it also waits for the
/// receiving daemon's answer first.
struct HelloDialer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    answered: bool,
    dials: AtomicUsize,
}

impl Dialer for HelloDialer {
    fn dial(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<quinn::Connection, DialError>> + Send + '_>> {
        Box::pin(async move {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let conn = self
                .endpoint
                .connect(self.addr, SERVER_NAME)
                .expect("valid client configuration")
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(HELLO).await.expect("hello written");
            send.finish().expect("hello finished");
            if self.answered {
                let answer = recv
                    .read_to_end(1024)
                    .await
                    .expect("an answer to the hello");
                assert_eq!(answer, WELCOME);
            }
            Ok(conn)
        })
    }

    fn peer(&self) -> String {
        format!("receiver at {}", self.addr)
    }
}

/// Accepts every connection on `server` like a node daemon: reads the hello from the first
/// bidirectional stream, answers it if `answer`, and hands the connection to the transfer.
async fn daemon_accept_loop(
    server: quinn::Endpoint,
    answer: bool,
    conns: mpsc::Sender<quinn::Connection>,
) {
    while let Some(incoming) = server.accept().await {
        let Ok(conn) = incoming.await else { continue };
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            continue;
        };
        let hello = recv.read_to_end(1024).await.expect("a hello");
        assert_eq!(hello, HELLO, "the first bidirectional stream is the hello");
        if answer {
            send.write_all(WELCOME).await.expect("answer written");
            send.finish().expect("answer finished");
        }
        if conns.send(conn).await.is_err() {
            return;
        }
    }
}

/// One transfer between a sender dialing with [`HelloDialer`] and a receiver fed by
/// [`daemon_accept_loop`].
async fn handover_transfer(answered: bool) {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 8 << 20, 11);
    let store = lab.store();
    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let client =
        quic::client_endpoint(&lab.sender, Some("receiver"), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let dialer = Arc::new(HelloDialer {
        endpoint: client,
        addr: server.local_addr().unwrap(),
        answered,
        dials: AtomicUsize::new(0),
    });

    let (tx, mut rx) = mpsc::channel(1);
    let accepting = tokio::spawn(daemon_accept_loop(server.clone(), answered, tx));
    let out = lab.path("out.bin");
    let options = ReceiveOptions::default();
    let receiving = quic::receive_file_from(&mut rx, store, &out, &options);
    // Spawned: a daemon runs transfers on tasks of their own, so the future must be Send.
    let sending = tokio::spawn({
        let (dialer, src) = (dialer.clone(), src.clone());
        async move { quic::send_file_via(&*dialer, &src, &SendOptions::default()).await }
    });
    let (received, sent) = timeout(DEADLINE, async { tokio::join!(receiving, sending) })
        .await
        .expect("the transfer finished (a failed assertion in the accept loop hangs it)");
    let (received, sent) = (received.unwrap(), sent.unwrap().unwrap());
    accepting.abort();

    assert!(same_file(&src, &out), "output differs");
    assert_eq!(received.bytes_written, sent.input_bytes);
    assert_eq!(received.peer, "sender");
    assert_eq!((sent.connections, received.connections), (1, 1));
    assert_eq!(dialer.dials.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_hands_over_connections_after_a_hello() {
    // The transport opens its control stream right behind the hello: the receiving daemon's
    // accept_bi must still get the hello, and the transfer its control stream.
    handover_transfer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_hands_over_connections_after_an_answered_hello() {
    handover_transfer(true).await;
}

/// A dialer that fails every attempt with a copy of one error.
struct FailingDialer {
    fail: fn() -> DialError,
    dials: AtomicUsize,
}

impl Dialer for FailingDialer {
    fn dial(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<quinn::Connection, DialError>> + Send + '_>> {
        Box::pin(async move {
            self.dials.fetch_add(1, Ordering::SeqCst);
            Err((self.fail)())
        })
    }

    fn peer(&self) -> String {
        "node2".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_dial_error_ends_the_transfer_at_once() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 1 << 20, 12);
    let dialer = FailingDialer {
        fail: || {
            DialError::Fatal(TransferError::Refused {
                addr: "node2".into(),
                reason: "a migration of web is already running".into(),
            })
        },
        dials: AtomicUsize::new(0),
    };
    // Far shorter than the resume timeout: no retry happened.
    let err = timeout(
        Duration::from_secs(10),
        quic::send_file_via(&dialer, &src, &SendOptions::default()),
    )
    .await
    .expect("a fatal error is not retried")
    .unwrap_err();
    match &err {
        TransferError::Refused { addr, reason } => {
            assert_eq!(addr, "node2");
            assert!(reason.contains("already running"), "{reason}");
        }
        other => panic!("expected the refusal, got {other}"),
    }
    assert_eq!(
        err.to_string(),
        "node2 refused the transfer: a migration of web is already running"
    );
    assert_eq!(dialer.dials.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_from_a_dialer_are_classified_like_handshakes() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 1 << 20, 13);
    let options = SendOptions {
        resume_timeout: Duration::from_millis(300),
        ..SendOptions::default()
    };

    // A timeout is retried until the resume timeout, then reported as unreachable.
    let unreachable = FailingDialer {
        fail: || DialError::Connection(quinn::ConnectionError::TimedOut),
        dials: AtomicUsize::new(0),
    };
    let err = timeout(DEADLINE, quic::send_file_via(&unreachable, &src, &options))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, TransferError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("node2"), "{err}");
    assert!(unreachable.dials.load(Ordering::SeqCst) >= 2, "retried");

    // A TLS alert is a refusal: fatal at the first attempt.
    let refused = FailingDialer {
        fail: || {
            DialError::Connection(quinn::ConnectionError::ConnectionClosed(
                quinn::ConnectionClose {
                    error_code: quinn::TransportErrorCode::crypto(42),
                    frame_type: None,
                    reason: bytes::Bytes::from_static(b"bad certificate"),
                },
            ))
        },
        dials: AtomicUsize::new(0),
    };
    let err = timeout(DEADLINE, quic::send_file_via(&refused, &src, &options))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, TransferError::Handshake { .. }), "{err}");
    assert_eq!(refused.dials.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_channel_fails_the_receiver_as_lost() {
    let lab = Lab::new();
    let (tx, mut rx) = mpsc::channel::<quinn::Connection>(1);
    drop(tx);
    let out = lab.path("out.bin");
    let err = timeout(
        DEADLINE,
        quic::receive_file_from(&mut rx, lab.store(), &out, &ReceiveOptions::default()),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, TransferError::Lost { .. }), "{err}");
    assert!(!out.exists() && !lab.path("out.bin.partial").exists());
}

/// Reads `counter` every few milliseconds until `done` resolves; returns what `done` gave and
/// the samples.
async fn sample<T>(counter: &AtomicU64, done: impl Future<Output = T>) -> (T, Vec<u64>) {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tokio::pin!(done);
    loop {
        tokio::select! {
            value = &mut done => {
                samples.push(counter.load(Ordering::Relaxed));
                return (value, samples);
            }
            _ = tick.tick() => samples.push(counter.load(Ordering::Relaxed)),
        }
    }
}

fn assert_monotonic(samples: &[u64], side: &str) {
    assert!(
        samples.windows(2).all(|w| w[0] <= w[1]),
        "{side} progress went backwards: {samples:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_counters_rise_to_the_file_size() {
    let lab = Lab::new();
    let src = lab.path("src.bin");
    write_source(&src, 16 << 20, 14);
    let size = std::fs::metadata(&src).unwrap().len();
    let store = lab.store();
    let server =
        quic::server_endpoint(&lab.receiver, loopback(), quic::DEFAULT_IDLE_TIMEOUT).unwrap();
    let addr = server.local_addr().unwrap();
    let client =
        quic::client_endpoint(&lab.sender, Some("receiver"), quic::DEFAULT_IDLE_TIMEOUT).unwrap();

    // The second round takes every chunk from the store: reused bytes count too.
    for round in 0..2 {
        let sent_progress = Arc::new(AtomicU64::new(0));
        let received_progress = Arc::new(AtomicU64::new(0));
        let send_options = SendOptions {
            progress: Some(sent_progress.clone()),
            ..SendOptions::default()
        };
        let receive_options = ReceiveOptions {
            progress: Some(received_progress.clone()),
            ..ReceiveOptions::default()
        };
        let out = lab.path(&format!("out{round}.bin"));
        let receiving = sample(
            &received_progress,
            quic::receive_file(&server, store.clone(), &out, &receive_options),
        );
        let sending = sample(
            &sent_progress,
            quic::send_file(&client, addr, &src, &send_options),
        );
        let ((received, received_samples), (sent, sent_samples)) =
            timeout(DEADLINE, async { tokio::join!(receiving, sending) })
                .await
                .unwrap();
        received.unwrap();
        sent.unwrap();
        assert!(same_file(&src, &out), "round {round}: output differs");
        assert_eq!(sent_progress.load(Ordering::Relaxed), size, "round {round}");
        assert_eq!(
            received_progress.load(Ordering::Relaxed),
            size,
            "round {round}"
        );
        assert_monotonic(&sent_samples, "sender");
        assert_monotonic(&received_samples, "receiver");
    }
}
