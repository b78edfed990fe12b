"""Where torch and transformers are not installed: the package imports, its ONNX runner and
`python -m modeling_itera --backend onnx` run, and the model's names say what to install. (.ci/run also checks this
in a virtualenv that really has no torch.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from .test_onnx import exported, model, onnx_model  # noqa: F401  (the export these tests run)

WITHOUT_TORCH = """
import sys
sys.modules["torch"] = sys.modules["transformers"] = None  # any import of them now raises ImportError
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    script = WITHOUT_TORCH + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_the_packaged_runner_imports_and_generates_without_torch(exported, onnx_model):  # noqa: F811
    result = run_without_torch(f"""
        import json
        from modeling_itera.onnx_runtime import IteraOnnxModel
        model = IteraOnnxModel({str(exported)!r})
        print(json.dumps(model.generate(["the cat", "a big red ball"], max_new_tokens=12, greedy=True)))
    """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == onnx_model.generate(
        ["the cat", "a big red ball"], max_new_tokens=12, greedy=True
    )


def test_the_story_cli_runs_the_onnx_backend_without_torch(exported, onnx_model):  # noqa: F811
    result = run_without_torch(f"""
        import runpy
        sys.argv = ["modeling_itera", "--backend", "onnx", "--model", {str(exported)!r}, "--greedy",
                    "--max-new-tokens", "8", "the cat"]
        runpy.run_module("modeling_itera", run_name="__main__")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the cat" + "".join(onnx_model.stream("the cat", max_new_tokens=8, greedy=True)) + "\n"


def test_the_model_names_say_what_to_install_without_torch():
    result = run_without_torch("""
        import modeling_itera
        try:
            modeling_itera.IteraLiteConfig
        except ImportError as err:
            print(err)
    """)
    assert result.returncode == 0, result.stderr
    assert "needs torch and transformers" in result.stdout and "pip install" in result.stdout
