"""The activation quantize in Gluon (Hopper): x through shared memory once, the low-rank MMA
beside the quantize arithmetic.

Same contract and the same codes as ``quantize.quantize_act`` for a plain 16-bit input
(no tail, no gated input): ``x`` [M, K] -> fp8 operands [M, k_out] and the low-rank down
projection's fp32 sums [M, r] (reference ``reference.quantize_act_ref``). Why a second
kernel: in the Triton kernel the low-rank branch makes the quantize 1.35× longer at
K = 3072 (v47: 40% of copy against 54% without it) — x goes from registers into shared
memory for the MMA every step, and the MMA is waited for at once (v47: folding the
smoothing into L_down once gained nothing there; Triton's two-stage pipeline cost
registers and ran 0.59–0.70× as fast). Here

* x arrives by **TMA** in shared memory (two stages: the next step's tile is requested
  before this one is used; the copy engine holds no registers and zero-fills past M and
  K), where the **asynchronous** ``wgmma`` reads it directly, while the warps read the same
  tile into registers for the codes — the MMA runs during the quantize arithmetic and is
  waited for at the end of the step;
* L_down's chunk comes by TMA in the same stage (one barrier for both) and is folded
  (``· diag(1/s)``, rounded to 16 bits: the Triton kernel's operation) in place, and the
  smoothing vector is loaded a step ahead: v48's first version loaded both when the step
  began, and Nsight Compute found its warps waiting there most (the reciprocal of s:
  18% of the stall samples, 31% without the low-rank branch).

Same grid as the Triton kernel (row blocks of 64 × the K split; the split's partial sums
meet through fp32 atomics). Off by default (``quantize.WS_QUANTIZE``): alone 1.02–1.23×
as fast as the Triton kernel from 4096 rows, but no faster in the layer or a model's step
(``bench/NOTES.md`` v48); GPU only (sm_90, a triton with Gluon: ``gemm_ws.available``),
no interpreter.
"""

from __future__ import annotations

import torch

from svdquant.kernels import gemm_ws
from svdquant.kernels._triton_common import cdiv, num_sms, pdl_supported
from svdquant.kernels.launch import launch

if gemm_ws.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from svdquant.kernels.gemm_ws import int4_codes

__all__ = ["quantize_act_ws", "supports"]

#: rows a program, columns a step, warps (one warpgroup: wgmma's 64 rows)
BLOCK_M, BLOCK_K, WARPS = 64, 128, 4
#: ranks it takes: one power-of-two part up to 64 (LoRA-stacked ranks stay on Triton's)
RANKS = (0, 16, 32, 64)
#: For the probe's A/B (``probe_layer.py --set quantize_ws.PREFETCH=False``): request the
#: next step's tile before using this one's (else after: one buffer's worth in flight);
#: wait for the low-rank MMA after the codes (else at once, as the Triton kernel does).
PREFETCH = True
ASYNC_MMA = True


def supports(x: torch.Tensor, lowrank_down: torch.Tensor, k_out: int) -> bool:
    """Whether this kernel takes the call: a 16-bit x and L_down whose rows TMA can read
    (K a multiple of 8, the data 16-byte aligned), L_down in x's dtype at a rank of ``RANKS``,
    ``k_out`` at least K and a multiple of 16."""
    k = x.shape[1]
    return (
        gemm_ws.available(x.device)
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.data_ptr() % 16 == 0
        and lowrank_down.dtype == x.dtype
        and (lowrank_down.shape[0] == 0 or lowrank_down.data_ptr() % 16 == 0)
        and lowrank_down.shape[0] in RANKS
        and k % 8 == 0
        and k_out >= k
        and k_out % 16 == 0
    )


