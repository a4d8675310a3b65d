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
    fp32, never specialized; an argument annotated with a type keeps that type."""
    kernel = spec.kernel
    missing = [p.name for p in kernel.params if p.name not in spec.args]
    extra = [k for k in spec.args if k not in kernel.arg_names]
    if missing or extra:
        raise TypeError(f"{spec.name}: spec misses kernel arguments {missing} / has unknown ones {extra}")
    divisible = [["tt.divisibility", 16]]
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(kernel.params):
        value = spec.args[param.name]
        align = not getattr(param, "do_not_specialize_on_alignment", False)
        specialize_int = not getattr(param, "do_not_specialize", False)
        annotated = getattr(param, "annotation_type", "") or ""
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        if isinstance(value, torch.Tensor):
            value = Ptr(value.dtype)
        if isinstance(value, tuple):   # a tuple of tensors (the mods' MOD_ARGS): one typed pointer per element
            types = []
            for j, item in enumerate(value):
                item = Ptr(item.dtype) if isinstance(item, torch.Tensor) else item
                if not isinstance(item, Ptr):
                    raise TypeError(f"{spec.name}: cannot specialize tuple argument {param.name}[{j}]={item!r}")
                types.append("*" + TRITON_TYPE[item.dtype])
                attrs[(i, j)] = divisible if item.aligned and align else []
            signature[param.name] = tuple(types)
            continue
        if type(value).__name__ == "TensorDescriptor":   # host-side TMA descriptor: typed by dtype and box
            block = ", ".join(str(n) for n in value.block_shape)
            signature[param.name] = f"tensordesc<{TRITON_TYPE[value.base.dtype]}[{block}]>"
        elif isinstance(value, Ptr):
            signature[param.name] = "*" + TRITON_TYPE[value.dtype]
            attrs[(i,)] = divisible if value.aligned and align else []
        elif value is None:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = None
        elif isinstance(value, bool):
            signature[param.name] = annotated or "i1"
        elif isinstance(value, int):
            if annotated and (annotated == "u1" or annotated[:2] in ("fp", "bf")):
                specialize_int = False
            if specialize_int and value == 1:
                signature[param.name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                signature[param.name] = annotated or _int_type(value)
                attrs[(i,)] = divisible if specialize_int and align and value % 16 == 0 else []
        elif isinstance(value, float):
            signature[param.name] = annotated or "fp32"
        else:
            raise TypeError(f"{spec.name}: cannot specialize argument {param.name}={value!r}")
    return signature, constexprs, attrs


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
