# Copyright (c) fasa_seesaw contributors.
"""The synthetic long-tailed LVIS-format dataset: long tail, json consistency, registration."""

import collections
import dataclasses
import hashlib
import json
import numpy as np
import os
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from fasa_seesaw import ConfigError
from fasa_seesaw.data import add_frequency
from fasa_seesaw.data.datasets import load_longtail_json, validate_lvis_json
from fasa_seesaw.data.synth import QUICKSTART, SMOKE, STUDY, ensure_generated, generate
from fasa_seesaw.data.synth import spec as synth_spec
from fasa_seesaw.data.synth import spec_categories, spec_splits

# The smoke spec is small enough for unit tests (and is what the end-to-end test trains on).
TINY = SMOKE

LVIS_V1_GROUPS = {"r": 337, "c": 461, "f": 405}


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = generate(TINY, str(tmp_path_factory.mktemp("synth")))
    return paths, _load(paths["train_json"]), _load(paths["val_json"])


def _shoelace(xs, ys):
    return 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))


def _lvis_group(image_count):
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def test_generation_is_deterministic(tiny, tmp_path):
    paths, _, _ = tiny
    again = generate(TINY, str(tmp_path))
    for key in ("train_json", "val_json", "spec_json"):
        with open(paths[key], "rb") as a, open(again[key], "rb") as b:
            assert a.read() == b.read(), key
    for name in ("000001.png", "000060.png"):
        with open(os.path.join(paths["train_image_root"], name), "rb") as a:
            with open(os.path.join(again["train_image_root"], name), "rb") as b:
                assert a.read() == b.read()


