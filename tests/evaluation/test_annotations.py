"""The paper's annotation format, tag lists, and matching image ids to result URIs."""

from __future__ import annotations

import pytest

from ramplus_core.evaluation.annotations import (builtin_taglists, check_known_tags, image_key, label_matrix,
                                                 match_images, parse_annotations, read_annotations, read_taglist)
from ramplus_core.evaluation.common import EvaluationError


def test_parse_paper_format():
    text = "\ufeffimg1,cat,dog\nimg2\n\nimg3,dog, \"tag, with comma\",dog\nimg4,\n"
    a = parse_annotations(text, "gt.csv")
    assert a.ids == ["img1", "img2", "img3", "img4"]
    assert a.tags == [["cat", "dog"], [], ["dog", "tag, with comma"], []]
    assert a.lines == [1, 2, 4, 5]
    assert a.all_tags() == ["cat", "dog", "tag, with comma"]


def test_duplicate_and_empty_ids_are_errors():
    with pytest.raises(EvaluationError, match=r"line 3: image id 'a' is also on line 1"):
        parse_annotations("a,x\nb,y\na,z\n", "gt.csv")
    with pytest.raises(EvaluationError, match="line 2: the image id"):
        parse_annotations("a,x\n,y\n", "gt.csv")
    with pytest.raises(EvaluationError, match="no images"):
        parse_annotations("\n\n", "gt.csv")


def test_unknown_tags_are_named_with_a_line():
    a = parse_annotations("i1,cat,dgo\ni2,cat\ni3,brid,dgo\n", "gt.csv")
    with pytest.raises(EvaluationError) as e:
        label_matrix(a, ["cat", "dog", "bird"])
    msg = str(e.value)
    assert "2 tag(s)" in msg and "'brid' (line 3)" in msg and "'dgo' (line 1)" in msg
    check_known_tags(a, ["cat", "dgo", "brid"], "x")  # no error


def test_label_matrix():
    a = parse_annotations("i1,cat,dog\ni2\ni3,dog\n")
    m = label_matrix(a, ["dog", "cat"])
    assert m.tolist() == [[True, True], [False, False], [True, False]]
    assert label_matrix(a, ["dog", "cat"], rows=[2]).tolist() == [[True, False]]


def test_shipped_tag_lists_and_their_duplicates(tmp_path):
    lists = builtin_taglists()
    assert {"openimages_common_214", "openimages_rare_200", "hico_600", "imagenet_multi_1000"} <= set(lists)
    assert len(read_taglist("openimages_common_214").names) == 214
    assert len(read_taglist("openimages_rare_200").names) == 200
    assert len(read_taglist("hico_600").names) == 600
    imagenet = read_taglist("imagenet_multi_1000")
    assert sum(imagenet.line_counts) == 1000 and len(imagenet.names) == 998
    assert imagenet.duplicates == {"missile": 2, "sunglasses": 2}
    p = tmp_path / "t.txt"
    p.write_text("a\n\nb\na\n")
    assert read_taglist(str(p)).names == ("a", "b")
    with pytest.raises(EvaluationError, match="not found"):
        read_taglist(str(tmp_path / "nope.txt"))
    with pytest.raises(EvaluationError, match="not found"):
        read_annotations(str(tmp_path / "nope.csv"))


def test_image_keys():
    assert image_key("s3://bucket/imgs/0a1b.jpg") == "0a1b"
    assert image_key("0a1b") == "0a1b"
    assert image_key("imgs/0a1b.JPG") == "0a1b"
    assert image_key(".hidden") == ".hidden"
    assert image_key("file:///data/x/a.b.png", "name") == "a.b.png"
    assert image_key("file:///data/x/a.b.png") == "a.b"
    assert image_key("file:///data/x/./a.png", "path") == "data/x/a.png"


def test_matching_modes_and_ambiguity():
    uris = ["s3://b/2024/a.jpg", "s3://b/2025/a.jpg", "s3://b/2025/b.png", "s3://b/2025/c.jpg"]
    m = match_images(["b", "c.jpg", "zzz", "a"], uris, "stem")
    assert m.rows == {0: 2, 1: 3}
    assert m.unmatched == [2]
    assert m.ambiguous == {3: [0, 1]}
    m = match_images(["2024/a.jpg", "2025/a.jpg", "b/2025/c.jpg", "a.jpg"], uris, "path")
    assert m.rows == {0: 0, 1: 1, 2: 3}
    assert m.ambiguous == {3: [0, 1]}  # "a.jpg" ends two URIs
    m = match_images(["b.png", "b"], uris, "name")
    assert m.rows == {0: 2} and m.unmatched == [1]
    with pytest.raises(EvaluationError, match="key mode"):
        image_key("x", "basename")
