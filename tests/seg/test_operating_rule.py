"""The operating-threshold rule (``operating_rule``, :mod:`napari_wsimil.seg.operating_point`): with painted
validation pixels, the threshold (≥ 0.5) of best pooled Dice on them; without, the benign-FPR rule. The same
function serves a centralised run and FedMix's server, which applies it to counts summed over sites
(:func:`napari_wsimil.federated.fedmix_validation.summarise`). Pure counts here: fast, no slide."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_wsimil.federated.fedmix_validation import histogram_numbers, summarise
from napari_wsimil.seg.operating_point import (
    FLOOR_LEVEL,
    LevelHistogram,
    choose_threshold,
    dice_at_level,
    level_threshold,
    threshold_for_fpr,
    threshold_for_val_dice,
)


def _hist(levels: dict[int, int]) -> np.ndarray:
    h = np.zeros(256, np.int64)
    for k, c in levels.items():
        h[k] += c
    return h


def _benign(counts: np.ndarray) -> LevelHistogram:
    hist = LevelHistogram()
    hist.counts = np.asarray(counts, np.int64)
    return hist


# A saturated map (a Dice loss): tumour at 255 and 200, a few benign false positives at 254-255 with the rest
# of the normal tissue at 0. 0.5 % of benign tissue sits at 255, so at most 0.1 % is met only above 1.
TUMOUR = _hist({255: 900, 200: 100})
NORMAL = _hist({0: 9000, 150: 40, 254: 10})
BENIGN = _hist({0: 99_000, 254: 500, 255: 500})


def test_a_saturated_map_gets_a_threshold_near_half_from_painted_pixels_not_above_one() -> None:
    old, _ = threshold_for_fpr(_benign(BENIGN), 0.001)
    assert old > 1.0  # the benign-FPR rule: nothing called tumour
    point = choose_threshold("auto", 0.001, _benign(BENIGN), (TUMOUR, NORMAL))
    # levels 151..200 keep all tumour and drop the 40 normal pixels at 150: the lowest of them
    assert point["rule"] == "val-dice" and point["threshold"] == level_threshold(151)
    assert point["val_pixel_dice_at_threshold"] == pytest.approx(2000 / (2000 + 10))
    assert point["val_pixel_dice_at_0.5"] == pytest.approx(2000 / (2000 + 50))
    assert point["benign_fpr_threshold"] == old and point["benign_fpr"] == pytest.approx(0.01)
    assert "painted validation pixels" in point["why"] and point["operating_rule"] == "auto"
    forced = choose_threshold("benign-fpr", 0.001, _benign(BENIGN), (TUMOUR, NORMAL))
    assert forced["rule"] == "benign-fpr" and forced["threshold"] == old


def test_without_painted_tumour_the_benign_rule_stays() -> None:
    """Slide labels only (e.g. weak-only Pinchaud), or painted pixels none of which is tumour: Dice says nothing,
    so 'auto' keeps the benign-FPR rule; 'val-dice' asked for explicitly is refused."""
    want, achieved = threshold_for_fpr(_benign(BENIGN), 0.01)
    for painted in (None, (np.zeros(256), NORMAL)):
        point = choose_threshold("auto", 0.01, _benign(BENIGN), painted)
        assert point["rule"] == "benign-fpr" and point["threshold"] == want and point["benign_fpr"] == achieved
        assert "no painted validation pixel is tumour" in point["why"]
        with pytest.raises(ValueError, match="val-dice"):
            choose_threshold("val-dice", 0.01, _benign(BENIGN), painted)
    with pytest.raises(ValueError, match="operating_rule"):
        choose_threshold("best", 0.01, _benign(BENIGN))


def test_val_dice_needs_no_benign_slide() -> None:
    point = choose_threshold("auto", 0.001, None, (TUMOUR, NORMAL))
    assert point["threshold"] == level_threshold(151) and "benign_fpr" not in point


def test_the_threshold_never_goes_below_half() -> None:
    """Tumour at 0.3: a lower threshold would score better on these pixels, but the floor is 0.5."""
    t, n = _hist({77: 100, 255: 10}), _hist({0: 100})
    assert choose_threshold("val-dice", 0.001, None, (t, n))["threshold"] == level_threshold(FLOOR_LEVEL) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=256, max_size=256), st.lists(st.integers(0, 50), min_size=256,
                                                                           max_size=256))
def test_val_dice_threshold_is_the_brute_force_argmax(t: list[int], n: list[int]) -> None:
    t_, n_ = np.asarray(t), np.asarray(n)
    if not t_.sum():
        with pytest.raises(ValueError):
            threshold_for_val_dice(t_, n_)
        return
    dice = [dice_at_level(t_, n_, k) for k in range(FLOOR_LEVEL, 256)]
    best = FLOOR_LEVEL + int(np.argmax(dice))  # the first (lowest) of the best
    threshold, d = threshold_for_val_dice(t_, n_)
    assert threshold == level_threshold(best) and d == pytest.approx(max(dice))


def _site(tumour: np.ndarray, normal: np.ndarray, benign: np.ndarray | None = None) -> dict[str, float]:
    m = {"val_loss": 0.5, "n_val": 2.0, **histogram_numbers("val_tumour", tumour),
         **histogram_numbers("val_normal", normal)}
    if benign is not None:
        m.update(histogram_numbers("benign", benign), benign_slides=1.0, benign_from_validation=1.0)
    return m


def test_fedmix_server_sets_the_threshold_from_the_summed_counts() -> None:
    """Two sites whose own painted pixels would each choose another threshold: the server's is the one of the
    sum (Dice does not add up over sites; counts do), the same function as a centralised run's."""
    a_t, a_n = _hist({255: 100}), _hist({0: 1000, 250: 30})  # alone: 251 (drop the 30 at 250)
    b_t, b_n = _hist({180: 100}), _hist({0: 1000, 170: 5})  # alone: 171
    assert threshold_for_val_dice(a_t, a_n)[0] == level_threshold(251)
    assert threshold_for_val_dice(b_t, b_n)[0] == level_threshold(171)
    summary = summarise([_site(a_t, a_n, BENIGN), _site(b_t, b_n, BENIGN)], operating_fpr=0.001)
    want, _ = threshold_for_val_dice(a_t + b_t, a_n + b_n)
    assert want == level_threshold(171)  # summed: keep b's tumour, pay a's 30
    assert summary["threshold"] == want and summary["rule"] == "val-dice"
    assert summary["benign_fpr_threshold"] == threshold_for_fpr(_benign(2 * BENIGN), 0.001)[0] > 1.0
    assert summary["val_pixel_dice_at_threshold"] == pytest.approx(dice_at_level(a_t + b_t, a_n + b_n, 171))
    old = summarise([_site(a_t, a_n, BENIGN), _site(b_t, b_n, BENIGN)], operating_fpr=0.001,
                    operating_rule="benign-fpr")
    assert old["rule"] == "benign-fpr" and old["threshold"] > 1.0


