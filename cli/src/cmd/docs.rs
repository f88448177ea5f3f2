//! `strata completions` and `strata man`: shell completions and man pages generated from the
//! command line's own definition, so they cannot drift from `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Write strata.1 and one page per command (strata-publish.1...) into DIR; without it,
    /// print strata.1 to stdout (`strata man | man -l -`).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script; e.g. `strata completions bash >
/// /etc/bash_completion.d/strata`.
pub fn completions(a: CompletionsArgs) -> anyhow::Result<()> {
    clap_complete::generate(
        a.shell,
        &mut crate::Cli::command(),
        "strata",
        &mut std::io::stdout(),
    );
    Ok(())
}

pub fn man(a: ManArgs) -> anyhow::Result<()> {
    let cmd = crate::Cli::command();
    match a.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("writing the man page")?,
    }
    Ok(())
}
