"""Host side of the prefill kernels behind ``torch.ops.memattn.attention``: which calls they support, and the plan
of a call signature (every kernel argument that is not a tensor, decided once; see launch.py).

Same semantics as ``codegen/reference.py`` (read that first); this is the fast path that dispatch.py calls. The
kernels: prefill_fwd.py (forward), prefill_bwd.py (dq, then dk/dv); their device helpers and flag table: tiles.py;
autotuning: autotune.py; TMA descriptors: tma.py.
"""
from __future__ import annotations

import torch

from attn_compiler import config

from . import autotune, prefill_bwd, prefill_fwd, reference, tiles, tma
from .reference import Spec

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # z*h goes on grid axis 1

# MEMATTN_CAUSAL_LOOP's names (attn_compiler/config.py lists them) -> CAUSAL_LOOP (tiles.py's flag table)
CAUSAL_LOOPS = {"split": 0, "one": 1}
assert set(config.VARIABLES["MEMATTN_CAUSAL_LOOP"].allowed) == {"", *CAUSAL_LOOPS}, "config.py and CAUSAL_LOOPS differ"


def causal_loop(block_d: int) -> int:
    """CAUSAL_LOOP for a causal forward of padded head dim ``block_d``: MEMATTN_CAUSAL_LOOP names one; unset, one
    loop for 128 (faster there) and two otherwise (level or faster; benchmarks/results/tuning_notes.md)."""
    name = config.read("MEMATTN_CAUSAL_LOOP")   # ValueError naming the loops for another name
    return CAUSAL_LOOPS[name or ("one" if block_d == 128 else "split")]


def next_pow2(n: int) -> int:
    """The least power of two >= n (n >= 1), in plain Python: Triton's next_power_of_2 is a constexpr function
    whose host calls cost microseconds each, on every launch."""
    return 1 << (n - 1).bit_length()


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _as4(t, shape):
    """Broadcast view of a bias/mask (any broadcastable shape) as 4-D: broadcast dims get stride 0, no copy."""
    return t.expand(shape)


def supports(*args):
    """(ok, reason). Takes the positional arguments of ``forward`` (7) or ``backward`` (11)."""
    if len(args) == 7:
        q, k, v, bias, mask, seed, spec = args
        bias_grad = False
    elif len(args) == 11:
        _dout, q, k, v, _out, _stats, bias, mask, seed, spec, bias_grad = args
    else:
        return False, f"triton_prefill.supports takes 7 or 11 arguments, got {len(args)}"
    if not (q.is_cuda or config.interpret()):
        return False, "tensors are not on a CUDA device (and TRITON_INTERPRET is not set)"
    if q.dtype not in _DTYPES:
        return False, f"unsupported dtype {q.dtype} (fp16, bf16, fp32 only)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False, f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False, "q, k, v must be 4-D"
    if q.shape[3] > _MAX_HEAD_DIM or v.shape[3] > _MAX_HEAD_DIM:
        return False, f"unsupported head dim {q.shape[3]}/{v.shape[3]} (at most {_MAX_HEAD_DIM})"
    if q.shape[1] % k.shape[1]:
        return False, "query heads are not a multiple of kv heads"
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        return False, f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the grid limit {MAX_GRID_Y}"
    devs = {t.device for t in (q, k, v, bias, mask) if t is not None}
    if len(devs) > 1:
        return False, f"tensors on several devices {sorted(map(str, devs))}"
    if bias is not None and bias.dtype not in _DTYPES:
        return False, f"unsupported bias dtype {bias.dtype}"
    if mask is not None and mask.dtype != torch.bool:
        return False, f"mask must be bool, got {mask.dtype}"
    if abs(spec.causal_offset) >= 2 ** 31 - 2 ** 20:
        return False, "causal_offset does not fit int32"
    if bias_grad and bias is None:
        return False, "bias_grad without a bias"
    return True, ""


def _dot_precision(dtype) -> str:
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and config.interpret():
        return "upcast"
    return "tf32"


