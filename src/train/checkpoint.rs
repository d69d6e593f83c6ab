//! Checkpoints: a folder per saved step, written so that a run killed at any moment leaves the
//! latest complete checkpoint loadable.
//!
//! A checkpoint folder `step-<N>` holds
//!
//! | file | contents |
//! | --- | --- |
//! | `model.safetensors` | f32 master weights, one tensor per layout entry, named and shaped as in [`ParamLayout`] |
//! | `optimizer.safetensors` | Adam moments, `m.<name>` and `v.<name>`, f32 |
//! | `config.toml` | the run's [`Config`] |
//! | `tokenizer.json` | the tokenizer, stored verbatim |
//! | `state.json` | [`TrainingState`] plus the format `version` |
//!
//! and the checkpoint root holds the folders and a pointer file `latest` naming the newest one.
//! See docs/ARCHITECTURE.md ("Checkpoints") for the ordering of writes, renames and fsyncs that
//! makes saving atomic.

use crate::model::{Config, ParamLayout, TensorInfo};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the folder format written by this build; [`load`] refuses any other.
pub const FORMAT_VERSION: u32 = 1;

/// How many checkpoints [`save`] keeps when the caller has no opinion.
pub const DEFAULT_KEEP: usize = 3;

/// File holding the master weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// File holding the Adam moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File holding the run's configuration.
pub const CONFIG_FILE: &str = "config.toml";
/// File holding the tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File holding the training state.
pub const STATE_FILE: &str = "state.json";
/// Pointer file in the checkpoint root naming the newest complete checkpoint folder.
pub const LATEST_FILE: &str = "latest";
/// Pointer file in the checkpoint root naming the checkpoint with the lowest validation loss
/// (written, with early stopping on, when the state's `best_step` is the saved step); never
/// pruned.
pub const BEST_FILE: &str = "best";

const FILES: [&str; 5] = [
    MODEL_FILE,
    OPTIMIZER_FILE,
    CONFIG_FILE,
    TOKENIZER_FILE,
    STATE_FILE,
];

/// Prefixes of the optimizer tensors: first moment, then second.
const MOMENT_PREFIXES: [&str; 2] = ["m.", "v."];

/// Counters and scalars a resumed run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Current dynamic loss scale (1 when loss scaling is off).
    pub loss_scale: f32,
    /// Clean steps in a row counted towards the next growth of the loss scale.
    #[serde(default)]
    pub loss_scale_run: u32,
    /// Steps skipped because the gradients overflowed.
    pub skipped_steps: u64,
    /// Lowest validation loss seen, if any evaluation has run.
    pub best_val_loss: Option<f64>,
    /// The step whose periodic evaluation gave `best_val_loss`.
    #[serde(default)]
    pub best_step: Option<u64>,
    /// Periodic evaluations since the last one that improved on the best loss by more than
    /// `train.early_stopping_min_delta`: early stopping's count, kept so a resume continues it.
    #[serde(default)]
    pub evals_without_improvement: u32,
    /// Seed from which the data order and dropout streams continue.
    pub rng_seed: u64,
    /// Recent measurements (losses, learning rates), oldest first.
    #[serde(default)]
    pub metrics: Vec<Metric>,
}

impl Default for TrainingState {
    fn default() -> Self {
        TrainingState {
            step: 0,
            tokens_seen: 0,
            loss_scale: 1.0,
            loss_scale_run: 0,
            skipped_steps: 0,
            best_val_loss: None,
            best_step: None,
            evals_without_improvement: 0,
            rng_seed: 0,
            metrics: Vec::new(),
        }
    }
}

/// One recorded measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    /// Optimizer step at which it was measured.
    pub step: u64,
    /// What was measured (`train_loss`, `val_loss`, `lr`, ...).
    pub name: String,
    /// The value. JSON has no NaN or infinity, so a non-finite value is stored as `null` and
    /// reads back as NaN.
    #[serde(with = "nullable_f64")]
    pub value: f64,
}

/// A diverged run records NaN losses; storing them must not make the checkpoint unwritable.
mod nullable_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Everything saved at one step. `master`, `m` and `v` are flat buffers laid out by `layout`
/// (`layout.buffer_len()` elements each, zero between tensors), exactly as they live on the GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The run's configuration.
    pub config: Config,
    /// The tokenizer as JSON text, stored and returned unchanged.
    pub tokenizer_json: String,
    /// Counters and scalars.
    pub state: TrainingState,
    /// The layout of the three buffers. [`load`] returns the dense layout (alignment 1) of the
    /// checkpoint's own config; [`Checkpoint::with_layout`] moves the buffers to another one.
    pub layout: ParamLayout,
    /// f32 master weights.
    pub master: Vec<f32>,
    /// Adam first moments.
    pub m: Vec<f32>,
    /// Adam second moments.
    pub v: Vec<f32>,
}