def test_category_statistics_match_annotations(tiny):
    _, train, val = tiny
    image_sets = collections.defaultdict(set)
    instances = collections.Counter()
    for ann in train["annotations"]:
        image_sets[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    for cat in train["categories"]:
        assert cat["image_count"] == len(image_sets[cat["id"]])
        assert cat["instance_count"] == instances[cat["id"]]
        assert cat["frequency"] == _lvis_group(cat["image_count"])
        assert cat["synonyms"] == [cat["name"]]
    # Val carries the TRAIN statistics, so APr/APc/APf use training frequency, as on LVIS.
    assert val["categories"] == train["categories"]
    # The metadata computed before generation is exact.
    spec_counts = [c["image_count"] for c in spec_categories(TINY)]
    assert spec_counts == [c["image_count"] for c in train["categories"]]


@pytest.mark.parametrize("spec", [QUICKSTART, STUDY], ids=lambda s: s.name)
def test_group_proportions_follow_lvis_v1(spec):
    counts = collections.Counter(c["frequency"] for c in spec_categories(spec))
    assert sum(counts.values()) == spec.num_classes
    total = sum(LVIS_V1_GROUPS.values())
    for group, lvis_count in LVIS_V1_GROUPS.items():
        assert counts[group] >= 1
        assert abs(counts[group] - spec.num_classes * lvis_count / total) < 1.0, group
    ids = [c["id"] for c in spec_categories(spec)]
    assert ids == list(range(1, spec.num_classes + 1))
    assert len({c["name"] for c in spec_categories(spec)}) == spec.num_classes


@pytest.mark.parametrize("spec", [QUICKSTART, STUDY, TINY], ids=lambda s: s.name)
def test_train_image_count_ranges(spec):
    cats = spec_categories(spec)
    by_group = collections.defaultdict(list)
    for c in cats:
        by_group[c["frequency"]].append(c["image_count"])
    assert all(1 <= n <= 10 for n in by_group["r"])
    assert all(11 <= n <= 100 for n in by_group["c"])
    assert all(101 <= n <= spec.frequent_max_images for n in by_group["f"])
    assert max(by_group["f"]) == spec.frequent_max_images
    # Rare and common classes keep their LVIS v1 image counts.
    for c in cats:
        if c["frequency"] != "f":
            assert c["image_count"] == c["source_image_count"]


def test_rare_classes_in_generated_json(tiny):
    _, train, val = tiny
    rare = [c for c in train["categories"] if c["frequency"] == "r"]
    assert rare and all(1 <= c["image_count"] <= 10 for c in rare)
    # Every class is measurable on val.
    val_images = collections.defaultdict(set)
    for ann in val["annotations"]:
        val_images[ann["category_id"]].add(ann["image_id"])
    for cat in val["categories"]:
        assert len(val_images[cat["id"]]) >= TINY.val_min_images_per_class


@pytest.mark.parametrize("split", [1, 2])
def test_polygons_bbox_area(tiny, split):
    data = tiny[split]
    size = TINY.image_size
    for img in data["images"]:
        assert img["height"] == img["width"] == size
    for ann in data["annotations"]:
        assert len(ann["segmentation"]) == 1
        pts = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        assert len(pts) >= 3
        xs, ys = pts[:, 0], pts[:, 1]
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= size and ys.max() <= size
        x, y, w, h = ann["bbox"]
        assert np.allclose([x, y, x + w, y + h], [xs.min(), ys.min(), xs.max(), ys.max()])
        assert ann["area"] == pytest.approx(_shoelace(xs, ys), abs=0.01)
        assert ann["iscrowd"] == 0 and ann["area"] > 0


@pytest.mark.parametrize("split", [1, 2])
def test_image_lists_and_ids(tiny, split):
    data = tiny[split]
    assert [img["id"] for img in data["images"]] == list(range(1, len(data["images"]) + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    present = collections.defaultdict(set)
    for ann in data["annotations"]:
        present[ann["image_id"]].add(ann["category_id"])
    num_classes = len(data["categories"])
    for img in data["images"]:
        assert present[img["id"]], "every image has at least one annotated object"
        neg = set(img["neg_category_ids"])
        assert not neg & present[img["id"]]
        assert neg <= set(range(1, num_classes + 1))
        assert set(img["not_exhaustive_category_ids"]) <= present[img["id"]]
        assert os.path.basename(img["file_name"]) == img["file_name"]


def test_no_objects_overlap(tiny):
    _, train, _ = tiny
    boxes = collections.defaultdict(list)
    for ann in train["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes[ann["image_id"]].append((x, y, x + w, y + h))
    for group in boxes.values():
        b = np.asarray(group)
        ix = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
        iy = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
        overlap = (ix > 0) & (iy > 0)
        np.fill_diagonal(overlap, False)
        assert not overlap.any()


def test_load_longtail_json(tiny):
    paths, train, _ = tiny
    dicts = load_longtail_json(paths["train_json"], paths["train_image_root"])
    assert len(dicts) == TINY.num_train_images
    assert sum(len(d["annotations"]) for d in dicts) == len(train["annotations"])
    assert all(os.path.isfile(d["file_name"]) for d in dicts[:5])
    cat_ids = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert min(cat_ids) >= 0 and max(cat_ids) < TINY.num_classes  # contiguous, 0-based


def test_load_json_without_coco_url(tiny, tmp_path):
    # Users' LVIS-style files often have only file_name; detectron2 alone would need coco_url.
    paths, train, _ = tiny
    train = json.loads(json.dumps(train))  # the fixture is shared: do not mutate it
    for img in train["images"]:
        img.pop("coco_url", None)
    json_file = tmp_path / "no_url.json"
    json_file.write_text(json.dumps(train))
    dicts = load_longtail_json(str(json_file), paths["train_image_root"])
    assert [os.path.basename(d["file_name"]) for d in dicts[:3]] == [
        "000001.png",
        "000002.png",
        "000003.png",
    ]
    assert all(os.path.isfile(d["file_name"]) for d in dicts[:5])


def test_validate_requires_frequency(tiny):
    paths, train, _ = tiny
    validate_lvis_json(paths["train_json"])
    broken = json.loads(json.dumps(train))
    for cat in broken["categories"]:
        del cat["frequency"]
    with pytest.raises(ValueError, match="frequency") as err:
        validate_lvis_json(broken, "broken.json")
    assert "add_frequency" in str(err.value)
    assert isinstance(err.value, ConfigError)

    gapped = json.loads(json.dumps(train))
    gapped["categories"][0]["id"] = 1000
    with pytest.raises(ValueError, match="contiguous"):
        validate_lvis_json(gapped)


def test_add_frequency_cli(tiny, tmp_path):
    _, train, _ = tiny
    stripped = json.loads(json.dumps(train))
    for cat in stripped["categories"]:
        for key in ("frequency", "image_count", "instance_count"):
            del cat[key]
    src, dst = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(stripped))
    assert add_frequency.main([str(src), str(dst)]) == 0
    fixed = _load(dst)
    validate_lvis_json(fixed)
    assert fixed["categories"] == train["categories"]
    assert add_frequency.main([str(src), str(dst)]) == 1  # refuses to overwrite
    assert add_frequency.main([str(src), str(dst), "--force"]) == 0


def test_ensure_generated_caches_and_keeps_stale(tmp_path):
    small = dataclasses.replace(TINY, num_train_images=110, num_val_images=12)
    paths = ensure_generated(small, str(tmp_path))
    stamp = os.stat(paths["train_json"]).st_mtime_ns
    assert ensure_generated(small, str(tmp_path)) == paths
    assert os.stat(paths["train_json"]).st_mtime_ns == stamp  # cached, not regenerated

    changed = dataclasses.replace(small, seed=small.seed + 1)
    ensure_generated(changed, str(tmp_path))
    stale = os.path.join(str(tmp_path), f"{small.name}.stale-{small.spec_hash()[:12]}")
    assert os.path.isfile(os.path.join(stale, "lvis_v1_format_train.json"))  # moved, not deleted
    assert _load(paths["spec_json"])["spec_hash"] == changed.spec_hash()
    # No temporary directories are left behind.
    assert sorted(os.listdir(str(tmp_path))) == sorted([small.name, os.path.basename(stale)])


def test_spec_hash_tracks_fields_and_version(monkeypatch):
    assert TINY.spec_hash() == dataclasses.replace(TINY).spec_hash()
    assert TINY.spec_hash() != dataclasses.replace(TINY, seed=8).spec_hash()
    before = TINY.spec_hash()
    monkeypatch.setattr(synth_spec, "GENERATOR_VERSION", "test")
    assert TINY.spec_hash() != before


def test_invalid_spec_is_rejected():
    with pytest.raises(ValueError, match="frequent"):
        dataclasses.replace(TINY, num_train_images=60)
    with pytest.raises(ValueError, match="num_test_images"):
        dataclasses.replace(TINY, num_test_images=-1)
    with pytest.raises(ValueError, match="num_test_images"):
        dataclasses.replace(TINY, num_test_images=TINY.val_min_images_per_class - 1)


# ---------------------------------------------------------------------------------------------
# The test split
# ---------------------------------------------------------------------------------------------

TINY_WITH_TEST = dataclasses.replace(TINY, num_test_images=20)


@pytest.fixture(scope="module")
def tiny_with_test(tmp_path_factory):
    paths = generate(TINY_WITH_TEST, str(tmp_path_factory.mktemp("synth_test")))
    return paths, {split: _load(paths[f"{split}_json"]) for split in ("train", "val", "test")}


def test_test_split_only_when_asked():
    assert spec_splits(TINY) == ("train", "val")
    assert spec_splits(TINY_WITH_TEST) == ("train", "val", "test")
    assert spec_splits(STUDY) == ("train", "val", "test") and STUDY.num_test_images > 0
    assert "test_json" not in synth_spec.dataset_paths(TINY, "/x")


def test_test_split_leaves_train_and_val_unchanged(tiny, tiny_with_test):
    paths, train, val = tiny
    paths_t, data = tiny_with_test
    # Train and val draw from their own RNG streams: identical content; only the spec hash in
    # "info" differs (a spec with a test split is another dataset).
    for split, old in (("train", train), ("val", val)):
        new = data[split]
        for key in ("images", "annotations", "categories"):
            assert new[key] == old[key], (split, key)
        assert new["info"]["spec_hash"] == TINY_WITH_TEST.spec_hash() != old["info"]["spec_hash"]
    for split in ("train", "val"):
        for name in ("000001.png", "000012.png"):
            with open(os.path.join(paths[f"{split}_image_root"], name), "rb") as a:
                with open(os.path.join(paths_t[f"{split}_image_root"], name), "rb") as b:
                    assert a.read() == b.read()


def test_test_split_is_drawn_like_val(tiny_with_test):
    paths, data = tiny_with_test
    test, val = data["test"], data["val"]
    assert test["info"]["split"] == "test"
    assert len(test["images"]) == TINY_WITH_TEST.num_test_images
    assert test["categories"] == data["train"]["categories"]  # train statistics, as val
    with open(os.path.join(paths["test_image_root"], "000001.png"), "rb") as a:
        with open(os.path.join(paths["val_image_root"], "000001.png"), "rb") as b:
            assert a.read() != b.read()  # its own stream, not a copy of val
    images = collections.defaultdict(set)
    for ann in test["annotations"]:
        images[ann["category_id"]].add(ann["image_id"])
    for cat in test["categories"]:  # every class measurable, as on val
        assert len(images[cat["id"]]) >= TINY_WITH_TEST.val_min_images_per_class
    # Same target rule as val: sqrt(train count), at the same density.
    per_image = len({(a["image_id"], a["category_id"]) for a in test["annotations"]})
    per_image_val = len({(a["image_id"], a["category_id"]) for a in val["annotations"]})
    assert per_image / len(test["images"]) == pytest.approx(
        per_image_val / len(val["images"]), rel=0.25
    )
    assert all(
        os.path.isfile(os.path.join(paths["test_image_root"], img["file_name"]))
        for img in test["images"]
    )
    assert validate_lvis_json(test)


def test_spec_hash_without_test_split_is_unchanged():
    # Specs without a test split keep the cache key they had before num_test_images existed,
    # so already generated quickstart/smoke data stays valid.
    for spec in (QUICKSTART, TINY):
        fields = {k: v for k, v in spec.to_dict().items() if k != "num_test_images"}
        payload = {"generator_version": synth_spec.GENERATOR_VERSION, "spec": fields}
        old = hashlib.sha1(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
        assert spec.spec_hash() == old
    assert TINY_WITH_TEST.spec_hash() != TINY.spec_hash()


def test_cached_copy_without_test_split_is_regenerated(tmp_path):
    small = dataclasses.replace(TINY, num_train_images=110, num_val_images=12)
    paths = ensure_generated(small, str(tmp_path))
    assert not os.path.exists(os.path.join(paths["root"], "lvis_v1_format_test.json"))
    with_test = dataclasses.replace(small, num_test_images=12)
    new_paths = ensure_generated(with_test, str(tmp_path))
    assert os.path.isfile(new_paths["test_json"])
    assert _load(new_paths["spec_json"])["spec_hash"] == with_test.spec_hash()
    stale = os.path.join(str(tmp_path), f"{small.name}.stale-{small.spec_hash()[:12]}")
    assert os.path.isdir(stale)
    # A folder with the right hash but a missing split is not taken as complete either.
    os.remove(new_paths["test_json"])
    ensure_generated(with_test, str(tmp_path))
    assert os.path.isfile(new_paths["test_json"])


def test_builtin_datasets_registered():
    import fasa_seesaw.data  # noqa: F401

    assert "longtail_synth_quickstart_test" not in DatasetCatalog.list()
    for spec in (QUICKSTART, STUDY):
        for split in spec_splits(spec):
            name = f"longtail_synth_{spec.name}_{split}"
            assert name in DatasetCatalog.list()
            meta = MetadataCatalog.get(name)
            cats = spec_categories(spec)
            assert meta.evaluator_type == "lvis"
            assert meta.thing_classes == [c["name"] for c in cats]
            assert meta.thing_frequency == [c["frequency"] for c in cats]
            assert [c["image_count"] for c in meta.class_image_count] == [
                c["image_count"] for c in cats
            ]
            assert meta.json_file.endswith(f"lvis_v1_format_{split}.json")
    assert "longtail_synth_study_test" in DatasetCatalog.list()
