"""Hugging Face ``transformers``: cuparing as an attention implementation, and inputs sharded
for a ring.

``register()`` adds cuparing to ``transformers.AttentionInterface`` (and a matching entry to
``AttentionMaskInterface``, so models build no dense mask for it): then
``model = AutoModelForCausalLM.from_config(config, attn_implementation="cuparing")``, or
``model.set_attn_implementation("cuparing")``, runs every attention layer through
:func:`cuparing.torch.attention` -- exact, differentiable, compilable. ``register(ring=ring)``
makes it :func:`cuparing.torch.ring_attention` on ``ring``: each rank then runs the model on its
shard of the sequence (:func:`shard_inputs`). No monkeypatching.

Supported: causal and bidirectional layers, GQA, ``scaling``, sliding windows, packed documents
(``cu_seq_lens_q`` as ``DataCollatorWithFlattening`` provides it, batch 1). Refused with a
message: padding masks (pack the sequences instead), attention dropout, soft-capping.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import api

IGNORE_INDEX = -100  # labels Hugging Face losses skip


def register(name: str = "cuparing", ring: Any = None, layout: str = "contiguous") -> str:
    """Register cuparing's attention with ``transformers`` under ``name`` (returned).

    Args:
        name: the ``attn_implementation`` to select it by.
        ring: a :class:`cuparing.Ring` to run ring attention on (each rank holds its shard of
            the sequence, see :func:`shard_inputs`); None: attention on one device.
        layout: the shard layout of the ring (as :func:`cuparing.shard`).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  is_causal=None, **kwargs):  # fmt: skip
        return _attention(module, query, key, value, attention_mask, scaling, dropout, is_causal,
                          ring, layout, kwargs)  # fmt: skip

    AttentionInterface.register(name, attention)
    # no dense mask: None when every token is real (the mask's pattern comes from the module)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def _attention(module, query, key, value, attention_mask, scaling, dropout, is_causal, ring,
               layout, kwargs):  # fmt: skip
    import cuparing.torch as crt

    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "cuparing attention takes no padding mask: pack the sequences instead (one row, "
            "documents marked by cu_seq_lens_q, e.g. transformers' DataCollatorWithFlattening)"
        )
    if dropout and module.training:
        raise ValueError(f"cuparing attention has no dropout, got dropout={dropout}")
    if kwargs.get("softcap") is not None:
        raise ValueError("cuparing attention does not soft-cap logits (softcap)")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = None
    sliding = kwargs.get("sliding_window")
    if sliding is not None:  # HF: a query sees the `sliding_window` latest keys, itself included
        window = (int(sliding) - 1, 0 if causal else int(sliding) - 1)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        cu_seqlens = [int(x) for x in cu_seqlens.tolist()]
    # transformers passes [B, H, S, D]; cuparing takes [B, S, H, D] (a view, no copy)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    opts = {"causal": causal, "scale": scaling, "window": window, "cu_seqlens": cu_seqlens}
    if ring is None:
        out = crt.attention(q, k, v, **opts)
    else:
        out = crt.ring_attention(q, k, v, ring, layout=layout, **opts)
    return out, None


def shard_inputs(inputs: dict, rank: int, world_size: int, layout: str = "contiguous",
                 cu_seqlens: Any = None) -> dict:  # fmt: skip
    """This rank's share of a batch of ``[B, S]`` model inputs, for a model registered with a
    ring.

    ``input_ids``, ``attention_mask``, ``position_ids`` and the like are sharded along the
    sequence; ``position_ids`` are made (0..S-1) when absent, so rotary embeddings see global
    positions. ``labels`` become ``shift_labels`` (labels moved one token left over the whole
    sequence, the last one ignored), since a shard cannot shift across its boundary: pass them to
    the loss (``model(**inputs)`` does, as transformers' context-parallel training expects).
    Padding rows of shards (packed documents, or lengths the layout does not divide) get
    ``labels`` ignored and ``position_ids`` 0.
    """
    import torch

    inputs = dict(inputs)
    reference = inputs["input_ids"]
    batch, seqlen = reference.shape
    if "position_ids" not in inputs:
        inputs["position_ids"] = torch.arange(seqlen, device=reference.device).expand(batch, -1)
    labels = inputs.pop("labels", None)
    if labels is not None:
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        inputs["shift_labels"] = shifted
    rows = api.token_positions(seqlen, rank, world_size, layout=layout, cu_seqlens=cu_seqlens)
    padding = torch.as_tensor(np.asarray(rows) < 0, device=reference.device)
    out = {}
    for name, x in inputs.items():
        part = api.shard(x, rank, world_size, layout=layout, cu_seqlens=cu_seqlens)
        if name == "shift_labels":
            part = part.masked_fill(padding, IGNORE_INDEX)
        out[name] = part
    return out
