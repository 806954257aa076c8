"""Tests of sparse_attn.layout.BlockSparseLayout (pure PyTorch, CPU)."""

import pytest
import torch

from helpers import random_block_mask
from sparse_attn import sparse_attention
from sparse_attn.layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout


def _cdiv(a, b):
    return -(-a // b)


def _pair(block_size):
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)


# (Bl, Hl, Sq, Sk, block_size): full and partial last blocks, square and not.
ROUND_TRIP_CASES = [
    pytest.param(1, 1, 64, 64, 16, id="Bl1-Hl1-S64x64-b16"),
    pytest.param(2, 3, 100, 37, 16, id="Bl2-Hl3-S100x37-b16-partial"),
    pytest.param(1, 4, 129, 256, 32, id="Bl1-Hl4-S129x256-b32-partialq"),
    pytest.param(2, 1, 200, 130, 64, id="Bl2-Hl1-S200x130-b64-partial"),
    pytest.param(1, 2, 300, 513, 128, id="Bl1-Hl2-S300x513-b128-partial"),
    pytest.param(2, 2, 100, 100, (32, 16), id="Bl2-Hl2-S100x100-b32x16"),
    pytest.param(1, 2, 77, 260, (16, 128), id="Bl1-Hl2-S77x260-b16x128"),
    pytest.param(1, 1, 256, 64, (128, 64), id="Bl1-Hl1-S256x64-b128x64"),
    pytest.param(1, 1, 1, 1, 64, id="Bl1-Hl1-S1x1-b64-single-block"),
]


def _layout_and_mask(Bl, Hl, Sq, Sk, block_size, seed=0, density=0.4):
    bq, bk = _pair(block_size)
    g = torch.Generator().manual_seed(seed)
    mask = random_block_mask(Bl, Hl, _cdiv(Sq, bq), _cdiv(Sk, bk), density, g, ensure_full_rows=True)
    return BlockSparseLayout.from_block_mask(mask, block_size, Sq, Sk), mask


# ----------------------------------------------------------------------------------------
# from_block_mask / to_block_mask
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("Bl,Hl,Sq,Sk,block_size", ROUND_TRIP_CASES)
@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
def test_round_trip_exact(Bl, Hl, Sq, Sk, block_size, seed):
    layout, mask = _layout_and_mask(Bl, Hl, Sq, Sk, block_size, seed)
    back = layout.to_block_mask()
    assert back.dtype == torch.bool
    assert back.shape == mask.shape
    assert torch.equal(back, mask)
    bq, bk = _pair(block_size)
    assert layout.block_size == (bq, bk)
    assert (layout.seq_q, layout.seq_k) == (Sq, Sk)
    assert layout.shape == tuple(mask.shape)
    assert layout.num_query_blocks == _cdiv(Sq, bq)
    assert layout.num_key_blocks == _cdiv(Sk, bk)


@pytest.mark.parametrize(
    "fill", [pytest.param(False, id="all-empty"), pytest.param(True, id="all-full")]
)
def test_round_trip_all_empty_and_all_full(fill):
    mask = torch.full((2, 2, 3, 5), fill, dtype=torch.bool)
    layout = BlockSparseLayout.from_block_mask(mask, 32, seq_q=70, seq_k=150)
    assert torch.equal(layout.to_block_mask(), mask)
    assert torch.equal(layout.kv_num, torch.full((2, 2, 3), 5 if fill else 0, dtype=torch.int32))
    assert torch.equal(layout.q_num, torch.full((2, 2, 5), 3 if fill else 0, dtype=torch.int32))
    assert layout.density == (1.0 if fill else 0.0)


