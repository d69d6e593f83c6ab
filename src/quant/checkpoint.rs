//! The quantised checkpoint: a folder `kiln sample` and `kiln eval` load like any checkpoint
//! folder, written by `kiln quantize`.
//!
//! | file | contents |
//! | --- | --- |
//! | `model.safetensors` | per quantised matrix `NAME.qweight` (q8: `I8 [rows, cols]`; q4: `U8 [rows, cols/2]`, the bytes of [`crate::quant`]'s layouts) and `NAME.scales` (`F16 [rows, cols/group]`); every other tensor as `F32` under its own name; the settings in the header metadata under `kiln.quantization` |
//! | `config.toml` | the source checkpoint's config |
//! | `tokenizer.json` | the source checkpoint's tokenizer |
//!
//! There is no optimizer state and no training state: a quantised model cannot be trained or
//! resumed, and `kiln train` says so (see [`crate::train::checkpoint::load`]).

use super::convert::quantized_tensors;
use super::{QuantKind, QuantMatrix, QuantSettings};
use crate::model::{Config, ParamLayout};
use crate::train::checkpoint::{
    self as ck, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, canonical_metadata, ckpt_err, io_err,
    read_bytes, read_text, sync_dir, write_synced,
};
use crate::{Error, Result};
use half::f16;
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// Header metadata key holding the settings (JSON).
pub const METADATA_KEY: &str = "kiln.quantization";

/// Version of the quantised format written by this build; [`load`] refuses any other.
pub const FORMAT_VERSION: u32 = 1;

/// What the header says about a quantised model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantHeader {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Type, group size, embeddings.
    pub settings: QuantSettings,
    /// Rows of the token table.
    pub vocab: usize,
    /// The checkpoint folder it was quantised from, as given.
    pub source: String,
}

/// A quantised model in memory.
#[derive(Clone, Debug)]
pub struct QuantizedModel {
    /// The source's config.
    pub config: Config,
    /// The tokenizer JSON, verbatim.
    pub tokenizer_json: String,
    /// Settings, vocabulary and source.
    pub header: QuantHeader,
    /// The tensors kept in float: a dense layout (alignment 1) of the model's tensors minus the
    /// quantised ones.
    pub float_layout: ParamLayout,
    /// Their values, laid out by `float_layout`.
    pub float_values: Vec<f32>,
    /// The quantised matrices by tensor name.
    pub quantized: BTreeMap<String, QuantMatrix>,
}

/// The quantisation header of the checkpoint folder `dir`, reading only the start of its
/// `model.safetensors`; `None` for a float checkpoint or a file too damaged to tell (its own
/// loader then says what is wrong with it).
pub fn header(dir: &Path) -> Option<QuantHeader> {
    use std::io::Read;
    let mut f = fs::File::open(dir.join(MODEL_FILE)).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    // safetensors caps headers at 100 MB; a larger length is damage, not a header.
    let n = u64::from_le_bytes(len).min(100_000_000) as usize;
    let mut text = vec![0u8; n];
    f.read_exact(&mut text).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let meta = value.get("__metadata__")?.get(METADATA_KEY)?.as_str()?;
    serde_json::from_str(meta).ok()
}

/// The error for a quantised checkpoint where a float one is needed (training, quantising).
pub fn not_float(dir: &Path, h: &QuantHeader, doing: &str) -> Error {
    ckpt_err(
        dir,
        format!(
            "is a quantised checkpoint ({} in groups of {}, made by kiln quantize from {}); it \
             can be sampled and evaluated but not {doing}: use the float checkpoint it was made \
             from",
            h.settings.kind, h.settings.group_size, h.source
        ),
    )
}

