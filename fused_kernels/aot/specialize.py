"""The specialization the runtime launcher gives a typical contiguous call (pointer and integer divisibility,
integers equal to 1), cross-checked against triton's own binder where this triton exposes it."""


from __future__ import annotations

from typing import Any

import torch

from .specs import TRITON_TYPE, Ptr, Spec


def _int_type(v: int) -> str:
    if -(2**31) <= v < 2**31:
        return "i32"
    if 2**63 <= v < 2**64:
        return "u64"
    return "i64"


def specialize(spec: Spec) -> tuple[dict[str, str], dict[tuple[int, ...], Any], dict[tuple[int, ...], list]]:
    """(signature, constexprs, attrs) for ``ASTSource``, by the rules of triton's launcher: constexpr
    parameters are constants; a tensor is a typed pointer, divisible by 16 when aligned; an int equal
    to 1 is a constant, another int an i32/i64/u64 divisible by 16 when it is; bools are i1 and floats
    fp32, never specialized; None is a constant; a tuple is specialized element by element (its paths are
    (parameter, element)); an argument annotated with a type keeps that type."""
    kernel = spec.kernel
    missing = [p.name for p in kernel.params if p.name not in spec.args]
    extra = [k for k in spec.args if k not in kernel.arg_names]
    if missing or extra:
        raise TypeError(f"{spec.name}: spec misses kernel arguments {missing} / has unknown ones {extra}")
    signature: dict[str, Any] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(kernel.params):
        value = spec.args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        rules = dict(align=not getattr(param, "do_not_specialize_on_alignment", False),
                     specialize_int=not getattr(param, "do_not_specialize", False),
                     annotated=getattr(param, "annotation_type", "") or "")
        signature[param.name] = _specialize_value(spec, param.name, value, (i,), constexprs, attrs, **rules)
    return signature, constexprs, attrs


def _specialize_value(spec: Spec, name: str, value: Any, path: tuple[int, ...], constexprs: dict, attrs: dict, *,
                      align: bool, specialize_int: bool, annotated: str) -> Any:
    """The signature type of one (possibly nested) argument value; fills its constexprs and attrs by path."""
    divisible = [["tt.divisibility", 16]]
    if isinstance(value, torch.Tensor):
        value = Ptr(value.dtype)
    if isinstance(value, tuple):
        return tuple(_specialize_value(spec, f"{name}[{j}]", item, (*path, j), constexprs, attrs, align=align,
                                       specialize_int=specialize_int, annotated="")
                     for j, item in enumerate(value))
    if type(value).__name__ == "TensorDescriptor":   # host-side TMA descriptor: typed by dtype and box
        block = ", ".join(str(n) for n in value.block_shape)
        return f"tensordesc<{TRITON_TYPE[value.base.dtype]}[{block}]>"
    if isinstance(value, Ptr):
        attrs[path] = divisible if value.aligned and align else []
        return "*" + TRITON_TYPE[value.dtype]
    if value is None:
        constexprs[path] = None
        return "constexpr"
    if isinstance(value, bool):
        return annotated or "i1"
    if isinstance(value, int):
        if annotated and (annotated == "u1" or annotated[:2] in ("fp", "bf")):
            specialize_int = False
        if specialize_int and value == 1:
            constexprs[path] = 1
            return "constexpr"
        attrs[path] = divisible if specialize_int and align and value % 16 == 0 else []
        return annotated or _int_type(value)
    if isinstance(value, float):
        return annotated or "fp32"
    raise TypeError(f"{spec.name}: cannot specialize argument {name}={value!r}")


def runtime_specialization(spec: Spec, target) -> tuple[dict, dict, dict] | None:
    """What this triton's own launcher binder makes of the same arguments, or None where its internal
    API is not there; used only to cross-check ``specialize``."""
    try:
        from triton._utils import find_paths_if, get_iterable_path
        from triton.compiler import make_backend
        from triton.runtime.jit import MockTensor, create_function_from_signature
    except ImportError:
        return None
    kernel = spec.kernel
    try:
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        def mock(v):
            if isinstance(v, tuple):
                return tuple(mock(x) for x in v)
            return MockTensor(v.dtype) if isinstance(v, (Ptr, torch.Tensor)) else v

        args = {k: mock(v) for k, v in spec.args.items()}
        bound, specialization, _ = binder(**args)
    except Exception:  # internal API of another shape: nothing to compare with
        return None
    sigvals = [s[0] for s in specialization]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    paths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
    constexprs = {p: get_iterable_path(list(bound.values()), p) for p in paths}
    attrvals = ["" if s[0] == "constexpr" else s[1] for s in specialization]
    paths = find_paths_if(attrvals, lambda _, v: isinstance(v, str))
    attrs = {p: backend.parse_attr(get_iterable_path(attrvals, p)) for p in paths}
    return signature, constexprs, attrs
