//! The parameter layout: every tensor of the model in one table over one flat buffer.
//!
//! The table drives everything that touches parameters as a whole: the one-dispatch AdamW (which
//! tensors decay), checkpoints (names and shapes), the parameter count and per-tensor test
//! comparisons. Gradients, f32 master weights and Adam moments mirror the same offsets.

use super::config::ModelConfig;
use crate::Result;

/// Which part of the model a tensor belongs to (for the parameter report).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Component {
    /// Token and position embeddings.
    Embedding,
    /// Attention projections.
    Attention,
    /// The MLP (dense MLPs, and the routers of routed ones).
    Mlp,
    /// The experts of routed MLPs (of which a token runs top_k of n_experts).
    Experts,
    /// Layer norms.
    Norm,
    /// The output head (zero extra parameters when tied to the token embedding).
    Head,
}

impl Component {
    /// Every component, in report order.
    pub const ALL: [Component; 6] = [
        Component::Embedding,
        Component::Attention,
        Component::Mlp,
        Component::Experts,
        Component::Norm,
        Component::Head,
    ];

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Embedding => "embeddings",
            Component::Attention => "attention",
            Component::Mlp => "mlp",
            Component::Experts => "experts",
            Component::Norm => "norms",
            Component::Head => "head",
        }
    }
}

/// Weight or bias (norm gains count as weights, norm shifts as biases, as in GPT-2's naming).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ParamKind {
    /// A weight matrix, embedding table or norm gain.
    Weight,
    /// A bias vector or norm shift.
    Bias,
}

/// One tensor of the layout.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorInfo {
    /// Name in checkpoints (GPT-2's names: `h.0.attn.c_attn.weight`, ...).
    pub name: String,
    /// Shape, outermost first (linear weights are (out, in)).
    pub shape: Vec<usize>,
    /// Element offset in the flat parameter buffer.
    pub offset: usize,
    /// Whether AdamW's weight decay applies.
    pub decayed: bool,
    /// Weight or bias.
    pub kind: ParamKind,
    /// Part of the model.
    pub component: Component,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ordered table of every parameter tensor.
///
/// The first [`ParamLayout::trainable_count`] tensors are the trainable ones; the rest are
/// frozen (`finetune.freeze`, or every base weight under LoRA) and get no gradient, master copy
/// or moments (see [`crate::finetune::layout`]). A layout with LoRA adapters also carries their
/// scale alpha/rank, which the units read beside the `PREFIX.lora_A.weight` and
/// `PREFIX.lora_B.weight` tensors.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ParamLayout {
    tensors: Vec<TensorInfo>,
    total: usize,
    trainable: usize,
    lora_scale: Option<f32>,
}

impl ParamLayout {
    /// The layout of a GPT-2-style model with `vocab` tokens. Each tensor starts at a multiple of
    /// `align` elements (so per-tensor bindings can meet the adapter's offset alignment); padding
    /// is not counted as parameters. The units of the architecture declare the tensors.
    pub fn gpt(model: &ModelConfig, vocab: usize, align: usize) -> Result<ParamLayout> {
        Ok(super::arch::Arch::new(model, vocab)?.layout(align))
    }

    /// The layout of a run of `config` with `vocab` tokens: the architecture's tensors, ordered
    /// and extended for `[finetune]` freezing and `[lora]` adapters
    /// ([`crate::finetune::layout::adapted`]).
    pub fn for_config(config: &super::Config, vocab: usize, align: usize) -> Result<ParamLayout> {
        crate::finetune::layout::adapted(&config.model, vocab, align, &config.adaptation())
    }