impl Checkpoint {
    /// The same checkpoint with its buffers moved to `layout` (typically the device layout, whose
    /// tensors start at aligned offsets). Fails if `layout` does not hold the same tensors with
    /// the same shapes; run [`check_compatible`] first for a message in terms of the config.
    pub fn with_layout(self, layout: &ParamLayout) -> Result<Checkpoint> {
        if &self.layout == layout {
            return Ok(self);
        }
        let differences = shape_differences(&self.layout, layout);
        if !differences.is_empty() {
            return Err(Error::IncompatibleCheckpoint {
                differences: differences.join(", "),
                advice: "The checkpoint's tensors do not fit the model it is being loaded into \
                         (were its files mixed or edited?); load another checkpoint with \
                         --checkpoint RUN/step-N"
                    .into(),
            });
        }
        let move_buffer = |src: &[f32]| {
            let mut dst = vec![0.0f32; layout.buffer_len()];
            for (from, to) in self.layout.tensors().iter().zip(layout.tensors()) {
                dst[to.offset..to.offset + to.len()]
                    .copy_from_slice(&src[from.offset..from.offset + from.len()]);
            }
            dst
        };
        Ok(Checkpoint {
            master: move_buffer(&self.master),
            m: move_buffer(&self.m),
            v: move_buffer(&self.v),
            layout: layout.clone(),
            config: self.config,
            tokenizer_json: self.tokenizer_json,
            state: self.state,
        })
    }
}

/// The on-disk form of `state.json`: the version sits beside the state so that a reader checks
/// it before trusting any other field.
#[derive(Serialize)]
struct StateFileOut<'a> {
    version: u32,
    #[serde(flatten)]
    state: &'a TrainingState,
}

pub(crate) fn ckpt_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        message: message.into(),
    }
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Saves `ckpt` under `root` as `step-<ckpt.state.step>`, points `root/latest` at it and then
/// deletes all but the newest `keep` checkpoints (at least 1). Returns the new folder.
///
/// Only one process may save into a given `root` at a time.
pub fn save(root: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    check_savable(ckpt)?;
    fs::create_dir_all(root).map_err(|e| io_err(root, e))?;
    let step = ckpt.state.step;
    let name = step_name(step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        // Our own leftover from an earlier failed save of the same step in this process.
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;

    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("producer".to_string(), "kiln".to_string());
    let model = encode_tensors(&ckpt.layout, &[("", &ckpt.master)], meta.clone())?;
    write_synced(&tmp.join(MODEL_FILE), &model)?;
    drop(model);
    let optimizer = encode_tensors(
        &ckpt.layout,
        &[(MOMENT_PREFIXES[0], &ckpt.m), (MOMENT_PREFIXES[1], &ckpt.v)],
        meta,
    )?;
    write_synced(&tmp.join(OPTIMIZER_FILE), &optimizer)?;
    drop(optimizer);
    let config = toml::to_string_pretty(&ckpt.config).map_err(|e| Error::Config {
        message: format!("cannot write the config as TOML: {e}"),
    })?;
    write_synced(&tmp.join(CONFIG_FILE), config.as_bytes())?;
    write_synced(&tmp.join(TOKENIZER_FILE), ckpt.tokenizer_json.as_bytes())?;
    let state = serde_json::to_string_pretty(&StateFileOut {
        version: FORMAT_VERSION,
        state: &ckpt.state,
    })
    .map_err(|e| ckpt_err(&tmp.join(STATE_FILE), format!("cannot encode: {e}")))?;
    write_synced(&tmp.join(STATE_FILE), state.as_bytes())?;
    if ckpt.config.lora.is_some() {
        // A LoRA run's checkpoint is also a PEFT adapter folder (kiln sample --lora RUN/latest).
        crate::finetune::peft::write_adapter(&tmp, &ckpt.config, &ckpt.layout, &ckpt.master)?;
    }
    sync_dir(&tmp)?;

    let dir = root.join(&name);
    if dir.exists() {
        // A re-run reached this step again. A directory cannot be renamed over a non-empty one,
        // so the old folder steps aside first; `.old-step-N-*` folders count as complete
        // checkpoints when falling back, so a crash between the two renames loses nothing.
        let old = root.join(format!(".old-{name}-{}", std::process::id()));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
        }
        fs::rename(&dir, &old).map_err(|e| io_err(&dir, e))?;
        sync_dir(root)?;
    }
    fs::rename(&tmp, &dir).map_err(|e| io_err(&tmp, e))?;
    sync_dir(root)?;

    write_pointer(root, LATEST_FILE, &name)?;
    if ckpt.config.train.early_stopping_patience > 0 && ckpt.state.best_step == Some(step) {
        // After `latest`: the best is never newer than the latest, and the checkpoint the
        // pointer named before stays (unpruned) until this rename lands.
        write_pointer(root, BEST_FILE, &name)?;
    }

    // Everything below only removes data that the new, complete checkpoint supersedes.
    prune(root, step, keep.max(1))?;
    Ok(dir)
}

