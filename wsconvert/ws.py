"""The Weight Standardization parametrization and its fused autograd path.

A converted layer keeps its module class and its pretrained weight; WS is registered on the weight
with :func:`torch.nn.utils.parametrize.register_parametrization`, so ``layer.weight`` is the
standardized weight (arXiv:1903.10520, Eq. 5-6) and the trainable tensor is
``layer.parametrizations.weight.original``.

Speed: WS runs on every training step. The forward centres each row and takes the norm of the
centred rows (two passes, faster than ``var_mean`` on CPU); the backward uses the closed form

    grad_w = s * (g - mean(g)) - k * mean(g * y) * y

with ``y`` the standardized rows, ``s`` the inverse spread and ``k`` set by the convention
(``s * N / (N - b)`` with eps inside the square root, ``N / ((N - b) * sigma)`` with eps added to
the std, ``b`` = 1 for the unbiased variance). That is batch norm's training backward for a
zero-mean input, so it runs as ATen's fused ``native_batch_norm_backward`` kernel, which also
returns the per-channel gain gradient. Only the output is saved for it (gamma / beta included:
the kernel's "mean" argument takes beta). On CPU the output goes into a per-layer workspace that
is reused once nothing holds the previous step's value, instead of a fresh page-faulting tensor
per step. :func:`accumulate` goes further for gradient accumulation: one standardization per
optimizer step instead of one per micro-batch, with exactly the same gradients.

Evaluation: when no gradient is recorded, the standardized weight is cached and reused until one
of its inputs changes, which is detected exactly (storage identity, version counters, layout,
dtype, device, eps, and any ``optimizer.step()``, since fused optimizers do not bump version
counters). Training frees the cache; the cache is never saved, pickled or copied. Figures and
pass counts: docs/performance.md.

``torch.func`` transforms (grad, vmap, jvp) cannot run the fused Function, and ``torch.jit.trace``
cannot record it; there the layer computes the same steps in plain autograd ops.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize

from wsconvert.conventions import (
    Convention,
    check_eps,
    fan_in,
    from_rows,
    get_convention,
    inv_std,
    standardize_rows,
    to_rows,
)
from wsconvert.errors import UsageError

__all__ = [
    "INIT_MODES",
    "WeightStandardization",
    "accumulate",
    "layer_weight",
    "register_ws",
    "standardize_ahead",
    "trainable_weight",
    "ws_parametrization",
]

INIT_MODES = ("plain", "scale", "exact")


_bn_backward = torch.ops.aten.native_batch_norm_backward
_FLOATS = (torch.float32, torch.float64)
# How many live tensors use a storage (``None`` where this torch lacks the helper: then no
# workspace is ever reused).
_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


_WORKSPACE_LOCK = threading.Lock()


def _only_holder(work: Tensor) -> bool:
    """True when ``work`` is the one tensor using its storage (no view, saved copy or alias of
    it is alive anywhere), so writing into it cannot change a value someone still holds."""
    if _storage_use_count is None:
        return False
    # ``untyped_storage()`` creates one more (temporary) holder: 2 means ``work`` alone.
    return _storage_use_count(work.untyped_storage()._cdata) == 2


def _version(t: Tensor | None) -> int | None:
    """``t``'s version counter (``None`` for no tensor, or an inference tensor: it has none)."""
    if t is None or t.is_inference():
        return None
    return t._version


def _plain_standardize(weight: Tensor, eps: float, unbiased: bool, eps_in_sqrt: bool,
                       transposed: bool, groups: int, scale: Tensor | None,
                       shift: Tensor | None, n: int) -> Tensor:
    """:class:`_Standardize`'s forward in plain autograd ops (the same steps in the same dtypes,
    values equal to rounding): for ``torch.func`` transforms and ``torch.jit.trace``, which
    cannot run the Function, and for its second-order gradients. ``n`` is the row length, given
    as a Python int (a size read while tracing would be recorded as a float32 divisor). A
    constant filter gets the fused backward's subgradient, and finite higher derivatives."""
    rows = to_rows(weight, transposed=transposed, groups=groups)
    x = rows if rows.dtype in _FLOATS else rows.float()
    b = 1 if unbiased else 0
    y = x - x.mean(dim=1, keepdim=True)
    squares = y.square().sum(dim=1, keepdim=True)
    if eps_in_sqrt:  # smooth everywhere: derivatives of every order, constant filters included
        s = torch.rsqrt(squares / (n - b) + eps)
    else:
        # sqrt has no derivative at 0 (a constant filter): there every order gets 0, the fused
        # backward's subgradient, instead of NaN.
        positive = squares > 0
        norm = torch.where(positive, torch.where(positive, squares, 1.0).sqrt(), 0.0)
        s = torch.reciprocal(norm / ((n - b) ** 0.5 if n > b else 0.0) + eps)
    z = y * s
    if scale is not None:
        z = z * scale.to(z.dtype).unsqueeze(1)
    if shift is not None:
        z = z + shift.to(z.dtype).unsqueeze(1)
    return from_rows(z.to(weight.dtype), weight.shape, transposed=transposed, groups=groups)


