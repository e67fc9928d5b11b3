"""The slide file types the plugin offers to open: one list for the reader's manifest and the file dialogs.

napari.yaml cannot import Python, so ``tests/test_manifest.py`` checks that its reader patterns are
exactly these; the widgets build their file-dialog filter from :func:`dialog_filter`.
"""

from __future__ import annotations

#: suffixes, lower case; TIFF covers generic and OME pyramids, DICOM one file of a WSI series
SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff", ".dcm", ".mrxs", ".scn",
                  ".bif", ".vms", ".vmu", ".svslide")


def filename_patterns() -> list[str]:
    """``*.svs``, ... as napari's reader contribution lists them."""
    return [f"*{s}" for s in SLIDE_SUFFIXES]


def dialog_filter() -> str:
    """A Qt file-dialog filter: the slides, then all files."""
    return f"Slides ({' '.join(filename_patterns())});;All files (*)"


__all__ = ["SLIDE_SUFFIXES", "dialog_filter", "filename_patterns"]
