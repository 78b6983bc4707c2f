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

import numpy as np

from ..masks import BlockKind, MaskSpec

KEY_TILE = 128  # keys per inner step: bounds memory at B*H*Sq*KEY_TILE scalars
# Queries per outer step of a PARTIAL block on NumPy, so the tiles a causal mask hides above the
# diagonal are skipped rather than computed and masked (PERF.md, "CPU backend"). Other
# namespaces (CuPy) pay ~15 kernel launches per tile, so there query tiles end only at layout
# jumps (zigzag's two chunks), which already skips zigzag's hidden half.
QUERY_TILE = 256


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


def _query_tile(xp, q_tile: int | None) -> int | None:
    """``q_tile`` if given, else this namespace's default (see QUERY_TILE)."""
    if q_tile is not None:
        return q_tile
    return QUERY_TILE if xp is np else None


def _tiles(pos, tile: int | None):
    """Split sorted positions into tiles: yield (start, stop) index ranges of at most ``tile``.

    A tile also ends at a jump, a step between neighbours wider than the smallest one (between
    zigzag's two chunks), so its positions stay a narrow range, which is what lets
    :meth:`MaskSpec.classify` call it EMPTY or FULL. Layouts give evenly spaced runs (spacing 1,
    or C when striped), so jumps fall only between runs; a run of one position cannot be told
    from its neighbour's spacing and may share a tile.

    Args:
        pos: NumPy int array of global positions, ascending.
        tile: the most entries per tile (>= 1); None: unlimited, so tiles end only at jumps.
    """
    count = len(pos)
    tile = max(1, count) if tile is None else tile
    steps = np.diff(pos)
    jumps = (np.flatnonzero(steps > steps.min()) + 1).tolist() if len(steps) else []
    bounds = [0, *jumps, count]
    for run_start, run_stop in zip(bounds[:-1], bounds[1:], strict=True):
        for start in range(run_start, run_stop, tile):
            yield start, min(start + tile, run_stop)


def all_finite(xp, x) -> bool:
    """Whether ``x`` surely holds no NaN or inf: decides per block whether :func:`masked_matmul`
    may skip its exact non-finite path. One reduction on NumPy; on a GPU namespace reading the
    answer back would stall the host behind the device every block, so there it is ``False``
    (the exact path always runs)."""
    return xp is np and bool(np.isfinite(x).all())


def masked_matmul(xp, weights, values, keep, values_finite: bool):
    """``weights @ values`` over the pairs ``keep`` allows only, in IEEE arithmetic.

    A plain product lets a hidden pair's weight 0 meet a NaN or inf value (``0 * inf`` is NaN), so
    a key a query does not see could still poison it. With finite ``values`` the plain product is
    exact; otherwise the finite parts are multiplied as usual and each non-finite value reaches
    only the rows that keep it: ``w * (+-inf)`` is ``+-inf`` (sign of ``w``), NaN for ``w == 0``,
    and NaN values give NaN.

    Args:
        weights: [..., M, N], 0 where ``keep`` is False; values: [..., N, D];
        keep: bool, broadcastable to ``weights`` (unused, may be None, when ``values_finite``);
            values_finite: from :func:`all_finite`.
    """
    if values_finite:
        return weights @ values
    finite = xp.isfinite(values)
    out = weights @ xp.where(finite, values, 0)
    dtype = out.dtype.type
    kept = xp.broadcast_to(keep, weights.shape).astype(dtype)
    pos, neg, zero = kept * (weights > 0), kept * (weights < 0), kept * (weights == 0)
    plus_inf, minus_inf = (values == xp.inf).astype(dtype), (values == -xp.inf).astype(dtype)
    nan_hits = kept @ xp.isnan(values).astype(dtype) + zero @ (plus_inf + minus_inf)
    plus_hits = pos @ plus_inf + neg @ minus_inf
    minus_hits = pos @ minus_inf + neg @ plus_inf
    out = xp.where(plus_hits > 0, dtype(xp.inf), out)
    out = xp.where(minus_hits > 0, dtype(-xp.inf), out)
    return xp.where((nan_hits > 0) | ((plus_hits > 0) & (minus_hits > 0)), dtype(xp.nan), out)