class _Standardize(torch.autograd.Function):
    """``z = a * (x - mu) * s + c`` per row (``a``, ``c`` optional), statistics in float32 or
    wider, closed-form backward.

    The backward ``a * s * (g - mean(g) - r * mean(g * y) * y)`` (``y = (x - mu) * s``,
    ``r = k / s``) is exactly batch norm's training backward for the input ``z`` with "mean"
    ``c``, "inverse std" ``sqrt(r) / a`` and affine weight ``a * s / sqrt(r) * a``: the
    normalized input ``(z - c) * sqrt(r) / a`` is ``y * sqrt(r)``. ATen's fused kernel does it
    row by row (two sweeps over a row that is still in cache) and also returns ``sum(g * y)``
    and ``sum(g)``, the gradients of ``a`` and ``c``. Only ``z`` is saved; the inputs are kept
    by reference (no copy, no version check) so that under ``create_graph=True`` the gradient
    is built as a graph through :func:`_plain_standardize` (second-order gradients).

    It takes and returns the weight in its own layout (the rows are a view inside, so no
    reshape nodes join the autograd graph). ``out``, when given, is a float32/float64 buffer of
    the rows' shape that receives ``z`` (a reused workspace: no fresh allocation, hence no page
    faults, on every step).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, eps: float, unbiased: bool, eps_in_sqrt: bool,
                transposed: bool, groups: int, scale: Tensor | None, shift: Tensor | None,
                out: Tensor | None) -> Tensor:
        rows = to_rows(weight, transposed=transposed, groups=groups)
        x = rows if rows.dtype in _FLOATS else rows.float()
        if not x.is_contiguous():
            x = x.contiguous()
        n = x.shape[1]
        b = 1 if unbiased else 0
        # Mean, centre, norm of the centred rows: two reads and a write, exact like a two-pass
        # variance. ``var_mean`` would read once but its Welford kernel is compute-bound on CPU
        # (8x slower here); the sum of squares in one pass cancels catastrophically when
        # |mean| >> std.
        mu = x.mean(dim=1, keepdim=True)
        y = torch.sub(x, mu, out=out) if out is not None else x - mu
        norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
        sigma: Tensor | None
        if eps_in_sqrt:
            s = norm.square_().div_(n - b).add_(eps).rsqrt_()
            sigma = None
        else:
            sigma = norm.div_((n - b) ** 0.5 if n > b else 0.0)
            s = torch.reciprocal(sigma + eps)
        a = None if scale is None else scale.to(y.dtype).unsqueeze(1)
        c = None if shift is None else shift.to(y.dtype).unsqueeze(1)
        # z - c gives back a * y to within ulp(c) / |a|: the order of the forward's own centring
        # error, ulp(mu) / sigma (for init="exact", c = mu and a = sigma). Whether every gain is
        # non-zero is only asked on CPU outside compile: on a GPU the answer would wait for the
        # device on every forward, and under torch.compile it would split the graph.
        if a is None or (x.device.type == "cpu" and not torch.compiler.is_compiling()
                         and bool((a != 0).all())):
            # In place: z = (y * s) * a + c, and z is all the backward needs. s and a are applied
            # in two sweeps, not one by s * a: the rounding of earlier releases, so saved models
            # give bit-identical outputs (tests/test_wsfile.py).
            z = y.mul_(s)
            if a is not None:
                z.mul_(a)
            if c is not None:
                z.add_(c)
            ctx.gain_in_z = True
            ctx.save_for_backward(z, s, sigma, a, c)
        else:
            # A zero gain possible: z no longer determines y, so y is kept (one more tensor).
            y.mul_(s)
            ctx.gain_in_z = False
            ctx.save_for_backward(y, s, sigma, a, None)
            z = y * a
            if c is not None:
                z.add_(c)
        ctx.unbiased, ctx.eps_in_sqrt = unbiased, eps_in_sqrt
        # The inputs by reference, for create_graph=True only: not saved tensors, so writing
        # into the weight between forward and backward stays allowed, as for the first order.
        ctx.inputs = (weight, scale, shift)
        ctx.versions = ((None, None, None) if torch.compiler.is_compiling()  # traced: no check
                        else tuple(_version(t) for t in ctx.inputs))
        ctx.layout = (weight.shape, transposed, groups, weight.dtype,
                      None if scale is None else scale.dtype,
                      None if shift is None else shift.dtype, eps, n / max(n - b, 1))
        z = z if weight.dtype is z.dtype else z.to(weight.dtype)
        return from_rows(z, weight.shape, transposed=transposed, groups=groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xin, s, sigma, a, c = ctx.saved_tensors  # unpacked once (activation checkpointing)
        shape, transposed, groups, weight_dtype, scale_dtype, shift_dtype, eps, ratio = ctx.layout
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            return _Standardize._differentiable_backward(ctx, grad, xin.shape[1])
        o = xin.shape[0]
        # sqrt(r): r = k / s (see the class docstring); sigma == 0 (a constant filter, y == 0)
        # has no derivative, and any finite r gives the subgradient s * (g - mean(g)).
        if sigma is None:
            sqrt_r = torch.full_like(s, ratio ** 0.5)
        else:
            sqrt_r = torch.where(sigma > 0, (sigma + eps).div_(sigma), 1.0).mul_(ratio).sqrt_()
        # (xin - mean) * invstd is the normalized row y * sqrt(r).
        invstd = sqrt_r if a is None or not ctx.gain_in_z else sqrt_r / a
        w = (s / invstd) if a is None else (s * a / invstd)
        mean = xin.new_zeros(o) if c is None else c.view(o)
        g = to_rows(grad if grad.dtype is xin.dtype else grad.to(xin.dtype),
                    transposed=transposed, groups=groups)
        want_a, want_c = ctx.needs_input_grad[6], ctx.needs_input_grad[7]
        gx, gw, gc = _bn_backward(g.contiguous().unsqueeze(0), xin.unsqueeze(0), w.view(o),
                                  None, None, mean, invstd.view(o), True, 0.0,
                                  [ctx.needs_input_grad[0], want_a, want_c])
        if gx is not None:
            gx = from_rows(gx.view(xin.shape), shape, transposed=transposed, groups=groups)
            gx = gx if gx.dtype is weight_dtype else gx.to(weight_dtype)
        ga = gw.div_(sqrt_r.view(o)).to(scale_dtype) if want_a else None
        gc = gc.to(shift_dtype) if want_c else None
        return gx, None, None, None, None, None, ga, gc, None

    @staticmethod
    def _differentiable_backward(ctx: Any, grad: Tensor, n: int) -> tuple[Tensor | None, ...]:
        """The gradients as a graph (second-order gradients, Hessians): autograd through
        :func:`_plain_standardize` on the inputs, which computes the same values."""
        weight, scale, shift = ctx.inputs
        if any(v is not None and _version(t) != v for t, v in zip(ctx.inputs, ctx.versions,
                                                                  strict=True)):
            raise RuntimeError("one of the variables needed for gradient computation has been "
                               "modified by an inplace operation: a WS layer's weight (or gain) "
                               "changed between the forward and a create_graph=True backward, "
                               "which needs its value at the forward")
        _, transposed, groups, _, _, _, eps, _ = ctx.layout
        positions = [(i, t) for i, t in ((0, weight), (6, scale), (7, shift))
                     if t is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            out = _plain_standardize(weight, eps, ctx.unbiased, ctx.eps_in_sqrt, transposed,
                                     groups, scale, shift, n)
            grads = torch.autograd.grad(out, [t for _, t in positions], grad, create_graph=True,
                                        allow_unused=True)
        result: list[Tensor | None] = [None] * 9
        for (i, _), g in zip(positions, grads, strict=True):
            result[i] = g
        return tuple(result)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_CACHE_SAFE_TYPES = (Tensor, nn.Parameter)


_is_functorch_wrapped: Callable[[Tensor], bool] = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)
# True inside ``torch.func`` transforms (grad, vmap, jvp, jacrev, functional_call under them),
# which cannot run an autograd.Function written with a ``ctx`` forward.
_in_functorch_transform: Callable[[], bool] = getattr(
    torch._C, "_are_functorch_transforms_active", lambda: False)


def _plain_ops_only() -> bool:
    """Inside ``torch.func`` transforms, which cannot run the fused Function; under forward-mode
    AD (it has no jvp); or while ``torch.jit.trace`` records (it would record the Function's
    in-place steps, which its graph cannot differentiate, and a cached value as a constant)."""
    return (_in_functorch_transform() or forward_ad._current_level >= 0
            or torch._C._get_tracing_state() is not None)


def _plain_tensors(tensors: tuple[Tensor | None, ...]) -> bool:
    """Tensors whose storage and version counter identify their value: not inference tensors
    (no version counter), not functorch wrappers or subclasses (no storage of their own)."""
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _CACHE_SAFE_TYPES or t.is_inference():
            return False
        if _is_functorch_wrapped(t):
            return False
    return True


def _meta(t: Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t._version, t.shape, t.stride(), t.storage_offset(), t.dtype,
            t.device)


class _OptimizerSteps:
    """Counts ``optimizer.step()`` calls process-wide (a global step post hook, registered the
    first time a WS layer caches a weight). Fused optimizers (``fused=True``) write parameters
    without bumping their version counters, so a step anywhere invalidates every cache."""

    count = 0
    _handle: Any = None

    @classmethod
    def watch(cls) -> int:
        if cls._handle is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            cls._handle = register_optimizer_step_post_hook(cls._bump)
        return cls.count

    @classmethod
    def _bump(cls, optimizer: Any, args: Any, kwargs: Any) -> None:
        cls.count += 1


def _meta_or_none(t: Tensor | None) -> tuple[Any, ...] | None:
    return None if t is None else _meta(t)


class _Stamp:
    """Exactly which tensor values a cached result was computed from.

    Per tensor: a weak reference to its storage (a freed storage invalidates, even if a new one
    later lands at the same address), its address, version counter (bumped by every in-place
    write: optimizer steps, ``copy_``, ``load_state_dict``), layout, dtype and device; and the
    layer's settings (``extra``).
    """

    __slots__ = ("key", "refs")

    def __init__(self, tensors: tuple[Tensor | None, ...], extra: tuple[Any, ...]) -> None:
        self.key = self._key(tensors, extra)
        self.refs = [StorageWeakRef(t.untyped_storage())  # type: ignore[no-untyped-call]
                     for t in tensors if t is not None]

    @staticmethod
    def _key(tensors: tuple[Tensor | None, ...], extra: tuple[Any, ...]) -> tuple[Any, ...]:
        weight, gain, gamma, beta = tensors
        assert weight is not None
        return (extra, _meta(weight), _meta_or_none(gain), _meta_or_none(gamma),
                _meta_or_none(beta))

    def matches(self, tensors: tuple[Tensor | None, ...], extra: tuple[Any, ...]) -> bool:
        try:
            if self._key(tensors, extra) != self.key:
                return False
        except RuntimeError:  # no storage or no version counter (wrapper, inference tensor)
            return False
        return not any(r.expired() for r in self.refs)  # type: ignore[no-untyped-call]


class WeightStandardization(nn.Module):
    """Parametrization: maps a stored weight to its standardized, optionally rescaled form.

    ``weight = gamma * (gain * c * standardize(w)) + beta`` per output channel, where ``c`` is
    ``gamma_scaled * N**-0.5`` for the ``scaled`` convention (else 1), ``gain`` a learnable
    parameter (``scaled`` convention or ``init="scale"``) and ``gamma`` / ``beta`` fixed buffers
    (``init="exact"``, as mmcv ``ConvAWS2d``). Absent pieces are ``None`` and cost nothing.

    Args:
        weight: the layer's current weight; gives the shape and, for ``scale`` / ``exact`` init,
            the statistics to preserve.
        convention: name in :data:`wsconvert.conventions.CONVENTIONS`.
        eps: overrides the convention's default.
        init: ``plain`` (pure WS), ``scale`` (learnable gain keeping each filter's magnitude) or
            ``exact`` (fixed gamma/beta so the layer computes the same function as before).
        transposed: the weight is a transposed conv's ``[in, out/groups, *k]``.
        groups: the layer's groups (only matters for transposed convs).
        scaled_gamma: the constant ``gamma`` of the ``scaled`` convention.

    Raises:
        UsageError: unknown convention or init, negative eps.
    """

    gain: nn.Parameter | None
    gamma: Tensor | None
    beta: Tensor | None

    def __init__(self, weight: Tensor, convention: str = "paper", eps: float | None = None,
                 init: str = "plain", *, transposed: bool = False, groups: int = 1,
                 scaled_gamma: float = 1.0) -> None:
        super().__init__()
        conv = get_convention(convention)
        if init not in INIT_MODES:
            raise UsageError(f"unknown init {init!r}; choose one of: {', '.join(INIT_MODES)}")
        e = conv.eps if eps is None else check_eps(eps)
        self.convention = conv.name
        self.eps = e
        self.init = init
        self.transposed = transposed
        self.groups = groups
        self.fan_in = fan_in(weight.shape, transposed=transposed, groups=groups)
        self.scaled_gamma = scaled_gamma
        self.scale = scaled_gamma * self.fan_in ** -0.5 if conv.fan_in_scale else 1.0
        out = to_rows(weight.detach(), transposed=transposed, groups=groups).shape[0]
        needs_gain = conv.fan_in_scale or init == "scale"
        self.gain = nn.Parameter(torch.ones(out, device=weight.device, dtype=weight.dtype)
                                 ) if needs_gain else None
        self.register_buffer("gamma", None)
        self.register_buffer("beta", None)
        if init != "plain":
            # The magnitude to keep: 1 / (s * c), with the exact eps of the convention, so that
            # gamma * c * (w - mu) * s + mu reproduces w up to rounding.
            rows = to_rows(weight.detach(), transposed=transposed, groups=groups).double()
            var, mu = torch.var_mean(rows, dim=1, correction=1 if conv.unbiased else 0)
            magnitude = (1.0 / (inv_std(var, conv, e) * self.scale)).to(weight.dtype)
            if init == "scale":
                assert self.gain is not None
                with torch.no_grad():
                    self.gain.copy_(magnitude)
            else:
                self.gamma = magnitude
                self.beta = mu.to(weight.dtype)
        self._accum: tuple[Tensor, Tensor] | None = None
        self._reset_transient()

    def _reset_transient(self) -> None:
        # Never saved (state_dict, pickle, deepcopy): see __getstate__.
        self._cache: tuple[_Stamp, Tensor, int] | None = None
        self._ahead: tuple[_Stamp, Tensor] | None = None
        self._work: list[Tensor] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_accum=None, _cache=None, _ahead=None, _work=[])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._accum = None
        self._reset_transient()

    def train(self, mode: bool = True) -> WeightStandardization:
        """Training frees the evaluation cache; evaluation frees the training workspace."""
        if mode:
            self._cache = None
        else:
            self._work = []
            self._ahead = None
        return super().train(mode)

    def clear_cache(self) -> None:
        """Drop the cached evaluation weight and the training workspace.

        Only needed after writing the trainable weight through ``.data`` (or another path that
        bypasses its version counter), which no cache can see.
        """
        self._reset_transient()

    @property
    def spec(self) -> Convention:
        return get_convention(self.convention)

    def extra_repr(self) -> str:
        return (f"convention={self.convention}, eps={self.eps:g}, init={self.init}, "
                f"fan_in={self.fan_in}")

    def config(self) -> dict[str, Any]:
        """What is needed to rebuild this parametrization (values come from the state dict)."""
        return {"convention": self.convention, "eps": self.eps, "init": self.init,
                "scaled_gamma": self.scaled_gamma}

    def _affine_parts(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``gain``, ``gamma``, ``beta`` (``None`` when absent). Direct dict reads where they
        normally are (this runs on every forward), else the attribute: a user may re-register
        one as a Parameter, or put a parametrization on it."""
        attrs, params, buffers = self.__dict__, self._parameters, self._buffers
        gain = attrs["gain"] if "gain" in attrs else (
            params["gain"] if "gain" in params else getattr(self, "gain", None))
        gamma = buffers["gamma"] if "gamma" in buffers else getattr(self, "gamma", None)
        beta = buffers["beta"] if "beta" in buffers else getattr(self, "beta", None)
        return gain, gamma, beta

    def _rows_shape(self, weight: Tensor) -> tuple[int, int]:
        return weight.numel() // self.fan_in, self.fan_in

    def _row_affine(self, weight: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Per-row multiplier and offset applied after standardizing (``None`` when absent)."""
        # In float32 (or float64) like the statistics: a gain rounded to fp16 before the multiply
        # would put an ulp between the trained forward and the float64 fold.
        dt = weight.dtype if weight.dtype in _FLOATS else torch.float32
        gain, gamma, beta = self._affine_parts()
        a: Tensor | None = None
        if gain is not None:
            a = gain.to(dt) * self.scale
        elif self.scale != 1.0:
            a = torch.full((self._rows_shape(weight)[0],), self.scale, dtype=dt,
                           device=weight.device)
        if gamma is not None:
            gamma = gamma.to(dt)
            a = gamma if a is None else a * gamma
        return a, None if beta is None else beta.to(dt)

    def standardize(self, weight: Tensor) -> Tensor:
        """Standardized weight, always computed (ignores :func:`accumulate` and the cache)."""
        return self._compute(weight, reuse=False)

    def _workspace(self, weight: Tensor) -> Tensor | None:
        """A buffer for the standardized rows that nothing else still uses (CPU only).

        A fresh weight-size tensor per layer per step costs page faults on CPU (glibc returns
        freed large blocks to the system); the CUDA caching allocator needs no such help.
        """
        if (weight.device.type != "cpu" or weight.dtype not in _FLOATS
                or torch.compiler.is_compiling() or not _plain_tensors((weight,))):
            return None  # never a buffer made inside a transform or of a tensor subclass
        shape = self._rows_shape(weight)
        with _WORKSPACE_LOCK:  # check and take (a new alias holds it) as one step
            for w in self._work:
                if (w.shape == shape and w.dtype == weight.dtype
                        and w.device == weight.device and _only_holder(w)):
                    return w.detach()
            new = torch.empty(shape, dtype=weight.dtype, device=weight.device)
            # At most two: a layer called twice per step (shared weights) reuses both.
            self._work = [*self._work[-1:], new]
            return new.detach()

    def _compute(self, weight: Tensor, reuse: bool) -> Tensor:
        if _plain_ops_only():
            return self._composite(weight)
        spec = self.spec
        with _no_autocast(weight.device.type):
            a, c = self._row_affine(weight)
            out = self._workspace(weight) if reuse else None
            return cast(Tensor, _Standardize.apply(  # type: ignore[no-untyped-call]
                weight, self.eps, spec.unbiased, spec.eps_in_sqrt, self.transposed,
                self.groups, a, c, out))

    def _composite(self, weight: Tensor) -> Tensor:
        """The layer's value in plain autograd ops (see :func:`_plain_ops_only`)."""
        spec = self.spec
        with _no_autocast(weight.device.type):
            a, c = self._row_affine(weight)
            return _plain_standardize(weight, self.eps, spec.unbiased, spec.eps_in_sqrt,
                                      self.transposed, self.groups, a, c, self.fan_in)

    def _inputs(self, weight: Tensor) -> tuple[Tensor | None, ...]:
        return (weight, *self._affine_parts())

    def _settings(self) -> tuple[Any, ...]:
        return (_OptimizerSteps.count, self.convention, self.eps, self.scale, self.transposed,
                self.groups)

    def _prefetch(self, weight: Tensor) -> None:
        """Standardize ``weight`` now, for this layer's next gradient-recording forward.

        The root hook of :func:`standardize_ahead` calls this for every layer at the start of a
        training forward. The standardization joins the autograd graph before any layer runs,
        so its backward runs after every other backward node (the engine runs later-created
        nodes first): the weight sweeps no longer interleave with the activation gradients.
        The layer's forward returns the value if its inputs are still exactly what they were.
        """
        state = self.__dict__
        state["_ahead"] = None  # release the workspace first
        state["_cache"] = None
        tensors = self._inputs(weight)
        if not _plain_tensors(tensors) or forward_ad._current_level >= 0:
            return  # sharded (DTensor), wrapped or dual tensors: the layer computes its own
        _OptimizerSteps.watch()
        value = self._compute(weight, reuse=True)
        state["_ahead"] = (_Stamp(tensors, self._settings()), value)

    def _records_grad(self, weight: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        if weight.requires_grad:
            return True
        return any(t is not None and t.requires_grad for t in self._affine_parts())

    def _cached(self, weight: Tensor) -> Tensor:
        """The standardized weight, recomputed only when an input changed (no gradient)."""
        # Runs on every evaluation forward: plain dict reads and writes, not Module attribute
        # machinery.
        state = self.__dict__
        if state["_work"] and not self.training:  # a no_grad forward in training keeps it
            state["_work"] = []
        tensors = self._inputs(weight)
        extra = self._settings()
        hit = state["_cache"]
        if (hit is not None and hit[1]._version == hit[2] and type(weight) in _CACHE_SAFE_TYPES
                and forward_ad._current_level < 0 and hit[0].matches(tensors, extra)):
            return cast(Tensor, hit[1])
        state["_cache"] = None  # release the stale value before computing the new one
        if not _plain_tensors(tensors) or forward_ad._current_level >= 0:
            return self._compute(weight, reuse=False)
        _OptimizerSteps.watch()
        # A normal tensor even under inference_mode: it has a version counter (a caller writing
        # into it invalidates it) and may later be used outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            value = self._compute(weight, reuse=False)
        state["_cache"] = (_Stamp(tensors, extra), value, value._version)
        return value

    def forward(self, weight: Tensor) -> Tensor:
        if self._accum is not None:
            return self._accum[1]
        if _plain_ops_only():  # no cache, workspace or value made ahead in there
            return self._composite(weight)
        if torch.compiler.is_compiling():
            return self._compute(weight, reuse=False)
        if self._records_grad(weight):
            state = self.__dict__
            state["_cache"] = None  # training frees the evaluation cache
            ahead = state["_ahead"]
            if ahead is not None:
                state["_ahead"] = None
                # Inside a region whose saved tensors are packed by hooks (non-reentrant
                # activation checkpointing), the recomputation must save what the first pass
                # saved: the layer standardizes for itself both times.
                if (_saved_tensor_hooks() is None
                        and ahead[0].matches(self._inputs(weight), self._settings())):
                    return cast(Tensor, ahead[1])
            return self._compute(weight, reuse=True)
        return self._cached(weight)

    def reference(self, weight: Tensor) -> Tensor:
        """Same value through the plain-autograd formula, in ``weight``'s dtype (for folding)."""
        rows = to_rows(weight, transposed=self.transposed, groups=self.groups)
        y = standardize_rows(rows, self.spec, self.eps)
        if self.spec.fan_in_scale:
            y = y * self.scaled_gamma  # standardize_rows already applied N**-0.5
        a = torch.ones(y.shape[0], dtype=y.dtype, device=y.device)
        if self.gain is not None:
            a = a * self.gain.to(y.dtype)
        if self.gamma is not None:
            a = a * self.gamma.to(y.dtype)
        y = y * a.unsqueeze(1)
        if self.beta is not None:
            y = y + self.beta.to(y.dtype).unsqueeze(1)
        return from_rows(y, weight.shape, transposed=self.transposed, groups=self.groups)


def ws_parametrization(module: nn.Module) -> WeightStandardization | None:
    """The :class:`WeightStandardization` registered on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)["weight"]):
        if isinstance(p, WeightStandardization):
            return p
    return None


def _no_hooks(module: nn.Module) -> bool:
    """No forward or backward hook on ``module``."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _no_global_hooks() -> bool:
    return not (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks
                or _torch_module._global_backward_pre_hooks)


def _sole_ws(module: nn.Module) -> tuple[WeightStandardization, Tensor] | None:
    """The WS module and stored weight of a layer whose weight has WS as its only
    parametrization, with no module hooks on either parametrization module (torch's own path
    runs those, so such a layer goes through it); else ``None``."""
    plists = module._modules.get("parametrizations")
    plist = None if plists is None else plists._modules.get("weight")
    if plist is None or len(plist._modules) != 1:
        return None
    p = plist._modules["0"]
    original = plist._parameters.get("original")
    if (type(p) is not WeightStandardization or original is None or not _no_hooks(p)
            or not _no_hooks(plist)):
        return None
    return p, original


def _fast_weight_getter(torch_getter: Callable[[nn.Module], Tensor]
                        ) -> Callable[[nn.Module], Tensor]:
    """``module.weight`` for a layer whose only parametrization is WS, without going through
    ``ParametrizationList`` (a module call and a raising ``hasattr`` probe per read: about half
    the cost of a cached evaluation read). Anything else goes to torch's own getter: a second
    parametrization, ``parametrize.cached()``, any module hook that torch's path would run."""

    def weight(self: nn.Module) -> Tensor:
        sole = _sole_ws(self)
        if sole is not None and not parametrize._cache_enabled and _no_global_hooks():
            return sole[0].forward(sole[1])
        return torch_getter(self)

    weight.__wsconvert_fast__ = True  # type: ignore[attr-defined]
    return weight


def register_ws(module: nn.Module, p: WeightStandardization) -> None:
    """Register ``p`` on ``module.weight`` (torch's ``register_parametrization``), with a faster
    ``module.weight`` read while WS is the layer's only parametrization."""
    parametrize.register_parametrization(module, "weight", p)
    cls = type(module)
    prop = cls.__dict__.get("weight")
    if (isinstance(prop, property) and prop.fget is not None
            and not getattr(prop.fget, "__wsconvert_fast__", False)):
        fast = property(_fast_weight_getter(prop.fget), prop.fset, prop.fdel)
        setattr(cls, "weight", fast)  # noqa: B010 (a class attribute mypy cannot see)


def _saved_tensor_hooks() -> Any:
    """The innermost saved-tensor hooks in force (``None`` when there are none)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


def _ahead_layers(root: nn.Module) -> Iterator[tuple[WeightStandardization, Tensor]]:
    """The layers of ``root`` that :func:`_sole_ws` accepts, with their stored weight."""
    for module in root.modules():
        sole = _sole_ws(module)
        if sole is not None:
            yield sole


def _ahead_wanted(root: nn.Module) -> bool:
    # Not under saved-tensor hooks (``save_on_cpu``, checkpointing the whole model): the
    # layers would refuse the values (see ``forward``) and standardize again.
    return (root.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and torch._C._get_tracing_state() is None and _saved_tensor_hooks() is None
            and _no_global_hooks() and not _in_functorch_transform())


def _standardize_ahead_hook(root: nn.Module, args: Any) -> None:
    if not _ahead_wanted(root):
        return
    for p, weight in _ahead_layers(root):
        if p.training and p._accum is None and p._records_grad(weight):
            p._prefetch(weight)


def _standardize_ahead_done(root: nn.Module, args: Any, output: Any) -> None:
    # A value the forward did not use (a skipped branch, an exception midway) is not kept, and
    # a layer called after the forward (outside it) standardizes for itself.
    if _ahead_wanted(root):  # else the pre-hook made nothing (evaluation costs nothing here)
        _drop_ahead(root)


def _drop_ahead(root: nn.Module) -> None:
    for p, _ in _ahead_layers(root):
        p._ahead = None


def standardize_ahead(model: nn.Module, enable: bool = True) -> None:
    """Standardize every WS weight of ``model`` at the start of each training forward.

    A forward pre-hook on ``model`` runs all the layers' standardizations, with autograd, before
    the first layer; each layer then uses its value (recomputing only if its weight changed in
    between), and a forward hook drops what the forward did not use. Values are bit-identical
    to the default, where each layer standardizes when it runs, and so are gradients when the
    stored weight has no other use (otherwise autograd may sum the contributions in another
    order: rounding-level differences). What changes is when the WS backward runs: after every
    other backward node instead of right after its convolution's, so the weight-size sweeps no
    longer push the activation gradients out of the cache. On CPU that pays when activations are
    large against the weights (medians of 2-5 runs: a GroupNorm ResNet-50 at 224x224 batch 2,
    1.07-1.09x plain instead of 1.11-1.21x; the reference net at 224x224 batch 2, 1.02-1.03x
    instead of 1.04-1.07x) and costs when they are small (64x64 batch 1: about 1 ms more per
    step). Not measured on a GPU. ``wsconvert bench --ahead`` measures both on your model and
    input size.

    Costs: the weight gradients of all layers are alive together at the end of the backward
    (one more weight-size set at peak); under ``DistributedDataParallel`` the conv weights'
    gradients all arrive at the end of the backward, so their all-reduce overlaps less with it.

    Only forwards of ``model`` itself trigger it (not calls to its submodules), in training
    mode with gradients recorded, outside ``torch.compile`` and tracing, for layers whose only
    parametrization is WS. Layers inside a non-reentrant activation-checkpointed region, and
    in a submodule compiled on its own, standardize for themselves (the value made ahead is
    wasted: compile the whole model instead), as do layers with module hooks and every layer
    while saved-tensor hooks are active. A value lives only during the forward that made it;
    after an interrupted forward (``KeyboardInterrupt``) a layer called outside the model may
    see one until the next step, so call ``clear_cache()`` after writing its weight through
    ``.data`` then. Idempotent; ``enable=False`` removes it from ``model`` and its submodules.

    Example:
        >>> model = wsconvert.apply_ws(net).model       # doctest: +SKIP
        >>> wsconvert.standardize_ahead(model)          # doctest: +SKIP
    """
    if enable:
        if _standardize_ahead_hook not in model._forward_pre_hooks.values():
            model.register_forward_pre_hook(_standardize_ahead_hook)
            model.register_forward_hook(_standardize_ahead_done, always_call=True)
        return
    for module in model.modules():
        for key in [k for k, h in module._forward_pre_hooks.items()
                    if h is _standardize_ahead_hook]:
            del module._forward_pre_hooks[key]
        for key in [k for k, h in module._forward_hooks.items() if h is _standardize_ahead_done]:
            del module._forward_hooks[key]
            module._forward_hooks_always_called.pop(key, None)
    _drop_ahead(model)


def layer_weight(module: nn.Module) -> Tensor:
    """``module.weight`` (the standardized value on a WS layer)."""
    return cast(Tensor, module.weight)


def trainable_weight(module: nn.Module) -> Tensor:
    """The tensor the optimizer updates: ``parametrizations.weight.original`` on a WS layer."""
    if parametrize.is_parametrized(module, "weight"):
        return cast(Tensor, cast(nn.ModuleDict, module.parametrizations)["weight"].original)
    return layer_weight(module)


class _AccumulateSteps:
    """Refuses ``optimizer.step()`` on a model's WS weights while an :func:`accumulate` block
    runs on it: their gradients only arrive when the block ends, so the step would not move
    them (an optimizer over other parameters, a GAN's other network say, is left alone)."""

    active: ClassVar[list[set[int]]] = []
    _handle: Any = None

    @classmethod
    def enter(cls, weights: set[int]) -> None:
        if cls._handle is None:
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            cls._handle = register_optimizer_step_pre_hook(cls._check)
        cls.active.append(weights)

    @classmethod
    def leave(cls, weights: set[int]) -> None:
        cls.active[:] = [w for w in cls.active if w is not weights]
        if not cls.active and cls._handle is not None:
            cls._handle.remove()
            cls._handle = None

    @classmethod
    def _check(cls, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        held = set().union(*cls.active)
        if any(id(p) in held for group in optimizer.param_groups for p in group["params"]):
            raise UsageError("optimizer.step() inside wsconvert.accumulate: the WS weights' "
                             "gradients arrive when the block ends; step after the block")


@contextlib.contextmanager
def accumulate(model: nn.Module) -> Iterator[None]:
    """Standardize once for all the micro-batches of one optimizer step.

    Inside the block every WS layer uses one standardized weight computed on entry; the
    micro-batches' backward passes accumulate their gradients on it, and on exit a single backward
    through the standardization moves the sum to the trainable weights. The WS backward is linear
    in its incoming gradient, so the result equals one standardization per micro-batch to float
    rounding.

    Call ``optimizer.step()`` after the block, never inside it: a step over this model's WS
    weights inside it raises :class:`~wsconvert.errors.UsageError`, as does a nested block. On an
    exception inside the block the pending gradients are dropped.

    With ``DistributedDataParallel``: the gradients reach the trainable weights on exit, outside
    any backward pass DDP prepared for, so DDP cannot reduce them. Run the micro-batches under
    ``ddp_model.no_sync()`` and all-reduce the gradients yourself after the block (sum, divide
    by the world size), as in ``tests/test_training.py``.

    Example:
        >>> with wsconvert.accumulate(model):          # doctest: +SKIP
        ...     for x, t in micro_batches:
        ...         loss_fn(model(x), t).backward()
        >>> optimizer.step()                           # doctest: +SKIP
    """
    layers: list[tuple[WeightStandardization, nn.Module]] = []
    for module in model.modules():
        p = ws_parametrization(module)
        if p is not None:
            if p._accum is not None:
                raise UsageError("wsconvert.accumulate blocks do not nest: a layer of this "
                                 "model is already inside one")
            layers.append((p, module))
    entered: list[WeightStandardization] = []
    weights = {id(trainable_weight(module)) for _, module in layers}
    _AccumulateSteps.enter(weights)
    try:
        with torch.enable_grad():
            for p, module in layers:
                p._cache = None
                p._ahead = None
                full = p._compute(trainable_weight(module), reuse=True)
                leaf = full.detach().requires_grad_(full.requires_grad)
                p._accum = (full, leaf)
                entered.append(p)
        yield
        outs, grads = [], []
        for p in entered:
            assert p._accum is not None
            full, leaf = p._accum
            if leaf.grad is not None and full.requires_grad:
                outs.append(full)
                grads.append(leaf.grad)
        if outs:
            torch.autograd.backward(outs, grads)
    finally:
        _AccumulateSteps.leave(weights)
        for p in entered:
            p._accum = None