def test_round_trip_non_contiguous_masks():
    g = torch.Generator().manual_seed(2)
    base = random_block_mask(2, 3, 6, 4, 0.5, g)
    transposed = base.transpose(-1, -2)  # [2, 3, 4, 6], a non-contiguous view
    assert not transposed.is_contiguous()
    layout = BlockSparseLayout.from_block_mask(transposed, (32, 16), 100, 90)
    assert torch.equal(layout.to_block_mask(), transposed)
    expanded = base[:1, :1].expand(2, 3, 6, 4)  # stride-0 batch/head dims
    layout = BlockSparseLayout.from_block_mask(expanded, 16)
    assert torch.equal(layout.to_block_mask(), expanded)
    assert torch.equal(layout.kv_num[1, 2], expanded[0, 0].sum(-1, dtype=torch.int32))


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int32, torch.int64], ids=["int8", "uint8", "int32", "int64"]
)
def test_integer_mask_is_accepted_as_boolean(dtype):
    g = torch.Generator().manual_seed(3)
    mask = random_block_mask(1, 2, 4, 6, 0.5, g)
    as_int = mask.to(dtype)  # 0/1 integers (other values are refused: test_integer_block_mask_must_be_zero_one)
    layout = BlockSparseLayout.from_block_mask(as_int, 16)
    assert torch.equal(layout.to_block_mask(), mask)


def test_docstring_example():
    mask = torch.tensor([[[[1, 0], [1, 1]]]], dtype=torch.bool)
    layout = BlockSparseLayout.from_block_mask(mask, block_size=64, seq_q=100, seq_k=100)
    assert layout.kv_num.tolist() == [[[1, 2]]]
    assert layout.kv_idx[0, 0, 0, 0].item() == 0
    assert layout.kv_idx[0, 0, 1, :2].tolist() == [0, 1]
    assert layout.q_num.tolist() == [[[2, 1]]]
    assert layout.q_idx[0, 0, 1, 0].item() == 1
    assert layout.density == 0.75
    assert torch.equal(layout.to_block_mask(), mask)


# ----------------------------------------------------------------------------------------
# The compressed forms
# ----------------------------------------------------------------------------------------
def _check_rows(num, idx, mask):
    """num/idx describe the rows of mask: counts, ascending kept indices first."""
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    assert num.shape == mask.shape[:-1]
    assert idx.shape == mask.shape
    assert torch.equal(num, mask.sum(-1, dtype=torch.int32))
    flat_mask = mask.reshape(-1, mask.shape[-1])
    flat_num, flat_idx = num.reshape(-1), idx.reshape(-1, idx.shape[-1])
    for r in range(flat_mask.shape[0]):
        n = int(flat_num[r])
        expected = torch.nonzero(flat_mask[r]).flatten().to(torch.int32)
        assert torch.equal(flat_idx[r, :n], expected), f"row {r}: {flat_idx[r, :n]} != {expected}"
        if n > 1:
            assert bool((flat_idx[r, 1:n] > flat_idx[r, : n - 1]).all())


@pytest.mark.parametrize("Bl,Hl,Sq,Sk,block_size", ROUND_TRIP_CASES[:7])
def test_kv_idx_ascending_in_first_kv_num_slots(Bl, Hl, Sq, Sk, block_size):
    layout, mask = _layout_and_mask(Bl, Hl, Sq, Sk, block_size, seed=5)
    _check_rows(layout.kv_num, layout.kv_idx, mask)
    assert layout.kv_num.is_contiguous() and layout.kv_idx.is_contiguous()


@pytest.mark.parametrize("Bl,Hl,Sq,Sk,block_size", ROUND_TRIP_CASES[:7])
def test_transposed_form_matches_transposed_mask(Bl, Hl, Sq, Sk, block_size):
    layout, mask = _layout_and_mask(Bl, Hl, Sq, Sk, block_size, seed=6)
    _check_rows(layout.q_num, layout.q_idx, mask.transpose(-1, -2))
    assert layout.q_num.shape == (Bl, Hl, layout.num_key_blocks)
    assert layout.q_idx.shape == (Bl, Hl, layout.num_key_blocks, layout.num_query_blocks)


# ----------------------------------------------------------------------------------------
# The constructor from counts + indices
# ----------------------------------------------------------------------------------------
def _counts_and_indices(mask, slots, g, pad="random"):
    """(kv_num, kv_idx) for mask, with padding slots holding garbage."""
    Bl, Hl, Mq, Mk = mask.shape
    num = mask.sum(-1).to(torch.int64)
    if pad == "random":
        idx = torch.randint(-1000, 1000, (Bl, Hl, Mq, slots), generator=g)
    else:
        idx = torch.full((Bl, Hl, Mq, slots), pad, dtype=torch.int64)
    for b in range(Bl):
        for h in range(Hl):
            for r in range(Mq):
                cols = torch.nonzero(mask[b, h, r]).flatten()
                idx[b, h, r, : cols.numel()] = cols
    return num, idx


