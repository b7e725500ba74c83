//! `migrate inspect ARCHIVE`: what a checkpoint archive holds, validated on the way, as an
//! aligned table or (`--json`) one JSON object. A hostile or damaged archive fails with the
//! validation error and exit status 1.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use engine::archive::Limits;
use engine::inspect::{inspect_file, CheckpointInfo};

use crate::output::{self, Output};

/// Arguments of `migrate inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint archive: an uncompressed tar from `podman container checkpoint --export` or the kubelet.
    pub archive: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `migrate inspect`.
pub fn run(args: InspectArgs, out: &Output) -> anyhow::Result<()> {
    let info = inspect_file(&args.archive, &Limits::default()).with_context(|| {
        format!(
            "refusing {}: not a valid checkpoint archive",
            args.archive.display()
        )
    })?;
    if args.json {
        out.json(&info);
    } else {
        for (label, value) in rows(&args.archive.display().to_string(), &info) {
            out.line(format!("{label:<14} {value}"));
        }
    }
    Ok(())
}

/// The table's rows, in the order a user reads them.
fn rows(archive: &str, i: &CheckpointInfo) -> Vec<(&'static str, String)> {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_string());
    let mut container = or_dash(&i.container_name);
    if let Some(id) = &i.container_id {
        container.push_str(&format!(" (id {})", &id[..id.len().min(12)]));
    }
    let pod = match (&i.pod_name, &i.pod_namespace) {
        (Some(p), Some(ns)) => format!("{ns}/{p}"),
        (Some(p), None) => p.clone(),
        _ => "-".to_string(),
    };
    let processes = match i.threads {
        Some(t) => format!("{} ({t} threads, from {})", i.processes, i.processes_source),
        None => format!("{} (from {})", i.processes, i.processes_source),
    };
    let checkpointed = match (&i.checkpointed, &i.checkpointed_source) {
        (Some(t), Some(src)) => format!("{t} ({src})"),
        (t, _) => or_dash(t),
    };
    vec![
        (
            "Archive",
            format!(
                "{archive} ({}, {} entries)",
                output::bytes(i.archive_bytes),
                i.entries
            ),
        ),
        ("Container", container),
        ("Pod", pod),
        ("Engine", i.engine.clone()),
        ("Image", or_dash(&i.image)),
        ("Image ref", or_dash(&i.image_ref)),
        ("Runtime", or_dash(&i.runtime)),
        ("CRIU version", i.criu_version.clone()),
        (
            "Memory",
            format!(
                "{} in {} page images",
                output::bytes(i.memory_bytes),
                i.page_images
            ),
        ),
        (
            "Rootfs diff",
            i.rootfs_diff_bytes
                .map(output::bytes)
                .unwrap_or_else(|| "-".to_string()),
        ),
        ("Processes", processes),
        ("Created", or_dash(&i.created)),
        ("Checkpointed", checkpointed),
    ]
}
