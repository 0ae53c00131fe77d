"""masklet: videos and images in, SAM 2 masklets out (Zarr masks + Parquet metadata)."""
from pipeline.config import load_config
from pipeline.results import RunResults, open_run

__version__ = "0.1.0"
__all__ = ["open_run", "RunResults", "load_config", "__version__"]