@pytest.mark.parametrize("Bl,Hl,Sq,Sk,block_size", ROUND_TRIP_CASES[:7])
@pytest.mark.parametrize(
    "pad", [pytest.param("random", id="pad-random"), pytest.param(-1, id="pad-minus1"), pytest.param(0, id="pad-0")]
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_constructor_equals_from_block_mask(Bl, Hl, Sq, Sk, block_size, pad, index_dtype):
    layout_ref, mask = _layout_and_mask(Bl, Hl, Sq, Sk, block_size, seed=7)
    g = torch.Generator().manual_seed(8)
    num, idx = _counts_and_indices(mask, mask.shape[-1], g, pad)
    layout = BlockSparseLayout(num.to(index_dtype), idx.to(index_dtype), block_size, Sq, Sk)
    assert torch.equal(layout.to_block_mask(), mask)
    assert torch.equal(layout.kv_num, layout_ref.kv_num)
    assert torch.equal(layout.q_num, layout_ref.q_num)
    assert torch.equal(layout.q_idx, layout_ref.q_idx)
    assert layout.kv_num.dtype == torch.int32 and layout.kv_idx.dtype == torch.int32
    _check_rows(layout.kv_num, layout.kv_idx, mask)
    assert (layout.seq_q, layout.seq_k, layout.block_size) == (Sq, Sk, _pair(block_size))


def test_constructor_with_fewer_slots_than_key_blocks():
    """K < Mk index slots: Mk comes from seq_k (or num_key_blocks)."""
    Mq, Mk, K = 4, 9, 3
    mask = torch.zeros(1, 2, Mq, Mk, dtype=torch.bool)
    mask[0, 0, 0, [1, 5, 8]] = True
    mask[0, 0, 2, [0]] = True
    mask[0, 1, 1, [2, 3]] = True
    mask[0, 1, 3, [8]] = True
    g = torch.Generator().manual_seed(9)
    num, idx = _counts_and_indices(mask, K, g, "random")
    seq_q, seq_k = 60, 9 * 16 - 3
    by_seq = BlockSparseLayout(num, idx, 16, seq_q, seq_k)
    by_count = BlockSparseLayout(num, idx, 16, seq_q, num_key_blocks=Mk)
    assert by_seq.shape == by_count.shape == (1, 2, Mq, Mk)
    assert torch.equal(by_seq.to_block_mask(), mask)
    assert torch.equal(by_count.to_block_mask(), mask)
    assert by_count.seq_k == Mk * 16
    assert by_seq.seq_k == seq_k


def test_constructor_defaults_without_lengths():
    mask = torch.tensor([[[[1, 0, 1], [0, 0, 0]]]], dtype=torch.bool)
    num = torch.tensor([[[2, 0]]])
    idx = torch.tensor([[[[0, 2, 7], [5, 5, 5]]]])
    layout = BlockSparseLayout(num, idx, (32, 16))
    assert (layout.seq_q, layout.seq_k) == (64, 48)
    assert torch.equal(layout.to_block_mask(), mask)


def test_constructor_validate_false_skips_checks():
    """validate=False is for trusted producers: no error even for unsorted indices."""
    num = torch.tensor([[[2]]])
    idx = torch.tensor([[[[1, 0]]]])
    BlockSparseLayout(num, idx, 16, validate=False)  # must not raise
    with pytest.raises(ValueError):
        BlockSparseLayout(num, idx, 16)


def test_validate_false_drops_out_of_range_ids_instead_of_clamping():
    """Garbage ids in an unchecked layout keep no block: 99 is not the last block, -7 not block 0
    (clamping them would silently attend to blocks nobody listed)."""
    num = torch.tensor([[[3, 2, 9]]])  # the last count exceeds the 3 slots: all 3 count
    idx = torch.tensor([[[[99, 2, -7], [-7, 1, 0], [1, 1, 3]]]])
    layout = BlockSparseLayout(num, idx, 16, seq_q=48, seq_k=64, validate=False)
    want = torch.tensor([[[[0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 1]]]], dtype=torch.bool)
    assert torch.equal(layout.to_block_mask(), want)
    for bad in (dict(num=num, idx=idx), dict(num=torch.tensor([[[1, 0, 0]]]), idx=idx)):
        with pytest.raises(ValueError):
            BlockSparseLayout(bad["num"], bad["idx"], 16, seq_q=48, seq_k=64)
    q = torch.randn(1, 1, 48, 16)
    k = v = torch.randn(1, 1, 64, 16)
    from sparse_attn import reference_attention

    out = sparse_attention(q, k, v, layout, causal=False, backend="reference")
    torch.testing.assert_close(out, reference_attention(q, k, v, BlockSparseLayout.from_block_mask(
        want, 16, 48, 64), causal=False))


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "block_size,error",
    [
        pytest.param(48, ValueError, id="48"),
        pytest.param(0, ValueError, id="0"),
        pytest.param(8, ValueError, id="8"),
        pytest.param(256, ValueError, id="256"),
        pytest.param(-64, ValueError, id="neg64"),
        pytest.param((64,), ValueError, id="tuple-len1"),
        pytest.param((64, 64, 64), ValueError, id="tuple-len3"),
        pytest.param((64, 48), ValueError, id="pair-64x48"),
        pytest.param((0, 16), ValueError, id="pair-0x16"),
        pytest.param(True, TypeError, id="bool"),
        pytest.param(64.0, TypeError, id="float"),
        pytest.param((16.0, 16), TypeError, id="pair-float"),
        pytest.param(None, TypeError, id="None"),
    ],
)
def test_bad_block_size_raises(block_size, error):
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(error):
        BlockSparseLayout.from_block_mask(mask, block_size)
    with pytest.raises(error):
        BlockSparseLayout(torch.tensor([[[1, 1]]]), torch.tensor([[[[0, 1], [1, 0]]]]), block_size)
    with pytest.raises(error):
        BlockSparseLayout.dense(64, 64, block_size)