def kernel_args(q, k, v, bias, mask, seed, spec: Spec):
    z, h, m, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    full = (z, h, m, n)
    dummy = q.new_empty(1)
    if bias is not None:
        b4 = _as4(bias, full)
        b_strides = b4.stride()
    else:
        b4, b_strides = dummy, (0, 0, 0, 0)
    if mask is not None:
        m4 = _as4(mask, full).view(torch.uint8)
        m_strides = m4.stride()
    else:
        m4, m_strides = dummy, (0, 0, 0, 0)
    has_drop = spec.dropout_p > 0
    if has_drop:
        sd = seed if seed is not None else torch.zeros((), dtype=torch.int64)
        sd = sd.reshape(1).to(device=q.device, dtype=torch.int64)
    else:
        sd = dummy
    softcap = spec.softcap != 0  # even in softcap: a negative cap is the same function as its absolute value
    natural = bias is not None or mask is not None
    unit = 1.0 if natural else tiles.LOG2E  # scores in natural units or with log2(e) folded in
    scal = dict(
        qk_scale=spec.scale * unit,
        softcap_in=(spec.scale / spec.softcap) if softcap else 0.0,
        softcap_out=(spec.softcap * unit) if softcap else 0.0,
        fill2=spec.mask_fill * unit,
        causal_offset=int(spec.causal_offset),
        dropout_p=float(spec.dropout_p),
        inv_keep=(1.0 / (1.0 - spec.dropout_p)) if has_drop else 1.0,
    )
    flags = dict(
        BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), EVEN_D=_pow2(d) == d, EVEN_DV=_pow2(dv) == dv,
        IS_CAUSAL=bool(spec.causal), HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        MASK_KEEP=bool(spec.mask_keep), HAS_DROPOUT=has_drop, SOFTCAP=softcap,
        SAFE_SOFTMAX=bool(spec.safe_softmax), NATURAL=natural, DOT_PREC=_dot_precision(q.dtype),
    )
    return dict(z=z, h=h, m=m, n=n, d=d, hkv=hkv, dv=dv, b4=b4, b_strides=b_strides, m4=m4, m_strides=m_strides,
                seed=sd, scal=scal, flags=flags)


def fuse_scale(c) -> bool:
    """The kernels' plain-score path (FUSE_SCALE, forward and backward): no bias, mask or softcap (so scores stay
    in the log2 domain), and a positive scale (a negative one would turn the forward's row max of qk into the min
    of the scores, and the -inf of a masked key into +inf)."""
    f = c["flags"]
    return not (f["HAS_BIAS"] or f["HAS_MASK"] or f["SOFTCAP"]) and c["scal"]["qk_scale"] > 0


def _seed_arg(seed, device):
    """The dropout seed as the kernels read it: a one-element int64 tensor on the device."""
    sd = seed if seed is not None else torch.zeros((), dtype=torch.int64)
    if sd.device != device or sd.dtype != torch.int64 or sd.dim() != 1:
        sd = sd.reshape(1).to(device=device, dtype=torch.int64)
    return sd


class Empty:
    """The plan of a call with nothing to compute: no query rows or heads (empty outputs), or no keys (eager's
    p @ v sums nothing: zeros, and row max -inf)."""

    def __init__(self, out_shape, out_strides, stats_shape, dtype, device, no_keys: bool):
        self.out_shape, self.out_strides, self.stats_shape = out_shape, out_strides, stats_shape
        self.dtype, self.device, self.no_keys = dtype, device, no_keys

    def __call__(self, *_tensors):
        out = torch.empty_strided(self.out_shape, self.out_strides, dtype=self.dtype, device=self.device)
        stats = torch.empty(self.stats_shape, dtype=torch.float32, device=self.device)
        if self.no_keys:
            return out.zero_(), stats.fill_(float("-inf"))
        return out, stats


class _Forward:
    """A planned prefill forward: allocates out and stats and launches attn_fwd (see plan_forward)."""

    __slots__ = ("launch", "spec", "out_shape", "out_strides", "stats_shape", "dtype", "device", "dummy",
                 "has_drop", "tma")

    def __call__(self, q, k, v, bias, mask, seed):
        out = torch.empty_strided(self.out_shape, self.out_strides, dtype=self.dtype, device=self.device)
        stats = torch.empty(self.stats_shape, dtype=torch.float32, device=self.device)
        d = self.dummy
        b = d if bias is None else bias                 # the kernel reads bias and mask through their planned
        mk = d if mask is None else mask.view(torch.uint8)   # strides: a broadcast view needs no expand
        sd = _seed_arg(seed, self.device) if self.has_drop else d
        if self.tma is None:
            self.launch(q, k, v, b, mk, sd, out, stats, k, v)
            return out, stats
        try:
            self.launch(q, k, v, b, mk, sd, out, stats, tma.desc_like(self.tma[0], k), tma.desc_like(self.tma[1], v))
        except Exception as e:  # noqa: BLE001 - a TMA compile/encode failure: the pointer-load plan computes the same
            tma.failure(e)
            return plan_forward(q, k, v, bias, mask, seed, self.spec)(q, k, v, bias, mask, seed)
        return out, stats


