//! `strata key`: publishers' signing keys (FORMAT §5.2).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use strata_fs::refs::signed::SigningKey;

#[derive(Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new signing key, written to FILE (readable by its owner only; never
    /// overwritten), and print its public key for daemons' `trusted_keys`.
    Generate {
        /// Where the secret key goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of the signing key in FILE.
    Public { file: PathBuf },
}

pub fn run(a: KeyArgs) -> anyhow::Result<()> {
    match a.command {
        KeyCommand::Generate { out } => {
            let key = SigningKey::generate()?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| {
                    format!(
                        "creating {} (an existing key is never overwritten)",
                        out.display()
                    )
                })?;
            file.write_all(key.to_file_text().as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", key.public());
        }
        KeyCommand::Public { file } => println!("{}", SigningKey::load(&file)?.public()),
    }
    Ok(())
}

/// The signing key a command was given (`--sign-key FILE`), loaded.
pub fn load(path: Option<&PathBuf>) -> anyhow::Result<Option<Arc<SigningKey>>> {
    Ok(path.map(|p| SigningKey::load(p)).transpose()?.map(Arc::new))
}