    /// The token embedding (`wte.weight`, `model.embed_tokens.weight`), whose rows are the
    /// vocabulary.
    pub fn token_table(&self) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| {
            t.component == Component::Embedding
                && (t.name == "wte.weight" || t.name == "model.embed_tokens.weight")
        })
    }

    /// How many leading tensors train (all of them unless some are frozen).
    pub fn trainable_count(&self) -> usize {
        self.trainable
    }

    /// Elements of the flat buffer up to the end of the last trainable tensor: the length of
    /// the gradient, master and moment buffers.
    pub fn trainable_len(&self) -> usize {
        self.tensors[..self.trainable]
            .last()
            .map_or(0, |t| t.offset + t.len())
    }

    /// Whether tensor `name` trains.
    pub fn is_trainable(&self, name: &str) -> bool {
        self.tensors[..self.trainable]
            .iter()
            .any(|t| t.name == name)
    }

    /// The trainable tensors alone, at their offsets (the gradient buffer's table).
    pub fn trainable_layout(&self) -> ParamLayout {
        ParamLayout {
            tensors: self.tensors[..self.trainable].to_vec(),
            total: self.trainable_len(),
            trainable: self.trainable,
            lora_scale: self.lora_scale,
        }
    }

    /// Parameters that train and parameters that stay fixed.
    pub fn trainable_and_frozen(&self) -> (usize, usize) {
        let trainable = self.tensors[..self.trainable]
            .iter()
            .map(TensorInfo::len)
            .sum();
        (trainable, self.num_params() - trainable)
    }

    /// alpha/rank of the LoRA adapters, when the layout has them.
    pub fn lora_scale(&self) -> Option<f32> {
        self.lora_scale
    }

    /// The same tensors with only the first `trainable` training and LoRA's scale (the
    /// fine-tuning layout builder's last step).
    pub(crate) fn with_training(mut self, trainable: usize, lora_scale: Option<f32>) -> Self {
        self.trainable = trainable.min(self.tensors.len());
        self.lora_scale = lora_scale;
        self
    }

    /// Every tensor, in buffer order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Elements of the flat buffer, alignment padding included.
    pub fn buffer_len(&self) -> usize {
        self.total
    }

    /// Parameters (padding excluded).
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(TensorInfo::len).sum()
    }

    /// Parameters of one component and kind.
    pub fn count(&self, component: Component, kind: ParamKind) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.component == component && t.kind == kind)
            .map(TensorInfo::len)
            .sum()
    }

    /// Parameters of one kind over the whole model.
    pub fn count_kind(&self, kind: ParamKind) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.kind == kind)
            .map(TensorInfo::len)
            .sum()
    }

    /// The AdamW segment table: every tensor with its decay flag, plus the alignment gaps as
    /// undecayed segments, so that the table tiles the whole buffer as the kernel requires.
    pub fn adamw_segments(&self) -> Vec<crate::training::ParamSegment> {
        use crate::training::ParamSegment;
        let mut out = Vec::new();
        let mut next = 0;
        for t in &self.tensors {
            if t.offset > next {
                out.push(ParamSegment {
                    offset: next,
                    len: t.offset - next,
                    decayed: false,
                });
            }
            out.push(ParamSegment {
                offset: t.offset,
                len: t.len(),
                decayed: t.decayed,
            });
            next = t.offset + t.len();
        }
        if next < self.total {
            out.push(ParamSegment {
                offset: next,
                len: self.total - next,
                decayed: false,
            });
        }
        out
    }

    /// The tensors for which `keep` holds, in the same order, laid out again at multiples of
    /// `align` (an inference model whose quantised matrices live outside the flat buffer).
    /// The result keeps LoRA's scale and has every tensor trainable (inference has no training).
    pub fn filtered(&self, align: usize, keep: impl Fn(&TensorInfo) -> bool) -> ParamLayout {
        let mut b = LayoutBuilder::new(align);
        b.layout.lora_scale = self.lora_scale;
        for t in self.tensors.iter().filter(|t| keep(t)) {
            b.add(
                t.name.clone(),
                t.shape.clone(),
                t.kind,
                t.component,
                t.decayed,
            );
        }
        b.finish()
    }

    /// Bytes of training state resident on the GPU: the working copy of every tensor
    /// (`param_bytes` each: 2 for f16, 4 for f32) and, for the trainable part only, gradients
    /// in the storage precision and f32 master weights, Adam m and Adam v.
    pub fn training_state_bytes(&self, param_bytes: usize) -> usize {
        self.total * param_bytes + self.trainable_len() * (param_bytes + 4 + 4 + 4)
    }
}

/// Collects the tensors the units of an architecture declare, in order, each at the next aligned
/// offset.
#[derive(Debug)]
pub struct LayoutBuilder {
    layout: ParamLayout,
    align: usize,
}

impl LayoutBuilder {
    /// An empty table whose tensors start at multiples of `align` elements.
    pub fn new(align: usize) -> Self {
        LayoutBuilder {
            layout: ParamLayout {
                tensors: Vec::new(),
                total: 0,
                trainable: 0,
                lora_scale: None,
            },
            align: align.max(1),
        }
    }

    /// Appends a tensor.
    pub fn add(
        &mut self,
        name: String,
        shape: Vec<usize>,
        kind: ParamKind,
        component: Component,
        decayed: bool,
    ) {
        let l = &mut self.layout;
        let offset = l.total.div_ceil(self.align) * self.align;
        let len: usize = shape.iter().product();
        l.tensors.push(TensorInfo {
            name,
            shape,
            offset,
            decayed,
            kind,
            component,
        });
        l.total = offset + len;
        l.trainable = l.tensors.len();
    }

    /// The finished table.
    pub fn finish(self) -> ParamLayout {
        self.layout
    }
}