def plan_forward(q, k, v, bias, mask, seed, spec: Spec):
    """The prefill forward of one call signature, as a callable (q, k, v, bias, mask, seed) -> (out [Z, H, M, Dv]
    in v.dtype and spec.out_layout, stats [2, Z, H, M] fp32: row max, log row sum). Everything but the tensors
    is decided here, once: the kernel's flags, scalars and strides, TMA, the launch (bound after its first run)."""
    c = kernel_args(q, k, v, bias, mask, seed, spec)
    z, h, m, n = c["z"], c["h"], c["m"], c["n"]
    out_shape, out_strides = (z, h, m, c["dv"]), reference.out_strides(z, h, m, c["dv"], spec.out_layout)
    stats_shape = (2, z, h, m)
    if m == 0 or z * h == 0 or n == 0:
        return Empty(out_shape, out_strides, stats_shape, v.dtype, q.device, no_keys=m > 0 and z * h > 0)
    kd, vd, use_tma = tma.descs(k, v)
    named = dict(**c["scal"], BUCKET_M=autotune.bucket(m), BUCKET_N=autotune.bucket(n), **c["flags"],
                 FUSE_SCALE=fuse_scale(c),
                 CAUSAL_LOOP=causal_loop(max(c["flags"]["BLOCK_D"], c["flags"]["BLOCK_DV"])) if spec.causal else 0,
                 USE_TMA=use_tma, WARP_SPEC=use_tma and tma.warp_spec_wanted())

    def grid(meta):
        return (-(-m // meta["BLOCK_M"]), z * h)
    args = (q, k, v, c["b4"], c["m4"], c["seed"], None, None, kd, vd,
            *q.stride(), *k.stride(), *v.stride(), *c["b_strides"], *c["m_strides"], *out_strides,
            h, m, n, c["d"], c["dv"], h // c["hkv"], z * h * m)
    plan = _Forward()
    plan.launch = autotune.kernel_launch(prefill_fwd.attn_fwd_tuned, grid, args, named, n_tensors=10)
    plan.spec, plan.out_shape, plan.out_strides, plan.stats_shape = spec, out_shape, out_strides, stats_shape
    plan.dtype, plan.device, plan.dummy = v.dtype, q.device, q.new_empty(1)
    plan.has_drop = c["flags"]["HAS_DROPOUT"]
    plan.tma = (kd, vd) if use_tma else None
    return plan


def forward(q, k, v, bias, mask, seed, spec: Spec):
    """One forward call, planned afresh (dispatch.py keeps plans by call signature); returns (out, stats)."""
    return plan_forward(q, k, v, bias, mask, seed, spec)(q, k, v, bias, mask, seed)


class _Backward:
    """A planned prefill backward: allocates the gradients and launches attn_bwd_dq, then attn_bwd_dkdv (see
    plan_backward)."""

    __slots__ = ("dq_launch", "dkdv_launch", "q_shape", "k_shape", "v_shape", "delta_shape", "dtype", "device",
                 "dummy", "has_drop", "bias_grad", "bias_shape", "bias_dtype", "stats32")

    def __call__(self, dout, q, k, v, out, stats, bias, mask, seed):
        dev = self.device
        dq = torch.empty(self.q_shape, dtype=self.dtype, device=dev)
        dk = torch.empty(self.k_shape, dtype=self.dtype, device=dev)
        dv = torch.empty(self.v_shape, dtype=self.dtype, device=dev)
        delta = torch.empty(self.delta_shape, dtype=torch.float32, device=dev)
        d = self.dummy
        b = d if bias is None else bias
        mk = d if mask is None else mask.view(torch.uint8)
        sd = _seed_arg(seed, dev) if self.has_drop else d
        if self.stats32:
            stats = stats.to(torch.float32).contiguous()
        # dq first: it sums the exact delta that the dk/dv kernel's ds (and dbias) needs (see the header)
        self.dq_launch(q, k, v, b, mk, sd, dout, out, stats, delta, dq)
        if self.bias_grad:
            dbias32 = torch.zeros(self.bias_shape, dtype=torch.float32, device=dev)
            self.dkdv_launch(q, k, v, b, mk, sd, dout, stats, delta, dk, dv, dbias32)
            return dq, dk, dv, dbias32.to(self.bias_dtype)
        self.dkdv_launch(q, k, v, b, mk, sd, dout, stats, delta, dk, dv, d)
        return dq, dk, dv, None


class _EmptyBackward:
    """No rows, keys or heads: the gradients are zeros (and dbias too, when asked for)."""

    def __init__(self, bias_grad: bool):
        self.bias_grad = bias_grad

    def __call__(self, dout, q, k, v, out, stats, bias, mask, seed):
        dbias = torch.zeros(bias.shape, dtype=bias.dtype, device=q.device) if self.bias_grad else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias


def plan_backward(dout, q, k, v, out, stats, bias, mask, seed, spec: Spec, bias_grad: bool):
    """The backward of one call signature, as a callable (dout, q, k, v, out, stats, bias, mask, seed) ->
    (dq, dk, dv, dbias or None), recomputing the probabilities blockwise from the stats."""
    c = kernel_args(q, k, v, bias, mask, seed, spec)
    z, h, m, n, hkv = c["z"], c["h"], c["m"], c["n"], c["hkv"]
    if m == 0 or n == 0 or z * h == 0:
        return _EmptyBackward(bias_grad)
    stats32 = stats.dtype != torch.float32 or not stats.is_contiguous()   # the kernels read it contiguous
    named = dict(**c["scal"], scale=float(spec.scale), BUCKET_M=autotune.bucket(m), BUCKET_N=autotune.bucket(n),
                 **c["flags"], FUSE_SCALE=fuse_scale(c))
    dq_strides, dk_strides, dv_strides = (_contiguous_strides(t.shape) for t in (q, k, v))
    dq_args = (q, k, v, c["b4"], c["m4"], c["seed"], dout, out, stats, None, None,
               *q.stride(), *k.stride(), *v.stride(), *c["b_strides"], *c["m_strides"], *dout.stride(),
               *out.stride(), *dq_strides, h, m, n, c["d"], c["dv"], h // hkv, z * h * m)

    def grid_q(meta):
        return (-(-m // meta["BLOCK_M"]), z * h)

    if bias_grad:
        db_strides = torch.empty(bias.shape, device="meta").expand(z, h, m, n).stride()  # dbias32's, broadcast
        db_sum = dict(HAS_DBIAS=True, DB_SUM_M=db_strides[2] == 0 and m > 1, DB_SUM_N=db_strides[3] == 0 and n > 1)
    else:
        db_strides = (0, 0, 0, 0)
        db_sum = dict(HAS_DBIAS=False, DB_SUM_M=False, DB_SUM_N=False)
    dkdv_args = (q, k, v, c["b4"], c["m4"], c["seed"], dout, stats, None, None, None, None,
                 *q.stride(), *k.stride(), *v.stride(), *c["b_strides"], *c["m_strides"], *dout.stride(),
                 *dk_strides, *dv_strides, *db_strides,
                 h, hkv, m, n, c["d"], c["dv"], h // hkv, z * h * m)

    def grid_kv(meta):
        return (-(-n // meta["BLOCK_N"]), z * hkv)
    plan = _Backward()
    plan.dq_launch = autotune.kernel_launch(prefill_bwd.attn_bwd_dq_tuned, grid_q, dq_args, named, n_tensors=11)
    plan.dkdv_launch = autotune.kernel_launch(prefill_bwd.attn_bwd_dkdv_tuned, grid_kv, dkdv_args,
                                              dict(**named, **db_sum), n_tensors=12)
    plan.q_shape, plan.k_shape, plan.v_shape, plan.delta_shape = q.shape, k.shape, v.shape, (z, h, m)
    plan.dtype, plan.device, plan.dummy = q.dtype, q.device, q.new_empty(1)
    plan.has_drop, plan.bias_grad, plan.stats32 = c["flags"]["HAS_DROPOUT"], bias_grad, stats32
    plan.bias_shape = bias.shape if bias is not None else None
    plan.bias_dtype = bias.dtype if bias is not None else None
    return plan


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def backward(dout, q, k, v, out, stats, bias, mask, seed, spec: Spec, bias_grad: bool):
    """One backward call, planned afresh (dispatch.py keeps plans by call signature): (dq, dk, dv, dbias or
    None)."""
    return plan_backward(dout, q, k, v, out, stats, bias, mask, seed, spec, bias_grad)(dout, q, k, v, out, stats,
                                                                                      bias, mask, seed)

