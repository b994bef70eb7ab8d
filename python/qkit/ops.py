"""The core ops: schema, fake (meta) implementation, autograd and typed wrapper, side by side.

The kernels are ``qkit._C`` (CPU and CUDA), registered under ``torch.ops.qkit``.
Semantics: ``docs/ops.md`` §1-3. Groups are contiguous runs of the flattened tensor;
all arithmetic is fp32; params are float32 ``[G, 1]`` (symmetric: the step) or
``[G, 2]`` (asymmetric: step, midpoint offset).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from qkit import _loader

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_loader.load()
_lib = torch.library.Library("qkit", "DEF")


#: Names of every op qkit defines, in definition order.
DEFINED_OPS: list[str] = []


def define(schema: str, *, seeded: bool = False) -> None:
    """Define ``qkit::<schema>``; without ``_C`` its CPU/CUDA calls raise the load diagnosis."""
    tags = (torch.Tag.nondeterministic_seeded,) if seeded else ()
    _lib.define(schema, tags=tags)
    name = schema.split("(", 1)[0]
    DEFINED_OPS.append(name)
    error = _loader.load_error()
    if error is not None:

        def raiser(*args, **kwargs):
            raise error

        for key in ("CPU", "CUDA"):
            _lib.impl(name, raiser, key)


FORWARD_HINT = "pass the primal (torch.autograd.forward_ad.unpack_dual(t).primal) to drop the tangent on purpose"


# ---------------------------------------------------------------- private torch APIs
# The fast paths read torch internals that any torch release may rename. Each is looked
# up once, here, by name; where one is missing, the path that needs it falls back to the
# plain dispatcher call (slower, same results), so no rename can break `import qkit`.
# tests/test_private_api_fallback.py deletes each name in turn and compares results.

#: The private torch names this torch lacks, as "torch._C._after_autograd_keyset"; empty on a
#: torch qkit was written against.
MISSING_PRIVATE_APIS: list[str] = []


def _private(owner: object, owner_name: str, name: str) -> Any:
    """``owner.name``, or ``None`` (recorded in :data:`MISSING_PRIVATE_APIS`) where it is absent."""
    value = getattr(owner, name, None)
    if value is None:
        MISSING_PRIVATE_APIS.append(f"{owner_name}.{name}")
    return value


def _below_autograd_keyset() -> torch._C.DispatchKeySet | None:
    """The keys below Autograd, which an Autograd kernel redispatches to; ``None`` when this
    torch offers no way to name them (then the Autograd kernels become fallthroughs)."""
    keys = _private(torch._C, "torch._C", "_after_autograd_keyset")
    if keys is not None:
        return keys
    # The same set, built the way torch builds it: every key after AutogradOther.
    full_after = _private(torch._C, "torch._C", "_dispatch_keyset_full_after")
    dispatch_key = getattr(torch._C, "DispatchKey", None)
    if full_after is None or dispatch_key is None:
        return None
    return full_after(dispatch_key.AutogradOther)


_BELOW_AUTOGRAD = _below_autograd_keyset()

# Private torch state, read only where present; without it every call takes the
# (correct, slower) per-tensor look at the tangent.
_fw_grad_enabled = _private(torch._C, "torch._C", "_is_fwd_grad_enabled") or (lambda: True)
if isinstance(_private(_forward_ad, "torch.autograd.forward_ad", "_current_level"), int):

    def _dual_level_open() -> bool:
        return _forward_ad._current_level >= 0

else:

    def _dual_level_open() -> bool:
        return True


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``forward_ad.dual_level``, which
    ``torch.func.jvp`` uses too) with forward gradients enabled: only then can a
    tensor carry a tangent."""
    return _dual_level_open() and _fw_grad_enabled()


def has_tangent(t: Tensor) -> bool:
    """Whether ``t`` is a dual tensor at the current forward-AD level."""
    return _forward_ad.unpack_dual(t).tangent is not None