/// Points `root/file` at the folder `name` by one rename, so a reader sees the old name or the
/// new one, never a torn write.
fn write_pointer(root: &Path, file: &str, name: &str) -> Result<()> {
    let pointer = root.join(format!("{file}.tmp"));
    write_synced(&pointer, format!("{name}\n").as_bytes())?;
    let target = root.join(file);
    fs::rename(&pointer, &target).map_err(|e| io_err(&target, e))?;
    sync_dir(root)
}

/// Refuses, before anything is written, a checkpoint that [`load`] would reject.
fn check_savable(ckpt: &Checkpoint) -> Result<()> {
    let n = ckpt.layout.buffer_len();
    for (what, buf) in [("master", &ckpt.master), ("m", &ckpt.m), ("v", &ckpt.v)] {
        if buf.len() != n {
            return Err(Error::invalid(
                format!("checkpoint buffer {what}"),
                format!("{} elements", buf.len()),
                format!("must have layout.buffer_len() = {n} elements"),
            ));
        }
    }
    for (what, buf) in [("master", &ckpt.master), ("m", &ckpt.m), ("v", &ckpt.v)] {
        for t in ckpt.layout.tensors() {
            if let Some(i) = buf[t.offset..t.offset + t.len()]
                .iter()
                .position(|x| !x.is_finite())
            {
                return Err(Error::invalid(
                    format!("checkpoint {what} {}[{i}]", t.name),
                    buf[t.offset + i],
                    "weights and moments must be finite to be checkpointed; the run has \
                     diverged: resume from an earlier checkpoint (kiln train --out RUN --resume-from N) with a lower learning rate",
                ));
            }
        }
    }
    ckpt.config.validate()?;
    let expected = dense_layout(&ckpt.config, &ckpt.layout)?;
    let differences = shape_differences(&expected, &ckpt.layout);
    if !differences.is_empty() {
        return Err(Error::invalid(
            "checkpoint layout",
            differences.join(", "),
            "the layout must be the one the checkpoint's config describes \
             (ParamLayout::for_config of the config)",
        ));
    }
    let s = &ckpt.state;
    if !(s.loss_scale.is_finite() && s.loss_scale > 0.0) {
        return Err(Error::invalid(
            "state.loss_scale",
            s.loss_scale,
            "must be a finite number > 0",
        ));
    }
    if let Some(l) = s.best_val_loss.filter(|l| !l.is_finite()) {
        return Err(Error::invalid(
            "state.best_val_loss",
            l,
            "must be finite (use None when there is no valid loss yet)",
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(&ckpt.tokenizer_json).map_err(|e| {
        Error::invalid(
            "tokenizer_json",
            format!("{:.40}...", ckpt.tokenizer_json),
            format!("must be JSON text: {e}"),
        )
    })?;
    Ok(())
}

/// The dense layout the config describes, with the vocabulary taken from `like`'s token
/// embedding when the config leaves it to the tokenizer.
fn dense_layout(config: &Config, like: &ParamLayout) -> Result<ParamLayout> {
    let vocab = match config.model.vocab_size {
        0 => like
            .token_table()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(0),
        v => v,
    };
    ParamLayout::for_config(config, vocab, 1)
}

/// A `safetensors` view over one layout tensor, converted to little-endian bytes on demand.
pub(crate) struct F32View<'a> {
    pub shape: &'a [usize],
    pub data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

fn encode_tensors(
    layout: &ParamLayout,
    buffers: &[(&str, &Vec<f32>)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut views = Vec::new();
    for (prefix, buf) in buffers {
        for t in layout.tensors() {
            views.push((
                format!("{prefix}{}", t.name),
                F32View {
                    shape: &t.shape,
                    data: &buf[t.offset..t.offset + t.len()],
                },
            ));
        }
    }
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Invalid {
        key: "checkpoint tensors".into(),
        value: format!("{} tensors", layout.tensors().len()),
        rule: format!("safetensors refused them: {e}"),
    })?;
    canonical_metadata(bytes)
}

/// Rewrites the `__metadata__` object of a serialized safetensors file with its keys sorted.
/// safetensors takes the metadata as a `HashMap`, whose iteration order is random per process, so
/// the same checkpoint written twice would differ in its header. The rewritten header has the
/// same length (the same keys and values, reordered), so the data offsets stay valid.
pub(crate) fn canonical_metadata(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let broken = |m: &str| Error::Invalid {
        key: "checkpoint header".into(),
        value: m.to_string(),
        rule: "safetensors wrote a header kiln cannot read back; this is a bug".into(),
    };
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| broken("shorter than 8 bytes"))?,
    ) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(|| broken("cut short"))?;
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|_| broken("not JSON"))?;
    if let Some(serde_json::Value::Object(meta)) = value.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> =
            std::mem::take(meta).into_iter().collect();
        meta.extend(sorted);
    }
    let text = serde_json::to_vec(&value).map_err(|_| broken("not re-encodable"))?;
    if text.len() > n {
        return Err(broken("grew when reordered"));
    }
    // safetensors pads the header with spaces to an 8-byte boundary; keep the length.
    let mut padded = text;
    padded.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&padded);
    Ok(bytes)
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

