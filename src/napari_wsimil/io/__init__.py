"""The house's storage, below everything that stores: atomic writes, the chunked raster store and
the streamed mask writers. Nothing here knows of projects, slides or training."""
