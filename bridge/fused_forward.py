"""A fused forward for the model runs that feed training: the same activations, less work.

TransformerLens writes its forward so that every step can be hooked. The forwards that only
collect activations can skip several of its costs; on the embedded model those costs took more
time than all of the model's matrix products:

- **Attention.** TransformerLens takes the scores (divided by the scale), applies the causal
  mask with `torch.where`, takes the softmax, zeroes the pattern's NaNs, then computes
  pattern @ v: several elementwise passes over (batch, heads, pos, pos). When nothing reads
  hook_attn_scores or hook_pattern, `torch.nn.functional.scaled_dot_product_attention` gives
  the same z in one fused kernel (flash attention on CPU and GPU).
- **One LayerNorm and one product for q, k and v.** A block normalises its input three times,
  once for each of q, k and v, and projects each with a separate product. The fused block
  normalises once and projects q, k and v with one product against the stacked weights.
- **Matrix products.** On CPU in float32, the products go to oneDNN
  (`torch.ops.mkldnn._linear_pointwise`) rather than MKL through `torch.addmm`, which measured
  faster at the model's shapes (bench/RESULTS.md). When nothing reads hook_pre, the MLP's
  activation (GELU, either form, or ReLU) runs inside its first product as a oneDNN post-op
  instead of as a separate pass over (batch, pos, d_mlp).
- **LayerNorm.** TransformerLens' LayerNorm and LayerNormPre take a pass over the activations
  for each of mean, subtract, square, mean, add, sqrt, divide (and scale and shift); when nothing
  reads hook_scale or hook_normalized, `torch.nn.functional.layer_norm` computes the same in one.

hook_q, hook_k, hook_v, hook_rot_q, hook_rot_k, hook_z, hook_post and every block-level hook
(resid_pre/mid/post, attn_out, mlp_out) still fire, with the same shapes. The results
equal TransformerLens' within float rounding (1e-5 in the tests). The one difference is
summation order: oneDNN and MKL add up a dot product in different orders.

`fused_forward(model)` swaps these forwards in for the duration of a `with` block:

- only on the modules whose configuration is covered exactly (see `covered`);
- each call still falls back to TransformerLens' own forward when something needs the steps
  it skips: a hook on the scores or the pattern, a hook inside the block's first LayerNorm,
  a KV cache, a padding mask or a position bias, or gradients (oneDNN's product has none); a
  hook on hook_pre (the activation's input) or inside a LayerNorm; a LayerNorm under autocast or
  in a precision other than the model's float32 / float64.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_COVERED_POSITIONS = ("standard", "shortformer", "rotary")


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_available()


# TransformerLens' activation names whose function oneDNN applies as a post-op of a product, as
# (post-op, algorithm). "gelu" is F.gelu (erf); "gelu_new" is GPT-2's tanh form, the same formula as
# F.gelu(approximate="tanh") (transformer_lens/utilities/activation_functions.py).
_POST_OPS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
             "relu": ("relu", "")}


def _on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` (weight: (out, in)), through oneDNN for float32 CPU inference."""
    if x.device != weight.device:
        weight = weight.to(x.device)
    if bias is not None and bias.device != x.device:
        bias = bias.to(x.device)
    if _on_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------- what is covered
def covered(module) -> bool:
    """Whether `module` is a module whose configuration a fused forward reproduces exactly."""
    from transformer_lens.components import (
        MLP,
        Attention,
        GroupedQueryAttention,
        LayerNorm,
        LayerNormPre,
        TransformerBlock,
    )

    kind = type(module)
    if kind in (LayerNorm, LayerNormPre):
        return True
    if kind in (Attention, GroupedQueryAttention):
        return _attention_covered(module)
    if kind is MLP:
        return not getattr(module.cfg, "load_in_4bit", False)
    if kind is TransformerBlock:
        return _block_covered(module)
    return False


def _attention_covered(module) -> bool:
    from transformer_lens.utilities.activation_functions import softcap_enabled

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


def _block_covered(module) -> bool:
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = module.cfg
    return (
        not cfg.use_attn_in
        and not cfg.use_split_qkv_input
        and cfg.original_architecture not in POST_NORM_ARCHITECTURES
    )


def _has_hooks(module) -> bool:
    from transformer_lens.hook_points import HookPoint

    return any(isinstance(m, HookPoint) and m.has_hooks() for m in module.modules())


# ---------------------------------------------------------------------- the forwards
def _qkv(self, query_input, key_input, value_input):
    """q, k, v as TransformerLens' calculate_qkv_matrices computes them; one product when the
    three inputs are one tensor (the fused block passes them so)."""
    if not (query_input is key_input is value_input) or query_input.ndim != 3:
        return self.calculate_qkv_matrices(query_input, key_input, value_input)
    grouped = hasattr(self, "_W_K") and not self.cfg.ungroup_grouped_query_attention
    weights = (self.W_Q, self._W_K, self._W_V) if grouped else (self.W_Q, self.W_K, self.W_V)
    biases = (self.b_Q, self._b_K, self._b_V) if grouped else (self.b_Q, self.b_K, self.b_V)
    heads = [w.shape[0] for w in weights]
    d_head = weights[0].shape[-1]
    # (heads, d_model, d_head) -> (heads * d_head, d_model), as TransformerLens flattens them
    weight = torch.cat([w.transpose(1, 2).reshape(-1, w.shape[1]) for w in weights])
    bias = torch.cat([b.reshape(-1) for b in biases])
    out = linear(query_input, weight, bias)
    out = out.view(*out.shape[:-1], sum(heads), d_head)
    q, k, v = out.split(heads, dim=-2)
    return self.hook_q(q), self.hook_k(k), self.hook_v(v)


