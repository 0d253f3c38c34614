"""The numerics below BA's method: `ba_assign`, the E-M pass of `vqvae.ba_assign_direct` in blocks of rows with a
hand-written backward, within one memory budget (`ba_plan`), and its top-k truncation `ba_assign_topk`. vqvae.py
holds the specification (`ba_assign_direct`) directly above the quantizer that calls these; the tests hold the two
to agreement (tests/test_ba_modes.py, test_quantizers.py, test_quantizer_fast_paths.py, test_ba_topk.py).
Symbols as in vqvae.py: e (N, D) latents, C (K, D) codes, p = p(k|e), Q the marginal, beta the inverse temperature.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Optional

import torch

import plumbing
from plumbing import chunk_rows, dist_logsumexp, dist_sum_, log_total_rows, row_argmax, row_topk, with_ones

# ################################################################################################################
# Exact E-M pass (ba_assign)
# ################################################################################################################

class BAResult(typing.NamedTuple):
    """What a BA E-M pass returns (ba_assign, ba_assign_topk and the plain ba_assign_direct alike)."""
    z_soft: torch.Tensor  # (N, D) sum_k p(k|e_n) c_k; (0, D) when not asked for
    log_Q: torch.Tensor  # (K,) log of the marginal after the last M-step
    idx: torch.Tensor  # (N,) argmax_k p(k|e_n)
    counts: torch.Tensor  # (K,) N Q, this rank's share of the soft counts (summed over ranks: N_global Q)
    sums: Optional[torch.Tensor]  # (K, D) p^T e, for an EMA codebook (when asked for)
    H_p: torch.Tensor  # () mean_n H(p(.|e_n)) in nats; carries gradient
    max_p: torch.Tensor  # () mean_n max_k p(k|e_n)
    p: Optional[torch.Tensor] = None  # (N, K), from ba_assign_direct only


def ba_assign(e, C, log_Q0, beta, iters: int, chunk: int, want_sums: bool = False, want_z: bool = True,
              memory: int = 1 << 30) -> BAResult:
    """`ba_assign_direct`, in blocks of rows with a hand-written backward, within `memory` bytes (`ba_plan`). beta: a
    float or a 0-d tensor (the training step's, so it never leaves the device). want_z=False skips the soft mixture
    (a (rows, K) x (K, D) GEMM per block) and returns z_soft empty (0, D): a decoder fed hard codes never reads it."""
    beta = torch.as_tensor(beta, dtype=e.dtype, device=e.device)
    return BAResult(*_BAAssign.apply(e, C, log_Q0, beta, int(iters), int(chunk), want_sums, int(memory), want_z))


LIVE_BLOCKS = 5  # (rows, K) temporaries a BA block holds at once at most: the backward's logits, p, dL/dl, and the
# underflowing columns' logits and terms (<= K columns each)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k a_nk b_nk (N,) as a batched dot product: no (N, K) product is ever held."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def ba_plan(N: int, K: int, iters: int, chunk: int, device, elem: int, memory: int, grad: bool) -> tuple[int, bool]:
    """(rows per block, keep): blocks of at most `chunk` rows (and the device's cache-sized cap, `chunk_rows`) with
    LIVE_BLOCKS of them within `memory` bytes. The forward keeps every iteration's logits for the backward when they
    take at most half of it (blocks get the rest), else the backward forms them again (a GEMM and a row max per
    block). Either way the
    backward's p comes from the same operations on the same logits, so both give the same bits."""
    kept = iters * N * K * elem
    keep = grad and kept <= memory // 2  # then blocks get the other half at least
    room = memory - kept if keep else memory
    return max(1, min(N, chunk_rows(chunk, K, device), room // (LIVE_BLOCKS * K * elem))), keep


class _BAAssign(torch.autograd.Function):
    """`ba_assign`'s forward and backward.

    Iteration t:  logits = log Q_{t-1} - beta ||e - c||^2,  p_t = softmax(logits),
                  log Q_t = log sum_n p_t - log N  (the M-step: column sums accumulated chunk by chunk, in log space
                  for columns whose sum underflows, `_log_colsum`).
    Outputs as BAResult (statistics, counts, sums and max p carry no gradient; H_p does). Backward recomputes each
    chunk's logits (or reuses those the forward kept, `ba_plan`) and runs `_BAIteration.backward` from the last
    iteration to the first, so the gradient flows through every log Q_{t-1} as autograd's would through the direct
    formula.

    Data-parallel ranks (torch.distributed): Q is the marginal over the rows of ALL ranks (N = the global count).
    Each rank's loss sees that one Q, and DDP averages parameter gradients over ranks, so backward returns
    world x (this rank's share of the gradient of the global batch's loss): the adjoint of log Q and the column
    sums that carry it to log Q_{t-1} are summed over ranks. DDP's mean then equals one process on the global batch.
    """

    @staticmethod
    def forward(ctx, e, C, log_Q0, beta, iters, chunk, want_sums, memory, want_z):
        ctx.set_materialize_grads(False)  # an output nobody used (z with hard codes) gets no adjoint, and no GEMM
        N, K = len(e), len(C)
        chunk, cache = ba_plan(N, K, iters, chunk, e.device, e.element_size(), memory, any(ctx.needs_input_grad[:2]))
        c_sq = (C * C).sum(1)  # (K,)
        log_Qs, saved, lse_cs, unders = [log_Q0], [[] for _ in range(iters)], [], []
        z = e.new_empty(len(e) if want_z else 0, C.shape[1])  # (N, D)
        idx = torch.empty(N, dtype=torch.long, device=e.device)
        sums = torch.zeros_like(C) if want_sums else None  # (K, D)
        log_N = log_total_rows(N, e.device)  # every rank's rows (a rank's slice of a ragged batch may be empty)
        e1 = with_ones(e)  # (N, D+1)
        H_sum, max_p_sum = e.new_zeros(()), e.new_zeros(())
        pl = e.new_empty(N)  # (N,) sum_k p_nk l_nk of the last iteration
        # logits are shifted by their row max before anything reads them: they can sit at beta ||e||^2 / dbar ~ 1e3
        # from 0, where float32 keeps ~1e-4 of absolute precision, while p, log p and H(p) depend on differences
        for t in range(iters):
            last = t == iters - 1
            col = torch.zeros(K, dtype=e.dtype, device=e.device)  # sum_n p_nk over the chunks so far
            lse_c, top_all = e.new_empty(N), e.new_empty(N)  # (N,) log sum_k exp(l_nk - max_k l_nk), max_k l_nk
            W = _ba_logit_weights(C, c_sq, log_Qs[-1], beta)  # (K, D+1)
            for s in range(0, N, chunk):
                rows = slice(s, s + chunk)
                logits = e1[rows] @ W.t()  # (chunk, K)
                top, arg = row_argmax(logits) if last else (logits.amax(1), None)  # (chunk,)
                logits.sub_(top[:, None])  # (chunk, K) l - max l <= 0
                if cache:
                    saved[t].append(logits)
                p = torch.softmax(logits, dim=1)  # (chunk, K)
                col += p.sum(0)
                max_p = p.amax(1)  # (chunk,) = exp(0 - lse_c): the row logsumexp from a fast reduction
                lse_c[rows], top_all[rows] = -max_p.log(), top
                if last:
                    if want_z:
                        torch.mm(p, C, out=z[rows])
                    idx[rows] = arg
                    if want_sums:
                        sums.addmm_(p.t(), e[rows])
                    pl[rows] = row_dot(p, logits)  # sum_k p_nk l_nk, which backward's usage-term adjoint needs
                    H_sum += (lse_c[rows] - pl[rows]).sum()  # H(p_n) = lse_n - sum_k p_nk l_nk
                    max_p_sum += max_p.sum()
                del logits, p  # before the next block's are made: LIVE_BLOCKS counts one block's
            log_colsum, under = _log_colsum(col, e1, W, top_all + lse_c, chunk)
            log_Qs.append(dist_logsumexp(log_colsum) - log_N)
            lse_cs.append(lse_c)
            unders.append(under)
        ctx.save_for_backward(e, C, z, beta, pl, *log_Qs, *lse_cs)
        ctx.saved_logits = saved if cache else None
        ctx.cfg = (iters, chunk, log_N, unders)
        counts = log_Qs[-1].exp() * N
        # H_p and max p are means over this rank's rows: DDP's mean over ranks makes them the global batch's
        H_p, max_p = H_sum / max(N, 1), max_p_sum / max(N, 1)
        ctx.mark_non_differentiable(*(t for t in (idx, counts, sums, max_p) if t is not None))
        return z, log_Qs[-1], idx, counts, sums, H_p, max_p

    @staticmethod
    def backward(ctx, g_z, g_logQ, _g_idx, _g_counts, _g_sums, g_H, _g_max_p):
        e, C, z, beta, pl, *logs = ctx.saved_tensors
        iters, chunk, log_N, unders = ctx.cfg
        log_Qs, lse_cs = logs[:iters + 1], logs[iters + 1:]
        g_e = torch.zeros_like(e)
        g_C = torch.zeros_like(C) if ctx.needs_input_grad[1] else None
        # every rank's loss depends on the one global log Q: summed, its adjoint counts each rank's loss once
        g_lq = dist_sum_(g_logQ.clone() if g_logQ is not None else torch.zeros_like(log_Qs[-1]))
        for t in reversed(range(iters)):
            it = _BAIteration(e, C, log_Qs[t], log_Qs[t + 1], lse_cs[t], log_N, beta, chunk, unders[t],
                              ctx.saved_logits[t] if ctx.saved_logits is not None else None)
            last = t == iters - 1  # z = p_T C and H_p carry gradient to the last iteration only
            g_lq = it.backward(g_z if last else None, z, g_lq, g_e, g_C, want_prev=t > 0,
                               g_H=g_H if last else None, pl=pl)  # g_H None when H_p was not used
            if t > 0:  # log Q_{t-1} is global too: its adjoint sums the column sums of every rank's rows
                g_lq = dist_sum_(g_lq)
        return g_e, g_C, None, None, None, None, None, None, None


@dataclass
class _BAIteration:
    """One E-M iteration t of `_BAAssign`, for its backward pass.

    Forward (per row n, code k):
        l_nk = log Q_{t-1,k} + 2 beta e_n.c_k - beta ||c_k||^2      (- beta ||e_n||^2, removed by the softmax)
        p_nk = softmax_k(l_n)_k,         log Q_t,k = log sum_n p_nk - log N,        z_n = sum_k p_nk c_k  (t = T)
    Backward, given the adjoints g_z (N, D) of z (last iteration only) and g_q (K,) of log Q_t:
        dL/dp_nk        = G_nk + w_k,           G = g_z C^T,   w_k = g_q,k / (N Q_t,k)
        dL/dl_nk        = p_nk (G_nk + w_k - r_n),   r_n = sum_k p_nk (G_nk + w_k) = g_z_n.z_n + p_n.w
                                                     (softmax Jacobian: each row of dL/dl sums to zero)
        dL/de_n         = 2 beta sum_k dL/dl_nk c_k  (the -beta ||e_n||^2 term adds (row sum) e_n = 0)
        dL/dc_k         = sum_n p_nk g_z_n  +  2 beta sum_n dL/dl_nk e_n  -  2 beta c_k sum_n dL/dl_nk
        dL/dlog Q_{t-1} = sum_n dL/dl_nk             (log Q_{t-1,k} enters every row's logit for k)
    With the adjoint g_H of H_p = mean_n H(p_n), H(p_n) = -sum_k p_nk log p_nk (last iteration only), and
    log p_nk = l_nk - lse_n:
        dL/dl_nk       += -(g_H / N) p_nk (log p_nk + H(p_n)) = -(g_H / N) p_nk (l_nk - sum_j p_nj l_nj)
    (lse_n cancels), so with h = g_H / N a chunk's whole adjoint is one expression over its (rows, K) block:
        dL/dl_nk        = p_nk (G_nk + w_k - h l_nk + s_n),     s_n = h sum_j p_nj l_nj - r_n.
    For the columns whose Q_t,k underflowed in the forward (where w_k may overflow), w_k is set to 0 and their terms
    p_nk w_k are formed in log space, g_q,k exp(log p_nk - log Q_t,k - log N), and added (to r_n and to their
    columns of dL/dl). The forward found those columns, so the backward needs no host sync to look for them.
    """
    e: torch.Tensor  # (N, D)
    C: torch.Tensor  # (K, D)
    log_Q_prev: torch.Tensor  # (K,) log Q_{t-1}, the prior this iteration's E-step used
    log_Q: torch.Tensor  # (K,) log Q_t, its M-step's result
    lse_c: torch.Tensor  # (N,) each row's log sum_k exp(l_nk - max_k l_nk), from the forward
    log_N: float | torch.Tensor
    beta: torch.Tensor  # () in squared latent units
    chunk: int
    under: Optional[torch.Tensor]  # (n_under,) the columns whose Q_t underflowed in the forward, or None
    saved_logits: Optional[list[torch.Tensor]]  # this iteration's l - max l, block by block, when forward kept them

    def backward(self, g_z, z, g_q, g_e, g_C, want_prev: bool, g_H=None, pl=None) -> torch.Tensor:
        """Adds this iteration's share to g_e (N, D) and g_C (K, D) in place; returns dL/dlog Q_{t-1} (K,). With
        g_H, `pl` (N,) holds the forward's sum_k p_nk l_nk (the same bits this pass's p and logits would give)."""
        e, C, under = self.e, self.C, self.under
        W = _ba_logit_weights(C, (C * C).sum(1), self.log_Q_prev, self.beta)  # (K, D+1)
        e1 = with_ones(e)  # (N, D+1)
        w = g_q * torch.exp(-self.log_Q - self.log_N)  # (K,)
        if under is not None:
            w = w.index_fill(0, under, 0.0)
        h = g_H / len(e) if g_H is not None else None
        # [g_z, s, 1] @ [C, 1, w]^T = G + s + w: one GEMM forms the row and column terms beside G
        right = torch.cat([C, torch.ones_like(w)[:, None], w[:, None]], 1) if g_z is not None else None
        C2, e2 = (2 * self.beta) * C, (2 * self.beta) * e  # dL/de = 2 beta dL/dl C, and so on
        g_q_prev = torch.zeros_like(g_q)
        for j, s in enumerate(range(0, len(e), self.chunk)):
            rows, arg, a = slice(s, s + self.chunk), None, None
            if self.saved_logits is not None:
                logits = self.saved_logits[j]  # (chunk, K) l - max l, from the forward
            else:
                logits = e1[rows] @ W.t()  # formed again as in the forward
                logits.sub_(logits.amax(1, keepdim=True))
            p = torch.softmax(logits, dim=1)  # (chunk, K), the forward's operation on the same logits: its bits
            r = p @ w  # (chunk,)
            if g_z is not None:
                r += (g_z[rows] * z[rows]).sum(1)
            if under is not None:
                # log p - log Q - log N <= 0 (p_nk <= N Q_k); below -87 exp leaves its fast path for a result
                # under 1e-38, so the clamp changes nothing that float32 holds
                arg = logits.index_select(1, under).sub_(self.lse_c[rows, None]).sub_(self.log_Q[under] + self.log_N)
                a = g_q[under] * arg.clamp_(min=-87.0).exp_()  # (chunk, n_under) p_nk w_k
                r += a.sum(1)
            s_row = -r if h is None else pl[rows].mul(h).sub_(r)  # (chunk,)
            if g_z is not None:
                left = torch.cat([g_z[rows], s_row[:, None], torch.ones_like(s_row)[:, None]], 1)
                g_l = left @ right.t()  # (chunk, K) G + w + s
            else:
                g_l = w + s_row[:, None]
            if h is not None:
                g_l.addcmul_(logits, h, value=-1)
            g_l.mul_(p)  # dL/dl
            if under is not None:
                g_l.index_add_(1, under, a)
            g_e[rows].addmm_(g_l, C2)
            col = g_l.sum(0) if want_prev or g_C is not None else None  # (K,) sum_n dL/dl_nk
            if want_prev:
                g_q_prev += col
            if g_C is not None:
                if g_z is not None:
                    g_C.addmm_(p.t(), g_z[rows])
                g_C.addmm_(g_l.t(), e2[rows])
                g_C.sub_(col[:, None] * C2)
            del logits, p, g_l, arg, a  # before the next block's are made: LIVE_BLOCKS counts one block's
        return g_q_prev


def _ba_logit_weights(C, c_sq, log_Q, beta):
    """W (K, D+1) with [e, 1] W^T = 2 beta e.c_k - beta ||c_k||^2 + log Q_k = log Q_k - beta ||e - c_k||^2 up to the
    per-row constant -beta ||e||^2, which the softmax removes. The bias rides in the GEMM as an extra column:
    addmm's broadcast copy of it into the (chunk, K) output costs as much as the GEMM itself at D = 64."""
    return torch.cat([(2.0 * beta) * C, (log_Q - beta * c_sq)[:, None]], 1)


def _log_colsum(col, e1, W, lse_row, chunk) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log sum_n p_nk (K,), the underflowing columns or None): from the linear column sums `col` (K,), and in log
    space (logsumexp) for the columns whose sum underflows, so log Q stays finite even at beta = 1e4. A column counts
    as underflowing when all its terms may be subnormal (sum < N x smallest normal), where float32 keeps too few
    digits (a sum stored as 2.8e-45 was 13% off); above that the subnormal terms' rounding is below 1e-7 of the sum.
    Those columns' logits are formed again (a GEMM of N x (their number)), log p = logits - lse_row. Whether there
    are any is the one host read of an exact BA step (their number sets the shapes that follow)."""
    out = col.log()
    under = col < torch.finfo(col.dtype).tiny * len(e1)
    if not bool(under.any()):
        return out, None
    cols = under.nonzero().squeeze(1)
    Wu = W.index_select(0, cols)  # (n_under, D+1)
    lse = torch.full((len(cols),), -math.inf, dtype=col.dtype, device=col.device)
    for s in range(0, len(e1), chunk):
        log_p = (e1[s:s + chunk] @ Wu.t()).sub_(lse_row[s:s + chunk, None])  # (chunk, n_under)
        m = log_p.amax(0)
        # a column's logsumexp. Terms more than 87 below the column max add < 1e-38 to a sum >= 1, so clamping
        # them there changes nothing and keeps exp off its slow underflow path (about 10x slower on CPU)
        lse = torch.logaddexp(lse, log_p.sub_(m).clamp_(min=-87.0).exp_().sum(0).log_().add_(m))
    out[cols] = lse
    return out, cols


# ################################################################################################################
# Top-k truncation (ba_assign_topk)
# ################################################################################################################

def ba_assign_topk(e, C, log_Q0, beta, k: int, chunk: int, want_sums: bool = False, want_z: bool = True) -> BAResult:
    """`ba_assign` (one E-M iteration) with each row's p(.|e_n) truncated to its k largest logits T_n and
    renormalised there: p~_nk = exp(l_nk) / sum_{j in T_n} exp(l_nj). Everything after the (chunk, K) logits and
    their top-k is (N, k): Q, H_p, the EMA sums and the whole backward. A code in no row's top k gets Q = 0, held as
    log Q = LOG_Q_FLOOR so H(Q) stays finite. How much mass the truncation drops is `topk_dropped_mass`'s to
    measure."""
    beta = torch.as_tensor(beta, dtype=e.dtype, device=e.device)
    return BAResult(*_BATopK.apply(e, C, log_Q0, beta, int(k), int(chunk), want_sums, want_z))


LOG_Q_FLOOR = -1e4  # log Q of a code no row kept: exp() is 0 and Q log Q is 0, both finite


class _BATopK(torch.autograd.Function):
    """The backward is `_BAIteration`'s formula on the kept entries only (h = g_H / N, w_k = g_q,k / (N Q_k)):
        dL/dl_nk = p~_nk (G_nk - h l_nk + h sum_j p~_nj l_nj - r_n) + p~_nk w_k,   r_n = sum_j p~_nj (G_nj + w_j),
    G_nk = g_z_n.c_k, with p~ w formed as g_q,k p~_nk / (N Q_k) (<= g_q,k: a row's share of its code's mass).
    Data-parallel ranks: Q is the marginal over all ranks' rows, as in `_BAAssign`."""

    @staticmethod
    def forward(ctx, e, C, log_Q0, beta, k, chunk, want_sums, want_z):
        ctx.set_materialize_grads(False)
        N, K, D = len(e), len(C), C.shape[1]
        chunk = chunk_rows(chunk, K, e.device)
        W = _ba_logit_weights(C, (C * C).sum(1), log_Q0, beta)  # (K, D+1)
        e1 = with_ones(e)
        logits, ids = e.new_empty(N, k), torch.empty(N, k, dtype=torch.long, device=e.device)
        for s in range(0, N, chunk):  # the only (rows, K) work: one GEMM and a top-k per chunk
            logits[s:s + chunk], ids[s:s + chunk] = row_topk(e1[s:s + chunk] @ W.t(), k)
        logits -= logits[:, :1].clone()  # l - max l, as in _BAAssign (p, H and the backward read differences)
        lse = torch.logsumexp(logits, 1, keepdim=True)  # (N, 1) over the kept codes
        p = (logits - lse).exp()  # (N, k), rows sum to 1
        flat = ids.reshape(-1)
        col = dist_sum_(torch.zeros(K, dtype=e.dtype, device=e.device).index_add_(0, flat, p.reshape(-1)))
        log_Q = col.log().clamp_(min=LOG_Q_FLOOR) - log_total_rows(N, e.device)
        z = e.new_empty(N if want_z else 0, D)
        sums = torch.zeros_like(C) if want_sums else None
        for rows, Ck in _kept_code_blocks(C, ids, e.device):  # (rows, k, D) blocks of each row's kept codes
            if want_z:
                torch.bmm(p[rows].unsqueeze(1), Ck, out=z[rows].unsqueeze(1))
            if want_sums:
                sums.index_add_(0, ids[rows].reshape(-1), (p[rows].unsqueeze(2) * e[rows].unsqueeze(1)).reshape(-1, D))
        H_p = (lse.squeeze(1) - (p * logits).sum(1)).mean() if N else e.new_zeros(())
        max_p = p[:, 0].mean() if N else e.new_zeros(())
        ctx.save_for_backward(e, C, z, logits, ids, p, col, beta)
        counts = log_Q.exp() * N  # this rank's share N Q of the soft counts, as in _BAAssign
        ctx.mark_non_differentiable(*(t for t in (ids, counts, sums, max_p) if t is not None))
        return z, log_Q, ids[:, 0].contiguous(), counts, sums, H_p, max_p

    @staticmethod
    def backward(ctx, g_z, g_logQ, _g_idx, _g_counts, _g_sums, g_H, _g_max_p):
        e, C, z, logits, ids, p, col, beta = ctx.saved_tensors
        N, D = len(e), C.shape[1]
        g_q = dist_sum_(g_logQ.clone()) if g_logQ is not None else torch.zeros_like(col)
        h = g_H / N if g_H is not None else None
        g_e = torch.empty_like(e)
        g_C = torch.zeros_like(C) if ctx.needs_input_grad[1] else None
        for rows, Ck in _kept_code_blocks(C, ids, e.device):
            p_r, l_r, ids_r = p[rows], logits[rows], ids[rows]
            a = g_q[ids_r] * p_r / col[ids_r].clamp_min(torch.finfo(col.dtype).tiny)  # (rows, k) p~ w
            G = torch.bmm(Ck, g_z[rows].unsqueeze(2)).squeeze(2) if g_z is not None else None  # (rows, k)
            inner = -(a.sum(1, keepdim=True) + ((p_r * G).sum(1, keepdim=True) if G is not None else 0))  # -r
            if G is not None:
                inner = inner + G
            if h is not None:
                inner = inner + h * ((p_r * l_r).sum(1, keepdim=True) - l_r)
            g_l = p_r * inner + a  # (rows, k) dL/dl
            torch.bmm(g_l.unsqueeze(1), Ck, out=g_e[rows].unsqueeze(1)).mul_(2.0 * beta)
            if g_C is not None:
                flat = ids_r.reshape(-1)
                upd = (2.0 * beta) * (g_l.unsqueeze(2) * (e[rows].unsqueeze(1) - Ck))  # (rows, k, D)
                if g_z is not None:
                    upd += p_r.unsqueeze(2) * g_z[rows].unsqueeze(1)
                g_C.index_add_(0, flat, upd.reshape(-1, D))
        return g_e, g_C, None, None, None, None, None, None


def _kept_code_blocks(C, ids, device):
    """(row slice, C[ids[rows]] (rows, k, D)) over blocks of rows, each gather a few MiB that stay in cache."""
    N, k = ids.shape
    step = max(1, plumbing.CPU_CHUNK_ELEMENTS // (k * C.shape[1])) if device.type == "cpu" else N
    for s in range(0, N, step):
        rows = slice(s, s + step)
        yield rows, C.index_select(0, ids[rows].reshape(-1)).view(-1, k, C.shape[1])


@torch.no_grad()
def topk_dropped_mass(e, C, log_Q0, beta, k: int, chunk: int) -> torch.Tensor:
    """Mean over rows of the exact probability mass outside each row's k most likely codes (one E-step's p)."""
    K = len(C)
    W = _ba_logit_weights(C, (C * C).sum(1), log_Q0, beta)
    e1 = with_ones(e)
    total, chunk = e.new_zeros(()), chunk_rows(chunk, K, e.device)
    for s in range(0, len(e), chunk):
        p = torch.softmax(e1[s:s + chunk] @ W.t(), 1)  # (chunk, K)
        # the k largest p are the k largest logits'; summing p avoids a logsumexp of logits ~1e3 from 0
        total += (1 - row_topk(p, k)[0].sum(1)).clamp_(min=0).sum()
    return total / max(len(e), 1)