def test_fedmix_server_without_painted_validation_keeps_the_benign_rule() -> None:
    sites = [{"val_loss": 0.5, "n_val": 2.0, **histogram_numbers("benign", BENIGN), "benign_slides": 1.0}] * 2
    summary = summarise(sites, operating_fpr=0.01)
    assert summary["rule"] == "benign-fpr"
    assert summary["threshold"] == threshold_for_fpr(_benign(2 * BENIGN), 0.01)[0]
    assert "val_pixel_dice_at_threshold" not in summary


def test_a_site_without_paint_adds_its_benign_tissue_to_the_pooled_normal_pixels() -> None:
    """A centralised run pools every benign validation slide's tissue as normal; a FedMix site without painted
    slides sends those counts (tumour all zero), so the server's pooled Dice and threshold see them too. Alone,
    such sites carry no tumour: Dice then chooses nothing (the validation loss and benign rule stay)."""
    t, n = _hist({255: 100}), _hist({0: 1000})
    extra = _hist({0: 3000, 255: 100})  # another site's benign validation tissue, 100 false positives at 255
    with_it = summarise([_site(t, n), _site(np.zeros(256), extra)], operating_fpr=0.001, operating_rule="val-dice")
    alone = summarise([_site(t, n)], operating_fpr=0.001, operating_rule="val-dice")
    assert with_it["val_normal_pixels"] == 4100 and with_it["painted_sites"] == 1
    assert alone["val_pixel_dice"] == 1.0 and with_it["val_pixel_dice"] == pytest.approx(200 / 300)
    unpainted = summarise([_site(np.zeros(256), extra, BENIGN)] * 2, operating_fpr=0.01)
    assert "val_pixel_dice" not in unpainted and unpainted["select_by"] == "val_loss"
    assert unpainted["rule"] == "benign-fpr"
