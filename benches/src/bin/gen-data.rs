//! `gen-data`: writes the benchmarks' "checkpoint-like" data (4 KiB pages in runs: ~40% zero,
//! ~30% text-like, ~30% random), or a copy of such a file with a fraction of its pages
//! rewritten. Used by `scripts/demo.sh` and handy for trying `migrate send` by hand.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Generate checkpoint-like test data.
#[derive(Debug, Parser)]
#[command(after_help = "Examples:
  gen-data --size 512M --out /var/tmp/ckpt.bin
  gen-data --rewrite /var/tmp/ckpt.bin --fraction 0.05 --out /var/tmp/ckpt2.bin")]
struct Args {
    /// File to write.
    #[arg(long)]
    out: PathBuf,
    /// Size of new data, in bytes or with a K/M/G suffix.
    #[arg(long, default_value = "512M", conflicts_with = "rewrite", value_parser = benches::parse_size)]
    size: u64,
    /// Instead of new data, copy this file with `--fraction` of its pages rewritten.
    #[arg(long)]
    rewrite: Option<PathBuf>,
    /// Fraction of pages to rewrite with `--rewrite`.
    #[arg(long, default_value_t = 0.05)]
    fraction: f64,
    /// Seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.rewrite {
        Some(src) => {
            let pages =
                benches::data::write_rewritten_copy(src, &args.out, args.fraction, args.seed)
                    .with_context(|| {
                        format!("writing {} from {}", args.out.display(), src.display())
                    })?;
            println!(
                "{}: copy of {} with {pages} pages rewritten",
                args.out.display(),
                src.display()
            );
        }
        None => {
            let size = args.size;
            benches::data::write_checkpoint_like(&args.out, size, args.seed)
                .with_context(|| format!("writing {}", args.out.display()))?;
            println!(
                "{}: {size} bytes of checkpoint-like data",
                args.out.display()
            );
        }
    }
    Ok(())
}
