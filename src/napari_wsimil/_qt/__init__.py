"""Qt widgets. Nothing outside this subpackage imports Qt or napari's GUI."""
