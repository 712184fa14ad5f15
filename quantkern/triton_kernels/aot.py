"""Compile a quantkern Triton kernel ahead of time for a GPU architecture, without a GPU: what the
compile tests and ``benchmarks/sass_report.py`` use to read registers, shared memory and SASS."""

from __future__ import annotations

# integer / fp32 pointers of the WNA16 kernels (and the MoE kernel's routing); every other pointer has the
# activations' dtype
POINTER_TYPES = dict(qw_ptr="*i32", z_ptr="*u8", g_ptr="*i32", p_ptr="*fp32", rows_ptr="*i64", off_ptr="*i64",
                     perm_ptr="*i32")


def compile_ahead(fn, const: dict, dtype: str, arch: int, num_warps: int, num_stages: int,
                  unaligned: tuple[str, ...] = ("M",)):
    """``triton.compile`` ``fn`` (a ``@triton.jit`` kernel) with the ``const`` constexprs for
    ``sm_{arch}`` and activations of ``dtype`` (``"fp16"`` / ``"bf16"``). Pointers and integer
    arguments other than those named in ``unaligned`` are declared divisible by 16, as at a real launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTER_TYPES.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name not in unaligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
