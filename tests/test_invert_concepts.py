"""ConceptSet builders, formula evaluation, io."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reprlens.invert import ConceptSet
from reprlens.invert.concepts import parse_formula


def test_label_matrix_conversions_and_errors():
    cs = ConceptSet(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.int64), names=["a", "b"])
    assert cs.labels.dtype == torch.bool and cs.num_samples == 3 and cs.num_concepts == 2
    assert cs.counts.tolist() == [2, 2]
    np.testing.assert_allclose(cs.fractions.numpy(), [2 / 3, 2 / 3])
    assert ConceptSet(torch.tensor([[0.0, 1.0]])).names == ["c0", "c1"]
    with pytest.raises(ValueError, match="binary"):
        ConceptSet(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="Invalid concept name"):
        ConceptSet(torch.ones(2, 1), names=["a b"])
    with pytest.raises(ValueError, match="Invalid concept name"):
        ConceptSet(torch.ones(2, 1), names=["a&b"])
    with pytest.raises(ValueError, match="unique"):
        ConceptSet(torch.ones(2, 2), names=["a", "a"])
    with pytest.raises(ValueError, match="2 concept names"):
        ConceptSet(torch.ones(2, 2), names=["a"])
    with pytest.warns(UserWarning, match="constant concepts.*duplicate"):
        ConceptSet(torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_formula_parser_and_evaluate():
    assert parse_formula("~a & (b | c)") == ("and", [("not", "a"), ("or", ["b", "c"])])
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    cs = ConceptSet(labels, names=["x", "y", "z"])
    a, b, c = labels.t()
    assert torch.equal(cs.evaluate("x & ~y | z"), (a & ~b) | c)
    assert torch.equal(cs.evaluate("~(x | y) & ~z"), ~(a | b) & ~c)
    assert torch.equal(cs.evaluate("c11 | (x & y)".replace("c11", "z")), c | (a & b))
    for bad in ("x &", "(x | y", "x y", ""):
        with pytest.raises(ValueError):
            cs.evaluate(bad)
    with pytest.raises(ValueError, match="Unknown concept"):
        cs.evaluate("w")
    assert cs.describe("x & ~y") == "x AND NOT y"


def test_class_labels_and_hierarchy():
    t = torch.tensor([0, 1, 2, 3, 0, 2])
    names = ["cat", "dog", "car", "bus"]
    cs = ConceptSet.from_hierarchy(
        t, names, {"animal": ["cat", "dog"], "pet": ["cat"], "thing": ["vehicle", "animal"], "vehicle": ["car", "bus"]}
    )
    # leaves first, then parents in mapping order; "pet" covers one leaf (dropped); "vehicle" resolved transitively
    assert cs.names == ["cat", "dog", "car", "bus", "animal", "thing", "vehicle"]
    assert cs.evaluate("animal").tolist() == [True, True, False, False, True, False]
    assert cs.evaluate("thing").all()
    assert torch.equal(cs.evaluate("vehicle"), cs.evaluate("car | bus"))
    with pytest.raises(ValueError, match="Cycle"):
        ConceptSet.from_hierarchy(t, names, {"a": ["b"], "b": ["a"]})
    with pytest.raises(ValueError, match="Unknown"):
        ConceptSet.from_hierarchy(t, names, {"a": ["horse"]})
    # identical parents dropped, min_count applied
    cs2 = ConceptSet.from_hierarchy(t, names, {"p1": ["cat", "dog"], "p2": ["dog", "cat"]}, min_count=2)
    assert cs2.names == ["cat", "car", "p1"]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ConceptSet.from_class_labels(torch.tensor([5]), names)


def test_from_factors_and_shapes():
    f = {
        "shape": torch.tensor([0, 1, 2, 1]),
        "big": torch.tensor([True, False, True, True]),
        "x": torch.tensor([0.1, 0.4, 0.6, 0.9]),
    }
    cs = ConceptSet.from_factors(f, value_names={"shape": ["circle", "square", "triangle"]}, bins={"x": 2})
    assert cs.names[:4] == ["shape=circle", "shape=square", "shape=triangle", "big"]
    assert cs.evaluate("shape=square").tolist() == [False, True, False, True]
    assert cs.labels[:, 4:].sum(1).tolist() == [1, 1, 1, 1]  # bins partition the samples
    with pytest.raises(ValueError, match="continuous"):
        ConceptSet.from_factors({"x": torch.rand(4)})

    class FakeShapes:
        concept_names = ["shape=circle", "color=red"]

        def concept_matrix(self):
            return torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool)

    cs3 = ConceptSet.from_shapes(FakeShapes())
    assert cs3.names == FakeShapes.concept_names and cs3.num_samples == 3
    with pytest.raises(TypeError):
        ConceptSet.from_shapes(object())


def test_shapes_dataset_if_available():
    data = pytest.importorskip("reprlens.data")
    if not hasattr(data, "ShapesDataset"):
        pytest.skip("reprlens.data.ShapesDataset not available yet")
    ds = data.ShapesDataset(20, image_size=16, seed=0)
    cs = ConceptSet.from_shapes(ds)
    assert cs.num_samples == 20 and cs.num_concepts == len(ds.concept_names)
    assert torch.equal(cs.labels, ds.concept_matrix())
    # factors with value names and quantile bins
    fac = ConceptSet.from_factors(ds.factors(), value_names=ds.factor_categories,
                                  bins={"scale": 2, "pos_x": 2, "pos_y": 2, "rotation": 2})
    assert torch.equal(fac.evaluate("shape=circle"), cs.evaluate("shape=circle"))


def test_csv_select_drop_subset_save_load(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,red,round,never\nb,0,true,0\na,1,1,0\nc,false,0,0\n")
    cs = ConceptSet.from_csv(p, id_column="id", ids=["a", "b", "c"])
    assert cs.names == ["red", "round", "never"]
    assert cs.labels.tolist() == [[True, True, False], [False, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="missing"):
        ConceptSet.from_csv(p, id_column="id", ids=["a", "z"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a\n2\n")
    with pytest.raises(ValueError, match="0/1/true/false"):
        ConceptSet.from_csv(bad)
    assert cs.drop_constant().names == ["red", "round"]
    assert cs.select(["round", "red"]).names == ["round", "red"]
    dup = ConceptSet(torch.tensor([[1, 1, 0], [0, 0, 1]]), names=["a", "b", "c"])
    assert dup.drop_duplicates().names == ["a", "c"]
    assert cs.subset_rows([2, 0]).labels.tolist() == [[False, False, False], [True, True, False]]
    big = ConceptSet(torch.rand(37, 5, generator=torch.Generator().manual_seed(0)) > 0.5, descriptions=list("abcde"))
    path = big.save(tmp_path / "cs.npz")
    back = ConceptSet.load(path)
    assert torch.equal(back.labels, big.labels) and back.names == big.names and back.descriptions == list("abcde")
