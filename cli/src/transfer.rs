//! `migrate send` and `migrate receive`: the transport on its own, file to file between two
//! nodes, deduplicated against the receiver's chunk store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::output::{bytes, parse_size, Output};
use transport::quic::{self, ReceiveOptions, SendOptions};
use transport::store::DiskStore;
use transport::tls::NodeIdentity;

#[derive(Debug, Args)]
#[command(after_help = "Example:
  migrate receive --listen 0.0.0.0:7070 --store /var/lib/migrate/chunks \\
      --out /var/lib/migrate/in/ckpt.tar --certs certs/node2")]
pub struct ReceiveArgs {
    /// UDP address to listen on (port 0 picks a free port; the first line printed names it).
    #[arg(long)]
    listen: SocketAddr,
    /// Chunk store directory, kept across transfers so later ones send only what is new.
    #[arg(long)]
    store: PathBuf,
    /// Size cap of the chunk store (e.g. 20G); after a transfer, the least recently used packs
    /// of chunks are evicted until it fits. Default: no cap.
    #[arg(long, value_parser = parse_size)]
    store_cap: Option<u64>,
    /// File to write. It appears only once every chunk and the manifest digest check.
    #[arg(long)]
    out: PathBuf,
    /// This node's certificate directory (from `migrate certs init`).
    #[arg(long)]
    certs: PathBuf,
    /// Seconds to wait for the sender to reconnect after the connection drops.
    #[arg(long, default_value_t = 60)]
    resume_timeout: u64,
    /// One JSON object per line: a `listening` event, then the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  migrate send ckpt.tar --to 10.0.0.2:7070 --certs certs/node1
  migrate send ckpt.tar --to 10.0.0.2:7070 --certs certs/node1 --peer node2 --json")]
pub struct SendArgs {
    /// File to send.
    file: PathBuf,
    /// The receiver's UDP address.
    #[arg(long)]
    to: SocketAddr,
    /// This node's certificate directory (from `migrate certs init`).
    #[arg(long)]
    certs: PathBuf,
    /// Require the receiver's certificate to name this node.
    #[arg(long)]
    peer: Option<String>,
    /// zstd level for chunks; negative levels are zstd's `--fast=N`: faster, larger.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-10..=19))]
    level: i32,
    /// Concurrent chunk streams (also chunks compressed at once).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    streams: u16,
    /// Seconds to keep reconnecting after the connection drops.
    #[arg(long, default_value_t = 60)]
    resume_timeout: u64,
    /// Print one JSON object with what moved.
    #[arg(long)]
    json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[derive(Serialize)]
struct Listening {
    event: &'static str,
    addr: SocketAddr,
}

#[derive(Serialize)]
struct Summary<'a, T: Serialize> {
    event: &'static str,
    #[serde(flatten)]
    report: &'a T,
    peak_rss_bytes: u64,
}

impl<'a, T: Serialize> Summary<'a, T> {
    /// The last JSON line of a command: its report plus this process's peak memory.
    fn done(report: &'a T) -> Self {
        Summary {
            event: "done",
            report,
            peak_rss_bytes: quic::peak_rss_bytes(),
        }
    }
}

pub fn receive(args: ReceiveArgs, out: &Output) -> anyhow::Result<()> {
    let identity = NodeIdentity::load(&args.certs)?;
    let store = DiskStore::open(&args.store, args.store_cap)
        .with_context(|| format!("opening the chunk store at {}", args.store.display()))?;
    let options = ReceiveOptions {
        resume_timeout: Duration::from_secs(args.resume_timeout),
        ..ReceiveOptions::default()
    };
    runtime()?.block_on(async {
        let endpoint = quic::server_endpoint(&identity, args.listen, quic::DEFAULT_IDLE_TIMEOUT)?;
        let addr = endpoint.local_addr().context("reading the bound address")?;
        if args.json {
            out.json(&Listening {
                event: "listening",
                addr,
            });
        } else {
            out.line(format!("listening on {addr} as {}", identity.name()));
        }
        let report = quic::receive_file(&endpoint, Arc::new(store), &args.out, &options)
            .await
            .with_context(|| format!("receiving {}", args.out.display()))?;
        endpoint.wait_idle().await;
        if args.json {
            out.json(&Summary::done(&report));
        } else {
            out.line(format!(
                "received {} from {} in {:.2} s: {} chunks, {} over the wire, {} reused; wrote {}",
                bytes(report.bytes_written),
                report.peer,
                report.seconds,
                report.chunks,
                report.chunks_received,
                report.chunks_reused,
                args.out.display()
            ));
        }
        Ok(())
    })
}

pub fn send(args: SendArgs, out: &Output) -> anyhow::Result<()> {
    let identity = NodeIdentity::load(&args.certs)?;
    let options = SendOptions {
        level: args.level,
        streams: usize::from(args.streams),
        resume_timeout: Duration::from_secs(args.resume_timeout),
        ..SendOptions::default()
    };
    runtime()?.block_on(async {
        let endpoint = quic::client_endpoint(&identity, args.peer.as_deref(), quic::DEFAULT_IDLE_TIMEOUT)?;
        let report = quic::send_file(&endpoint, args.to, &args.file, &options)
            .await
            .with_context(|| format!("sending {} to {}", args.file.display(), args.to))?;
        endpoint.wait_idle().await;
        if args.json {
            out.json(&Summary::done(&report));
        } else {
            let pct = if report.input_bytes == 0 {
                0.0
            } else {
                100.0 * report.wire_bytes as f64 / report.input_bytes as f64
            };
            out.line(format!(
                "sent {} in {:.2} s ({:.0} MiB/s): {} on the wire ({pct:.1}%), {} chunks, {} reused, {} connection(s)",
                bytes(report.input_bytes),
                report.seconds,
                report.input_bytes as f64 / (1 << 20) as f64 / report.seconds.max(1e-9),
                bytes(report.wire_bytes),
                report.chunks,
                report.chunks_reused,
                report.connections
            ));
        }
        Ok(())
    })
}
