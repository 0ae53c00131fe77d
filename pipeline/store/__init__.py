"""Where results live: masks (Zarr), metadata (Parquet with explicit schemas), commits (atomic per item)."""
