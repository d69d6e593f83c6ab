//! The parameter layout of an adapted model: trainable tensors first, frozen ones after.
//!
//! AdamW updates the working copy at the offsets of the master weights, so the trainable
//! tensors must sit where the master buffer does. Putting them first lets the gradient, master
//! and moment buffers cover only the leading `trainable_len()` elements of the flat buffer: a
//! frozen tensor costs its working copy and nothing else. Without freezing or adapters the order
//! (and so every offset) is the plain architecture's, which keeps plain runs bit-identical.
//!
//! With LoRA, the adapters `PREFIX.lora_A.weight` (rank × fan_in) and `PREFIX.lora_B.weight`
//! (fan_out × rank) of every adapted layer come first, in block order, then every base tensor,
//! all frozen.

use super::{Adaptation, freeze};
use crate::model::arch::Arch;
use crate::model::layout::LayoutBuilder;
use crate::model::{ModelConfig, ParamKind, ParamLayout};
use crate::{Error, Result};

/// Name of an adapter tensor of the linear layer `prefix` (`which` is `A` or `B`).
pub fn lora_name(prefix: &str, which: char) -> String {
    format!("{prefix}.lora_{which}.weight")
}

/// The layout of `model` over `vocab` tokens adapted by `adapt`, each tensor at a multiple of
/// `align` elements. Errors for bad LoRA settings or a freeze pattern that matches nothing, and
/// when nothing would train.
pub fn adapted(
    model: &ModelConfig,
    vocab: usize,
    align: usize,
    adapt: &Adaptation,
) -> Result<ParamLayout> {
    let arch = Arch::new(model, vocab)?;
    if adapt.is_none() {
        return Ok(arch.layout(align));
    }
    let base = arch.layout(1);
    let tied = model.parts().tie_embeddings;
    let mut frozen = freeze::frozen_flags(&adapt.freeze, base.tensors(), model.n_layer, tied)?;
    let mut b = LayoutBuilder::new(align);
    let mut adapters = 0;
    if let Some(lora) = &adapt.lora {
        lora.validate(model)?;
        for (target, prefix, fan_in, fan_out, component) in arch.adaptable_linears() {
            if !lora.targets.contains(&target) {
                continue;
            }
            let r = lora.rank;
            b.add(
                lora_name(&prefix, 'A'),
                vec![r, fan_in],
                ParamKind::Weight,
                component,
                true,
            );
            b.add(
                lora_name(&prefix, 'B'),
                vec![fan_out, r],
                ParamKind::Weight,
                component,
                true,
            );
            adapters += 2;
        }
        frozen.iter_mut().for_each(|f| *f = true);
    }
    let mut trainable = adapters;
    for want_frozen in [false, true] {
        for (t, &f) in base.tensors().iter().zip(&frozen) {
            if f == want_frozen {
                b.add(
                    t.name.clone(),
                    t.shape.clone(),
                    t.kind,
                    t.component,
                    t.decayed,
                );
                trainable += usize::from(!f);
            }
        }
    }
    if trainable == 0 {
        return Err(Error::invalid(
            "finetune.freeze",
            format!("{:?}", adapt.freeze),
            "freezes every tensor of the model: nothing would train",
        ));
    }
    let scale = adapt.lora.as_ref().map(|l| l.scale());
    Ok(b.finish().with_training(trainable, scale))
}

/// `values` (laid out by `from`) moved to `to`, tensor by tensor by name; tensors of `to` that
/// `from` lacks (fresh adapters) are zero. Shapes must agree.
pub fn move_by_name(values: &[f32], from: &ParamLayout, to: &ParamLayout) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; to.buffer_len()];
    for t in to.tensors() {
        let Some(f) = from.get(&t.name) else { continue };
        if f.shape != t.shape {
            return Err(Error::shape(
                "layout",
                format!(
                    "tensor {} is {:?} in one layout and {:?} in the other",
                    t.name, f.shape, t.shape
                ),
            ));
        }
        out[t.offset..t.offset + t.len()].copy_from_slice(&values[f.offset..f.offset + f.len()]);
    }
    Ok(out)
}