def register_autograd_rules(
    name: str, *, mutates: str | tuple[str, ...] = (), no_grad_for: tuple[str, ...] = (), hint: str = ""
) -> None:
    """How autograd treats ``qkit::<name>`` (``"op"`` or ``"op.overload"``), an op with no
    derivative formula.

    Its outputs carry no gradient. Arguments in ``no_grad_for`` and the mutated
    arguments ``mutates`` must not require grad while grad mode is on (a clear error
    instead of a gradient that silently stops or goes wrong), and each mutated
    argument's version counter is bumped, as every aten in-place op does, so
    autograd notices when a saved tensor was overwritten. An op with nothing to
    guard gets a fallthrough: no Python runs per call at the Autograd key.
    """
    op_name, _, overload = name.partition(".")
    op = getattr(getattr(torch.ops.qkit, op_name), overload or "default")
    names = [a.name for a in op._schema.arguments]
    mutated = (mutates,) if isinstance(mutates, str) else mutates
    guarded = [*no_grad_for, *mutated]
    if not guarded or _BELOW_AUTOGRAD is None:
        # Without the below-Autograd keys there is no way down from a Python Autograd
        # kernel: torch's own fallback handles the op (no guard errors, same results).
        _lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
        return

    positions = [(names.index(arg_name), arg_name) for arg_name in guarded]
    mutated_positions = positions[len(no_grad_for) :]
    redispatch = op.redispatch
    below_autograd = _BELOW_AUTOGRAD
    grad_enabled = torch.is_grad_enabled
    bump = torch.autograd.graph.increment_version

    def arg(args: tuple, kwargs: dict, index: int, arg_name: str) -> Tensor:
        return args[index] if index < len(args) else kwargs[arg_name]

    # Runs on every call, so it is kept lean: no dispatch guard (the kernels only
    # allocate and copy tensors that do not require grad, so nothing below would
    # record history) and the argument positions are looked up once, here.
    def autograd_kernel(keyset: torch._C.DispatchKeySet, *args, **kwargs):
        if grad_enabled():
            for index, arg_name in positions:
                if arg(args, kwargs, index, arg_name).requires_grad:
                    raise QkitValueError(
                        f"qkit.{op_name}: `{arg_name}` requires grad, but {name} has no gradient - {hint}"
                    )
        if forward_ad_active():
            # Forward mode has no "requires grad" flag: the tangent itself is the signal.
            # Dropping it would hand the caller a silent zero (torch.func.jvp) or None.
            for index, arg_name in positions:
                if has_tangent(arg(args, kwargs, index, arg_name)):
                    raise QkitValueError(
                        f"qkit.{op_name}: `{arg_name}` carries a forward-mode tangent, but {name} has no "
                        f"derivative - {FORWARD_HINT}"
                    )
        result = redispatch(keyset & below_autograd, *args, **kwargs)
        # The version bump aten does at ADInplaceOrView, done here to save a second
        # Python kernel per call (inference mode skips both keys, and needs no bump).
        for index, arg_name in mutated_positions:
            bump(arg(args, kwargs, index, arg_name))
        return result

    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling
# What the straight-call gate reads (kernel_keys); any one missing turns straight calls off.
_functorch_active = _private(torch._C, "torch._C", "_are_functorch_transforms_active")
_dispatch_modes = _private(torch._C, "torch._C", "_len_torch_dispatch_stack")
_function_modes = _private(torch._C, "torch._C", "_is_torch_function_mode_enabled")
_profiling = _private(torch.autograd, "torch.autograd", "_profiler_enabled")
_jit_tracing = _private(torch._C, "torch._C", "_get_tracing_state")
_redispatch_boxed = _private(
    getattr(torch.ops.aten.empty.memory_format, "_handle", None), "OpOverload._handle", "redispatch_boxed"
)
_strided = torch.strided
KernelKeys = getattr(torch._C, "DispatchKeySet", object)


def _kernel_keys_on(backend_name: str) -> torch._C.DispatchKeySet | None:
    # With the view-bit keys in the set, their fallbacks still resolve a negative, conjugate
    # or zero view before qkit's kernel runs, just as a normal call would, for ~0.1 us.
    try:
        key_set, key = torch._C.DispatchKeySet, torch._C.DispatchKey
        keys = key_set(getattr(key, backend_name))
        for view_key in (key.Conjugate, key.Negative, key.ZeroTensor):
            keys = keys | key_set(view_key)
    except (AttributeError, TypeError):  # torch renamed or reshaped its dispatch keys
        MISSING_PRIVATE_APIS.append(f"torch._C.DispatchKeySet(DispatchKey.{backend_name})")
        return None
    return keys


_CPU_KEYS = _kernel_keys_on("CPU")
_CUDA_KEYS = _kernel_keys_on("CUDA")
_GATE = (_functorch_active, _dispatch_modes, _function_modes, _profiling, _jit_tracing, _redispatch_boxed)
#: Whether the wrappers may call qkit's kernels straight (every private name they need is here).
STRAIGHT_CALLS = all(part is not None for part in (*_GATE, _CPU_KEYS, _CUDA_KEYS))  # `is`: keysets lack None ==
if _functorch_active is None:
    # Read below outside the gate too: "maybe active" sends the straight-through estimator
    # down its single-level path, which is right with and without a transform.
    def _functorch_active() -> bool:
        return True