def _block_tiles(kind: BlockKind, mask: MaskSpec, q_pos, k_pos, q_tile, k_tile):
    """The work of one block: yield ``((q_start, q_stop), [(k_start, k_stop, kind), ...])``.

    Every query tile comes with its key tiles that the mask does not hide entirely from it,
    classified by :meth:`MaskSpec.classify` on the tiles' extreme positions (the one mechanism
    the schedule and the kernels use too); query tiles that see no key tile are left out, so
    their rows keep output 0 and lse -inf. A ``FULL`` block is one query tile (no mask to
    decide, and the fewest, largest products).

    Args:
        kind: the block's classification (``EMPTY`` blocks must not be passed in).
        q_pos, k_pos: NumPy int arrays of global positions, ascending.
        q_tile, k_tile: the most queries and keys per tile (None: see :func:`_tiles`).
    """
    if kind == BlockKind.FULL:
        key_tiles = [(start, stop, BlockKind.FULL) for start, stop in _tiles(k_pos, k_tile)]
        yield (0, len(q_pos)), key_tiles
        return
    k_ranges = list(_tiles(k_pos, k_tile))
    for q_start, q_stop in _tiles(q_pos, q_tile):
        q_min, q_max = int(q_pos[q_start]), int(q_pos[q_stop - 1])
        key_tiles = []
        for k_start, k_stop in k_ranges:
            tile_kind = mask.classify(q_min, q_max, int(k_pos[k_start]), int(k_pos[k_stop - 1]))
            if tile_kind != BlockKind.EMPTY:
                key_tiles.append((k_start, k_stop, tile_kind))
        if key_tiles:
            yield (q_start, q_stop), key_tiles


