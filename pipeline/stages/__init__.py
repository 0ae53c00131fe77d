"""The worker's stages: models (build SAM 2), decode (lazy frames), prompt (automatic grid prompting),
propagate (SAM 2 video propagation). Each takes and returns records from pipeline.records."""