def _device_keys(t: Tensor) -> KernelKeys | None:
    return _CPU_KEYS if t.is_cpu else _CUDA_KEYS if t.is_cuda else None


def _plain(t: Tensor) -> bool:
    return type(t) is Tensor and t.layout is _strided and not t.is_nested


def _kernel_keys(a: Tensor, b: Tensor | None = None, c: Tensor | None = None) -> KernelKeys | None:
    """The key set that reaches qkit's own CPU or CUDA kernel, when a call on ``a`` (and
    ``b``, ``c``) may go straight there; ``None`` when the op must be called the normal way.

    Straight means ``op._handle.redispatch_boxed(keys, ...)``: no Python autograd kernel,
    no dispatch-key computation from the arguments, no torch-function handling; about
    a third of a small call's time. It is only taken where none of those could act:
    strided plain Tensors (no subclass, FakeTensor, proxy, sparse or nested tensor) of one
    device kind, none requiring grad (or grad mode off), no dispatch or torch-function
    mode, no profiler (a redispatch records no op event), outside torch.compile and
    torch.jit tracing and functorch transforms, and with no forward-AD level open. After a
    straight call to an op that writes into an argument, the caller bumps that argument's
    version (:func:`bump`), as the skipped Autograd kernel would have.
    """
    # Spelled out for three tensors, cheapest tests first: every 30 ns is 1% of a call.
    if _compiling() or _functorch_active() or _dispatch_modes() or _function_modes() or _profiling() or _jit_tracing():
        return None
    if _dual_level_open():  # a tensor may carry a forward-mode tangent: the Autograd kernel decides
        return None
    if not (_plain(a) and (b is None or _plain(b)) and (c is None or _plain(c))):
        return None
    wants_grad = a.requires_grad or (b is not None and b.requires_grad) or (c is not None and c.requires_grad)
    if wants_grad and _grad_enabled():
        return None
    keys = _device_keys(a)
    if (b is not None and _device_keys(b) is not keys) or (c is not None and _device_keys(c) is not keys):
        return None
    return keys


def _no_kernel_keys(a: Tensor, b: Tensor | None = None, c: Tensor | None = None) -> KernelKeys | None:
    """:func:`kernel_keys` on a torch without the private names it reads: never straight."""
    return None


# Chosen once, here, so that a working torch pays no per-call test for the fallback.
kernel_keys = _kernel_keys if STRAIGHT_CALLS else _no_kernel_keys


#: Marks a tensor (or each of several) as written in place, for autograd's saved-tensor check.
bump = torch.autograd.graph.increment_version


