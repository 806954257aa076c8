"""The CUDA C++ decode kernel (``csrc/decode``) without a GPU.

* The emulation tier: the kernel source compiled as host C++20 against the shim of the CUDA
  execution model (``csrc/shim/cuda_shim.h``) and run on CPU tensors
  (``sparse_attn._cuda.decode_fwd_emulated``), compared with ``reference_decode`` in fp64 on the
  same inputs. Unused cache rows and pages hold NaN; every global access of the kernel is checked
  against the tensors it was given (an out-of-buffer read raises).
* The shim's own primitives, one small C++ test each (``csrc/shim/test_cuda_shim.cpp``).
* The compile tier: every instantiation through nvcc for sm_80 and sm_90a, with ptxas's registers
  and spills (skipped without nvcc).

The emulation extension is JIT-built once and cached on disk (``SPARSE_ATTN_CACHE`` or torch's
extension directory); the first build takes about 35 s on two cores.
"""

import os
import shutil
import subprocess

import pytest
import torch

from helpers import page_pool, random_block_lists, tolerances
from sparse_attn import _cuda
from sparse_attn.decode import reference_decode

CSRC = _cuda.csrc_dir()


def _cxx():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="session")
def emulated():
    """Builds (or loads the cached) emulation extension once per session."""
    if _cxx() is None:
        pytest.skip("no C++ compiler: the emulation tier needs one")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("ninja is not installed: torch's JIT build needs it")
    _cuda.load_emulated()
    return _cuda.decode_fwd_emulated


@pytest.fixture(scope="session")
def shim_test_binary(tmp_path_factory):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("shim") / "test_cuda_shim"
    subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", str(CSRC / "shim" / "test_cuda_shim.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


# --------------------------------------------------------------------------------------------
# Building the inputs
# --------------------------------------------------------------------------------------------
def contiguous_cache(bsz, hkv, s_max, d, lens, dtype, gen, pad=0):
    """``[B, Hkv, S_max, D]`` with NaN at and past each sequence's length. ``pad`` > 0 makes it a
    view into a wider buffer (row stride D + pad, storage offset 1: no 128-bit loads possible)."""
    full = torch.full((bsz, hkv, s_max, d + pad), float("nan"), dtype=dtype)
    cache = full[..., 1 : d + 1] if pad else full
    data = torch.randn(bsz, hkv, s_max, d, generator=gen).to(dtype)
    for b, length in enumerate(lens):
        n = max(0, min(length, s_max))
        cache[b, :, :n] = data[b, :, :n]
    return cache


def paged_cache(cache, page_size, gen, extra_pages=2):
    """The contiguous ``cache`` ([B, Hkv, S, D], S a multiple of page_size) as a shuffled page pool
    ``[P, page_size, Hkv, D]`` (NaN in pages no sequence owns) and its ``block_table``."""
    return page_pool(cache, page_size, gen, extra_pages)


