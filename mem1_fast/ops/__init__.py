"""The project's ops, one front module each (the registered torch.library op, its backends' registry and protocol, the
reference)."""
from .logprob_entropy import logprob_entropy
from .ppo_loss import ppo_loss
from .state_attention import state_attention

__all__ = ["state_attention", "logprob_entropy", "ppo_loss"]
