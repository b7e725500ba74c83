//! The `migrate` binary as a user runs it: `certs init`, then `receive` and `send` as two
//! processes over QUIC on the loopback, with the JSON a script would read. Also what a user sees
//! when the certificates do not match.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIGRATE: &str = env!("CARGO_BIN_EXE_migrate");

fn migrate(args: &[&str]) -> std::process::Output {
    Command::new(MIGRATE).args(args).output().unwrap()
}

/// Starts `migrate receive --json` and returns it with the address from its first line.
fn start_receiver(
    dir: &Path,
    certs: &str,
    out: &str,
) -> (Child, String, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(MIGRATE)
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--json",
            "--resume-timeout",
            "5",
        ])
        .arg("--store")
        .arg(dir.join("store"))
        .arg("--out")
        .arg(dir.join(out))
        .arg("--certs")
        .arg(dir.join(certs))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).expect("first line is JSON");
    assert_eq!(event["event"], "listening");
    let addr = event["addr"].as_str().unwrap().to_string();
    (child, addr, stdout)
}

/// Waits for a child with a deadline; kills it and fails the test when the deadline passes.
fn wait(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > deadline {
            child.kill().unwrap();
            panic!("process did not exit within {deadline:?}");
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

fn write_data(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..(6 << 20) / 4096 {
        let page: Vec<u8> = match i % 3 {
            0 => vec![0; 4096],
            1 => (0..4096).map(|j| b"some text in memory "[j % 20]).collect(),
            _ => (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect(),
        };
        f.write_all(&page).unwrap();
    }
}

#[test]
fn send_and_receive_as_processes_with_json_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let init = migrate(&[
        "certs",
        "init",
        "--out",
        dir.join("certs").to_str().unwrap(),
        "--name",
        "a",
        "--name",
        "b",
    ]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let src = dir.join("src.bin");
    write_data(&src);

    for round in 0..2 {
        let out = format!("out{round}.bin");
        let (mut receiver, addr, mut stdout) = start_receiver(dir, "certs/b", &out);
        let sent = migrate(&[
            "send",
            src.to_str().unwrap(),
            "--to",
            &addr,
            "--certs",
            dir.join("certs/a").to_str().unwrap(),
            "--peer",
            "b",
            "--json",
        ]);
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
        for key in [
            "input_bytes",
            "wire_bytes",
            "chunks",
            "chunks_reused",
            "seconds",
        ] {
            assert!(
                report.get(key).is_some(),
                "send --json lacks {key}: {report}"
            );
        }
        assert_eq!(report["input_bytes"], 6 << 20);
        let wire = report["wire_bytes"].as_u64().unwrap();
        if round == 0 {
            assert!(wire < 6 << 20, "zeros and text must compress: {report}");
        } else {
            assert_eq!(report["chunks_reused"], report["chunks"], "{report}");
            assert!(
                wire < 64 << 10,
                "a repeat sends only the manifest: {report}"
            );
        }
        assert!(wait(&mut receiver, Duration::from_secs(30)).success());
        let mut last = String::new();
        stdout.read_line(&mut last).unwrap();
        let done: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(done["event"], "done");
        assert_eq!(done["bytes_written"], 6 << 20);
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(dir.join(&out)).unwrap()
        );
    }
}

#[test]
fn a_sender_from_another_ca_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(migrate(&[
        "certs",
        "init",
        "--out",
        dir.join("certs").to_str().unwrap()
    ])
    .status
    .success());
    assert!(migrate(&[
        "certs",
        "init",
        "--out",
        dir.join("other").to_str().unwrap(),
        "--name",
        "mallory"
    ])
    .status
    .success());
    let src = dir.join("src.bin");
    write_data(&src);
    let (mut receiver, addr, _stdout) = start_receiver(dir, "certs/node2", "out.bin");
    let sent = migrate(&[
        "send",
        src.to_str().unwrap(),
        "--to",
        &addr,
        "--certs",
        dir.join("other/mallory").to_str().unwrap(),
    ]);
    receiver.kill().unwrap();
    let _ = receiver.wait();
    assert_eq!(sent.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&sent.stderr);
    assert!(
        stderr.contains("TLS handshake") && stderr.contains("same cluster CA"),
        "{stderr}"
    );
    assert!(!dir.join("out.bin").exists());
}

#[test]
fn missing_certificates_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = migrate(&[
        "send",
        "/etc/hostname",
        "--to",
        "127.0.0.1:9",
        "--certs",
        tmp.path().join("nope").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope"), "{stderr}");
}
