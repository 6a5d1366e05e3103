//! Load tools (`meshd bench …`); see BENCHMARKS.md.
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {}
}
