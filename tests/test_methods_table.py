"""The methods table: complete, consistent with the registries, values as the references set them."""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path

import pytest

import s2clip_cli.methods as methods_module
from s2clip_cli.data.class_names import read_class_file
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.methods import (
    LAYER_POLICIES,
    METHODS,
    POSTPROCESS_STEPS,
    TABLE_HEADERS,
    TABLE_PRESETS,
    TEMPLATES,
    deviations,
    get_method,
    method_table_rows,
    resolve_protocol,
)
from s2clip_cli.models.registry import vfm_spec
from s2clip_cli.pipeline.attention import STRATEGIES

NAMES = ["s2clip", "proxyclip", "trident", "clearclip", "sclip", "naclip", "maskclip", "clip", "cliper", "corrclip",
         "scclip", "resclip"]


def test_all_methods_and_eight_presets() -> None:
    assert list(METHODS) == NAMES
    assert set(TABLE_PRESETS) == set(PRESETS) and len(PRESETS) == 8
    for m in METHODS.values():
        assert set(m.protocol) == set(PRESETS), m.name
        assert m.reported and all(set(r.miou) == set(PRESETS) for r in m.reported), m.name
        assert set(m.reported[0].caveats) <= set(PRESETS)
        assert len(m.deviations) > 80 and deviations(m.name) == m.deviations


def test_fields_name_things_that_exist() -> None:
    for m in METHODS.values():
        assert m.strategy in STRATEGIES, m.name
        assert m.layers in LAYER_POLICIES, m.name
        assert all(step in POSTPROCESS_STEPS for step in m.postprocess), m.name
        assert (m.vfm is not None) == STRATEGIES[m.strategy].needs_vfm, m.name
        if m.vfm is not None:
            assert vfm_spec(m.vfm).name == m.vfm
        if m.residual or m.ffn:
            assert STRATEGIES[m.strategy].with_cls, m.name  # the skip needs the CLIP token grid


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_resolves_to_complete_settings(name: str) -> None:
    root = resources.files("s2clip_cli.data").joinpath("class_names")
    for preset in PRESETS:
        p = resolve_protocol(name, preset)
        assert p.short_side > 0 and p.logit_scale > 0 and 0.0 <= p.prob_thd < 1.0
        assert p.templates in TEMPLATES
        if p.whole_image:
            assert p.crop is None and p.stride is None
        else:
            assert p.crop > 0 and 0 < p.stride <= p.crop
        classes = read_class_file(Path(str(root.joinpath(p.class_file))), strict=False)
        assert len(classes) == PRESETS[preset].num_classes, (name, preset, p.class_file)


def test_values_from_the_references() -> None:
    sclip = resolve_protocol("sclip", "voc21")
    assert (sclip.short_side, sclip.crop, sclip.stride, sclip.logit_scale, sclip.prob_thd, sclip.area_thd) == (
        336, 224, 112, 65.0, 0.1, 0.1)
    assert resolve_protocol("sclip", "coco_stuff164k").short_side == 448
    assert resolve_protocol("sclip", "ade20k").area_thd is None
    naclip = resolve_protocol("naclip", "voc20")
    assert naclip.whole_image and naclip.logit_scale == 40.0 and naclip.extra["pamr_steps"] == 10
    assert not resolve_protocol("naclip", "context59").whole_image
    clear = resolve_protocol("clearclip", "voc21")
    assert (clear.short_side, clear.crop, clear.stride, clear.prob_thd, clear.logit_scale) == (448, 448, 224, 0.5, 50.0)
    assert read_class_file(Path(str(resources.files("s2clip_cli.data").joinpath("class_names", clear.class_file))))[0] \
        == ["background"]
    city = resolve_protocol("proxyclip", "cityscapes")
    assert (city.short_side, city.crop, city.stride) == (448, 224, 112)
    # S2CLIP and Trident run our presets unchanged (they are Trident's configs).
    for preset, base in PRESETS.items():
        for name in ("s2clip", "trident"):
            p = resolve_protocol(name, preset)
            assert (p.short_side, p.crop, p.stride, p.prob_thd, p.class_file) == (
                base.short_side, base.crop, base.stride, base.prob_thd, base.class_file)
    assert resolve_protocol("trident", "cityscapes").extra["cos_fac"] == 3.0
    assert resolve_protocol("trident", "voc21").extra["cos_fac"] == 1.2
    cliper = resolve_protocol("cliper", "coco_object")
    assert cliper.logit_scale == 50.0 and cliper.templates == "openai80" and cliper.extra["sliding_crop_size"] == 224
    assert resolve_protocol("cliper", "cityscapes").short_side == 560
    assert METHODS["cliper"].reported[0].caveats.keys() == {"coco_object"}
    assert (get_method("sclip").residual, get_method("sclip").ffn) == (True, True)
    assert (get_method("maskclip").strategy, get_method("maskclip").residual) == ("identity", True)
    assert (get_method("naclip").postprocess, get_method("naclip").sigma) == (("pamr",), 5.0)
    # CorrCLIP's configs (CorrCLIPv1/configs): base 336 with 336/112, City 448 with 224/112, ADE 448; its own
    # class files ('people'); MetaCLIP; instance masks and the map correction.
    corr = get_method("corrclip")
    assert (corr.clip, corr.vfm, corr.instance_masks, corr.postprocess) == (
        "MetaCLIP-B/16", "dino_vitb8", True, ("mask_correction",))
    for preset, expected in {"voc21": (336, 336, 112, 0.2), "context60": (336, 336, 112, 0.15),
                             "coco_object": (336, 336, 112, 0.25), "voc20": (336, 336, 112, 0.0),
                             "cityscapes": (448, 224, 112, 0.0), "ade20k": (448, 336, 112, 0.0),
                             "context59": (336, 336, 112, 0.0), "coco_stuff164k": (336, 336, 112, 0.0)}.items():
        p = resolve_protocol("corrclip", preset)
        assert (p.short_side, p.crop, p.stride, p.prob_thd) == expected, preset
        assert p.logit_scale == 40.0 and p.class_file == f"corrclip/{preset}.txt"
        names = read_class_file(Path(str(resources.files("s2clip_cli.data").joinpath("class_names", p.class_file))))
        assert ["people"] in names and ["person"] not in names
    assert sum(corr.reported[0].miou.values()) / 8 == pytest.approx(51.0, abs=0.05)
    assert sum(corr.reported[2].miou.values()) / 8 == pytest.approx(53.6, abs=0.05)


def test_table_rows() -> None:
    rows = method_table_rows()
    assert [r["method"] for r in rows] == NAMES
    columns = {"method", "strategy", "residual/FFN", "layers", "VFM", "post-processing", "source",
               *TABLE_HEADERS.values()}
    assert all(set(r) == columns for r in rows)
    by_name = {r["method"]: r for r in rows}
    assert by_name["sclip"]["residual/FFN"] == "kept/kept" and by_name["sclip"]["VOC21"] == "59.63"
    assert by_name["clearclip"]["VOC21"] == "–" and by_name["clearclip"]["City"] == "30.0"
    assert by_name["cliper"]["Obj"] == "39.2*"
    assert by_name["s2clip"]["VFM"] == "dino_vitb8" and by_name["s2clip"]["post-processing"] == "sam"


def test_unknown_names() -> None:
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        resolve_protocol("sclip", "nope")


def test_methods_module_is_pure_data() -> None:
    tree = ast.parse(Path(methods_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "collections.abc", "dataclasses", "types", "typing", ".config", ".data.presets"}, imported
