"""masklet: videos and images in, SAM 2 masklets out (Zarr masks + Parquet metadata)."""
from pipeline.config import load_config

__version__ = "0.1.0"
__all__ = ["open_run", "RunResults", "load_config", "__version__"]


def __getattr__(name: str):
    # Imported on first use: pipeline.results pulls in zarr, which `masklet status` (run every few seconds
    # over big runs) never needs.
    if name in ("open_run", "RunResults"):
        from pipeline import results

        return getattr(results, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
