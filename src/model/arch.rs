//! An architecture: the list of units ([`super::units`]) a model is, built from its config. The
//! parameter layout, the GPU training step, the CPU reference step and the KV-cache decoder all
//! walk this one list.

use super::layout::{LayoutBuilder, ParamLayout};
use super::units::attention::Attention;
use super::units::embedding::Embedding;
use super::units::head::Head;
use super::units::mlp::Mlp;
use super::units::moe::Moe;
use super::units::norm::{FinalNormCpu, FinalNormGpu, Norm};
use super::units::residual::{Body, Residual};
use super::units::{CpuBackward, CpuCtx, DecodeCtx, GpuBackward, GpuCtx, Ops};
use super::{ArchKind, ModelConfig, PositionKind};
use crate::gpu::GpuTensor;
use crate::ops::AttendOneShape;
use crate::{Error, Result};

/// The CPU backward states of every unit, in forward order.
pub(crate) type CpuStates = Vec<Box<dyn CpuBackward>>;

/// One unit of an architecture, in forward order.
#[derive(Clone, Debug)]
pub(crate) enum Unit {
    /// Token ids to the residual stream.
    Embedding(Embedding),
    /// `x + body(norm(x))`.
    Residual(Residual),
    /// The norm before the head.
    FinalNorm(Norm),
    /// The residual stream to logits.
    Head(Head),
}

/// The units of a model (see the module docs).
#[derive(Clone, Debug)]
pub(crate) struct Arch {
    pub units: Vec<Unit>,
}

impl Arch {
    /// The units of `model` (its parts: [`ModelConfig::parts`]) over `vocab` tokens. Tensor
    /// names follow the architecture: GPT-2's (`h.0.attn.c_attn.weight`) or Hugging Face
    /// Llama's (`model.layers.0.self_attn.o_proj.weight`, with q|k|v and gate|up fused by rows
    /// as `qkv_proj` and `gate_up_proj`).
    ///
    /// GPT-2: learned positions, pre-norm blocks of layer norm + attention and layer norm + GELU
    /// MLP (4× wide), a final layer norm, the head tied to the token embedding. Llama: RoPE,
    /// RMSNorm, SwiGLU MLP, grouped-query attention, a separate head.
    pub fn new(model: &ModelConfig, vocab: usize) -> Result<Arch> {
        if vocab == 0 {
            return Err(Error::invalid("model.vocab_size", 0, "must be at least 1"));
        }
        // A config built in code has not been through Config::validate: no division by zero
        // heads below.
        model.validate_parts()?;
        let parts = model.parts();
        let n = names(model.arch);
        let c = model.n_embd;
        let norm = |prefix: String| Norm {
            prefix,
            kind: parts.norm,
            eps: parts.norm_eps,
            channels: c,
            bias: model.bias,
        };
        let learned = parts.positions == PositionKind::Learned;
        let mut units = vec![Unit::Embedding(Embedding {
            tokens: n.tokens.into(),
            table: learned.then(|| n.positions.into()),
            vocab,
            channels: c,
            positions: model.block_size,
            decay_positions: model.decay_position_embedding,
        })];
        for l in 0..model.n_layer {
            let p = |s: &str| format!("{}.{l}.{s}", n.layers);
            // Dropout sites of layer l: attention probabilities, attention branch, MLP branch.
            let site = 3 * l as u32;
            units.push(Unit::Residual(Residual {
                norm: norm(p(n.norm_1)),
                body: Body::Attention(Attention {
                    layer: l,
                    qkv_prefix: p(n.qkv),
                    proj_prefix: p(n.attn_proj),
                    channels: c,
                    heads: model.n_head,
                    kv_heads: parts.n_kv_head,
                    bias: model.bias,
                    rope_theta: (!learned).then_some(parts.rope_theta),
                    dropout_site: site,
                    kernel: model.attention_kernel,
                }),
                dropout_site: site + 1,
                out_name: p("resid"),
            }));
            let body = match &model.moe {
                Some(moe) if moe.routes_layer(l) => Body::Moe(Moe {
                    layer: l,
                    kind: parts.mlp,
                    router_prefix: p(n.router),
                    fc_prefix: p(n.expert_fc),
                    proj_prefix: p(n.expert_proj),
                    channels: c,
                    hidden: parts.mlp_hidden,
                    config: moe.clone(),
                }),
                _ => Body::Mlp(Mlp {
                    layer: l,
                    kind: parts.mlp,
                    fc_prefix: p(n.fc),
                    proj_prefix: p(n.mlp_proj),
                    channels: c,
                    hidden: parts.mlp_hidden,
                    bias: model.bias,
                }),
            };
            units.push(Unit::Residual(Residual {
                norm: norm(p(n.norm_2)),
                body,
                dropout_site: site + 2,
                out_name: p("out"),
            }));
        }
        units.push(Unit::FinalNorm(norm(n.final_norm.into())));
        let tied = parts.tie_embeddings;
        units.push(Unit::Head(Head {
            prefix: if tied {
                n.tokens.trim_end_matches(".weight")
            } else {
                n.head
            }
            .into(),
            tied,
            channels: c,
            vocab,
        }));
        Ok(Arch { units })
    }