/// Writes `m` into the new folder `out` (which must not exist or be empty): the files go into a
/// temporary sibling folder first, which is renamed to `out` once complete.
pub fn save(out: &Path, m: &QuantizedModel) -> Result<PathBuf> {
    if out.exists()
        && fs::read_dir(out)
            .map_err(|e| io_err(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::invalid(
            "--out",
            out.display(),
            "exists and is not empty; choose a new folder or delete it",
        ));
    }
    let name = out
        .file_name()
        .map_or("quantized".into(), |n| n.to_string_lossy());
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    let result = (|| {
        write_synced(&tmp.join(MODEL_FILE), &encode(m)?)?;
        let config = toml::to_string_pretty(&m.config).map_err(|e| Error::Config {
            message: format!("cannot write the config as TOML: {e}"),
        })?;
        write_synced(&tmp.join(CONFIG_FILE), config.as_bytes())?;
        write_synced(&tmp.join(TOKENIZER_FILE), m.tokenizer_json.as_bytes())?;
        sync_dir(&tmp)?;
        if out.exists() {
            // Empty (checked above): rename cannot replace a directory on every platform.
            fs::remove_dir(out).map_err(|e| io_err(out, e))?;
        }
        fs::rename(&tmp, out).map_err(|e| io_err(&tmp, e))?;
        sync_dir(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| out.to_path_buf())
}

/// One tensor of the file as bytes.
pub(crate) struct Raw {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The name of a matrix's packed integers and of its scales.
fn part_names(name: &str) -> (String, String) {
    (format!("{name}.qweight"), format!("{name}.scales"))
}

/// The dtype and shape of a matrix's packed integers in the file.
fn packed_shape(kind: QuantKind, rows: usize, cols: usize) -> (Dtype, Vec<usize>) {
    match kind {
        QuantKind::Q8 => (Dtype::I8, vec![rows, cols]),
        QuantKind::Q4 => (Dtype::U8, vec![rows, cols / 2]),
    }
}

fn encode(m: &QuantizedModel) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Raw)> = Vec::new();
    for t in m.float_layout.tensors() {
        let values = &m.float_values[t.offset..t.offset + t.len()];
        tensors.push((
            t.name.clone(),
            Raw {
                dtype: Dtype::F32,
                shape: t.shape.clone(),
                bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        ));
    }
    for (name, q) in &m.quantized {
        let (qname, sname) = part_names(name);
        let (dtype, shape) = packed_shape(q.kind(), q.rows(), q.cols());
        tensors.push((
            qname,
            Raw {
                dtype,
                shape,
                bytes: q.packed().iter().flat_map(|w| w.to_le_bytes()).collect(),
            },
        ));
        tensors.push((
            sname,
            Raw {
                dtype: Dtype::F16,
                shape: vec![q.rows(), q.groups_per_row()],
                bytes: q.scales().iter().flat_map(|s| s.to_le_bytes()).collect(),
            },
        ));
    }
    let header = serde_json::to_string(&m.header).map_err(|e| {
        Error::invalid(
            "quantisation header",
            format!("{:?}", m.header),
            format!("cannot be encoded: {e}"),
        )
    })?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("producer".to_string(), "kiln".to_string()),
        (METADATA_KEY.to_string(), header),
    ]);
    let views = tensors.iter().map(|(n, r)| (n.clone(), r));
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Invalid {
        key: "quantised tensors".into(),
        value: format!("{} tensors", tensors.len()),
        rule: format!("safetensors refused them: {e}"),
    })?;
    canonical_metadata(bytes)
}