def block_forward(
    xp, q, k, v, q_pos, k_pos, kind, mask: MaskSpec, scale: float, tile=KEY_TILE, q_tile=None
):
    """Attention of one query shard over one key/value shard.

    Args:
        xp: array namespace of the inputs.
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]; any float dtype.
        q_pos, k_pos: NumPy int arrays of global positions, sorted ascending.
        kind: block classification (``EMPTY`` blocks must not be passed in).
        mask: causal / window spec; scale: softmax scale.
        tile, q_tile: the most keys and queries per tile (``q_tile`` None: the namespace's
            default, see QUERY_TILE); tiles the mask hides entirely are skipped.

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
    out = xp.zeros((b, hk, g, sq, d), dtype=acc_t)
    lse = xp.full((b, hk, g, sq, 1), -xp.inf, dtype=acc_t)
    q_pos_x = xp.asarray(q_pos)
    k_pos_x = xp.asarray(k_pos)
    v_finite = all_finite(xp, vh)
    work = _block_tiles(kind, mask, q_pos, k_pos, _query_tile(xp, q_tile), tile)
    for (q_start, q_stop), key_tiles in work:
        rows = slice(q_start, q_stop)
        out[..., rows, :], lse[..., rows, :] = _forward_rows(
            xp, qg[..., rows, :], kh, vh, q_pos_x[rows], k_pos_x, key_tiles, mask, scale,
            v_finite,
        )
    return _ungrouped(out), lse[..., 0].reshape(b, hk * g, sq)


def _forward_rows(xp, qg, kh, vh, q_pos_x, k_pos_x, key_tiles, mask: MaskSpec, scale: float,
                  v_finite: bool):  # fmt: skip
    """Online softmax of query rows ``qg`` (B, Hkv, G, Sq, D) over the given key tiles.

    Returns (out (B, Hkv, G, Sq, D), lse (B, Hkv, G, Sq, 1)); rows that see no key: 0 and -inf.
    A NaN among a row's visible logits makes its max, and so its output and lse, NaN; a ``+inf``
    logit gives NaN too (``inf - inf``), as in dense attention.
    """
    acc_t = qg.dtype.type
    b, hk, g, sq, d = qg.shape
    row_max = xp.full((b, hk, g, sq, 1), -xp.inf, dtype=acc_t)
    row_sum = xp.zeros((b, hk, g, sq, 1), dtype=acc_t)
    acc = xp.zeros((b, hk, g, sq, d), dtype=acc_t)
    for start, stop, tile_kind in key_tiles:
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
        # a -inf logit (masked, or a genuine -inf) hides its key: not even 0 * NaN reaches the row
        keep = None if v_finite else ~xp.isneginf(scores)
        acc = acc * rescale + masked_matmul(xp, probs, vh[..., start:stop, :], keep, v_finite)
        row_max = new_max
    # a row saw a key iff its max left -inf (NaN included: such a row must come out NaN)
    seen = ~xp.isneginf(row_max)
    out = xp.where(seen, acc / xp.where(seen, row_sum, 1), 0)
    lse = xp.where(seen, xp.where(seen, row_max, 0) + xp.log(xp.where(seen, row_sum, 1)), -xp.inf)
    return out, lse


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
    xp, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask, scale,
    tile=KEY_TILE, q_tile=None,
):  # fmt: skip
    """Add one block's gradient contributions into dq [B,Sq,H,D], dk, dv [B,Sk,Hkv,D] (in place).

    Probabilities are recomputed from the final (merged) ``lse``: ``P = exp(S - lse)``, and
    ``dS = P * (dP - delta)`` with ``dP = dO V^T``. Rows with lse -inf contribute nothing, and
    neither do tiles the mask hides (``tile``, ``q_tile``: as in :func:`block_forward`).
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
    # a hidden pair must not carry a NaN or inf from either side into a gradient (masked_matmul)
    k_finite, q_finite, do_finite = (all_finite(xp, x) for x in (kh, qg, dog))
    work = _block_tiles(kind, mask, q_pos, k_pos, _query_tile(xp, q_tile), tile)
    for (q_start, q_stop), key_tiles in work:
        rows = slice(q_start, q_stop)
        q_t, do_t, delta_t = qg[..., rows, :], dog[..., rows, :], delta_g[..., rows, :]
        seen_t, lse_t = row_seen[..., rows, :], lse_safe[..., rows, :]
        for start, stop, tile_kind in key_tiles:
            k_t, v_t = kh[..., start:stop, :], vh[..., start:stop, :]
            scores = (q_t @ k_t.swapaxes(-1, -2)) * acc_t(scale)
            keep = seen_t & ~xp.isneginf(scores)  # a -inf logit hides its key, as the mask does
            if tile_kind == BlockKind.PARTIAL:
                keep = keep & mask.visible(q_pos_x[rows], k_pos_x[start:stop])
            probs = xp.where(keep, xp.exp(xp.where(keep, scores - lse_t, 0)), 0)
            dprobs = do_t @ v_t.swapaxes(-1, -2)
            dscores = xp.where(keep, probs * (dprobs - delta_t), 0)
            keep_t = keep.swapaxes(-1, -2)
            dq_g[..., rows, :] += masked_matmul(xp, dscores, k_t, keep, k_finite) * acc_t(scale)
            # sum over the query-head group: every query head of a group shares this key head
            dk_t = masked_matmul(xp, dscores.swapaxes(-1, -2), q_t, keep_t, q_finite)
            dk[:, start:stop] += (dk_t.sum(axis=2) * acc_t(scale)).transpose(0, 2, 1, 3)
            dv_t = masked_matmul(xp, probs.swapaxes(-1, -2), do_t, keep_t, do_finite)
            dv[:, start:stop] += dv_t.sum(axis=2).transpose(0, 2, 1, 3)
    dq += _ungrouped(dq_g)


def gather_rows(xp, parts, rows, length: int):
    """(K, V) [B, length, Hkv, D]: ``parts[t]`` = (k_t, v_t) [B, n_t, Hkv, D] with their rows
    at the indices ``rows[t]`` (arrays of ``xp``, together covering ``0 .. length - 1``)."""
    k0 = parts[0][0]
    shape = (k0.shape[0], length, *k0.shape[2:])
    k_all, v_all = xp.empty(shape, dtype=k0.dtype), xp.empty(shape, dtype=parts[0][1].dtype)
    for (k, v), at in zip(parts, rows, strict=True):
        k_all[:, at] = k
        v_all[:, at] = v
    return k_all, v_all