/// Makes renames and creations inside `dir` durable. Windows cannot open a directory as a file
/// and orders metadata updates itself, so there this is a no-op.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn step_name(step: u64) -> String {
    format!("step-{step}")
}

/// The step of a folder name `step-<N>`, in exactly the form [`step_name`] writes.
fn parse_step_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    let step: u64 = digits.parse().ok()?;
    (step_name(step) == name).then_some(step)
}

/// The step of a complete checkpoint folder that a re-save moved aside: `.old-step-<N>-<pid>`.
fn parse_old_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(".old-")?;
    let (step, pid) = rest.rsplit_once('-')?;
    pid.parse::<u32>().ok()?;
    parse_step_name(step)
}

fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|f| dir.join(f).is_file())
}

/// `(step, is_moved_aside, path)` of every checkpoint folder in `root`, oldest first.
fn list_checkpoints(root: &Path) -> Result<Vec<(u64, bool, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| io_err(root, e))? {
        let entry = entry.map_err(|e| io_err(root, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(step) = parse_step_name(name) {
            found.push((step, false, entry.path()));
        } else if let Some(step) = parse_old_name(name) {
            found.push((step, true, entry.path()));
        }
    }
    // A moved-aside folder sorts before the regular one of the same step, so it loses to it.
    found.sort_by_key(|(step, old, _)| (*step, !*old));
    Ok(found)
}

/// Deletes leftovers of interrupted saves and all but the newest `keep` checkpoints up to
/// `newest`. Folders of later steps (left by an earlier run that went further before this one
/// resumed from an older checkpoint) are not this run's to delete and are kept.
///
/// The folder the `best` pointer names is never deleted and does not count towards `keep`.
fn prune(root: &Path, newest: u64, keep: usize) -> Result<()> {
    let best = fs::read_to_string(root.join(BEST_FILE))
        .ok()
        .map(|t| t.trim().to_string());
    let mut regular = Vec::new();
    for (step, old, path) in list_checkpoints(root)? {
        let is_best = best
            .as_deref()
            .is_some_and(|b| path.file_name() == Some(b.as_ref()));
        if old {
            remove_dir(&path)?;
        } else if step <= newest && !is_best {
            regular.push(path);
        }
    }
    let excess = regular.len().saturating_sub(keep);
    for path in &regular[..excess] {
        // Renamed first so that a crash in the middle of the deletion leaves an ignored `.tmp-*`
        // folder rather than a `step-*` folder with some of its files gone.
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let doomed = root.join(format!(".tmp-delete-{name}-{}", std::process::id()));
        fs::rename(path, &doomed).map_err(|e| io_err(path, e))?;
        remove_dir(&doomed)?;
    }
    for entry in fs::read_dir(root).map_err(|e| io_err(root, e))? {
        let entry = entry.map_err(|e| io_err(root, e))?;
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            // Leftovers of interrupted saves are folders; a file of that name is removed too
            // rather than failing the save.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dir(&entry.path())?;
            } else {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    sync_dir(root)
}

fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path, e)),
        _ => Ok(()),
    }
}