@pytest.mark.parametrize("block_size", list(SUPPORTED_BLOCK_SIZES) + [(16, 128), (128, 16), [32, 64]],
                         ids=lambda b: f"b{b}")
def test_supported_block_sizes_accepted(block_size):
    mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    layout = BlockSparseLayout.from_block_mask(mask, block_size)
    bq, bk = _pair(block_size)
    assert layout.block_size == (bq, bk)
    assert (layout.seq_q, layout.seq_k) == (2 * bq, 3 * bk)


@pytest.mark.parametrize(
    "mask,error",
    [
        pytest.param(torch.ones(2, 2, dtype=torch.bool), ValueError, id="2D"),
        pytest.param(torch.ones(1, 2, 2, dtype=torch.bool), ValueError, id="3D"),
        pytest.param(torch.ones(1, 1, 1, 2, 2, dtype=torch.bool), ValueError, id="5D"),
        pytest.param(torch.ones(1, 1, 2, 2), TypeError, id="float32"),
        pytest.param(torch.ones(1, 1, 2, 2, dtype=torch.float16), TypeError, id="float16"),
        pytest.param(torch.ones(1, 1, 2, 2, dtype=torch.complex64), TypeError, id="complex"),
        pytest.param([[[[True]]]], TypeError, id="list"),
    ],
)
def test_bad_mask_raises(mask, error):
    with pytest.raises(error):
        BlockSparseLayout.from_block_mask(mask, 16)


@pytest.mark.parametrize(
    "seq_q,seq_k",
    [
        pytest.param(48, 64, id="seq_q-too-short"),  # 3 blocks of 16, mask has Mq=4
        pytest.param(65, 64, id="seq_q-too-long"),
        pytest.param(64, 32, id="seq_k-too-short"),  # Mk=4 needs 49..64
        pytest.param(64, 65, id="seq_k-too-long"),
        pytest.param(0, 64, id="seq_q-zero"),
    ],
)
def test_inconsistent_lengths_raise(seq_q, seq_k):
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        BlockSparseLayout.from_block_mask(mask, 16, seq_q, seq_k)
    # The constructor takes Mk from seq_k unless num_key_blocks is given (then they must agree).
    num, idx = mask.sum(-1), torch.arange(4).expand(1, 1, 4, 4)
    with pytest.raises(ValueError):
        BlockSparseLayout(num, idx, 16, seq_q, seq_k, num_key_blocks=4)