/// Loads and checks the quantised checkpoint folder `dir`: the header, every expected tensor
/// present with its dtype and shape (the packed integers and the scales of each quantised
/// matrix, the float tensors), no others, finite values.
pub fn load(dir: &Path) -> Result<QuantizedModel> {
    let config = ck::read_config(dir)?;
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer_json = read_text(&tokenizer_path)?;
    crate::data::Tokenizer::from_json(&tokenizer_json).map_err(|e| {
        ckpt_err(
            &tokenizer_path,
            format!("is not a tokenizer kiln can use ({e}); quantise the checkpoint again"),
        )
    })?;
    let path = dir.join(MODEL_FILE);
    let again = "quantise the float checkpoint again with kiln quantize";
    let bytes = read_bytes(&path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ckpt_err(&path, format!("not a valid safetensors file: {e}; {again}")))?;
    let header = header(dir).ok_or_else(|| {
        ckpt_err(
            &path,
            format!("has no readable {METADATA_KEY} header: not a quantised checkpoint; {again}"),
        )
    })?;
    if header.version != FORMAT_VERSION {
        return Err(ckpt_err(
            &path,
            format!(
                "quantised format version {}, but this kiln reads version {FORMAT_VERSION}",
                header.version
            ),
        ));
    }
    let s = header.settings;
    let s = QuantSettings::new(s.kind, s.group_size, Some(s.embeddings))
        .map_err(|e| ckpt_err(&path, format!("its header is damaged ({e}); {again}")))?;
    let vocab = header.vocab;
    if config.model.vocab_size != 0 && config.model.vocab_size != vocab {
        return Err(ckpt_err(
            &path,
            format!(
                "the header's vocabulary ({vocab}) is not config.toml's model.vocab_size ({}); \
                 the files come from different models: {again}",
                config.model.vocab_size
            ),
        ));
    }
    let full = ParamLayout::gpt(&config.model, vocab, 1)
        .map_err(|e| ckpt_err(&path, format!("no parameter layout fits it: {e}")))?;
    let names = quantized_tensors(&config.model, vocab, s.embeddings)?;
    let float_layout = full.filtered(1, |t| !names.contains(&t.name));
    let reader = Reader {
        path: &path,
        st: &st,
    };
    let mut expected: Vec<String> = float_layout
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let mut quantized = BTreeMap::new();
    for name in &names {
        let t = full
            .get(name)
            .expect("quantised tensors are layout tensors");
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let (qname, sname) = part_names(name);
        let (dtype, shape) = packed_shape(s.kind, rows, cols);
        let packed = reader.bytes(&qname, dtype, &shape)?;
        let scales = reader.bytes(&sname, Dtype::F16, &[rows, cols / s.group_size])?;
        let packed = packed
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let scales = scales
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes(b.try_into().expect("2 bytes")))
            .collect();
        let m = QuantMatrix::new(name, s.kind, s.group_size, rows, cols, packed, scales)
            .map_err(|e| ckpt_err(&path, format!("{e}; {again}")))?;
        quantized.insert(name.clone(), m);
        expected.extend([qname, sname]);
    }
    let mut float_values = vec![0.0f32; float_layout.buffer_len()];
    for t in float_layout.tensors() {
        let b = reader.bytes(&t.name, Dtype::F32, &t.shape)?;
        for (i, (d, b)) in float_values[t.offset..t.offset + t.len()]
            .iter_mut()
            .zip(b.chunks_exact(4))
            .enumerate()
        {
            *d = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            if !d.is_finite() {
                return Err(ckpt_err(
                    &path,
                    format!("tensor {} holds {d} at element {i}; {again}", t.name),
                ));
            }
        }
    }
    let extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !expected.iter().any(|e| e == n))
        .map(String::from)
        .collect();
    if !extra.is_empty() {
        return Err(ckpt_err(
            &path,
            format!(
                "extra tensors not in a {} model with embeddings {}: {}; {again}",
                s.kind,
                if s.embeddings {
                    "quantised"
                } else {
                    "in float"
                },
                extra.join(", ")
            ),
        ));
    }
    Ok(QuantizedModel {
        config,
        tokenizer_json,
        header: QuantHeader {
            settings: s,
            ..header
        },
        float_layout,
        float_values,
        quantized,
    })
}

/// Typed access to the tensors of a parsed file, with errors naming the file and the tensor.
struct Reader<'a> {
    path: &'a Path,
    st: &'a safetensors::SafeTensors<'a>,
}

impl<'a> Reader<'a> {
    /// The bytes of tensor `name`, which must exist with `dtype` and `shape`.
    fn bytes(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&'a [u8]> {
        let again = "quantise the float checkpoint again with kiln quantize";
        let t = self.st.tensor(name).map_err(|_| {
            ckpt_err(
                self.path,
                format!("tensor {name} ({dtype:?} {shape:?}) is missing; {again}"),
            )
        })?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(ckpt_err(
                self.path,
                format!(
                    "tensor {name} is {:?} {:?}, but this model's settings need {dtype:?} \
                     {shape:?} (a packed tensor of the wrong length, or the wrong type); {again}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        Ok(t.data())
    }
}
