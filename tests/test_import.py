"""Importing gradfuse without its compiled extension must say how to build it."""
import subprocess
import sys

BLOCK_EXTENSION = """
import importlib.abc, sys
class Unbuilt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "gradfuse._C":
            raise ImportError("No module named 'gradfuse._C'")
sys.meta_path.insert(0, Unbuilt())
import gradfuse
"""


def test_missing_extension_says_how_to_build_it():
    result = subprocess.run([sys.executable, "-c", BLOCK_EXTENSION], capture_output=True, text=True)
    assert result.returncode != 0
    assert "gradfuse._C is not built" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
    assert "GRADFUSE_CUDA=0" in result.stderr


def test_built_extension_reports_its_backends():
    import gradfuse

    assert isinstance(gradfuse.cuda_compiled, bool)