def test_constructor_seq_k_sets_key_blocks():
    """Without num_key_blocks, Mk = ceil(seq_k / bk) (it may exceed the slot count)."""
    num, idx = torch.tensor([[[1]]]), torch.tensor([[[[2, 0]]]])
    layout = BlockSparseLayout(num, idx, 16, 16, 65)
    assert layout.num_key_blocks == 5
    assert layout.to_block_mask().tolist() == [[[[False, False, True, False, False]]]]
    with pytest.raises(ValueError):  # index 2 needs at least 3 key blocks
        BlockSparseLayout(num, idx, 16, 16, 32)


def test_partial_lengths_accepted_at_both_ends():
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    for seq_q, seq_k in [(49, 49), (64, 64), (50, 63)]:
        layout = BlockSparseLayout.from_block_mask(mask, 16, seq_q, seq_k)
        assert (layout.seq_q, layout.seq_k) == (seq_q, seq_k)


def _good():
    """A valid (kv_num, kv_idx) with Mq = 2, Mk = 4 (block 16, seq 32 x 64)."""
    return torch.tensor([[[2, 1]]]), torch.tensor([[[[0, 3, 9, 9], [2, -5, 0, 0]]]])


@pytest.mark.parametrize(
    "mutate,error",
    [
        pytest.param(lambda n, i: (n.float(), i), TypeError, id="float-counts"),
        pytest.param(lambda n, i: (n, i.float()), TypeError, id="float-indices"),
        pytest.param(lambda n, i: (n.bool(), i), TypeError, id="bool-counts"),
        pytest.param(lambda n, i: (n.tolist(), i), TypeError, id="list-counts"),
        pytest.param(lambda n, i: (n[0], i), ValueError, id="counts-2D"),
        pytest.param(lambda n, i: (n, i[0]), ValueError, id="indices-3D"),
        pytest.param(lambda n, i: (n, i[:, :, :1]), ValueError, id="indices-Mq-mismatch"),
        pytest.param(lambda n, i: (torch.tensor([[[-1, 1]]]), i), ValueError, id="negative-count"),
        pytest.param(lambda n, i: (torch.tensor([[[5, 1]]]), i), ValueError, id="count-gt-slots"),
        pytest.param(lambda n, i: (n, torch.tensor([[[[0, 4, 9, 9], [2, 0, 0, 0]]]])), ValueError,
                     id="index-eq-Mk"),
        pytest.param(lambda n, i: (n, torch.tensor([[[[0, 3, 9, 9], [-1, 0, 0, 0]]]])), ValueError,
                     id="index-negative"),
        pytest.param(lambda n, i: (n, torch.tensor([[[[3, 0, 9, 9], [2, 0, 0, 0]]]])), ValueError,
                     id="descending"),
        pytest.param(lambda n, i: (n, torch.tensor([[[[1, 1, 9, 9], [2, 0, 0, 0]]]])), ValueError,
                     id="duplicate"),
        pytest.param(lambda n, i: (n, torch.cat([i, i[..., :1]], -1)), ValueError, id="more-slots-than-Mk"),
    ],
)
def test_constructor_validation_errors(mutate, error):
    num, idx = _good()
    BlockSparseLayout(num, idx, 16, 32, 64)  # the unmutated input is valid
    num, idx = mutate(num, idx)
    with pytest.raises(error):
        BlockSparseLayout(num, idx, 16, 32, 64)


def test_padding_slots_are_never_validated_or_read():
    num, idx = _good()
    layout = BlockSparseLayout(num, idx, 16, 32, 64)
    expected = torch.tensor([[[[1, 0, 0, 1], [0, 0, 1, 0]]]], dtype=torch.bool)
    assert torch.equal(layout.to_block_mask(), expected)