/// The folder `root/latest` names, or, when the pointer is missing, unreadable or names a folder
/// that is not a complete checkpoint, the complete checkpoint folder of the highest step.
pub fn latest_dir(root: &Path) -> Result<PathBuf> {
    let pointer = root.join(LATEST_FILE);
    match fs::read_to_string(&pointer) {
        Ok(text) => {
            let name = text.trim();
            let dir = root.join(name);
            if parse_step_name(name).is_some() && is_complete(&dir) {
                return Ok(dir);
            }
            log::warn!(
                "{}: names {name:?}, which is not a complete checkpoint folder; \
                 falling back to the newest complete step-N folder",
                pointer.display()
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            log::warn!(
                "{}: {e}; falling back to the newest complete step-N folder",
                pointer.display()
            )
        }
    }
    let found = match list_checkpoints(root) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(ckpt_err(
                root,
                "no such directory; check the checkpoint path, or start a fresh run",
            ));
        }
        other => other?,
    };
    found
        .into_iter()
        .rev()
        .map(|(_, _, path)| path)
        .find(|p| is_complete(p))
        .ok_or_else(|| {
            if let Some(h) = crate::quant::checkpoint::header(root) {
                crate::quant::checkpoint::not_float(root, &h, "trained or resumed")
            } else if root.join(CONFIG_FILE).is_file() {
                ckpt_err(
                    root,
                    "no checkpoint yet: this run stopped before its first checkpoint (one is \
                     written every train.checkpoint_interval steps); start it again with \
                     `kiln train --config RUN/config.toml --out RUN --overwrite`",
                )
            } else {
                ckpt_err(
                    root,
                    "no checkpoint here (no valid `latest` pointer and no complete step-N \
                     folder); check the path, or start a fresh run",
                )
            }
        })
}

/// The checkpoint folder a user means by `path`: `path` itself when it is a checkpoint folder
/// (named `step-N`, or holding any of a checkpoint's own files), else the latest checkpoint of
/// the run folder `path` (see [`latest_dir`]). So a damaged step folder is reported as damaged
/// rather than as a run folder without checkpoints. The pointer files themselves are accepted
/// too: `RUN/latest` means the run's latest checkpoint and `RUN/best` the one it names (see
/// [`best_dir`]).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let pointer = path.file_name().and_then(|n| n.to_str());
    let root = path.parent().unwrap_or(Path::new("."));
    if path.is_file() && pointer == Some(LATEST_FILE) {
        return latest_dir(root);
    }
    if pointer == Some(BEST_FILE) && !path.is_dir() {
        return best_dir(root);
    }
    if path.is_file() {
        return Err(ckpt_err(
            path,
            "is a file; pass a run folder (its latest checkpoint is used) or a checkpoint folder \
             (RUN/step-N)",
        ));
    }
    let named_as_step = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| parse_step_name(n).is_some());
    let own_files = [MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE, STATE_FILE];
    if named_as_step || own_files.iter().any(|f| path.join(f).exists()) {
        return Ok(path.to_path_buf());
    }
    latest_dir(path)
}

/// The folder the `best` pointer of the run folder `root` names: the checkpoint with the lowest
/// validation loss of a run with early stopping. Unlike `latest` there is no fallback: a missing
/// pointer or one naming a folder that is not a complete checkpoint is an error.
pub fn best_dir(root: &Path) -> Result<PathBuf> {
    let pointer = root.join(BEST_FILE);
    let text = match fs::read_to_string(&pointer) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ckpt_err(
                &pointer,
                "no such file: only runs with train.early_stopping_patience ≥ 1 keep a best \
                 checkpoint; pass the run folder (its latest checkpoint) or RUN/step-N instead",
            ));
        }
        Err(e) => return Err(io_err(&pointer, e)),
    };
    let name = text.trim();
    let dir = root.join(name);
    if parse_step_name(name).is_some() && is_complete(&dir) {
        return Ok(dir);
    }
    Err(ckpt_err(
        &pointer,
        format!(
            "names {name:?}, which is not a complete checkpoint folder; pass the run folder or \
             RUN/step-N instead"
        ),
    ))
}

/// The folder of step `step` in the run folder `root`, checked to be a complete checkpoint;
/// the error lists the steps that are there.
pub fn step_dir(root: &Path, step: u64) -> Result<PathBuf> {
    let dir = root.join(step_name(step));
    if is_complete(&dir) {
        return Ok(dir);
    }
    let steps: Vec<String> = list_checkpoints(root)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, old, p)| !old && is_complete(p))
        .map(|(s, _, _)| s.to_string())
        .collect();
    Err(ckpt_err(
        &dir,
        format!(
            "no complete checkpoint for step {step}; this run has checkpoints for steps: {}",
            if steps.is_empty() {
                "none".to_string()
            } else {
                steps.join(", ")
            }
        ),
    ))
}

/// Loads the newest checkpoint under `root` (see [`latest_dir`]).
pub fn load_latest(root: &Path) -> Result<Checkpoint> {
    load(&latest_dir(root)?)
}

