"""Many slides on many machines: feature extraction and prediction as one dask.distributed task per slide,
written atomically into the same stores as the single-process path, with claims so that no slide is done twice.
"""