def _attention_forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,
                       additive_attention_mask=None, attention_mask=None, position_bias=None):
    """TransformerLens' attention forward for the covered configurations, with fused softmax(qk)v."""
    if (past_kv_cache_entry is not None or additive_attention_mask is not None or attention_mask is not None
            or position_bias is not None or self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()):
        return type(self).forward(self, query_input, key_input, value_input, past_kv_cache_entry,
                                  additive_attention_mask, attention_mask, position_bias)
    q, k, v = _qkv(self, query_input, key_input, value_input)  # hook_q, hook_k, hook_v
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
    return linear(z.to(w.dtype), w, self.b_O)


def _mlp_forward(self, x):
    """TransformerLens' MLP forward (x @ W_in + b_in, activation, @ W_out + b_out) on `linear`; the
    activation inside the first product where oneDNN has it and nothing reads hook_pre."""
    post_op = _POST_OPS.get(self.cfg.act_fn)
    if post_op is not None and not self.hook_pre.has_hooks() and _on_onednn(x, self.W_in):
        post_act = torch.ops.mkldnn._linear_pointwise(x, self.W_in.T, self.b_in, post_op[0], [], post_op[1])
        return linear(self.hook_post(post_act), self.W_out.T, self.b_out)
    pre_act = self.hook_pre(linear(x, self.W_in.T, self.b_in))
    if self.cfg.is_layer_norm_activation() and self.hook_mid is not None and self.ln is not None:
        post_act = self.hook_post(self.ln(self.hook_mid(self.act_fn(pre_act))))
    else:
        post_act = self.hook_post(self.act_fn(pre_act))
    return linear(post_act, self.W_out.T, self.b_out)


def _block_forward(self, resid_pre, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None):
    """TransformerLens' pre-norm block forward, normalising the attention input once, not three times."""
    if _has_hooks(self.ln1):  # those hooks expect three calls
        return type(self).forward(self, resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
    resid_pre = self.hook_resid_pre(resid_pre)
    normalized = self.ln1(resid_pre)
    query_key = normalized if shortformer_pos_embed is None else normalized + shortformer_pos_embed
    attn_out = self.attn(query_input=query_key, key_input=query_key, value_input=normalized,
                         past_kv_cache_entry=past_kv_cache_entry, attention_mask=attention_mask)
    if self.cfg.use_normalization_before_and_after:
        attn_out = self.ln1_post(attn_out)
    attn_out = self.hook_attn_out(attn_out)
    if resid_pre.device != attn_out.device:
        resid_pre = resid_pre.to(attn_out.device)
    if self.cfg.attn_only:
        return self.hook_resid_post(resid_pre + attn_out)
    if self.cfg.parallel_attn_mlp:
        mlp_in = resid_pre if not self.cfg.use_hook_mlp_in else self.hook_mlp_in(resid_pre.clone())
        return self.hook_resid_post(resid_pre + attn_out + self.apply_mlp(self.ln2(mlp_in)))
    resid_mid = self.hook_resid_mid(resid_pre + attn_out)
    mlp_in = resid_mid if not self.cfg.use_hook_mlp_in else self.hook_mlp_in(resid_mid.clone())
    return self.hook_resid_post(resid_mid + self.apply_mlp(self.ln2(mlp_in)))


def _layer_norm_forward(self, x):
    """TransformerLens' LayerNorm / LayerNormPre (x - mean, over sqrt(variance + eps), then w and b
    where the module has them) as one `F.layer_norm`."""
    if (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks() or x.dtype != self.cfg.dtype
            or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type)):
        return type(self).forward(self, x)
    return F.layer_norm(x, x.shape[-1:], getattr(self, "w", None), getattr(self, "b", None), self.eps)


def _forward_for(module):
    from transformer_lens.components import MLP, LayerNorm, LayerNormPre, TransformerBlock

    if isinstance(module, (LayerNorm, LayerNormPre)):
        return _layer_norm_forward
    if isinstance(module, TransformerBlock):
        return _block_forward
    if isinstance(module, MLP):
        return _mlp_forward
    return _attention_forward


@contextlib.contextmanager
def fused_forward(model, enabled: bool = True) -> Iterator[int]:
    """Within the block, the covered modules of `model` (blocks, attention, MLPs) run fused forwards.

    Yields how many modules were switched (0 when `enabled` is false or none is covered). The
    modules get their own forward back on exit, also after an exception.
    """
    switched = []
    if enabled:
        for module in model.modules():
            if "forward" not in vars(module) and covered(module):
                module.forward = types.MethodType(_forward_for(module), module)
                switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