/// Reads only the config of the checkpoint in `dir`.
pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join(CONFIG_FILE);
    let text = read_text(&path)?;
    Config::from_toml(&text, &[]).map_err(|e| {
        ckpt_err(
            &path,
            format!(
                "does not parse as a kiln config ({e}); fix the file by hand or load an earlier \
                 checkpoint"
            ),
        )
    })
}

/// Reads only the training state of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<TrainingState> {
    let path = dir.join(STATE_FILE);
    let text = read_text(&path)?;
    let corrupt = |e: serde_json::Error| {
        ckpt_err(
            &path,
            format!(
                "is not a valid training state ({e}); load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)"
            ),
        )
    };
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(corrupt)?;
    match value.remove("version") {
        Some(v) if v.as_u64() == Some(FORMAT_VERSION.into()) => {}
        Some(v) => {
            return Err(ckpt_err(
                &path,
                format!(
                    "format version {v}, but this kiln reads version {FORMAT_VERSION}; \
                     load it with the kiln that wrote it, or start a fresh run"
                ),
            ));
        }
        None => {
            return Err(ckpt_err(
                &path,
                format!(
                    "has no format `version` (this kiln reads version {FORMAT_VERSION}); \
                     the file was not written by kiln or was edited: load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)"
                ),
            ));
        }
    }
    serde_json::from_value(serde_json::Value::Object(value)).map_err(corrupt)
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    String::from_utf8(bytes).map_err(|e| {
        ckpt_err(
            path,
            format!("is not UTF-8 text ({e}); the file is corrupt: load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)"),
        )
    })
}

pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ckpt_err(
                path,
                "missing; the checkpoint folder is incomplete (copied partially or edited): \
                 load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)",
            )
        } else {
            io_err(path, e)
        }
    })
}

/// Loads and validates the checkpoint folder `dir`. The buffers come back in the dense layout of
/// the checkpoint's own config (vocabulary from `wte.weight` when the config leaves it to the
/// tokenizer); use [`check_compatible`] and [`Checkpoint::with_layout`] to resume into a run's
/// own layout.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(ckpt_err(
            dir,
            "not a directory; pass a checkpoint folder (step-N) or use the checkpoint root",
        ));
    }
    if let Some(h) = crate::quant::checkpoint::header(dir) {
        return Err(crate::quant::checkpoint::not_float(
            dir,
            &h,
            "trained, resumed or quantised again",
        ));
    }
    let state = read_state(dir)?;
    let config = read_config(dir)?;
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer_json = read_text(&tokenizer_path)?;
    serde_json::from_str::<serde::de::IgnoredAny>(&tokenizer_json).map_err(|e| {
        ckpt_err(
            &tokenizer_path,
            format!("is not valid JSON ({e}); the file is corrupt: load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)"),
        )
    })?;
    crate::data::Tokenizer::from_json(&tokenizer_json).map_err(|e| {
        ckpt_err(
            &tokenizer_path,
            format!(
                "is not a tokenizer kiln can use ({e}); the file is damaged or was replaced: \
                 load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln \
                 train --out RUN --resume-from N to train on)"
            ),
        )
    })?;

    let model_path = dir.join(MODEL_FILE);
    let model_bytes = read_bytes(&model_path)?;
    let model = SafetensorsFile::parse(&model_path, &model_bytes)?;
    let vocab = match config.model.vocab_size {
        0 => ["wte.weight", "model.embed_tokens.weight"]
            .iter()
            .find_map(|name| model.entries.get(*name))
            .and_then(|e| e.shape.first().copied())
            .ok_or_else(|| {
                ckpt_err(
                    &model_path,
                    "the token embedding (wte.weight or model.embed_tokens.weight) is missing (it sets the vocabulary size, which \
                     config.toml leaves to the tokenizer); load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)",
                )
            })?,
        v => v,
    };
    let layout = ParamLayout::for_config(&config, vocab, 1)
        .map_err(|e| ckpt_err(&model_path, format!("no parameter layout fits it: {e}")))?;
    let mut master = model.to_flat(&layout, &[""])?;
    drop(model_bytes);
    let master = master.remove(0);

    let opt_path = dir.join(OPTIMIZER_FILE);
    let opt_bytes = read_bytes(&opt_path)?;
    let optimizer = SafetensorsFile::parse(&opt_path, &opt_bytes)?;
    let mut moments = optimizer.to_flat(&layout, &MOMENT_PREFIXES)?;
    let v = moments.pop().expect("two prefixes");
    let m = moments.pop().expect("two prefixes");
    Ok(Checkpoint {
        config,
        tokenizer_json,
        state,
        layout,
        master,
        m,
        v,
    })
}