    /// The linear layers LoRA can adapt, in unit order: (target, weight prefix, fan_in,
    /// fan_out, component).
    pub fn adaptable_linears(
        &self,
    ) -> Vec<(
        crate::finetune::LoraTarget,
        String,
        usize,
        usize,
        super::Component,
    )> {
        use super::Component as C;
        use crate::finetune::LoraTarget as T;
        let mut out = Vec::new();
        for u in &self.units {
            let Unit::Residual(r) = u else { continue };
            match &r.body {
                Body::Attention(a) => {
                    let c = a.channels;
                    out.push((
                        T::AttnQkv,
                        a.qkv_prefix.clone(),
                        c,
                        a.qkv_width(),
                        C::Attention,
                    ));
                    out.push((T::AttnProj, a.proj_prefix.clone(), c, c, C::Attention));
                }
                Body::Mlp(m) => {
                    let (c, h) = (m.channels, m.hidden);
                    out.push((T::MlpFc, m.fc_prefix.clone(), c, m.fc_width(), C::Mlp));
                    out.push((T::MlpProj, m.proj_prefix.clone(), h, c, C::Mlp));
                }
                // A routed layer's experts are one batched tensor per projection, which the
                // LoRA hook (one adapter per linear layer) does not cover: not adaptable.
                Body::Moe(_) => {}
            }
        }
        out
    }

    /// The parameter table: every unit's tensors in unit order.
    pub fn layout(&self, align: usize) -> ParamLayout {
        let mut l = LayoutBuilder::new(align);
        for u in &self.units {
            match u {
                Unit::Embedding(e) => e.declare(&mut l),
                Unit::Residual(r) => r.declare(&mut l),
                Unit::FinalNorm(n) => n.declare(&mut l),
                Unit::Head(h) => h.declare(&mut l),
            }
        }
        l.finish()
    }

    /// Records the forward of every unit into `ops`; returns the backward states (in forward
    /// order) and the logits.
    pub fn gpu_forward(
        &self,
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
    ) -> Result<(Vec<Box<dyn GpuBackward>>, GpuTensor)> {
        let mut states = Vec::with_capacity(self.units.len());
        let mut x: Option<GpuTensor> = None;
        for u in &self.units {
            let (state, y) = match (u, x.as_ref()) {
                (Unit::Embedding(e), None) => e.forward(ctx, ops)?,
                (Unit::Residual(r), Some(x)) => r.forward(ctx, ops, x)?,
                (Unit::FinalNorm(n), Some(x)) => {
                    let s = n.forward(ctx, ops, x)?;
                    let y = super::units::alias(&s.out)?;
                    (Box::new(FinalNormGpu(s)) as Box<dyn GpuBackward>, y)
                }
                (Unit::Head(h), Some(x)) => h.forward(ctx, ops, x)?,
                _ => return Err(misplaced()),
            };
            states.push(state);
            x = Some(y);
        }
        Ok((states, x.ok_or_else(misplaced)?))
    }

    /// Records the backward of every unit, last first, from `dlogits`.
    pub fn gpu_backward(
        states: &[Box<dyn GpuBackward>],
        ctx: &mut GpuCtx<'_>,
        ops: &mut Ops,
        dlogits: &GpuTensor,
    ) -> Result<()> {
        let mut dy = super::units::alias(dlogits)?;
        for s in states.iter().rev() {
            match s.backward(ctx, ops, &dy)? {
                Some(dx) => dy = dx,
                None => break,
            }
        }
        Ok(())
    }