def straight_to_kernel(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """``op``'s call at a given key set, for the keys :func:`kernel_keys` returns; without
    straight calls (never taken then), the plain call, ignoring the keys."""
    if STRAIGHT_CALLS:
        return op._handle.redispatch_boxed

    def plain(keys: KernelKeys, *args: Any, **kwargs: Any) -> Any:
        return op(*args, **kwargs)

    return plain


# ---------------------------------------------------------------- argument checks
# The C++ bindings make the same checks with the same words; these run where the
# kernels do not (FakeTensor, meta, torch.compile tracing). The kernels can only
# raise RuntimeError, so these errors are RuntimeErrors too (and ValueError or
# TypeError for code that expects those): one `except` works on every path.


class QkitValueError(RuntimeError, ValueError):
    """A qkit op got an argument with a bad value."""


class QkitTypeError(RuntimeError, TypeError):
    """A qkit op got an argument of a bad dtype."""


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as messages name it, without "torch." (the C++ bindings' ``dtype_name``)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_float_input(t: Tensor, op: str, arg: str = "input") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise QkitTypeError(f"qkit.{op}: `{arg}` must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")


def check_groups(numel: int, groups: int, op: str, numel_of: str = "input", name: str = "groups") -> None:
    if groups < 1:
        raise QkitValueError(f"qkit.{op}: `{name}` must be >= 1, got {groups}")
    if numel % groups != 0:
        raise QkitValueError(
            f"qkit.{op}: `{name}` ({groups}) must divide the number of elements of `{numel_of}` ({numel})"
        )


_INT64_MAX = 2**63 - 1


def checked_product(factors: Sequence[int], what: str, op: str) -> int:
    """The product of non-negative int arguments (or sizes) that ``what`` names; the C++
    bindings' error when it does not fit in int64 (where theirs would wrap)."""
    product = math.prod(factors)
    if product > _INT64_MAX:
        raise QkitValueError(f"qkit.{op}: {what} ({' * '.join(str(f) for f in factors)}) overflows int64")
    return product


def check_params_size(groups: int, symmetric: bool, op: str, name: str = "groups") -> None:
    """The bytes of a ``[groups, 1|2]`` float32 params output fit in int64 (an empty input
    accepts any ``groups``, and only the allocation would notice, naming nothing)."""
    per_group = 1 if symmetric else 2
    checked_product((groups, per_group, 4), f"the bytes of the float32 params, `{name}` * {per_group} * 4", op)


# The one definition of these ranges on the Python side (QuantSpec and MoQ import them);
# the C++ bindings check the same numbers.
#: Code widths ``fake_quantize`` accepts.
MIN_BITS, MAX_BITS = 2, 16
#: Code widths ``quantize`` / ``dequantize`` (and the ZeRO++ ops) store.
STORAGE_BITS = (4, 8)
#: Rounding modes (``stochastic=False`` / ``True`` of ``fake_quantize``).
ROUNDING_MODES = ("nearest", "stochastic")


def check_fake_bits(bits: int, op: str) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise QkitValueError(f"qkit.{op}: `bits` must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def check_storage_bits(bits: int, op: str) -> None:
    if bits not in STORAGE_BITS:
        raise QkitValueError(f"qkit.{op}: `bits` must be {STORAGE_BITS[0]} or {STORAGE_BITS[1]}, got {bits}")


def check_packable(t: Tensor, bits: int, op: str, arg: str) -> None:
    if bits == 4 and t.numel() > 0 and (t.dim() == 0 or t.shape[-1] % 2 != 0):
        raise QkitValueError(
            f"qkit.{op}: 4-bit storage packs pairs along the last dimension: `{arg}` needs an even last dimension"
        )


def _code_shape(shape: torch.Size, bits: int) -> list[int]:
    out = list(shape)
    if bits == 4 and out:
        out[-1] //= 2
    return out


# ---------------------------------------------------------------- fake_quantize

define(
    "fake_quantize(Tensor input, int groups, int bits, bool symmetric=True, bool stochastic=False) -> Tensor",
    seeded=True,
)
define(
    "fake_quantize_(Tensor(a!) input, int groups, int bits, bool symmetric=True, bool stochastic=False) -> ()",
    seeded=True,
)
define(
    "fake_quantize.out(Tensor input, int groups, int bits, bool symmetric=True, bool stochastic=False, *, "
    "Tensor(a!) out) -> ()",
    seeded=True,
)


def _check_fake_args(input: Tensor, groups: int, bits: int, op: str) -> None:
    check_float_input(input, op)
    check_fake_bits(bits, op)
    check_groups(input.numel(), groups, op)


def check_no_self_overlap(t: Tensor, op: str, arg: str = "input") -> None:
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride(), strict=True)):
        raise QkitValueError(
            f"qkit.{op}: `{arg}` has elements that share memory (an expanded view); in-place writes "
            "would collide - pass a tensor that owns its elements (e.g. .clone())"
        )


def check_out(
    out: Tensor, name: str, dtype: torch.dtype, shape: list[int], like: Tensor, like_name: str, op: str
) -> None:
    """An ``out=`` tensor: ``dtype``, on ``like``'s device, exactly ``shape``, no expanded dimensions."""
    if out.dtype != dtype:
        raise QkitTypeError(f"qkit.{op}: `{name}` must be {dtype_name(dtype)}, got {dtype_name(out.dtype)}")
    if out.device != like.device:
        raise QkitValueError(f"qkit.{op}: `{name}` must be on the same device as `{like_name}`")
    if list(out.shape) != list(shape):
        raise QkitValueError(f"qkit.{op}: `{name}` must have shape {list(shape)}, got {list(out.shape)}")
    check_no_self_overlap(out, op, name)


def check_code_outputs(
    q: Tensor, params: Tensor, code_shape: list[int], groups: int, symmetric: bool, input: Tensor, op: str
) -> None:
    """The ``out=`` buffers of a quantizing op: int8 ``q`` of ``code_shape`` and float32
    ``params`` ``[groups, 1|2]``, on ``input``'s device."""
    check_out(q, "q", torch.int8, code_shape, input, "input", op)
    check_out(params, "params", torch.float32, [groups, 1 if symmetric else 2], input, "input", op)


@torch.library.register_fake("qkit::fake_quantize")
def _fake_quantize_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> Tensor:
    _check_fake_args(input, groups, bits, "fake_quantize")
    return input.new_empty(input.shape)


@torch.library.register_fake("qkit::fake_quantize_")
def _fake_quantize_inplace_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> None:
    _check_fake_args(input, groups, bits, "fake_quantize_")
    check_no_self_overlap(input, "fake_quantize_")


@torch.library.register_fake("qkit::fake_quantize.out")
def _fake_quantize_out_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False, *, out: Tensor
) -> None:
    _check_fake_args(input, groups, bits, "fake_quantize")
    check_out(out, "out", input.dtype, list(input.shape), input, "input", "fake_quantize")


