"""Loads the compiled extension; its import registers the torch.ops.gradfuse ops."""
try:
    from . import _C  # noqa: F401  (import side effect: op registration)
except ImportError as error:  # pragma: no cover - exercised only on an unbuilt checkout
    raise ImportError(
        "gradfuse's native extension gradfuse._C is not built. Build it from the repository root with\n"
        "    pip install --no-build-isolation -e .\n"
        "(or `python setup.py build_ext --inplace`); set GRADFUSE_CUDA=0 for a CPU-only build.\n"
        f"Original error: {error}"
    ) from error

cuda_compiled = bool(_C.cuda_compiled)
inspect_parameters = _C.inspect_parameters
first_modified = _C.first_modified
GradientInspector = _C.GradientInspector
FlatBinding = _C.FlatBinding
direct = _C.direct
gather_param_state = _C.gather_param_state
same_objects = _C.same_objects
