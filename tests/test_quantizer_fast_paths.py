"""The quantizers' fast paths agree with the plain formulas: CPU chunk capping, the tiled nearest-code search and
blocked row argmax, the underflow route of the M-step's column sums, and the BA backward's fused dL/dlogits, in
regimes where many columns underflow."""
import math
import weakref

import pytest
import torch

import plumbing
import ba_kernels
import vqvae


def test_chunk_rows_are_capped_by_each_devices_memory_budget():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert plumbing.chunk_rows(4096, 512, cpu) == min(4096, plumbing.CPU_CHUNK_ELEMENTS // 512)
    assert plumbing.chunk_rows(4096, 65536, cpu) * 65536 <= plumbing.CPU_CHUNK_ELEMENTS
    assert plumbing.chunk_rows(4096, 10 ** 9, cpu) == 1
    assert plumbing.chunk_rows(4096, 512, cuda) == 4096  # K = 512: the asked rows, 8 MiB a block
    # K = 65,536: 1,024 rows (256 MiB a block), not 4,096 (1 GiB): a BA step holds a few blocks at once
    assert plumbing.chunk_rows(4096, 65536, cuda) == 1024 == plumbing.GPU_CHUNK_ELEMENTS // 65536


@pytest.mark.parametrize("shape", [(5, 64), (7, 128), (33, 640), (3, 100), (4, 1)])
def test_row_argmax_is_max_with_the_first_index_on_ties(shape):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randint(0, 4, shape, generator=g).float()  # many ties: the first index must win
    x[0, :] = 2.0  # a row that is all ties
    best, idx = plumbing.row_argmax(x)
    want_best, want_idx = x.max(1)
    assert torch.equal(best, want_best) and torch.equal(idx, want_idx)
    assert idx[0] == 0


@pytest.mark.parametrize("tile", [3, 64, 1024])
def test_tiled_nearest_code_equals_cdist_argmin(monkeypatch, tile):
    g = torch.Generator().manual_seed(tile)
    e, C = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g)
    C[150] = C[20]  # a duplicate code: both tie for the same rows, the lower index must win
    e[:10] = C[20]
    monkeypatch.setattr(plumbing, "CPU_TILE", tile)  # 3: many code tiles and 3-row blocks
    idx = vqvae.nearest_code(e, C, 4096)
    assert torch.equal(idx, torch.cdist(e, C).argmin(1))
    assert (idx[:10] == 20).all()


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
def test_log_colsum_equals_logsumexp_of_log_softmax(scale):
    """log sum_n p_nk, including columns whose every p underflows to 0 in float32 (formed again in log space)."""
    g = torch.Generator().manual_seed(int(scale))
    e1 = torch.cat([torch.randn(64, 4, generator=g), torch.ones(64, 1)], 1)
    W = torch.randn(300, 5, generator=g) * scale
    logits = e1 @ W.t()
    p = torch.softmax(logits, dim=1)
    got, under = ba_kernels._log_colsum(p.sum(0), e1, W, torch.logsumexp(logits, 1), chunk=16)
    want = torch.logsumexp(torch.log_softmax(logits.double(), dim=1), dim=0)
    assert torch.isfinite(got).all()
    if scale > 1:
        assert (p.sum(0) == 0).any() and under is not None  # the underflow route ran ...
        assert set(under.tolist()) >= set((p.sum(0) == 0).nonzero().squeeze(1).tolist())  # ... on those columns
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_small_cpu_blocks_change_nothing(monkeypatch):
    g = torch.Generator().manual_seed(1)
    e, C = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    log_Q0 = torch.full((50,), -math.log(50))
    ref_idx = vqvae.nearest_code(e, C, 4096)
    ref = vqvae.ba_assign(e, C, log_Q0, 0.9, 2, 4096, want_sums=True)
    monkeypatch.setattr(plumbing, "CPU_CHUNK_ELEMENTS", 7 * 50)  # 7-row blocks
    assert plumbing.chunk_rows(4096, 50, e.device) == 7
    assert torch.equal(vqvae.nearest_code(e, C, 4096), ref_idx)
    for a, b in zip(vqvae.ba_assign(e, C, log_Q0, 0.9, 2, 4096, want_sums=True), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("learn_codebook", [False, True])
def test_ba_matches_direct_when_chunks_underflow(iters, learn_codebook):
    """Large beta and small chunks: many columns of each chunk underflow, yet values and gradients (through z,
    log Q and the entropy) agree with autograd through the (N, K) formula."""
    g = torch.Generator().manual_seed(7 + iters)
    e0 = torch.randn(256, 6, generator=g)
    C0 = e0[torch.randperm(256, generator=g)[:40]] + 0.1 * torch.randn(40, 6, generator=g)  # codes near data
    log_Q0 = torch.full((40,), -math.log(40))
    w_z, w_q = torch.randn(256, 6, generator=g), torch.randn(40, generator=g)
    beta = 100.0

    def run(fn):
        e, C = e0.clone().requires_grad_(), C0.clone().requires_grad_(learn_codebook)
        z, log_Q, idx = fn(e, C)[:3]
        ((z * w_z).sum() + (log_Q.exp() * w_q).sum() + vqvae.entropy_from_log(log_Q)).backward()
        return z, log_Q, idx, e.grad, C.grad

    p = torch.softmax(-beta * torch.cdist(e0[:16], C0) ** 2, dim=1)
    assert (p.sum(0) == 0).float().mean() > 0.25  # many columns of a 16-row chunk underflow
    chunked = run(lambda e, C: vqvae.ba_assign(e, C, log_Q0, beta, iters, chunk=16, memory=0))
    direct = run(lambda e, C: vqvae.ba_assign_direct(e, C, log_Q0, beta, iters))
    for name, a, b in zip(["z", "log_Q", "idx", "grad_e", "grad_C"], chunked, direct):
        if b is None:
            assert a is None and not learn_codebook
        elif a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            assert torch.isfinite(a).all(), name
            assert ((a - b).norm() / b.norm()).item() <= 1e-4, name


@pytest.mark.parametrize("K,k", [(4096, 16), (640, 9), (256, 8), (100, 5)])
def test_row_topk_equals_torch_topk(K, k):
    """Blocked top-k (CPU fast path where K is a multiple of the block) against torch.topk, ties included."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(37, K, generator=g)
    x[0, 5:40] = 7.0  # a row of ties at the top
    v, i = plumbing.row_topk(x, k)
    want_v, _ = x.topk(k, dim=1)
    assert torch.equal(v, want_v)
    assert torch.equal(x.gather(1, i), v)  # the indices point at those values
    assert (i.sort(1).values.diff(dim=1) > 0).all()  # distinct columns


def _ba_pass(e0, C0, log_Q0, beta, memory, chunk=4096):
    """A default-like BA pass (hard codes: z unused; the mutual-information term) and its gradients."""
    e, C = e0.clone().requires_grad_(), C0.clone().requires_grad_()
    out = vqvae.ba_assign(e, C, log_Q0, beta, 1, chunk=chunk, want_sums=True, want_z=False, memory=memory)
    loss = -(vqvae.entropy_from_log(out.log_Q) - out.H_p)
    loss.backward()
    return out.log_Q, out.sums, out.H_p, loss, e.grad, C.grad


@pytest.mark.parametrize("beta", [0.5, 200.0])  # diffuse, and sharp with underflowing columns
def test_ba_kept_and_recomputed_logits_give_the_same_bits(beta):
    g = torch.Generator().manual_seed(5)
    e0, C0 = torch.randn(300, 8, generator=g), torch.randn(64, 8, generator=g)
    log_Q0 = torch.full((64,), -math.log(64))
    block = ba_kernels.LIVE_BLOCKS * 64 * 64 * 4  # room for 64-row blocks only: the backward forms the logits again
    assert ba_kernels.ba_plan(300, 64, 1, 4096, torch.device("cpu"), 4, block, True) == (64, False)
    assert ba_kernels.ba_plan(300, 64, 1, 64, torch.device("cpu"), 4, 1 << 20, True) == (64, True)  # here it keeps them
    kept = _ba_pass(e0, C0, log_Q0, beta, 1 << 20, chunk=64)
    made = _ba_pass(e0, C0, log_Q0, beta, block)
    # the same block size in both (64 rows), so both run the same arithmetic on the same operands
    for a, b in zip(kept, made):
        assert torch.equal(a, b)


class _PeakBlockBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of live (rows, columns) blocks the ops under it create, K of them or fewer (the underflowing
    ones): 2-D outputs of another shape than (N or K, D..D+2), each until its storage is freed."""

    def __init__(self, K: int, D: int):
        super().__init__()
        self.K, self.D, self.live, self.peak, self.seen = K, D, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == self.K or t.shape[1] <= self.D + 2:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.data_ptr(), storage.nbytes())
        return out

    def _free(self, ptr, n):
        self.seen.discard(ptr)
        self.live -= n


@pytest.mark.parametrize("memory_kib", [1024, 8192])  # blocks only; blocks and the kept logits
def test_ba_pass_stays_within_its_memory_budget(memory_kib):
    """Peak bytes of the (rows, K) blocks a whole BA pass allocates (forward and backward, at a sharp beta: the
    underflow route too), counted as they are made and freed, stay within the budget, kept logits included."""
    g = torch.Generator().manual_seed(6)
    N, K, D = 256, 4096, 4  # logits 4 MiB
    e0, C0 = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    log_Q0 = torch.full((K,), -math.log(K))
    rows, keep = ba_kernels.ba_plan(N, K, 1, 4096, torch.device("cpu"), 4, memory_kib << 10, True)
    assert keep == (memory_kib == 8192) and rows < N
    with _PeakBlockBytes(K, D) as count:
        _ba_pass(e0, C0, log_Q0, 300.0, memory_kib << 10)
    assert (N * K * 4 if keep else 0) < count.peak <= memory_kib << 10
