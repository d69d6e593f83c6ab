//! GGUF export, read back by a reader written here from the format's description (not kiln's
//! writer): header, metadata keys, every tensor's name, `ne` and type; values against the
//! checkpoint (f32 exactly, with Llama's q and k rows in Meta's interleaved order computed here
//! independently; q8_0 blocks within half a quantisation step); refused output paths.

mod common;

use kiln::data::{CharTokenizer, Tokenizer};
use kiln::interop::{GgufType, export_gguf};
use kiln::model::init::gpt2_init;
use kiln::model::{ArchKind, Config, ModelConfig, ParamLayout};
use kiln::train::checkpoint::{self, Checkpoint, TrainingState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fresh(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn checkpoint_of(dir: &Path, model: &ModelConfig) -> (PathBuf, Checkpoint) {
    let tok = Tokenizer::Char(CharTokenizer::from_text("abcdefgh ijklmnop,.\n").unwrap());
    let layout = ParamLayout::gpt(model, tok.vocab_size(), 1).unwrap();
    let mut w = gpt2_init(&layout, model, 11);
    let noise = common::random(w.len(), 3);
    for (x, r) in w.iter_mut().zip(noise) {
        *x += 0.05 * r;
    }
    let n = layout.buffer_len();
    let ck = Checkpoint {
        config: Config {
            model: model.clone(),
            ..Config::default()
        },
        tokenizer_json: tok.to_json().unwrap(),
        state: TrainingState::default(),
        master: w,
        m: vec![0.0; n],
        v: vec![0.0; n],
        layout,
    };
    (checkpoint::save(&dir.join("run"), &ck, 1).unwrap(), ck)
}

/// What the reader found: metadata (as text for comparison), tensors (ne, type, bytes).
struct Gguf {
    meta: BTreeMap<String, String>,
    tensors: BTreeMap<String, (Vec<u64>, u32, Vec<u8>)>,
}

struct Cursor<'a>(&'a [u8], usize);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.0[self.1..self.1 + n];
        self.1 += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    fn value(&mut self, ty: u32) -> String {
        match ty {
            4 => self.u32().to_string(),
            5 => (self.u32() as i32).to_string(),
            6 => f32::from_bits(self.u32()).to_string(),
            7 => (self.take(1)[0] != 0).to_string(),
            8 => self.string(),
            9 => {
                let (sub, n) = (self.u32(), self.u64());
                let items: Vec<String> = (0..n).map(|_| self.value(sub)).collect();
                format!("[{}]", items.join("|"))
            }
            other => panic!("value type {other} not written by kiln"),
        }
    }
}

fn read(path: &Path) -> Gguf {
    let bytes = std::fs::read(path).unwrap();
    let mut c = Cursor(&bytes, 0);
    assert_eq!(c.take(4), b"GGUF");
    assert_eq!(c.u32(), 3, "version");
    let (n_tensors, n_kv) = (c.u64(), c.u64());
    let mut meta = BTreeMap::new();
    for _ in 0..n_kv {
        let k = c.string();
        let ty = c.u32();
        meta.insert(k, c.value(ty));
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string();
        let dims = c.u32();
        let ne: Vec<u64> = (0..dims).map(|_| c.u64()).collect();
        infos.push((name, ne, c.u32(), c.u64()));
    }
    let align: usize = meta["general.alignment"].parse().unwrap();
    let data = c.1.next_multiple_of(align);
    let mut tensors = BTreeMap::new();
    for (name, ne, ty, off) in infos {
        assert_eq!(off as usize % align, 0, "{name} is not aligned");
        let n: u64 = ne.iter().product();
        let len = match ty {
            0 => 4 * n,
            1 => 2 * n,
            8 => n / 32 * 34,
            other => panic!("type {other}"),
        } as usize;
        let start = data + off as usize;
        tensors.insert(name, (ne, ty, bytes[start..start + len].to_vec()));
    }
    Gguf { meta, tensors }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|x| f32::from_le_bytes(x.try_into().unwrap()))
        .collect()
}

fn kiln_tensor<'a>(ck: &'a Checkpoint, name: &str) -> &'a [f32] {
    let t = ck.layout.get(name).unwrap();
    &ck.master[t.offset..t.offset + t.len()]
}

fn llama() -> ModelConfig {
    ModelConfig {
        arch: ArchKind::Llama,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        n_embd: 64,
        block_size: 16,
        mlp_hidden: Some(96),
        rope_theta: Some(2500.0),
        ..ModelConfig::default()
    }
}

