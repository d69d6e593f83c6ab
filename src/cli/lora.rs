//! `kiln lora`: LoRA adapter tools.

use kiln::Result;
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum LoraCommand {
    /// Merge an adapter into its base: writes an ordinary checkpoint (W + alpha/rank·B·A)
    /// that sample, eval, quantize and train --init-from read like any other.
    Merge(MergeArgs),
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base checkpoint (a run folder, RUN/latest, RUN/best or RUN/step-N).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The adapter: a PEFT folder (adapter_config.json, adapter_model.safetensors), e.g. a
    /// checkpoint folder of a kiln run with [lora].
    #[arg(long)]
    lora: PathBuf,
    /// New run folder for the merged checkpoint (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(c: &LoraCommand) -> Result<()> {
    match c {
        LoraCommand::Merge(a) => {
            let lora = super::train::adapter_dir(&a.lora);
            let dir = kiln::finetune::merge::merge_adapter(&a.checkpoint, &lora, &a.out)?;
            eprintln!("merged checkpoint: {}", dir.display());
            Ok(())
        }
    }
}