def check(run, q, k, v, lens, block_table=None, kv_num=None, kv_idx=None, residues=None, local=1, stride=1, bs=16,
          own=True, num_splits=None, ref_args=None):
    """Run the emulated kernel, compare with reference_decode in fp64 on the same inputs."""
    scale = q.shape[-1] ** -0.5
    out, lse = run(q, k, v, lens, block_table, kv_num, kv_idx, residues, local, stride, bs, scale, own,
                   num_splits=num_splits)
    ref_in = ref_args or (q, k, v, lens, block_table, kv_num, kv_idx, residues)
    qd, kd, vd = (t.double() for t in ref_in[:3])
    ref_out, ref_lse = reference_decode(qd, kd, vd, *ref_in[3:], local, stride, bs, scale, own)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not out.isnan().any(), "NaN in the output"
    torch.testing.assert_close(out.double(), ref_out, **tolerances(q.dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    return out, lse


CASES = {
    # id: (layout, page, B, Hq, Hkv, Sq, D, dtype, bs, lens, mode)
    "contig-dense-gqa4-sq1-d64-fp16": ("contig", 0, 3, 8, 2, 1, 64, torch.float16, 16, [0, 1, 75], "dense"),
    "contig-dense-gqa1-sq7-d128-bf16": ("contig", 0, 3, 2, 2, 7, 128, torch.bfloat16, 32, [5, 7, 70], "dense"),
    "contig-dense-gqa8-sq7-d64-bf16": ("contig", 0, 1, 8, 1, 7, 64, torch.bfloat16, 16, [40], "dense"),
    "paged16-dense-gqa8-sq2-d64-bf16": ("paged", 16, 2, 8, 1, 2, 64, torch.bfloat16, 64, [1, 50], "dense"),
    "paged64-list-gqa4-sq7-d128-fp16": ("paged", 64, 2, 8, 2, 7, 128, torch.float16, 16, [3, 150], "list"),
    "contig-list-noown-gqa1-sq2-d64-bf16": ("contig", 0, 2, 2, 2, 2, 64, torch.bfloat16, 32, [90, 64], "list-noown"),
    "paged64-list-sq16-bs128-d64-fp16": ("paged", 64, 2, 4, 2, 16, 64, torch.float16, 128, [300, 20], "list"),
    "paged16-s2-gqa4-sq7-d64-fp16": ("paged", 16, 2, 12, 3, 7, 64, torch.float16, 16, [100, 9], "s2"),
    "contig-s2-gqa1-sq1-bs64-d128-bf16": ("contig", 0, 2, 2, 2, 1, 128, torch.bfloat16, 64, [300, 64], "s2-wide"),
    "contig-dense-sq1-bs128-d256-fp16": ("contig", 0, 1, 2, 1, 1, 256, torch.float16, 128, [70], "dense"),
}


def build_case(case):
    """``(q, k, v, lens, kwargs for check())`` of one CASES entry (CPU tensors)."""
    layout, page, bsz, hq, hkv, sq, d, dtype, bs, lens, mode = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    s_max = -(-max(lens) // 64) * 64 + 64
    q = torch.randn(bsz, sq, hq, d, generator=gen).to(dtype).transpose(1, 2)  # [B, S, H, D] storage
    k = contiguous_cache(bsz, hkv, s_max, d, lens, dtype, gen)
    v = contiguous_cache(bsz, hkv, s_max, d, lens, dtype, gen)
    kw = dict(bs=bs)
    if layout == "paged":
        k, kw["block_table"] = paged_cache(k, page, torch.Generator().manual_seed(1))
        v, _ = paged_cache(v, page, torch.Generator().manual_seed(1))
    nblocks = -(-s_max // bs)
    if mode.startswith("list"):
        kw["kv_num"], kw["kv_idx"] = random_block_lists(bsz, hkv, nblocks, max(1, nblocks // 2), gen)
        kw["own"] = mode == "list"
    elif mode == "s2":  # residue 0, residue 2 of stride 3, a dense head
        kw.update(residues=torch.tensor([0, 2, -1], dtype=torch.int32), local=2, stride=3)
    elif mode == "s2-wide":  # a residue >= stride keeps the window only
        kw.update(residues=torch.tensor([1, 5], dtype=torch.int32), local=1, stride=4)
    return q, k, v, torch.tensor(lens, dtype=torch.int32), kw


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_emulated_matches_reference(emulated, case):
    q, k, v, lens, kw = build_case(case)
    check(emulated, q, k, v, lens, **kw)


@pytest.mark.parametrize("num_splits", [1, 2, 7, None], ids=["splits1", "splits2", "splits7", "auto"])
def test_emulated_split_counts(emulated, num_splits):
    """Flash-decoding: the same answer for any split count, including splits left empty."""
    gen = torch.Generator().manual_seed(3)
    lens = [0, 33, 300]
    q = torch.randn(3, 4, 2, 64, generator=gen).half()
    k = contiguous_cache(3, 2, 320, 64, lens, torch.float16, gen)
    v = contiguous_cache(3, 2, 320, 64, lens, torch.float16, gen)
    check(emulated, q, k, v, torch.tensor(lens, dtype=torch.int32), bs=16, num_splits=num_splits)


def test_emulated_unaligned_views_and_expanded_lists(emulated):
    """Strides that forbid 128-bit loads (the scalar path), and lists expand()ed from one row
    (zero strides), as sparse_attention's decode route passes them."""
    gen = torch.Generator().manual_seed(5)
    lens = [50, 70]
    qbuf = torch.randn(2, 4, 3, 64 + 1, generator=gen).half()
    q = qbuf[..., 1:]
    k = contiguous_cache(2, 2, 80, 64, lens, torch.float16, gen, pad=3)
    v = contiguous_cache(2, 2, 80, 64, lens, torch.float16, gen, pad=3)
    assert k.storage_offset() % 8 and k.stride(2) % 8
    kv_num = torch.tensor([[2, 1]], dtype=torch.int32).expand(2, 2)
    kv_idx = torch.tensor([[[0, 3], [2, 9]]], dtype=torch.int32).expand(2, 2, 2)
    check(emulated, q, k, v, torch.tensor(lens, dtype=torch.int32), kv_num=kv_num, kv_idx=kv_idx, bs=16, own=False)


def test_emulated_garbage_metadata_stays_in_bounds(emulated):
    """Lengths past the cache or negative, counts past N or negative, ids outside the cache,
    repeated ids, page ids outside the pool: clamped or ignored as the reference does, and never a
    read out of bounds (the shim's memory guard raises on one: the last sequence's length runs past
    the end of the cache, a used page id past the end of the pool)."""
    gen = torch.Generator().manual_seed(9)
    bsz, hkv, s_max, d = 3, 2, 128, 64
    q = torch.randn(bsz, 4, 2, d, generator=gen).half()
    k = contiguous_cache(bsz, hkv, s_max, d, [s_max] * bsz, torch.float16, gen)
    v = contiguous_cache(bsz, hkv, s_max, d, [s_max] * bsz, torch.float16, gen)
    lens = torch.tensor([40, -3, s_max + 50], dtype=torch.int32)
    kv_num = torch.tensor([[9, -2], [3, 1], [4, 2]], dtype=torch.int32)
    kv_idx = torch.tensor([[[-1, 0, 2, 2, 5], [1, 1, 1, 1, 1]],
                           [[0, 1, 2, 0, 0], [7, 0, 0, 0, 0]],
                           [[1, 1, 2, 10**6, 3], [-5, 100, 0, 0, 0]]], dtype=torch.int32)
    check(emulated, q, k, v, lens, kv_num=kv_num, kv_idx=kv_idx, bs=16)
    check(emulated, q, k, v, lens, kv_num=kv_num, kv_idx=kv_idx, bs=32, own=False)

    pool, table = paged_cache(k, 32, torch.Generator().manual_seed(2), extra_pages=0)  # every page holds data
    vpool, _ = paged_cache(v, 32, torch.Generator().manual_seed(2), extra_pages=0)
    short = torch.tensor([20, 33, s_max + 7], dtype=torch.int32)
    table[0, 1:] = 10**6  # past the sequence's length: never looked at
    table[1, 0] = -4  # used: clamped to page 0
    table[1, 2:] = -4
    table[2, 3] = pool.shape[0] + 5  # used: clamped to the last page
    check(emulated, q, pool, vpool, short, block_table=table, bs=16)


def test_emulated_rejects_bad_inputs(emulated):
    q = torch.randn(1, 2, 1, 64).half()
    k = torch.randn(1, 2, 32, 64).half()
    lens = torch.tensor([32], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        emulated(q.float(), k.float(), k.float(), lens, None, None, None, None, 1, 1, 16, 0.1, True)
    with pytest.raises(RuntimeError, match="head dim"):
        emulated(q[..., :48], k[..., :48], k[..., :48], lens, None, None, None, None, 1, 1, 16, 0.1, True)
    with pytest.raises(RuntimeError, match="go together"):
        emulated(q, k, k, lens, None, torch.zeros(1, 2, dtype=torch.int32), None, None, 1, 1, 16, 0.1, True)
    with pytest.raises(RuntimeError, match="int32"):
        emulated(q, k, k, lens.long(), None, None, None, None, 1, 1, 16, 0.1, True)


def test_public_api_routes_cpu_to_the_emulation(emulated, monkeypatch):
    """``sparse_decode(..., backend="cuda")`` on CPU tensors (SPARSE_ATTN_CUDA_EMULATE) runs this
    kernel, S2Config included, and agrees with the reference backend."""
    import sparse_attn.decode as dec
    from sparse_attn.patterns.s2 import S2Config

    monkeypatch.setattr(dec, "_EMULATE_CUDA", True)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 1, 64, generator=gen).bfloat16()
    k = torch.randn(2, 2, 96, 64, generator=gen).bfloat16()
    v = torch.randn(2, 2, 96, 64, generator=gen).bfloat16()
    lens = torch.tensor([96, 41], dtype=torch.int32)
    cfg = S2Config(block_size=16, local_blocks=2, vert_stride=3, num_dense_heads=1)
    got = dec.sparse_decode(q, k, v, lens, kv_blocks=cfg, return_lse=True, backend="cuda")
    want = dec.sparse_decode(q.double(), k.double(), v.double(), lens, kv_blocks=cfg, return_lse=True,
                             backend="reference")
    torch.testing.assert_close(got[0].double(), want[0], **tolerances(torch.bfloat16))
    torch.testing.assert_close(got[1].double(), want[1], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The GPU tier: the same cases on the real kernel (bench/gpu_check.sh runs the gpu marker)
# --------------------------------------------------------------------------------------------
def _on_cuda(t):
    return t.cuda() if isinstance(t, torch.Tensor) else t


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cuda_matches_reference(case):
    q, k, v, lens, kw = build_case(case)
    ref_args = (q, k, v, lens, kw.get("block_table"), kw.get("kv_num"), kw.get("kv_idx"), kw.get("residues"))
    kw = {name: _on_cuda(t) for name, t in kw.items()}

    def run(*args, **kwargs):
        out, lse = _cuda.decode_fwd_cuda(*(_on_cuda(a) for a in args), **kwargs)
        return out.cpu(), lse.cpu()

    for splits in (None, 1, 3):
        check(run, *(_on_cuda(t) for t in (q, k, v, lens)), num_splits=splits, ref_args=ref_args, **kw)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host synchronisation: the launch captures into a CUDA graph and replays to the eager answer."""
    q, k, v, lens, kw = build_case("paged64-list-gqa4-sq7-d128-fp16")
    q, k, v, lens = (t.cuda() for t in (q, k, v, lens))
    args = (q, k, v, lens, kw["block_table"].cuda(), kw["kv_num"].cuda(), kw["kv_idx"].cuda(), None, 1, 1, kw["bs"],
            0.1, True)
    eager = _cuda.decode_fwd_cuda(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _cuda.decode_fwd_cuda(*args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(captured[1], eager[1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The shim
# --------------------------------------------------------------------------------------------
SHIM_TESTS = ["indices", "syncthreads", "static_shared", "dynamic_smem", "shfl_xor", "shfl_sync", "votes",
              "divergent_syncthreads", "divergent_shuffle", "partial_mask", "ldg_guard", "buffer_provenance",
              "half_bf16", "vector_types", "math"]


@pytest.mark.parametrize("name", SHIM_TESTS)
def test_shim_primitive(shim_test_binary, name):
    res = subprocess.run([str(shim_test_binary), name], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_shim_test_list_is_complete(shim_test_binary):
    res = subprocess.run([str(shim_test_binary), "list"], capture_output=True, text=True, check=True)
    assert sorted(res.stdout.split()) == sorted(SHIM_TESTS)


def test_shim_conversions_match_torch(shim_test_binary, tmp_path):
    """float -> fp16 / bf16 rounding (ties, subnormals, overflow, NaN) bit for bit as torch's."""
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.9, 65520.0, 1e-8, -6e-8, 5.96e-8, 3e-5, 1 + 2 ** -11,
                            1 + 3 * 2 ** -11, 1 + 2 ** -8, 3.4e38, float("inf"), -float("inf"), float("nan")])
    xs = torch.cat([special, torch.randn(20000, generator=gen) * 10 ** torch.randint(-8, 6, (20000,), generator=gen),
                    torch.randint(0, 2 ** 31, (20000,), generator=gen, dtype=torch.int32).view(torch.float32)])
    (tmp_path / "in.f32").write_bytes(xs.numpy().tobytes())
    subprocess.run([str(shim_test_binary), "convert", str(tmp_path / "in.f32"), str(tmp_path / "out.bin")],
                   check=True)
    got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.int16).view(-1, 2)
    nan = xs.isnan()
    assert torch.equal(got[~nan, 0], xs[~nan].half().view(torch.int16))
    assert torch.equal(got[~nan, 1], xs[~nan].bfloat16().view(torch.int16))
    assert got[nan, 0].view(torch.float16).isnan().all() and got[nan, 1].view(torch.bfloat16).isnan().all()


# --------------------------------------------------------------------------------------------
# The compile tier
# --------------------------------------------------------------------------------------------
def test_nvcc_compiles_every_instantiation():
    """sm_80 and sm_90a, fp16/bf16, head dims 64/128/256: compiles; no spills at 64/128; shared
    memory within the chips' opt-in limits."""
    from sparse_attn.benchmark import static_cuda

    if static_cuda.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on the PATH): the compile tier needs it")
    rows = static_cuda.cuda_rows(archs=("sm_80", "sm_90a"), jobs=2)
    assert len(rows) == 2 * 2 * 3 * 2
    assert static_cuda.check_cuda_rows(rows) == []
    limit = {"sm_80": 166912, "sm_90a": 232448}
    for r in rows:
        assert r["regs"] and r["regs"] <= 255, r
        assert r["smem_static"] + r["smem_dynamic"] <= limit[r["arch"]], r


def test_loader_reports_why_cuda_is_unavailable():
    ok, why = _cuda.cuda_available()
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the gpu tier runs the real kernel")
    assert not ok and why
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.load_cuda()


def test_source_hash_tracks_headers(tmp_path, monkeypatch):
    """The JIT cache key changes when a header (not only a listed source) changes."""
    for sub in ("decode", "shim"):
        shutil.copytree(CSRC / sub, tmp_path / sub)
    monkeypatch.setenv("SPARSE_ATTN_CSRC", str(tmp_path))
    before = _cuda.source_hash()
    assert before == _cuda.source_hash()
    with open(tmp_path / "decode" / "sparse_decode.cuh", "a") as f:
        f.write("// edited\n")
    assert _cuda.source_hash() != before
