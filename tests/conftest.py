import os

# Triton kernels run on the CPU only through Triton's interpreter, which must be chosen before
# triton is imported: without a GPU, the kernel tests run interpreted.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import warnings

import pytest
import torch

try:
    import bitsandbytes as bnb  # noqa: F401
    HAS_BNB = True
except Exception:  # pragma: no cover - bitsandbytes is a dependency, but keep the CPU tier alive
    HAS_BNB = False

needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    import numpy as _np

    _tv = tuple(int(p) for p in triton.__version__.split(".")[:2])
    _nv = tuple(int(p) for p in _np.__version__.split(".")[:2])
    if _tv < (3, 7) and _nv >= (2, 4):
        pytest.exit(f"triton {triton.__version__}'s interpreter (used by the CPU kernel tests) "
                    f"fails with numpy {_np.__version__}: install \"numpy<2.4\" beside it, or a "
                    "newer triton", returncode=4)

CUDA = torch.cuda.is_available()
#: the device kernel tests run on: CUDA when there is one, else the CPU through the interpreter
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
#: whether the Triton kernels can run in this session (a GPU, or the interpreter)
KERNELS_RUN = HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
KERNELS_MISSING = "needs Triton and a GPU, or TRITON_INTERPRET=1"
needs_triton = pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_MISSING)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

warnings.filterwarnings("ignore", message=".*kernels-community.*")


def make_linear4bit(n, k, *, bias=True, double_quant=True, compute_dtype=torch.float16,
                    quant_storage=torch.uint8, seed=0, weight=None):
    """A bitsandbytes Linear4bit (NF4) with a random weight, quantized on the CPU.

    Returns (layer, the float32 weight it was quantized from)."""
    g = torch.Generator().manual_seed(seed)
    w = weight if weight is not None else (
        torch.randn(n, k, generator=g) * 0.05
        + torch.randn(n, 1, generator=g) @ torch.randn(1, k, generator=g) * 0.05)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4",
                              quant_storage=quant_storage)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant,
                                     quant_storage=quant_storage).to("cpu")
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return layer, w


def make_linear(n, k, *, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * 0.05
                           + torch.randn(n, 1, generator=g) @ torch.randn(1, k, generator=g) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return layer.to(dtype)


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's node id (different per case)."""
    import zlib

    import os
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each test compiles against fresh dynamo caches: graphs compiled by earlier tests (other
    models, other layers) would otherwise count toward dynamo's recompile limit for the same
    forward code and fail a later fullgraph compile."""
    yield
    import sys

    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
