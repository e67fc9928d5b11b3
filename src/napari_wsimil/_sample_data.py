"""File > Open Sample: a synthetic malignant H&E slide, generated into a cache on first use."""

from __future__ import annotations

from .layers import LayerData, slide_layer_data


def make_sample_slide() -> list[LayerData]:
    from .slide import open_slide
    from .slide.synthetic import sample_slide_path

    return [slide_layer_data(open_slide(sample_slide_path()), name="wsimil sample")]