/// One header entry, as the safetensors format defines it.
#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// A safetensors file whose header has been checked against its own data section.
struct SafetensorsFile<'a> {
    path: &'a Path,
    data: &'a [u8],
    entries: BTreeMap<String, HeaderEntry>,
}

impl<'a> SafetensorsFile<'a> {
    fn parse(path: &'a Path, bytes: &'a [u8]) -> Result<SafetensorsFile<'a>> {
        let fail = |m: String| Err(ckpt_err(path, m));
        let what_to_do = "the file is corrupt or was cut short (interrupted copy?): load an \
                          earlier checkpoint";
        if bytes.len() < 8 {
            return fail(format!(
                "truncated: {} bytes, shorter than the 8-byte header length that starts every \
                 safetensors file; {what_to_do}",
                bytes.len()
            ));
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let available = bytes.len() as u64 - 8;
        if header_len > available {
            return fail(format!(
                "truncated: the header length says {header_len} bytes of header follow, but \
                 the file has only {available} bytes after the length; {what_to_do}"
            ));
        }
        let header_end = 8 + header_len as usize;
        let mut raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..header_end]).map_err(|e| {
                ckpt_err(
                    path,
                    format!("the safetensors header is not a JSON object ({e}); {what_to_do}"),
                )
            })?;
        raw.remove("__metadata__");
        let data = &bytes[header_end..];
        let mut entries = BTreeMap::new();
        for (name, value) in raw {
            let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| {
                ckpt_err(
                    path,
                    format!("tensor {name}: malformed header entry ({e}); {what_to_do}"),
                )
            })?;
            if entry.dtype != "F32" {
                return fail(format!(
                    "tensor {name} has dtype {}, but kiln checkpoints hold F32; convert the file \
                     to F32 (e.g. with the safetensors Python package) or load a checkpoint \
                     written by kiln",
                    entry.dtype
                ));
            }
            let (start, end) = entry.data_offsets;
            if start > end || end > data.len() as u64 {
                return fail(format!(
                    "the header lies about sizes: tensor {name} has data_offsets [{start}, \
                     {end}], beyond the {} bytes of data in the file; {what_to_do}",
                    data.len()
                ));
            }
            let needed = entry
                .shape
                .iter()
                .try_fold(4u64, |acc, &d| acc.checked_mul(d as u64));
            if needed != Some(end - start) {
                return fail(format!(
                    "the header lies about sizes: tensor {name} of shape {:?} needs {} bytes of \
                     F32 but its data_offsets span {} bytes; {what_to_do}",
                    entry.shape,
                    needed.map_or("too many".to_string(), |n| n.to_string()),
                    end - start
                ));
            }
            entries.insert(name, entry);
        }
        // The format's remaining rules (tensors packed back to back, data section fully
        // covered, header size limits) are the crate's to judge.
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
            ckpt_err(
                path,
                format!("not a valid safetensors file: {e}; {what_to_do}"),
            )
        })?;
        Ok(SafetensorsFile {
            path,
            data,
            entries,
        })
    }

    /// One flat buffer per prefix, holding the tensors `<prefix><layout name>`. Every tensor of
    /// the file must be one of them, with the layout's shape and finite values.
    fn to_flat(&self, layout: &ParamLayout, prefixes: &[&str]) -> Result<Vec<Vec<f32>>> {
        let (mut missing, mut reshaped) = (Vec::new(), Vec::new());
        for prefix in prefixes {
            for t in layout.tensors() {
                let name = format!("{prefix}{}", t.name);
                match self.entries.get(&name) {
                    None => missing.push(format!("{name} {:?}", t.shape)),
                    Some(e) if e.shape != t.shape => reshaped.push(format!(
                        "tensor {name} has shape {:?}, the config's layout says {:?}",
                        e.shape, t.shape
                    )),
                    Some(_) => {}
                }
            }
        }
        let extra: Vec<&str> = self
            .entries
            .keys()
            .filter(|name| {
                !prefixes.iter().any(|p| {
                    name.strip_prefix(p)
                        .is_some_and(|rest| layout.get(rest).is_some())
                })
            })
            .map(String::as_str)
            .collect();
        // Each kind is listed on its own, so that a long list of one cannot hide the others.
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing tensors: {}", list(&missing)));
        }
        if !reshaped.is_empty() {
            problems.push(list(&reshaped));
        }
        if !extra.is_empty() {
            problems.push(format!(
                "extra tensors not in the config's layout: {}",
                list(&extra)
            ));
        }
        if !problems.is_empty() {
            return Err(ckpt_err(
                self.path,
                format!(
                    "does not match the model in config.toml: {}; the files come from different \
                     runs or were edited: load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)",
                    problems.join("; ")
                ),
            ));
        }
        prefixes
            .iter()
            .map(|prefix| {
                let mut flat = vec![0.0f32; layout.buffer_len()];
                for t in layout.tensors() {
                    self.fill(&format!("{prefix}{}", t.name), t, &mut flat)?;
                }
                Ok(flat)
            })
            .collect()
    }

    fn fill(&self, name: &str, t: &TensorInfo, flat: &mut [f32]) -> Result<()> {
        let (start, end) = self.entries[name].data_offsets;
        let bytes = &self.data[start as usize..end as usize];
        let dst = &mut flat[t.offset..t.offset + t.len()];
        for (i, (d, b)) in dst.iter_mut().zip(bytes.chunks_exact(4)).enumerate() {
            *d = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            if !d.is_finite() {
                return Err(ckpt_err(
                    self.path,
                    format!(
                        "tensor {name} holds {d} at element {i}; a checkpoint of a diverged \
                         run cannot be resumed: load an earlier checkpoint (--checkpoint RUN/step-N for eval and sample, kiln train --out RUN --resume-from N to train on)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The first few items, then a count of the rest, so that a badly wrong file gives a readable
/// message.
fn list<S: AsRef<str>>(items: &[S]) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<String> = items
        .iter()
        .take(SHOWN)
        .map(|i| i.as_ref().to_string())
        .collect();
    if items.len() > SHOWN {
        s.push(format!("and {} more", items.len() - SHOWN));
    }
    s.join(", ")
}

/// Tensor names and shapes that differ, as `checkpoint vs requested`.
fn shape_differences(ckpt: &ParamLayout, wanted: &ParamLayout) -> Vec<String> {
    let mut out = Vec::new();
    for t in ckpt.tensors() {
        match wanted.get(&t.name) {
            Some(w) if w.shape != t.shape => {
                out.push(format!("{} {:?} vs {:?}", t.name, t.shape, w.shape))
            }
            None => out.push(format!("{} {:?} vs absent", t.name, t.shape)),
            Some(_) => {}
        }
    }
    for w in wanted.tensors() {
        if ckpt.get(&w.name).is_none() {
            out.push(format!("{} absent vs {:?}", w.name, w.shape));
        }
    }
    let names = |l: &ParamLayout| {
        l.tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>()
    };
    if out.is_empty() && names(ckpt) != names(wanted) {
        out.push("the same tensors in a different order".into());
    }
    out
}

/// Checks that `ckpt` can resume a run configured by `config` with parameter layout `layout`:
/// the model settings that change the function or the tensor shapes must match. Training
/// settings (learning rate, batch size, ...) may differ, as they do when fine-tuning.
pub fn check_compatible(ckpt: &Checkpoint, config: &Config, layout: &ParamLayout) -> Result<()> {
    let (a, b) = (&ckpt.config.model, &config.model);
    let mut differences = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            differences.push(format!("model.{name} {x} vs {y}"));
        }
    };
    field("n_layer", a.n_layer.to_string(), b.n_layer.to_string());
    field("n_head", a.n_head.to_string(), b.n_head.to_string());
    field("n_embd", a.n_embd.to_string(), b.n_embd.to_string());
    field(
        "block_size",
        a.block_size.to_string(),
        b.block_size.to_string(),
    );
    field("bias", a.bias.to_string(), b.bias.to_string());
    field("arch", format!("{:?}", a.arch), format!("{:?}", b.arch));
    field("moe", format!("{:?}", a.moe), format!("{:?}", b.moe));
    field(
        "(parts)",
        format!("{:?}", a.parts()),
        format!("{:?}", b.parts()),
    );
    // A vocabulary of 0 means "from the tokenizer"; the token embedding's rows say what it was.
    let vocab = |v: usize, l: &ParamLayout| match v {
        0 => l
            .token_table()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(0),
        v => v,
    };
    field(
        "vocab_size",
        vocab(a.vocab_size, &ckpt.layout).to_string(),
        vocab(b.vocab_size, layout).to_string(),
    );
    let shapes = shape_differences(&ckpt.layout, layout);
    if !shapes.is_empty() {
        differences.push(format!("tensor shapes: {}", list(&shapes)));
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Error::IncompatibleCheckpoint {
            differences: differences.join("; "),
            advice: "Resume with the checkpoint's model settings (see config.toml in its folder), \
                     or start a fresh run with another --out."
                .into(),
        })
    }
}
