"""What the memory read recalls comes from the bank alone; modules that own their initialisation keep it.

Phase 1 builds the query from the long clip, whose second half is the target frames. If the read let
the query's content through (a residual from the query to the output), the fused memory would carry
the future and phase-1 steps would reward a shortcut that phase 2 and inference cannot take. So the
query may only address the bank (choose the attention weights); the recalled vector must be a
function of the bank's slots mixed by those weights.
"""

from __future__ import annotations

import pytest
import torch

import models
from models.config import ModelConfig
from models.dat import DeformableWindowAttention
from models.memory import AttentionRead, CosineRead, MemoryBank

DIM, HEADS, SLOTS = 16, 4, 6


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny modules: one intra-op thread is as fast and immune to a busy machine."""


def _read(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    read = AttentionRead(DIM, HEADS) if kind == "attention" else CosineRead(DIM)
    return read.eval()


def _queries(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 4, DIM, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kind", ["attention", "cosine"])
@pytest.mark.parametrize("bank", ["zeros", "constant"])
def test_a_bank_of_identical_slots_recalls_the_same_memory_for_any_query(kind: str, bank: str) -> None:
    # every slot equal: whatever the addressing, the weighted mix is that one slot, so nothing of the
    # query may remain in the output
    slot = torch.zeros(DIM) if bank == "zeros" else torch.randn(DIM, generator=torch.Generator().manual_seed(5))
    slots = slot.expand(SLOTS, DIM).clone()
    read = _read(kind)
    with torch.no_grad():
        a, b = read(_queries(1), slots), read(_queries(2), slots)
    assert (a - b).abs().max().item() < 1e-5, f"{kind} read passes the query's content: {(a - b).abs().mean():.3f}"
    assert (a - a[:1, :1, :1]).abs().max().item() < 1e-5  # and the same at every token


def test_the_attention_output_is_a_function_of_the_mixed_value_projected_slots() -> None:
    # out = recall(w @ V(bank)): the weights w are a distribution over the slots (a point of their convex
    # hull per head), and the output is the query-free map of that mix
    read = _read("attention")
    bank = torch.randn(SLOTS, DIM, generator=torch.Generator().manual_seed(3))
    query = _queries(4)
    with torch.no_grad():
        weights = read.address(query, bank)  # (B, heads, L, S)
        assert weights.shape == (2, HEADS, 16, SLOTS)
        assert (weights >= 0).all() and torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        values = read.values(bank)  # (heads, S, hd): the value-projected slots
        mixed = weights @ values  # (B, heads, L, hd): inside the convex hull of the value-projected slots
        out = read(query, bank)
        assert torch.allclose(out, read.recall(mixed).view_as(out), atol=1e-5)
        # the same mix reached from another query gives the same memory: only the addressing depends on it
        other = _queries(9)
        assert torch.allclose(
            read.recall(read.address(other, bank) @ values).view_as(out), read(other, bank), atol=1e-5
        )


def test_phase1_memory_does_not_see_the_target_frames_when_the_bank_is_constant() -> None:
    # the whole model: two long clips with the same inputs and different targets recall the same memory
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="datswinlstm_memory", embed_dim=16, patch_size=4, window_size=2, depths_down=[1, 1],
        depths_up=[1, 1], heads=[2, 4], drop_path=0.0, memory={"slots": 8, "dim": 16, "heads": 4},
    )  # fmt: skip
    model = models.build(cfg).eval()
    with torch.no_grad():
        model.memory.bank.zero_()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 1, 64, 64, generator=gen)
    long_a = torch.cat([x, torch.rand(1, 2, 1, 64, 64, generator=gen)], dim=1)
    long_b = torch.cat([x, torch.rand(1, 2, 1, 64, 64, generator=gen)], dim=1)
    with torch.no_grad():
        qa, qb = model.encoder(1)(long_a), model.encoder(1)(long_b)
        assert (qa - qb).abs().max() > 1e-3  # the queries do differ: the targets are in them
        ma, mb = model.memory(qa, frozen=False), model.memory(qb, frozen=False)
    assert (ma - mb).abs().max().item() < 1e-5


def test_memory_bank_keeps_the_read_choice() -> None:
    assert isinstance(MemoryBank(4, DIM, "attention", HEADS).read, AttentionRead)
    assert isinstance(MemoryBank(4, DIM, "cosine").read, CosineRead)


# ----------------------------------------------------------------- initialisation
def test_the_dat_offset_head_keeps_its_own_initialisation_in_the_built_model() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="datswinlstm_memory", embed_dim=32, depths_down=[2, 2], depths_up=[2, 2], heads=[4, 8])
    model = models.build(cfg)
    heads = [m.offset_head.weight for m in model.modules() if isinstance(m, DeformableWindowAttention)]
    assert heads
    weights = torch.cat([w.detach().flatten() for w in heads])
    std = weights.std().item()
    # the DAT init: normal with std 0.01, not Swin's truncated normal with std 0.02
    assert abs(std - 0.01) < 0.002, f"offset head std {std:.4f}"
    # and the rest of the block still has Swin's init
    q = torch.cat([m.q.weight.detach().flatten() for m in model.modules() if isinstance(m, DeformableWindowAttention)])
    assert abs(q.std().item() - 0.02) < 0.002