    /// CPU forward to the logits; returns the backward states too.
    pub fn cpu_forward(&self, c: &CpuCtx<'_>) -> Result<(CpuStates, Vec<f32>)> {
        let mut states = Vec::with_capacity(self.units.len());
        let mut x: Option<Vec<f32>> = None;
        for u in &self.units {
            let (state, y) = match (u, x.take()) {
                (Unit::Embedding(e), None) => e.cpu_forward(c)?,
                (Unit::Residual(r), Some(x)) => r.cpu_forward(c, x)?,
                (Unit::FinalNorm(n), Some(x)) => {
                    let (y, s) = n.cpu_forward(c, x)?;
                    (Box::new(FinalNormCpu(s)) as Box<dyn CpuBackward>, y)
                }
                (Unit::Head(h), Some(x)) => h.cpu_forward(c, x)?,
                _ => return Err(misplaced()),
            };
            states.push(state);
            x = Some(y);
        }
        Ok((states, x.ok_or_else(misplaced)?))
    }

    /// CPU backward of every unit, last first, adding parameter gradients into `g`.
    pub fn cpu_backward(
        states: Vec<Box<dyn CpuBackward>>,
        c: &CpuCtx<'_>,
        g: &mut [f32],
        dlogits: Vec<f32>,
    ) -> Result<()> {
        let mut dy = dlogits;
        for s in states.into_iter().rev() {
            match s.backward(c, g, dy)? {
                Some(dx) => dy = dx,
                None => break,
            }
        }
        Ok(())
    }

    /// The decode step's attention shape of every attention unit, over a cache of `positions`
    /// rows.
    pub fn decode_attention_shapes(&self, positions: usize) -> Vec<AttendOneShape> {
        self.units
            .iter()
            .filter_map(|u| match u {
                Unit::Residual(Residual {
                    body: Body::Attention(a),
                    ..
                }) => Some(a.decode_shape(positions)),
                _ => None,
            })
            .collect()
    }

    /// The one-token decode plan: every unit's one-row forward, in order; returns the logits.
    pub fn decode(&self, d: &mut DecodeCtx<'_>, ops: &mut Ops) -> Result<GpuTensor> {
        let mut x: Option<GpuTensor> = None;
        for u in &self.units {
            let y = match (u, x.as_ref()) {
                (Unit::Embedding(e), None) => e.decode(d, ops)?,
                (Unit::Residual(r), Some(x)) => r.decode(d, ops, x)?,
                (Unit::FinalNorm(n), Some(x)) => n.decode(d, ops, x)?,
                (Unit::Head(h), Some(x)) => h.decode(d, ops, x)?,
                _ => return Err(misplaced()),
            };
            x = Some(y);
        }
        x.ok_or_else(misplaced)
    }
}

/// Tensor names of an architecture's checkpoints.
struct Names {
    tokens: &'static str,
    positions: &'static str,
    layers: &'static str,
    norm_1: &'static str,
    qkv: &'static str,
    attn_proj: &'static str,
    norm_2: &'static str,
    fc: &'static str,
    mlp_proj: &'static str,
    router: &'static str,
    expert_fc: &'static str,
    expert_proj: &'static str,
    final_norm: &'static str,
    head: &'static str,
}

fn names(arch: ArchKind) -> Names {
    match arch {
        ArchKind::Gpt2 => Names {
            tokens: "wte.weight",
            positions: "wpe.weight",
            layers: "h",
            norm_1: "ln_1",
            qkv: "attn.c_attn",
            attn_proj: "attn.c_proj",
            norm_2: "ln_2",
            fc: "mlp.c_fc",
            mlp_proj: "mlp.c_proj",
            router: "mlp.router",
            expert_fc: "mlp.experts.c_fc",
            expert_proj: "mlp.experts.c_proj",
            final_norm: "ln_f",
            head: "lm_head",
        },
        ArchKind::Llama => Names {
            tokens: "model.embed_tokens.weight",
            positions: "model.embed_positions.weight",
            layers: "model.layers",
            norm_1: "input_layernorm",
            qkv: "self_attn.qkv_proj",
            attn_proj: "self_attn.o_proj",
            norm_2: "post_attention_layernorm",
            fc: "mlp.gate_up_proj",
            mlp_proj: "mlp.down_proj",
            // Mixtral's names (`block_sparse_moe.gate`, `experts.N.w1/w3/w2`), with every
            // expert's matrix stacked in one tensor and gate|up fused as elsewhere.
            router: "block_sparse_moe.gate",
            expert_fc: "block_sparse_moe.experts.gate_up_proj",
            expert_proj: "block_sparse_moe.experts.down_proj",
            final_norm: "model.norm",
            head: "lm_head",
        },
    }
}

/// An architecture must start with its embedding and have it only there.
fn misplaced() -> Error {
    Error::shape(
        "architecture",
        "the embedding must be the first unit, and only the first",
    )
}
