"""cuparing.integrations.hf: a small Llama through cuparing's attention (one device and a ring of
simulated ranks) against the same model on transformers' SDPA attention, float64 on the CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from numerics import ARITHMETIC_FACTOR, UNIT_ROUNDOFF, gamma

import cuparing as cr

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("cuparing.integrations.hf")

VOCAB, HIDDEN, LAYERS = 40, 32, 2

# the longest chain of reductions a logit or gradient goes through, forward and back, per layer:
# q/k/v projections (32), scores (head dim 8), softmax and P V (S <= 24 each), output projection
# (32), the MLP (32 + 64), two RMS norms (32 each); then the head (32) and the loss's mean (S);
# elementwise first-order bound gamma_n times the largest magnitude, times the table's factor
_CHAIN = 2 * (LAYERS * (3 * 32 + 8 + 2 * 24 + 32 + 96 + 64) + 32 + 24)
_BOUND = ARITHMETIC_FACTOR * gamma(_CHAIN, UNIT_ROUNDOFF["float64"])


def _close(got, want) -> bool:
    return (got - want).abs().max().item() <= _BOUND * max(want.abs().max().item(), 1e-300)


def _model(seed: int = 0, sliding_window=None):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).double()
    model.set_attn_implementation("sdpa")  # float64 throughout (eager takes softmax in float32)
    return model


def _logits_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_one_device_model_matches_sdpa_attention():
    name = hf.register()
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    want = _logits_and_grads(model, inputs)
    model.set_attn_implementation(name)
    got = _logits_and_grads(model, inputs)
    assert _close(got[0], want[0])
    assert all(_close(g, w) for g, w in zip(got[1], want[1], strict=True))


def test_padding_masks_are_refused_with_advice():
    name = hf.register()
    model = _model()
    model.set_attn_implementation(name)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="pack the sequences"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous")])
def test_ring_of_simulated_ranks_matches_the_whole_sequence(world, layout):
    base = _model(seed=2)
    seqlen = 2 * world * 4
    ids = torch.randint(0, VOCAB, (1, seqlen), generator=torch.Generator().manual_seed(3))
    want_logits = base(input_ids=ids).logits.detach()

    def rank_fn(ring):
        model = copy.deepcopy(base)
        model.set_attn_implementation(hf.register(f"cuparing_test_ring{ring.rank}", ring, layout))
        local = hf.shard_inputs({"input_ids": ids, "labels": ids}, ring.rank, ring.size, layout)
        out = model(**local)
        return out.logits.detach(), local["shift_labels"]

    results = cr.simulate(world, rank_fn)
    logits = cr.unshard([r[0] for r in results], layout=layout)
    assert _close(logits, want_logits)
    shifted = cr.unshard([r[1] for r in results], layout=layout)
    assert torch.equal(shifted[:, :-1], ids[:, 1:]) and shifted[0, -1] == hf.IGNORE_INDEX


def test_shard_inputs_pads_documents_with_ignored_labels():
    cu = [0, 5, 6, 13]
    ids = torch.arange(13).reshape(1, 13)
    parts = [hf.shard_inputs({"input_ids": ids, "labels": ids}, r, 2, "zigzag", cu)
             for r in range(2)]  # fmt: skip
    for r, part in enumerate(parts):
        rows = np.asarray(cr.token_positions(13, r, 2, layout="zigzag", cu_seqlens=cu))
        labels = part["shift_labels"][0].numpy()
        assert np.all(labels[rows < 0] == hf.IGNORE_INDEX)
        real = rows[rows >= 0]
        want = np.where(real + 1 < 13, real + 1, hf.IGNORE_INDEX)  # the next token's id
        assert np.array_equal(labels[rows >= 0], want)


def test_sliding_window_layers_match_sdpa():
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=5,
    )  # fmt: skip
    torch.manual_seed(4)
    model = transformers.MistralForCausalLM(config).double()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(5))
    want = model(input_ids=ids).logits.detach()
    model.set_attn_implementation(hf.register())
    got = model(input_ids=ids).logits.detach()
    assert _close(got, want)


def test_packed_documents_match_each_document_alone():
    model = _model(seed=6)
    lengths = [5, 1, 8]
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    ids = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(7))
    pieces = zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
    alone = [model(input_ids=ids[:, a:b]).logits.detach() for a, b in pieces]
    model.set_attn_implementation(hf.register())
    positions = torch.cat([torch.arange(n) for n in lengths]).reshape(1, -1)  # restart per doc
    packed = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=8, max_length_k=8).logits.detach()  # fmt: skip
    assert _close(packed, torch.cat(alone, dim=1))
