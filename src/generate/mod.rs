//! Text generation from a trained checkpoint: sampling settings, the logits processors, stop
//! sequences and the generation loop.

pub mod processors;
pub mod sampler;
pub mod stop;

pub use processors::SamplingParams;
pub use sampler::{ContextWindow, Generator};
pub use stop::StopMatcher;
