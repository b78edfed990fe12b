"""`python -m modeling_itera`: which model it uses by default, its error when that model cannot be had, its flags."""

from __future__ import annotations

import os
import subprocess
import sys

from transformers import CompileConfig

from modeling_itera import IteraLiteForCausalLM, defaults
from modeling_itera import __main__ as cli


def test_the_default_model_is_the_bundled_folder_in_a_clone_else_the_hub_id(monkeypatch, tmp_path):
    assert cli.parse_args([]).model == str(defaults.BUNDLED_MODEL)
    monkeypatch.setattr(defaults, "BUNDLED_MODEL", tmp_path / "site-packages" / "checkpoints" / "absent")
    assert cli.parse_args([]).model == defaults.HUB_MODEL_ID == "itera-lite/itera-lite-tinystories"


def test_without_a_bundled_model_the_error_names_what_was_tried_and_the_flag(monkeypatch, tmp_path):
    absent = tmp_path / "checkpoints" / "itera-lite-tinystories"
    monkeypatch.setattr(defaults, "BUNDLED_MODEL", absent)
    message = cli.cannot_load(defaults.HUB_MODEL_ID, OSError("We couldn't connect to 'https://huggingface.co'"))
    assert str(absent) in message and defaults.HUB_MODEL_ID in message and "couldn't connect" in message
    assert "--model" in message


def test_an_unreachable_hub_id_is_a_clear_error_with_exit_code_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "modeling_itera", "--model", "nobody/no-such-model", "Once"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nobody/no-such-model" in last and "--model" in last
    assert "Traceback" not in proc.stderr


def test_compile_asks_generate_for_a_fullgraph_compile(monkeypatch):
    seen = {}

    def generate(self, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(IteraLiteForCausalLM, "generate", generate)
    assert cli.main(["Once", "--max-new-tokens", "2", "--compile"]) == 0
    assert isinstance(seen["compile_config"], CompileConfig) and seen["compile_config"].fullgraph is True
    seen.clear()
    assert cli.main(["Once", "--max-new-tokens", "2"]) == 0
    assert "compile_config" not in seen
