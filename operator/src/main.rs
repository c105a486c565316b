//! `granary-operator`: `crd` prints the CRDs; `run` reconciles.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "granary-operator",
    version,
    about = "Granary Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Crd => print!("{}", granary_operator::crd::crds_yaml()?),
    }
    Ok(())
}