OUT_HAS_NO_GRADIENT = "out= writes are not differentiable; call the op without out= (or under torch.no_grad())"
register_autograd_rules("fake_quantize.out", mutates="out", no_grad_for=("input",), hint=OUT_HAS_NO_GRADIENT)
register_autograd_rules(
    "fake_quantize_",
    mutates="input",
    hint="use qkit.fake_quantize (straight-through) or run under torch.no_grad()",
)


_RNG_STATE = {
    "cpu": (lambda device: torch.get_rng_state(), lambda state, device: torch.set_rng_state(state)),
    "cuda": (torch.cuda.get_rng_state, torch.cuda.set_rng_state),
}


def _fake_quantize_vmap(
    info, in_dims: tuple, input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> tuple[Tensor, int | None]:
    """Batching rule of ``fake_quantize``: ``B`` samples of ``groups`` groups each are one
    call with ``B * groups`` groups, since groups are contiguous runs of the flattened
    batch-first tensor. ``info.randomness`` decides stochastic rounding: "error" refuses,
    "different" draws once for the whole batch, "same" replays one draw for every sample."""
    op = "fake_quantize"
    bdim = in_dims[0]
    batch = info.batch_size
    if bdim is None:  # torch's vmap helper calls unbatched inputs plainly; kept for direct callers
        return torch.ops.qkit.fake_quantize.default(input, groups, bits, symmetric, stochastic), None
    x = input.movedim(bdim, 0)
    per_sample = x[0].numel() if batch else math.prod(x.shape[1:])
    check_float_input(x, op)
    check_fake_bits(bits, op)
    check_groups(per_sample, groups, op)  # the words the unbatched call would use
    if stochastic and info.randomness == "error":
        raise QkitValueError(
            f"qkit.{op}: stochastic rounding draws random numbers, refused under vmap(randomness='error'); "
            "pass randomness='different' or 'same' to torch.vmap"
        )
    if batch == 0:
        return x.new_empty(x.shape), 0
    if stochastic and info.randomness == "same":
        if x.device.type not in _RNG_STATE:
            raise QkitValueError(f"qkit.{op}: vmap(randomness='same') is supported on CPU and CUDA, not {x.device}")
        get_state, set_state = _RNG_STATE[x.device.type]
        state = get_state(x.device)
        samples = []
        for sample in x:
            set_state(state, x.device)
            samples.append(torch.ops.qkit.fake_quantize.default(sample, groups, bits, symmetric, True))
        return torch.stack(samples), 0
    return torch.ops.qkit.fake_quantize.default(x, batch * groups, bits, symmetric, stochastic), 0


# The estimator below is applied from inside the Autograd kernel, where a functorch
# transform is already being processed: torch.autograd.Function.apply would hand it to
# functorch's custom_function_call, which cannot be dispatched from there. The
# single-level base class applies it at the current level instead, exactly as a C++
# derivative formula would be; functorch itself applies such Functions the same way.
_SingleLevelFunction = getattr(torch.autograd.function, "_SingleLevelFunction", None)
_fw_grad_mode = getattr(_forward_ad, "_set_fwd_grad_enabled", None)
try:
    from torch._functorch.utils import enable_single_level_autograd_function as _single_level_allowed
except ImportError:  # a torch without it: torch.autograd works, torch.func transforms are refused
    _single_level_allowed = None
_FUNCTORCH_READY = None not in (_SingleLevelFunction, _fw_grad_mode, _single_level_allowed)
if _fw_grad_mode is None:

    def _fw_grad_mode(enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


_fake_quantize_redispatch = torch.ops.qkit.fake_quantize.default.redispatch
_below_autograd = _BELOW_AUTOGRAD


class _FakeQuantizeSTE(_SingleLevelFunction if _FUNCTORCH_READY else torch.autograd.Function):
    """``fake_quantize`` with the straight-through estimator, d fake_quantize(x)/dx := 1,
    for backward (``backward``) and forward mode (``jvp``), at one autograd level."""

    @staticmethod
    def forward(
        input: Tensor, groups: int, bits: int, symmetric: bool, stochastic: bool, keyset: torch._C.DispatchKeySet
    ) -> Tensor:
        # Past this level's Autograd key, with both grad modes back on: apply() turned them
        # off, and an enclosing torch.func level below must still record the call.
        with torch.enable_grad(), _fw_grad_mode(True):
            return _fake_quantize_redispatch(keyset & _below_autograd, input, groups, bits, symmetric, stochastic)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        pass  # the estimator needs nothing from the forward

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        return grad, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tangent: Tensor, *_: object) -> Tensor:
        return tangent


def _fake_quantize_autograd(
    keyset: torch._C.DispatchKeySet,
    input: Tensor,
    groups: int,
    bits: int,
    symmetric: bool = True,
    stochastic: bool = False,
) -> Tensor:
    # The estimator only where something differentiates: a tensor that requires grad
    # (under torch.func.grad/vjp, the transform's wrapper does) or carries a tangent
    # (forward_ad, torch.func.jvp). Otherwise a plain redispatch, as before.
    args = (input, groups, bits, symmetric, stochastic)
    if (input.requires_grad and _grad_enabled()) or (forward_ad_active() and has_tangent(input)):
        if not _functorch_active():
            return _FakeQuantizeSTE.apply(*args, keyset)
        if not _FUNCTORCH_READY:
            raise QkitValueError(
                f"qkit.fake_quantize: torch.func transforms of it need torch's single-level autograd.Function, "
                f"which torch {torch.__version__} lacks; differentiate with torch.autograd instead"
            )
        with _single_level_allowed():
            return _FakeQuantizeSTE.apply(*args, keyset)
    return _fake_quantize_redispatch(keyset & _below_autograd, *args)


if _BELOW_AUTOGRAD is not None:
    _lib.impl("fake_quantize", _fake_quantize_autograd, "Autograd", with_keyset=True)
else:  # no way below Autograd from Python (see register_autograd_rules): no estimator either
    _lib.impl("fake_quantize", torch.library.fallthrough_kernel, "Autograd")
if hasattr(torch.library, "register_vmap"):  # reached at the FuncTorchBatched key, below autograd
    torch.library.register_vmap("qkit::fake_quantize", _fake_quantize_vmap, lib=_lib)


# Writing forms under vmap: the functional op's batching rule, then a batched copy (torch's
# own fallback refuses ops that write). One extra copy, and only under vmap. The checks
# are the unbatched call's, on the per-sample view: copy_ alone would broadcast a wrong
# shape and cast a wrong dtype.
def _fake_quantize_inplace_batched(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> None:
    check_no_self_overlap(input, "fake_quantize_")
    input.copy_(torch.ops.qkit.fake_quantize.default(input, groups, bits, symmetric, stochastic))


def _fake_quantize_out_batched(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False, *, out: Tensor
) -> None:
    check_out(out, "out", input.dtype, list(input.shape), input, "input", "fake_quantize")
    out.copy_(torch.ops.qkit.fake_quantize.default(input, groups, bits, symmetric, stochastic))


_lib.impl("fake_quantize_", _fake_quantize_inplace_batched, "FuncTorchBatched")
_lib.impl("fake_quantize.out", _fake_quantize_out_batched, "FuncTorchBatched")
_fake_quantize_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize.default)
_fake_quantize_out_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize.out)
_fake_quantize_in_place_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize_.default)