#[test]
fn llama_f32_has_llama_cpp_keys_names_and_meta_order() {
    let dir = fresh("llama");
    let (run, ck) = checkpoint_of(&dir, &llama());
    let out = dir.join("m.gguf");
    export_gguf(&run, &out, GgufType::F32).unwrap();
    let g = read(&out);
    for (k, v) in [
        ("general.architecture", "llama"),
        ("llama.context_length", "16"),
        ("llama.embedding_length", "64"),
        ("llama.block_count", "2"),
        ("llama.feed_forward_length", "96"),
        ("llama.attention.head_count", "4"),
        ("llama.attention.head_count_kv", "2"),
        ("llama.rope.dimension_count", "16"),
        ("llama.rope.freq_base", "2500"),
        ("llama.attention.layer_norm_rms_epsilon", "0.00001"),
        ("tokenizer.ggml.model", "gpt2"),
    ] {
        assert_eq!(g.meta.get(k).map(String::as_str), Some(v), "{k}");
    }
    // Spaces and newlines as GPT-2's byte stand-ins.
    assert!(
        g.meta["tokenizer.ggml.tokens"].starts_with("[Ċ|Ġ|,|.|a|b"),
        "{}",
        g.meta["tokenizer.ggml.tokens"]
    );
    let names: Vec<&String> = g.tensors.keys().collect();
    assert_eq!(names.len(), 3 + 2 * 9, "{names:?}");
    let (ne, ty, q) = &g.tensors["blk.1.attn_q.weight"];
    assert_eq!((ne.as_slice(), *ty), (&[64u64, 64][..], 0));
    assert_eq!(g.tensors["blk.0.attn_k.weight"].0, vec![64, 32]);
    assert_eq!(g.tensors["blk.0.ffn_down.weight"].0, vec![96, 64]);
    assert_eq!(
        g.tensors["output.weight"].0,
        vec![64, ck.layout.get("lm_head.weight").unwrap().shape[0] as u64]
    );
    // Meta order: in each head of 16 rows, row 2j + s is kiln's (rotate-half) row s·8 + j.
    let qkv = kiln_tensor(&ck, "model.layers.1.self_attn.qkv_proj.weight");
    let q = f32s(q);
    for h in 0..4 {
        for j in 0..8 {
            for s in 0..2 {
                let (to, from) = (h * 16 + 2 * j + s, h * 16 + s * 8 + j);
                assert_eq!(
                    q[to * 64..(to + 1) * 64],
                    qkv[from * 64..(from + 1) * 64],
                    "head {h} pair {j}"
                );
            }
        }
    }
    // k comes after the 64 q rows; v after the 32 k rows, unpermuted.
    let k = f32s(&g.tensors["blk.1.attn_k.weight"].2);
    assert_eq!(k[64..128], qkv[(64 + 8) * 64..(64 + 9) * 64]);
    let v = f32s(&g.tensors["blk.1.attn_v.weight"].2);
    assert_eq!(v[..], qkv[96 * 64..128 * 64]);
    let gate_up = kiln_tensor(&ck, "model.layers.0.mlp.gate_up_proj.weight");
    assert_eq!(
        f32s(&g.tensors["blk.0.ffn_up.weight"].2)[..],
        gate_up[96 * 64..]
    );
}

#[test]
fn gpt2_q8_0_blocks_and_zero_biases() {
    let dir = fresh("gpt2");
    let m = ModelConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 64,
        block_size: 8,
        mlp_hidden: Some(80),
        ..ModelConfig::default()
    };
    let (run, ck) = checkpoint_of(&dir, &m);
    let out = dir.join("m.gguf");
    export_gguf(&run, &out, GgufType::Q8_0).unwrap();
    let g = read(&out);
    assert_eq!(g.meta["general.architecture"], "gpt2");
    assert_eq!(g.meta["general.file_type"], "7");
    assert_eq!(g.meta["gpt2.attention.layer_norm_epsilon"], "0.00001");
    // No separate head (tied), the position table in f16, vectors in f32, and the biases a
    // model without biases lacks written as zeros.
    assert!(!g.tensors.contains_key("output.weight"));
    assert_eq!(g.tensors["position_embd.weight"].1, 1);
    assert_eq!(g.tensors["blk.0.attn_qkv.bias"].1, 0);
    assert!(
        f32s(&g.tensors["blk.0.ffn_up.bias"].2)
            .iter()
            .all(|&x| x == 0.0)
    );
    // ffn_down's rows are 80 wide: not whole blocks of 32, so f16.
    assert_eq!(g.tensors["blk.0.ffn_down.weight"].1, 1);
    let (ne, ty, bytes) = &g.tensors["blk.0.attn_qkv.weight"];
    assert_eq!((ne.as_slice(), *ty), (&[64u64, 192][..], 8));
    let w = kiln_tensor(&ck, "h.0.attn.c_attn.weight");
    for (b, block) in bytes.chunks_exact(34).enumerate() {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (i, &q) in block[2..].iter().enumerate() {
            let x = w[b * 32 + i];
            let err = (x - d * f32::from(q as i8)).abs();
            assert!(
                err <= d / 2.0 * 1.0001,
                "block {b} element {i}: {x} vs {d}·{}",
                q as i8
            );
        }
    }
}

#[test]
fn bad_output_paths_are_refused_and_nothing_is_left() {
    let dir = fresh("bad");
    let (run, _) = checkpoint_of(&dir, &llama());
    let cases = [
        (dir.join("missing-folder/m.gguf"), "not a folder"),
        (dir.join("run"), "exists"),
    ];
    for (out, needle) in cases {
        let e = export_gguf(&run, &out, GgufType::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    // A model llama.cpp's llama graph cannot run (biases) is refused before writing.
    let mut m = llama();
    m.bias = true;
    let (biased, _) = checkpoint_of(&fresh("bad-bias"), &m);
    let out = dir.join("b.gguf");
    let e = export_gguf(&biased, &out, GgufType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.bias"), "{e}");
    assert!(!out.exists());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}
