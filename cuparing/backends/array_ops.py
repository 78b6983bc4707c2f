"""Block attention written once over an array namespace (NumPy on the CPU, CuPy on the GPU).

One *block* is one query shard against one key/value shard, each with its global positions.
Everything here accumulates in float32 (float64 for float64 inputs) whatever the input dtype,
and tiles over keys so memory is O(queries x tile), never a dense S x S matrix.

Shapes (flash-attn convention, shape letters used throughout):
    q, out, dout:  [B, Sq, H, D]
    k, v:          [B, Sk, Hkv, D]     (H % Hkv == 0: query head h reads key head h // (H/Hkv))
    lse, delta:    [B, H, Sq]          natural log; -inf for a row that sees no key
"""

from __future__ import annotations

from ..masks import BlockKind, MaskSpec

KEY_TILE = 128  # keys per inner step: bounds memory at B*H*Sq*KEY_TILE scalars


def accum_dtype(xp, dtype):
    """float64 for float64 inputs, float32 for everything narrower."""
    return xp.float64 if xp.dtype(dtype) == xp.float64 else xp.float32


def _grouped(x, nheads_kv):
    """[B, S, H, D] -> [B, Hkv, G, S, D], G = H / Hkv (a view where the layout allows)."""
    b, s, h, d = x.shape
    return x.reshape(b, s, nheads_kv, h // nheads_kv, d).transpose(0, 2, 3, 1, 4)


def _ungrouped(x):
    """[B, Hkv, G, S, D] -> [B, S, H, D]."""
    b, hk, g, s, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, s, hk * g, d)


def _heads_first(x):
    """[B, S, Hkv, D] -> [B, Hkv, 1, S, D] (broadcasts against the query groups)."""
    return x.transpose(0, 2, 1, 3)[:, :, None]


def _key_tiles(kind: BlockKind, mask: MaskSpec, q_pos, k_pos, tile: int):
    """Yield (start, stop, kind) for key tiles that are not entirely masked.

    Positions are NumPy int arrays sorted ascending, so a tile's extremes are its ends.
    """
    q_min, q_max = int(q_pos[0]), int(q_pos[-1])
    for start in range(0, len(k_pos), tile):
        stop = min(start + tile, len(k_pos))
        tile_kind = (
            BlockKind.FULL
            if kind == BlockKind.FULL
            else mask.classify(q_min, q_max, int(k_pos[start]), int(k_pos[stop - 1]))
        )
        if tile_kind != BlockKind.EMPTY:
            yield start, stop, tile_kind


def block_forward(xp, q, k, v, q_pos, k_pos, kind, mask: MaskSpec, scale: float, tile=KEY_TILE):
    """Attention of one query shard over one key/value shard.

    Args:
        xp: array namespace of the inputs.
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]; any float dtype.
        q_pos, k_pos: NumPy int arrays of global positions, sorted ascending.
        kind: block classification (``EMPTY`` blocks must not be passed in).
        mask: causal / window spec; scale: softmax scale.

    Returns:
        (out, lse): out [B, Sq, H, D] and lse [B, H, Sq] in the accumulation dtype; rows that see
        no key have out 0 and lse -inf.
    """
    acc_t = accum_dtype(xp, q.dtype)
    hk = k.shape[2]
    qg = _grouped(q, hk).astype(acc_t)  # (B, Hkv, G, Sq, D)
    kh = _heads_first(k).astype(acc_t)  # (B, Hkv, 1, Sk, D)
    vh = _heads_first(v).astype(acc_t)
    b, _, g, sq, d = qg.shape
    row_max = xp.full((b, hk, g, sq, 1), -xp.inf, dtype=acc_t)
    row_sum = xp.zeros((b, hk, g, sq, 1), dtype=acc_t)
    acc = xp.zeros((b, hk, g, sq, d), dtype=acc_t)
    q_pos_x = xp.asarray(q_pos)
    k_pos_x = xp.asarray(k_pos)
    for start, stop, tile_kind in _key_tiles(kind, mask, q_pos, k_pos, tile):
        scores = (qg @ kh[..., start:stop, :].swapaxes(-1, -2)) * acc_t(scale)
        if tile_kind == BlockKind.PARTIAL:
            visible = mask.visible(q_pos_x, k_pos_x[start:stop])
            scores = xp.where(visible, scores, -xp.inf)
        new_max = xp.maximum(row_max, scores.max(axis=-1, keepdims=True))
        # a row with nothing visible so far keeps max -inf: shift by 0 so exp() gives 0, not NaN
        shift = xp.where(xp.isneginf(new_max), 0, new_max)
        probs = xp.exp(scores - shift)
        rescale = xp.exp(row_max - shift)
        row_sum = row_sum * rescale + probs.sum(axis=-1, keepdims=True)
        acc = acc * rescale + probs @ vh[..., start:stop, :]
        row_max = new_max
    seen = row_sum > 0
    out = xp.where(seen, acc / xp.where(seen, row_sum, 1), 0)
    lse = xp.where(seen, xp.where(seen, row_max, 0) + xp.log(xp.where(seen, row_sum, 1)), -xp.inf)
    return _ungrouped(out), lse[..., 0].reshape(b, hk * g, sq)