if gemm_ws.HAVE_GLUON:

    @gluon.jit
    def _request_stage(x_desc, ld_desc, bar, x_buf, ld_buf, row0, k, NBYTES: gl.constexpr,
                       HAS_LORA: gl.constexpr):  # fmt: skip
        """One stage by TMA, on one barrier: x's tile at (row0, k) and (with the low-rank
        branch) L_down's chunk at column k."""
        mbarrier.expect(bar, NBYTES)
        tma.async_copy_global_to_shared(x_desc, [row0, k], bar, x_buf)
        if HAS_LORA:
            tma.async_copy_global_to_shared(ld_desc, [0, k], bar, ld_buf)

    @gluon.jit
    def _quantize_ws_kernel(
        x_desc,
        ld_desc,
        smooth_ptr,
        scale_ptr,
        xq_ptr,
        lora_ptr,
        M,
        K,
        K_OUT,
        R,
        k_per_split,
        stride_qm,
        stride_lm,
        INT4: gl.constexpr,
        HAS_LORA: gl.constexpr,
        ATOMIC: gl.constexpr,
        WARPS: gl.constexpr,
        PDL_TRIGGER: gl.constexpr = False,
        PDL_WAIT_LAST: gl.constexpr = False,
        PREFETCH: gl.constexpr = True,
        ASYNC_MMA: gl.constexpr = True,
    ):
        # programmatic dependent launch, as the Triton kernel's (``quantize_act``'s
        # ``trigger`` and ``pdl``): the widen launched next may start at once, or (launched
        # as the widen's dependent) the last program waits for the widen to finish
        if PDL_TRIGGER:
            gdc_launch_dependents()
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BR: gl.constexpr = ld_desc.block_type.shape[0]
        dtype: gl.constexpr = x_desc.dtype
        # registers: rows of 8 contiguous 16-bit values a thread (16-byte shared loads)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        # the step's columns one a thread, for their IEEE reciprocals (one division each,
        # then spread to the columns' threads, instead of 16 a thread)
        one: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        row0 = gl.program_id(0) * BM
        k_start = gl.program_id(1) * k_per_split
        k_end = gl.minimum(k_start + k_per_split, gl.maximum(K, K_OUT))
        steps = gl.cdiv(k_end - k_start, BK)
        inv_act = gl.div_rn(1.0, gl.load(scale_ptr))
        nbytes: gl.constexpr = x_desc.block_type.nbytes + (
            ld_desc.block_type.nbytes if HAS_LORA else 0
        )

        # a stage: x's tile and (with the low-rank branch) L_down's chunk, one barrier
        x_bufs = gl.allocate_shared_memory(dtype, [2, BM, BK], x_desc.layout)
        if HAS_LORA:
            ld_bufs = gl.allocate_shared_memory(dtype, [2, BR, BK], ld_desc.layout)
        else:
            ld_bufs = x_bufs  # (a stand-in: without the low-rank branch never requested)
        ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()
        gl.thread_barrier()  # the barriers initialized for every warp that waits on them
        _request_stage(x_desc, ld_desc, ready.index(0), x_bufs.index(0), ld_bufs.index(0),
                       row0, k_start, nbytes, HAS_LORA)  # fmt: skip

        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
        rmask = rows < M
        g = gl.arange(0, BK, layout=gl.SliceLayout(0, blk))
        c1 = k_start + gl.arange(0, BK, layout=one)
        s_next = gl.load(smooth_ptr + c1, mask=c1 < K, other=1.0)
        if HAS_LORA:
            mma: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BR, 16]
            )
            acc = gl.zeros([BM, BR], gl.float32, mma)
        for i in range(steps):
            s = i % 2
            k0 = k_start + i * BK
            if PREFETCH and i + 1 < steps:  # the next stage now (its buffers freed last step)
                _request_stage(x_desc, ld_desc, ready.index(1 - s), x_bufs.index(1 - s),
                               ld_bufs.index(1 - s), row0, k0 + BK, nbytes, HAS_LORA)  # fmt: skip
            # this step's smoothing (loaded a step ahead: its latency hidden), the next's
            smooth = s_next
            c1 = k0 + BK + gl.arange(0, BK, layout=one)
            s_next = gl.load(smooth_ptr + c1, mask=c1 < K, other=1.0)
            inv_s = gl.convert_layout(gl.div_rn(1.0, smooth), gl.SliceLayout(0, blk))
            cols = k0 + g
            x_smem = x_bufs.index(s)
            mbarrier.wait(ready.index(s), (i // 2) & 1)
            if HAS_LORA:  # L_down's chunk · diag(1/s), rounded to 16 bits (Triton's fold),
                # in place; then the MMA runs while the codes come from the same x tile
                ld_smem = ld_bufs.index(s)
                ld16 = (ld_smem.load(blk).to(gl.float32) * gl.expand_dims(inv_s, 0)).to(dtype)
                gl.thread_barrier()  # every warp has read the raw chunk
                ld_smem.store(ld16)
                fence_async_shared()
                gl.thread_barrier()
                acc = warpgroup_mma(x_smem, ld_smem.permute((1, 0)), acc, is_async=True)
                if not ASYNC_MMA:
                    acc = warpgroup_mma_wait(0, deps=(acc,))
            xh = x_smem.load(blk).to(gl.float32) * gl.expand_dims(inv_s, 0)
            if INT4:
                q = gl.convert_layout(int4_codes(xh, inv_act, BM, BK), blk)
            else:  # fp8 operands of x̂ itself (``to_e4m3``: saturated at ±448)
                q = gl.minimum(gl.maximum(xh * inv_act, -448.0), 448.0).to(gl.float8e4nv)
            qmask = gl.expand_dims(rmask, 1) & gl.expand_dims(cols < K_OUT, 0)
            qptrs = xq_ptr + gl.expand_dims(rows, 1) * stride_qm + gl.expand_dims(cols, 0)
            gl.store(qptrs, q, mask=qmask)
            if HAS_LORA:
                acc = warpgroup_mma_wait(0, deps=(acc,))
            # every warp done with this stage before the next request overwrites it through
            # the copy engine (the async proxy)
            gl.thread_barrier()
            fence_async_shared()
            if not PREFETCH and i + 1 < steps:  # the next stage only now
                _request_stage(x_desc, ld_desc, ready.index(1 - s), x_bufs.index(1 - s),
                               ld_bufs.index(1 - s), row0, k0 + BK, nbytes, HAS_LORA)  # fmt: skip
        if HAS_LORA:
            pm = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
            pr = gl.arange(0, BR, layout=gl.SliceLayout(0, mma))
            lptrs = lora_ptr + gl.expand_dims(pm, 1) * stride_lm + gl.expand_dims(pr, 0)
            lmask = gl.expand_dims(pm < M, 1) & gl.expand_dims(pr < R, 0)
            if ATOMIC:
                gl.atomic_add(lptrs, acc, mask=lmask, sem="relaxed")
            else:
                gl.store(lptrs, acc, mask=lmask)
        if PDL_WAIT_LAST:  # (a compile-time branch around a runtime one)
            last_m = gl.program_id(0) == gl.num_programs(0) - 1
            if last_m & (gl.program_id(1) == gl.num_programs(1) - 1):
                gdc_wait()


def quantize_act_ws(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
    trigger: bool = False,
    pdl: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize.quantize_act`` for a plain input on this kernel (``supports``): the same
    ``(xq fp8 [M, k_out], lora_act fp32 [M, r])``, the codes bit for bit; ``trigger``,
    ``pdl`` and ``out`` as there (the widen beside it, ``ops.quantize_and_widen``)."""
    from svdquant.kernels.quantize import k_split, outputs

    if act_fmt not in ("int4", "fp8"):
        raise ValueError(f"the fp8 engine quantizes activations to int4 or fp8, got {act_fmt!r}")
    if not supports(x, lowrank_down, k_out):
        raise ValueError(
            "quantize_act_ws takes a 16-bit x with K a multiple of 8 on an sm_90 GPU, L_down "
            f"in x's dtype at a rank of {RANKS} and k_out >= K, a multiple of 16; got x "
            f"{tuple(x.shape)} {x.dtype}, L_down {tuple(lowrank_down.shape)} "
            f"{lowrank_down.dtype}, k_out {k_out}"
        )
    m, k = x.shape
    r = lowrank_down.shape[0]
    x, lowrank_down = x.contiguous(), lowrank_down.contiguous()
    pdl = pdl and pdl_supported(x.device)
    steps = cdiv(k_out, BLOCK_K)
    m_blocks = cdiv(m, BLOCK_M)
    split, per_split = k_split(m_blocks, steps, num_sms(x.device))
    xq, lora = outputs(m, k_out, r, split, x.device, out)
    if m == 0:
        return xq, lora
    layout = gemm_ws._layout(BLOCK_M, BLOCK_K, x.dtype)
    desc = GluonDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], layout)
    ld_desc = desc  # (a stand-in without the low-rank branch: never read)
    if r:
        ld_layout = gemm_ws._layout(r, BLOCK_K, x.dtype)
        ld_desc = GluonDescriptor.from_tensor(lowrank_down, [r, BLOCK_K], ld_layout)
    launch(
        _quantize_ws_kernel,
        (m_blocks, split),
        desc,
        ld_desc,
        smooth.float().contiguous(),
        act_scale.float().reshape(1),
        xq,
        lora,
        m,
        k,
        k_out,
        r,
        per_split * BLOCK_K,
        xq.stride(0),
        lora.stride(0) if r else 0,
        INT4=act_fmt == "int4",
        HAS_LORA=r > 0,
        ATOMIC=split > 1,
        WARPS=WARPS,
        PDL_TRIGGER=trigger and pdl_supported(x.device),
        PDL_WAIT_LAST=pdl,
        PREFETCH=PREFETCH,
        ASYNC_MMA=ASYNC_MMA,
        num_warps=WARPS,
        **({"launch_pdl": True} if pdl else {}),
    )
    return xq, lora