def fake_quantize(
    input: Tensor,
    groups: int = 1,
    bits: int = 8,
    symmetric: bool = True,
    stochastic: bool = False,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Quantize and dequantize ``input`` group-wise: ``dequantize(quantize(input))``.

    Args:
        input: float32/float16/bfloat16 tensor of any shape (``M`` elements), any layout.
        groups: number of groups ``G``; must divide ``M``. Group ``g`` is elements
            ``[g*M/G, (g+1)*M/G)`` of the flattened tensor.
        bits: 2..16.
        symmetric: ``scale = 2^b / (2 max|x|)``; otherwise ``2^b / (max - min)``
            around the group's midpoint.
        stochastic: round ``floor(v + u)``, ``u ~ U[0, 1)`` from torch's generator
            (``torch.manual_seed`` reproduces it) instead of to nearest-even.
        out: optional preallocated result (``input``'s shape, dtype and device; it may be
            ``input`` itself, but must not partly overlap it). Reusing one saves the
            allocation and first-touch page faults of a fresh output on every call.

    Returns:
        A new contiguous tensor of ``input``'s shape and dtype, or ``out``. Autograd
        passes the gradient straight through (not with ``out=``, which has no gradient).
    """
    if out is None:
        keys = kernel_keys(input)
        if keys is not None:
            return _fake_quantize_kernel(keys, input, groups, bits, symmetric, stochastic)
        return torch.ops.qkit.fake_quantize.default(input, groups, bits, symmetric, stochastic)
    keys = kernel_keys(input, out)
    if keys is not None:
        _fake_quantize_out_kernel(keys, input, groups, bits, symmetric, stochastic, out=out)
        bump(out)
        return out
    torch.ops.qkit.fake_quantize.out(input, groups, bits, symmetric, stochastic, out=out)
    return out


def fake_quantize_(
    input: Tensor, groups: int = 1, bits: int = 8, symmetric: bool = True, stochastic: bool = False
) -> Tensor:
    """In-place :func:`fake_quantize`; returns ``input``.

    No gradient: a tensor that requires grad is refused unless grad mode is off
    (``torch.no_grad()``, or ``param.data`` as optimizers and MoQ use it).
    """
    keys = kernel_keys(input)
    if keys is not None:
        _fake_quantize_in_place_kernel(keys, input, groups, bits, symmetric, stochastic)
        bump(input)
        return input
    torch.ops.qkit.fake_quantize_.default(input, groups, bits, symmetric, stochastic)
    return input


# ---------------------------------------------------------------- quantize / dequantize

define("quantize(Tensor input, int groups, int bits, bool symmetric=True) -> (Tensor, Tensor)")
define(
    "dequantize(Tensor q, Tensor params, int groups, int bits, bool symmetric=True, ScalarType? dtype=None) -> Tensor"
)
define(
    "quantize.out(Tensor input, int groups, int bits, bool symmetric=True, *, Tensor(a!) q, Tensor(b!) params) -> ()"
)
define("dequantize.out(Tensor q, Tensor params, int groups, int bits, bool symmetric=True, *, Tensor(a!) out) -> ()")


def _check_quantize_args(input: Tensor, groups: int, bits: int, symmetric: bool) -> None:
    op = "quantize"
    check_float_input(input, op)
    check_storage_bits(bits, op)
    check_groups(input.numel(), groups, op)
    check_params_size(groups, symmetric, op)
    check_packable(input, bits, op, "input")


@torch.library.register_fake("qkit::quantize")
def _quantize_fake(input: Tensor, groups: int, bits: int, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    _check_quantize_args(input, groups, bits, symmetric)
    codes = input.new_empty(_code_shape(input.shape, bits), dtype=torch.int8)
    params = input.new_empty((groups, 1 if symmetric else 2), dtype=torch.float32)
    return codes, params


@torch.library.register_fake("qkit::quantize.out")
def _quantize_out_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, *, q: Tensor, params: Tensor
) -> None:
    _check_quantize_args(input, groups, bits, symmetric)
    check_code_outputs(q, params, _code_shape(input.shape, bits), groups, symmetric, input, "quantize")


def check_codes_and_params(q: Tensor, params: Tensor, bits: int, op: str) -> None:
    """Quantized input of an op: int8 codes, float32 params on the codes' device, 4 or 8 bits."""
    if q.dtype != torch.int8:
        raise QkitTypeError(f"qkit.{op}: `q` must be int8, got {dtype_name(q.dtype)}")
    if params.dtype != torch.float32:
        raise QkitTypeError(f"qkit.{op}: `params` must be float32, got {dtype_name(params.dtype)}")
    if params.device != q.device:
        raise QkitValueError(f"qkit.{op}: `params` must be on the same device as `q`")
    check_storage_bits(bits, op)


def check_dequantize_args(
    q: Tensor, params: Tensor, groups: int, bits: int, symmetric: bool, dtype: torch.dtype | None
) -> None:
    op = "dequantize"
    check_codes_and_params(q, params, bits, op)
    if bits == 4 and q.dim() == 0:
        raise QkitValueError(f"qkit.{op}: 4-bit `q` must have at least one dimension")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise QkitTypeError(f"qkit.{op}: `dtype` must be float32, float16 or bfloat16, got {dtype_name(dtype)}")
    numel = q.numel() * (2 if bits == 4 else 1)
    check_groups(numel, groups, op, "the dequantized output")
    per_group = 1 if symmetric else 2
    if params.dim() != 2 or params.shape[0] != groups or params.shape[1] != per_group:
        kind = "symmetric" if symmetric else "asymmetric"
        raise QkitValueError(
            f"qkit.{op}: `params` must have shape [groups, {per_group}] = [{groups}, {per_group}] for {kind} "
            f"quantization, got {list(params.shape)}"
        )


def _dequantized_shape(q: Tensor, bits: int) -> list[int]:
    shape = list(q.shape)
    if bits == 4:
        shape[-1] *= 2
    return shape


@torch.library.register_fake("qkit::dequantize")
def _dequantize_fake(
    q: Tensor, params: Tensor, groups: int, bits: int, symmetric: bool = True, dtype: torch.dtype | None = None
) -> Tensor:
    check_dequantize_args(q, params, groups, bits, symmetric, dtype)
    return q.new_empty(_dequantized_shape(q, bits), dtype=dtype or torch.float16)


@torch.library.register_fake("qkit::dequantize.out")
def _dequantize_out_fake(
    q: Tensor, params: Tensor, groups: int, bits: int, symmetric: bool = True, *, out: Tensor
) -> None:
    check_dequantize_args(q, params, groups, bits, symmetric, None)
    check_float_input(out, "dequantize", "out")
    check_out(out, "out", out.dtype, _dequantized_shape(q, bits), q, "q", "dequantize")


register_autograd_rules("quantize")
register_autograd_rules("quantize.out", mutates=("q", "params"), hint=OUT_HAS_NO_GRADIENT)
_DEQUANTIZE_HINT = "detach `params`, or train with qkit.fake_quantize (straight-through)"
register_autograd_rules("dequantize", no_grad_for=("params",), hint=_DEQUANTIZE_HINT)
register_autograd_rules("dequantize.out", mutates="out", no_grad_for=("params",), hint=_DEQUANTIZE_HINT)
_quantize_kernel = straight_to_kernel(torch.ops.qkit.quantize.default)
_dequantize_kernel = straight_to_kernel(torch.ops.qkit.dequantize.default)
_quantize_out_kernel = straight_to_kernel(torch.ops.qkit.quantize.out)
_dequantize_out_kernel = straight_to_kernel(torch.ops.qkit.dequantize.out)


def quantize(
    input: Tensor,
    groups: int = 1,
    bits: int = 8,
    symmetric: bool = True,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize ``input`` group-wise to int8 codes (or int4 packed two per byte).

    Args:
        input: float32/float16/bfloat16, ``M`` elements; for 4 bits an even last dimension.
        groups: ``G``, dividing ``M``.
        bits: 8 (one int8 per element) or 4 (pairs packed, the even element in the high nibble).
        symmetric: symmetric (params ``[G, 1]``: step) or asymmetric (``[G, 2]``: step, offset).
        out: optional preallocated ``(q, params)`` of the shapes and dtypes below, on
            ``input``'s device, sharing no memory with ``input`` or each other.

    Returns:
        ``(q, params)``: ``q`` int8 of ``input``'s shape (4-bit: last dimension halved),
        ``params`` float32 ``[G, 1|2]``. No gradient flows through either.
    """
    if out is None:
        keys = kernel_keys(input)
        if keys is not None:
            return _quantize_kernel(keys, input, groups, bits, symmetric)
        return torch.ops.qkit.quantize.default(input, groups, bits, symmetric)
    q, params = out
    keys = kernel_keys(input, q, params)
    if keys is not None:
        _quantize_out_kernel(keys, input, groups, bits, symmetric, q=q, params=params)
        bump(out)
        return q, params
    torch.ops.qkit.quantize.out(input, groups, bits, symmetric, q=q, params=params)
    return q, params


def dequantize(
    q: Tensor,
    params: Tensor,
    groups: int | None = None,
    bits: int = 8,
    symmetric: bool = True,
    dtype: torch.dtype | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Inverse of :func:`quantize`: ``y = step * q (+ offset)``, computed in fp32 and rounded once.

    Args:
        q: int8 codes from :func:`quantize` (4-bit: packed).
        params: float32 ``[G, 1|2]`` from :func:`quantize`.
        groups: ``G``; defaults to ``params.shape[0]``.
        bits: 4 or 8, as quantized.
        symmetric: as quantized.
        dtype: output dtype: float16 (default, as DeepSpeed), bfloat16 or float32.
            With ``out=``, the dtype of ``out`` (``dtype``, if given, must match it).
        out: optional preallocated result, on ``q``'s device, sharing no memory with
            ``q`` or ``params``.

    Returns:
        Tensor of ``q``'s shape (4-bit: last dimension doubled) and ``dtype``, or ``out``.
    """
    if groups is None:
        groups = params.shape[0] if params.dim() > 0 else 1
    if out is None:
        keys = kernel_keys(q, params)
        if keys is not None:
            return _dequantize_kernel(keys, q, params, groups, bits, symmetric, dtype)
        return torch.ops.qkit.dequantize.default(q, params, groups, bits, symmetric, dtype)
    if dtype is not None and dtype != out.dtype:
        raise QkitTypeError(
            f"qkit.dequantize: `dtype` ({dtype_name(dtype)}) and `out` ({dtype_name(out.dtype)}) disagree"
        )
    keys = kernel_keys(q, params, out)
    if keys is not None:
        _dequantize_out_kernel(keys, q, params, groups, bits, symmetric, out=out)
        bump(out)
        return out
    torch.ops.qkit.dequantize.out(q, params, groups, bits, symmetric, out=out)
    return out