def merge_into(xp, out_acc, lse_acc, out_blk, lse_blk):
    """Fold one block's (out, lse) into the running (out_acc, lse_acc), in place, in their dtype.

    ``lse = log(exp(lse_acc) + exp(lse_blk))``; each output is weighted by ``exp(its lse - lse)``.
    Rows where both sides are -inf stay output 0, lse -inf.
    """
    lse_new = xp.logaddexp(lse_acc, lse_blk)
    shift = xp.where(xp.isneginf(lse_new), 0, lse_new)
    w_acc = xp.exp(lse_acc - shift).transpose(0, 2, 1)[..., None]  # [B, Sq, H, 1]
    w_blk = xp.exp(lse_blk - shift).transpose(0, 2, 1)[..., None]
    out_acc *= w_acc
    out_acc += w_blk * out_blk
    lse_acc[...] = lse_new


def backward_delta(xp, dout, out):
    """D = rowsum(dO * O) as [B, H, Sq] in the accumulation dtype."""
    acc_t = accum_dtype(xp, out.dtype)
    return (dout.astype(acc_t) * out.astype(acc_t)).sum(axis=-1).transpose(0, 2, 1)


def block_backward(
    xp, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask, scale, tile=KEY_TILE
):
    """Add one block's gradient contributions into dq [B,Sq,H,D], dk, dv [B,Sk,Hkv,D] (in place).

    Probabilities are recomputed from the final (merged) ``lse``: ``P = exp(S - lse)``, and
    ``dS = P * (dP - delta)`` with ``dP = dO V^T``. Rows with lse -inf contribute nothing.
    """
    acc_t = dq.dtype.type
    hk = k.shape[2]
    qg = _grouped(q, hk).astype(acc_t)  # (B, Hkv, G, Sq, D)
    dog = _grouped(dout, hk).astype(acc_t)
    kh = _heads_first(k).astype(acc_t)  # (B, Hkv, 1, Sk, D)
    vh = _heads_first(v).astype(acc_t)
    b, _, g, sq, d = qg.shape
    lse_g = lse.reshape(b, hk, g, sq)[..., None].astype(acc_t)
    delta_g = delta.reshape(b, hk, g, sq)[..., None].astype(acc_t)
    row_seen = ~xp.isneginf(lse_g)
    lse_safe = xp.where(row_seen, lse_g, 0)
    dq_g = xp.zeros_like(qg)
    q_pos_x = xp.asarray(q_pos)
    k_pos_x = xp.asarray(k_pos)
    for start, stop, tile_kind in _key_tiles(kind, mask, q_pos, k_pos, tile):
        k_t, v_t = kh[..., start:stop, :], vh[..., start:stop, :]
        scores = (qg @ k_t.swapaxes(-1, -2)) * acc_t(scale)
        keep = row_seen
        if tile_kind == BlockKind.PARTIAL:
            keep = keep & mask.visible(q_pos_x, k_pos_x[start:stop])
        probs = xp.where(keep, xp.exp(xp.where(keep, scores - lse_safe, 0)), 0)
        dprobs = dog @ v_t.swapaxes(-1, -2)
        dscores = probs * (dprobs - delta_g)
        dq_g += (dscores @ k_t) * acc_t(scale)
        # sum over the query-head group: every query head of a group shares this key head
        dk[:, start:stop] += ((dscores.swapaxes(-1, -2) @ qg).sum(axis=2) * acc_t(scale)).transpose(
            0, 2, 1, 3
        )
        dv[:, start:stop] += (probs.swapaxes(-1, -2) @ dog).sum(axis=2).transpose(0, 2, 1, 3)
    dq += _ungrouped(dq_g)
