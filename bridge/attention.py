"""Fused attention for the forwards that feed training: same activations, fewer passes over memory.

TransformerLens computes attention step by step so that every step can be hooked: the scores
(divided by the scale), the causal mask applied with `torch.where`, the softmax, the pattern's
NaN-zeroing, then pattern @ v. On the embedded model those elementwise passes over
(batch, heads, pos, pos) cost more than all of the model's matrix products. When nothing reads
hook_attn_scores or hook_pattern, `torch.nn.functional.scaled_dot_product_attention` gives the
same z in one fused kernel (flash attention on CPU and GPU); hook_q, hook_k, hook_v, hook_rot_q,
hook_rot_k and hook_z still fire, with the same shapes.

`fused_attention(model)` swaps that forward in for the duration of a `with` block, on the
attention modules whose configuration it covers exactly (causal, global, standard / shortformer
/ rotary positions, no soft-cap, sinks, ALiBi, QK-norm, clipping or 4-bit weights). Every call
still falls back to TransformerLens' own forward when a hook sits on the scores or the pattern,
or when the call brings a KV cache, a padding mask or a position bias.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch.nn.functional as F

_COVERED_POSITIONS = ("standard", "shortformer", "rotary")


def covered(module) -> bool:
    """Whether `module` is an attention module whose configuration the fused forward reproduces exactly."""
    from transformer_lens.components import Attention, GroupedQueryAttention
    from transformer_lens.utilities.activation_functions import softcap_enabled

    if type(module) not in (Attention, GroupedQueryAttention):
        return False
    cfg = module.cfg
    return (
        cfg.positional_embedding_type in _COVERED_POSITIONS
        and module.attn_type == "global"
        and (module._attention_dir_override or cfg.attention_dir) == "causal"
        and not softcap_enabled(cfg.attn_scores_soft_cap)
        and not getattr(cfg, "use_attention_sinks", False)
        and not getattr(cfg, "use_logn_attn", False)
        and getattr(cfg, "clip_qkv", None) is None
        and getattr(module, "q_norm", None) is None  # QK-norm, in either of its places
        and not cfg.load_in_4bit
        and not cfg.use_attn_result
    )


def _fused_forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,
                   additive_attention_mask=None, attention_mask=None, position_bias=None):
    """TransformerLens' attention forward for the covered configurations, with fused softmax(qk)v."""
    if (past_kv_cache_entry is not None or additive_attention_mask is not None or attention_mask is not None
            or position_bias is not None or self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()):
        return type(self).forward(self, query_input, key_input, value_input, past_kv_cache_entry,
                                  additive_attention_mask, attention_mask, position_bias)
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)  # hook_q, hook_k, hook_v
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, 0, None))
        k = self.hook_rot_k(self.apply_rotary(k, 0, None))
    # (batch, pos, head, d_head) -> (batch, head, pos, d_head) and back.
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.to(q.dtype).transpose(1, 2), is_causal=True,
        scale=1.0 / self.attn_scale, enable_gqa=k.shape[2] != q.shape[2],
    ).transpose(1, 2)
    z = self.hook_z(z.to(v.dtype))
    w = self.W_O.reshape(-1, self.cfg.d_model).T  # (d_model, head * d_head), as TransformerLens flattens it
    z = z.reshape(z.shape[0], z.shape[1], -1)
    return F.linear(z.to(w.dtype), w.to(z.device), self.b_O.to(z.device))


@contextlib.contextmanager
def fused_attention(model, enabled: bool = True) -> Iterator[int]:
    """Within the block, the covered attention modules of `model` run the fused forward.

    Yields how many modules were switched (0 when `enabled` is false or none is covered). The
    modules get their own forward back on exit, also after an exception.
    """
    switched = []
    if enabled:
        for module in model.modules():
            if "forward" not in vars(module) and covered(module):
                module.forward = types.MethodType(_fused_forward, module)
                switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
