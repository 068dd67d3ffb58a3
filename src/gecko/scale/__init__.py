"""Scale-out: `gecko generate` and `gecko relabel` with the LLM work on a Ray cluster (`--engine ray`).

Ray is an optional extra (`pip install 'gecko[ray]'`); it is imported only when an engine runs.
"""

from gecko.scale.ray_engine import RayConfig, ScaleError, run_generate_ray, run_relabel_ray

__all__ = ["RayConfig", "ScaleError", "run_generate_ray", "run_relabel_ray"]