# ----------------------------------------------------------------------------------------
# dense(), to(), density, repr
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seq_q,seq_k,block_size",
    [
        pytest.param(128, 128, 64, id="128x128-b64"),
        pytest.param(100, 37, 16, id="100x37-b16"),
        pytest.param(1, 300, (32, 128), id="1x300-b32x128"),
    ],
)
def test_dense(seq_q, seq_k, block_size):
    layout = BlockSparseLayout.dense(seq_q, seq_k, block_size)
    bq, bk = _pair(block_size)
    mq, mk = _cdiv(seq_q, bq), _cdiv(seq_k, bk)
    assert layout.shape == (1, 1, mq, mk)
    assert (layout.seq_q, layout.seq_k, layout.block_size) == (seq_q, seq_k, (bq, bk))
    assert bool(layout.to_block_mask().all())
    assert torch.equal(layout.kv_num, torch.full((1, 1, mq), mk, dtype=torch.int32))
    assert torch.equal(layout.kv_idx[0, 0], torch.arange(mk, dtype=torch.int32).expand(mq, mk))
    assert torch.equal(layout.q_idx[0, 0], torch.arange(mq, dtype=torch.int32).expand(mk, mq))
    assert layout.density == 1.0
    assert layout.device == torch.device("cpu")


def test_density():
    mask = torch.zeros(2, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 0, :3] = True
    mask[1, 0, 2, 1] = True
    layout = BlockSparseLayout.from_block_mask(mask, 16)
    assert layout.density == pytest.approx(4 / 24)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"], ids=["str-cpu", "device-cpu", "meta"])
def test_to_device(device):
    layout, mask = _layout_and_mask(2, 2, 100, 70, (32, 16), seed=11)
    moved = layout.to(device)
    assert moved is not layout
    assert isinstance(moved, BlockSparseLayout)
    assert moved.device == torch.device(device)
    assert (moved.block_size, moved.seq_q, moved.seq_k, moved.shape) == (
        layout.block_size, layout.seq_q, layout.seq_k, layout.shape)
    for name in ("kv_num", "kv_idx", "q_num", "q_idx"):
        t = getattr(moved, name)
        assert t.device == torch.device(device)
        assert t.shape == getattr(layout, name).shape and t.dtype == torch.int32
        if t.device.type != "meta":
            assert torch.equal(t, getattr(layout, name))
    if moved.device.type != "meta":
        assert torch.equal(moved.to_block_mask(), mask)
    # the original is untouched
    assert layout.device == torch.device("cpu")
    assert torch.equal(layout.to_block_mask(), mask)


@pytest.mark.gpu
def test_to_cuda_and_back():
    layout, mask = _layout_and_mask(1, 2, 100, 70, 16, seed=12)
    on_gpu = layout.to("cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.to_block_mask().cpu(), mask)
    assert torch.equal(on_gpu.to("cpu").kv_idx, layout.kv_idx)


def test_repr_mentions_shape_and_block_size():
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 2, 3, 4, dtype=torch.bool), (32, 16), 70, 60)
    r = repr(layout)
    assert "(1, 2, 3, 4)" in r and "(32, 16)" in r and "70" in r and "60" in r


# ----------------------------------------------------------------------------------------
# No host synchronisation in from_block_mask / to_block_mask
# ----------------------------------------------------------------------------------------
_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_no_host_sync_on_cpu(monkeypatch):
    """On CPU there is no sync to detect, so forbid the calls that would sync on a GPU."""
    g = torch.Generator().manual_seed(13)
    mask = random_block_mask(2, 3, 7, 5, 0.5, g)
    calls = []

    def forbid(name):
        def raiser(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"Tensor.{name} called (host sync)")

        return raiser

    with monkeypatch.context() as m:
        for name in _SYNC_METHODS:
            m.setattr(torch.Tensor, name, forbid(name))
        # sanity: the patch is effective
        with pytest.raises(AssertionError):
            torch.ones(1).item()
        calls.clear()
        layout = BlockSparseLayout.from_block_mask(mask, (16, 32), seq_q=100, seq_k=150)
        back = layout.to_block_mask()
        dense = BlockSparseLayout.dense(100, 150, 32)
        dense.to_block_mask()
    assert calls == []
    assert torch.equal(back, mask)


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    g = torch.Generator().manual_seed(14)
    mask = random_block_mask(2, 3, 7, 5, 0.5, g).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layout = BlockSparseLayout.from_block_mask(mask, (16, 32), seq_q=100, seq_k=150)
        back = layout.to_block_mask()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(back, mask)


