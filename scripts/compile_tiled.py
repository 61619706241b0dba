"""Compile loss=tiled's Triton kernels for a CUDA architecture without a GPU: Triton's front end, its
passes and ptxas, as a launch on that GPU would (nothing runs). Prints each kernel's shared memory.

Usage::

    python scripts/compile_tiled.py              # sm_90 (H100, H200): every kernel, every option on, per dtype
    python scripts/compile_tiled.py --arch 80 --all-variants   # A100: every combination of the options (slow)

A check to run before spending GPU time on a change to the kernels: it finds what the interpreter
(TRITON_INTERPRET=1, where the tests run) lets through and the compiler does not, and tiles that do not
fit the GPU's shared memory (227 KiB a program on sm_90, 163 KiB on sm_80).
"""

from __future__ import annotations

import argparse
import itertools
import os

# The kernels must be compiled, not interpreted, whatever the caller's environment.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from losslab.losses import tiled_kernels as kernels  # noqa: E402

# (dot dtype, the inputs' pointer type, the accumulation dtype's); under autocast the inputs stay float32
# and are cast to bf16 in the kernels.
DTYPES = {
    "bf16-autocast": (torch.bfloat16, "*fp32", "*fp32"),
    "float32": (torch.float32, "*fp32", "*fp32"),
    "float64": (torch.float64, "*fp64", "*fp64"),
}
OPTIONS = ("HAS_ROWS", "HAS_BIAS", "SOFTCAP", "SMOOTHING", "WEIGHTED", "FILTER")


def compile_kernel(fn, arguments: dict, target: GPUTarget, num_warps: int) -> int:
    """Compile ``fn`` with ``arguments`` (a type string for a runtime argument, a value for a constexpr
    or a None pointer); its shared memory in bytes."""
    signature = {name: "constexpr" for name in fn.arg_names}
    constants = {}
    for name in fn.arg_names:
        value = arguments[name]
        if isinstance(value, str) and (value.startswith("*") or value in ("i32", "fp32")):
            signature[name] = value
        else:
            constants[name] = value
    compiled = triton.compile(ASTSource(fn, signature, constants), target=target, options={"num_warps": num_warps})
    return compiled.metadata.shared


def blocks(dot: torch.dtype) -> kernels.Blocks:
    """The tiles a GPU launch takes for this compute dtype (they depend on nothing else there)."""
    acc = torch.float64 if dot == torch.float64 else torch.float32
    return kernels.blocks(kernels.Problem(None, None, None, None, None, None, None, dot, acc))


def kernels_of(dtype: str, options: dict[str, bool]):
    """Each kernel with its arguments, for a dtype and a choice of options."""
    dot, pointer, acc_pointer = DTYPES[dtype]
    block = blocks(dot)
    common = dict(
        hidden_ptr=pointer,
        rows_ptr="*i64" if options["HAS_ROWS"] else None,
        weight_ptr=pointer,
        bias_ptr=pointer if options["HAS_BIAS"] else None,
        softcap_ptr=acc_pointer,
        class_weights_ptr=acc_pointer if options["WEIGHTED"] else None,
        targets_ptr="*i64",
        coef_ptr=acc_pointer,
        **dict.fromkeys(("n_rows", "vocab", "dim", "stride_hidden", "stride_weight", "tiles_per_split"), "i32"),
        filter_eps="fp32",
        **options,
        DOT=kernels.TRITON_DTYPES[dot],
        ACC=tl.float64 if dot == torch.float64 else tl.float32,
        PRECISION="ieee",
        BLOCK_N=block.rows,
        BLOCK_V=block.vocab,
        BLOCK_D=block.dim,
    )
    bias_grad = acc_pointer if options["HAS_BIAS"] else None
    outputs = dict.fromkeys(("log_norm_ptr", "max_ptr", "target_logit_ptr", "below_max_ptr"), acc_pointer)
    yield kernels._forward_kernel, dict(common, **outputs, argmax_ptr="*i64")
    grads = dict(grad_hidden_ptr=acc_pointer, grad_weight_ptr=acc_pointer, grad_bias_ptr=bias_grad)
    flags = dict(GRAD_HIDDEN=True, GRAD_WEIGHT=True, GRAD_BIAS=options["HAS_BIAS"])
    yield kernels._backward_atomic_kernel, dict(common, **grads, **flags)
    yield kernels._grad_hidden_kernel, dict(common, grad_hidden_ptr=acc_pointer)
    yield kernels._grad_weight_kernel, dict(common, **grads, **flags)


def main() -> None:
    parser = argparse.ArgumentParser(description="Compile loss=tiled's kernels for a CUDA GPU, without one.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100, H200)")
    parser.add_argument("--all-variants", action="store_true", help="every combination of the options, not all on")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    choices = itertools.product((False, True), repeat=len(OPTIONS)) if args.all_variants else [(True,) * len(OPTIONS)]
    for values in choices:
        options = dict(zip(OPTIONS, values))
        for dtype in DTYPES:
            warps = kernels.num_warps(blocks(DTYPES[dtype][0]))
            for fn, arguments in kernels_of(dtype, options):
                shared = compile_kernel(fn, arguments, target, warps)
                on = ",".join(name for name, value in options.items() if value) or "no options"
                print(
                    f"sm_{args.arch} {dtype:>13} {fn.__name__:<24} {shared / 1024:6.0f} KiB shared  ({on})", flush=True
                )


if __name__ == "__main__":
    main()