# ----------------------------------------------------------------------------------------
# The conftest NaN-allocation fixture itself (the other tests rely on it)
# ----------------------------------------------------------------------------------------
def test_conftest_makes_empty_nan_filled():
    assert torch.isnan(torch.empty(3, 4)).all()
    assert torch.isnan(torch.empty((2, 2), dtype=torch.float16)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(5, dtype=torch.bfloat16))).all()
    assert torch.isnan(torch.zeros(2).new_empty(3)).all()
    assert torch.empty(3, dtype=torch.int32).dtype == torch.int32  # integers untouched, no error
    assert torch.empty(2, dtype=torch.bool).shape == (2,)
    t = torch.empty(4, requires_grad=True)
    assert t.requires_grad and t.is_leaf and torch.isnan(t).all()


@pytest.mark.parametrize("seq_q,seq_k,error", [(-5, 10, ValueError), (10, -1, ValueError), (5.5, 10, TypeError),
                                               (10, True, TypeError)])
def test_bad_sequence_lengths_raise(seq_q, seq_k, error):
    with pytest.raises(error, match="seq_"):
        BlockSparseLayout.dense(seq_q, seq_k, 16)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(error, match="seq_"):
        BlockSparseLayout.from_block_mask(mask, 16, seq_q, seq_k)


def test_numpy_integer_sizes_are_accepted():
    np = pytest.importorskip("numpy")
    layout = BlockSparseLayout.dense(np.int64(40), np.int32(20), block_size=(np.int64(16), 32))
    assert (layout.seq_q, layout.seq_k, layout.block_size) == (40, 20, (16, 32))
    assert BlockSparseLayout.dense(0, 10, 16).shape == (1, 1, 0, 1)


def test_integer_block_mask_must_be_zero_one():
    ones = torch.tensor([[[[1, 0], [1, 1]]]], dtype=torch.int64)
    assert torch.equal(BlockSparseLayout.from_block_mask(ones, 16).to_block_mask(), ones.bool())
    for bad in (2, -1):
        with pytest.raises(ValueError, match="only 0 and 1"):
            BlockSparseLayout.from_block_mask(ones * bad, 16)


def test_layouts_compose_with_and_or():
    gen = torch.Generator().manual_seed(3)
    a_mask = torch.rand(2, 1, 5, 4, generator=gen) < 0.5  # Bl=2, Hl=1
    b_mask = torch.rand(1, 3, 5, 4, generator=gen) < 0.5  # Bl=1, Hl=3: broadcasts to (2, 3)
    a = BlockSparseLayout.from_block_mask(a_mask, (32, 16), 150, 60)
    b = BlockSparseLayout.from_block_mask(b_mask, (32, 16), 150, 60)
    assert torch.equal((a & b).to_block_mask(), a_mask & b_mask)
    assert torch.equal((a | b).to_block_mask(), a_mask | b_mask)
    assert (a | b).shape == (2, 3, 5, 4) and ((a & b).seq_q, (a & b).seq_k) == (150, 60)
    for other, what in ((BlockSparseLayout.from_block_mask(b_mask, 32, 150, 120), "block_size"),
                        (BlockSparseLayout.from_block_mask(b_mask, (32, 16), 140, 60), "seq_q"),
                        (BlockSparseLayout.from_block_mask(torch.ones(3, 1, 5, 4, dtype=torch.bool), (32, 16), 150,
                                                           60), "broadcastable")):
        with pytest.raises(ValueError, match=what):
            a & other
    with pytest.raises(TypeError):
        a | a_mask


def test_to_string_draws_the_mask():
    mask = torch.zeros(1, 2, 3, 4, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 0, 2, 1:] = mask[0, 1, 1, 3] = True
    text = BlockSparseLayout.from_block_mask(mask, 16).to_string()
    assert text.splitlines()[1:] == ["[b=0, h=0]", "#...", "....", ".###", "[b=0, h=1]", "....", "...#", "...."]
    assert "density=0.208" in text.splitlines()[0]  # 5 of 24 blocks
    big = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    big[0, 0, :2, :2] = True  # a full 2x2 group
    big[0, 0, 7, 7] = True  # one of four
    lines = BlockSparseLayout.from_block_mask(big, 16).to_string(max_blocks=4).splitlines()
    assert lines[1] == "[b=0, h=0] (2x2 blocks per character)" and lines[2:] == ["#...", "....", "....", "...+"]
    assert BlockSparseLayout.from_block_mask(mask, 16).to_string(limit=1).splitlines()[-1] == "... 1 more"
