"""Attention flow (Abnar & Zuidema 2020): equal to networkx's max-flow over the explicitly built
layered graph, a case computed by hand, signed patterns refused or reduced to their positive part,
the analysis end to end on a zoo ViT (captioners refused before any weights load), and the
attribution method."""

from __future__ import annotations

from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import torch

import probe.analyses.attention_flow as af
from probe import registry
from probe.analyses.explain import METHODS, Target
from probe.analyses.rollout import rollout
from probe.cli import main
from probe.data import ImageSet
from probe.registry import load_model
from probe.runs.store import RunStore


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _networkx_flow(caps: np.ndarray, e: int, source: int) -> np.ndarray:
    """The paper's method: the full layered graph ((L + 1) * n nodes, edge (l, i) -> (l - 1, j) of
    capacity Â_l[i, j]) and one networkx max-flow per (source, input token) pair."""
    m, _, n, _ = caps.shape
    g = nx.DiGraph()
    g.add_nodes_from((layer, i) for layer in range(m + 1) for i in range(n))
    for layer in range(1, m + 1):
        for i in range(n):
            for j in range(n):
                if caps[layer - 1, e, i, j] > 0:
                    g.add_edge((layer, i), (layer - 1, j), capacity=float(caps[layer - 1, e, i, j]))
    return np.array([nx.maximum_flow_value(g, (m, source), (0, j)) for j in range(n)])


def _patterns(kind: str, b: int, heads: int, n: int, layers: int, g: torch.Generator) -> list[torch.Tensor]:
    out = []
    for _ in range(layers):
        scores = torch.randn(b, heads, n, n, generator=g, dtype=torch.float64)
        if kind == "peaky":
            scores = scores * 4
        if kind == "banded":  # local attention: zero capacities, tokens the source cannot reach
            far = (torch.arange(n)[:, None] - torch.arange(n)[None]).abs() > 1
            scores = (scores * 2).masked_fill(far, -torch.inf)
        out.append(scores.softmax(-1))
    return out


# ------------------------------------------------------------------------------ the method
@pytest.mark.parametrize("kind", ["dense", "peaky", "banded"])
@pytest.mark.parametrize("n,layers,heads,fusion", [(3, 1, 2, "mean"), (5, 2, 3, "mean"), (6, 3, 2, "min"),
                                                   (8, 4, 3, "max")])
def test_equals_networkx_max_flow_on_the_layered_graph(kind, n, layers, heads, fusion):
    g = torch.Generator().manual_seed(n * 10 + layers)
    patterns = _patterns(kind, 2, heads, n, layers, g)
    sources = [0, n // 2, n - 1]
    caps = af.flow_capacities(patterns, fusion=fusion).numpy()
    got = af.attention_flow_values(patterns, source=sources, fusion=fusion)
    norm = af.attention_flow(patterns, source=sources, fusion=fusion)
    assert got.values.shape == norm.shape == (2, 3, n)
    for e in range(2):
        for k, s in enumerate(sources):
            want = _networkx_flow(caps, e, s)
            np.testing.assert_allclose(got.values[e, k].numpy(), want, atol=1e-6, rtol=0)
            # the certified bound holds: values - exact lies in [0, error]
            assert bool((got.values[e, k].numpy() - want <= got.error[e, k].numpy() + 1e-12).all())
            np.testing.assert_allclose(norm[e, k].numpy(), want / want.sum(), atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert float(got.error.max()) < 1e-6


def test_hand_computed_two_layers_two_tokens():
    # layer 1: heads [[.6,.4],[.4,.6]] and [[1,0],[.4,.6]], mean [[.8,.2],[.4,.6]], Â1 = [[.9,.1],[.2,.8]]
    # layer 2: [[0,1],[1,0]], Â2 = [[.5,.5],[.5,.5]]
    # flow from (2, 0) to (0, 0): via (1, 0) min(.5, .9) = .5, via (1, 1) min(.5, .2) = .2: 0.7
    #                  to (0, 1): via (1, 0) min(.5, .1) = .1, via (1, 1) min(.5, .8) = .5: 0.6
    # both below the trivial cuts (source out 1; sink in 1.1 and 0.9), rows normalised: [7/13, 6/13].
    # Rollout's row 0 is .5 [.9,.1] + .5 [.2,.8] = [.55, .45]: flow is not rollout.
    layer1 = torch.stack([_t([[0.6, 0.4], [0.4, 0.6]]), _t([[1.0, 0.0], [0.4, 0.6]])])[None]
    layer2 = torch.stack([_t([[0, 1], [1, 0]])] * 2)[None]
    values = af.attention_flow_values([layer1, layer2], source=[0, 1])
    # exact to float64, not only to the solver's 2**-30 integer grid
    torch.testing.assert_close(values.values[0], _t([[0.7, 0.6], [0.7, 0.6]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(af.attention_flow([layer1, layer2])[0, 0], _t([7 / 13, 6 / 13]), atol=1e-12, rtol=0)
    torch.testing.assert_close(rollout([layer1, layer2])[0, 0].double(), _t([0.55, 0.45]), atol=1e-6, rtol=0)
    # start_layer=1: the graph is the top layer alone, flow = Â2's row
    torch.testing.assert_close(af.attention_flow([layer1, layer2], start_layer=1)[0, 0], _t([0.5, 0.5]))


def test_signed_patterns_refused_or_reduced_to_their_positive_part():
    signed = _t([[[[0.8, -0.4, 0.6], [0.2, 0.2, 0.6], [-0.1, 0.5, 0.6]]]])
    other = torch.full((1, 1, 3, 3), 1 / 3, dtype=torch.float64)
    with pytest.raises(af.SignedPatternError) as e:
        af.attention_flow([other, signed])  # the default refuses
    msg = str(e.value)
    assert "\n" not in msg and "layer 1" in msg and "use signed='positive' (--signed positive)" in msg
    positive = af.attention_flow([other, signed], signed="positive")
    clamped = _t([[[[4 / 7, 0, 3 / 7], [0.2, 0.2, 0.6], [0, 5 / 11, 6 / 11]]]])
    torch.testing.assert_close(positive, af.attention_flow([other, clamped]))
    assert float(af.flow_capacities([other, signed], signed="positive").min()) >= 0
    # on softmax rows the positive part changes nothing
    g = torch.Generator().manual_seed(3)
    soft = _patterns("dense", 1, 2, 5, 2, g)
    torch.testing.assert_close(af.attention_flow(soft, signed="positive"), af.attention_flow(soft))


def test_bad_inputs_are_refused():
    p = [torch.full((1, 1, 4, 4), 0.25)]
    with pytest.raises(ValueError, match="source token 4: use 0 to 3"):
        af.attention_flow(p * 2, source=4)
    with pytest.raises(ValueError, match="start layer 2"):
        af.attention_flow(p * 2, start_layer=2)
    with pytest.raises(ValueError, match="NaN or inf"):
        af.attention_flow([torch.full((1, 1, 4, 4), float("nan"))])
    with pytest.raises(ValueError, match="sum to at most 1"):
        af.max_flow_values(torch.full((2, 1, 4, 4), 0.5))


# ------------------------------------------------------------------------------ the analysis
@pytest.fixture(scope="module")
def shapes2() -> ImageSet:
    return ImageSet.shapes(2)


def test_analysis_on_a_zoo_vit_and_its_attribution_method(shapes2):
    adapter = load_model("vit-standard", weights="demo")
    res = af.AttentionFlow()(adapter, shapes2)
    n = adapter.n_image_tokens
    flow, raw = res.arrays["flow"], res.arrays["flow.raw"]
    assert flow.shape == raw.shape == res.arrays["flow.rollout"].shape == (2, 1, n)
    assert res.source == 0 and res.source_span == "cls" and res.layers == [0, 1, 2, 3]
    torch.testing.assert_close(flow.sum(-1), torch.ones(2, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(flow, raw / raw.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.arrays["flow.rollout"].sum(-1), torch.ones(2, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.arrays["flow.map"], flow[:, 0, 1:].reshape(2, *adapter.grid))
    assert 0 <= res.max_error < 1e-6 and float(raw.max()) <= 1 + 1e-9
    assert "attention_flow" in af.AttentionFlow().render(res)
    lines = af.AttentionFlow().summary_lines(res)
    assert "max-flow from the last layer's CLS" in lines[0] and "rank correlation with rollout" in lines[1]
    # the attribution method: the same CLS row over the patches, (b, 1, patches)
    method = METHODS["flow"]
    assert method.refusal(adapter) is None and not method.gradients
    pixels = adapter.preprocess(shapes2.images)["pixel_values"]
    maps = method.fn(adapter, Target(pixel_values=pixels, labels=torch.zeros(2, dtype=torch.long)))
    assert maps.shape == (2, 1, n - 1)
    torch.testing.assert_close(maps, flow[:, :, 1:], atol=1e-6, rtol=0)


def test_signed_zoo_kind_refused_by_default_and_run_with_positive(shapes2):
    adapter = load_model("vit-linformer", weights="demo")
    with pytest.raises(af.SignedPatternError) as e:
        af.AttentionFlow()(adapter, shapes2)
    assert "\n" not in str(e.value) and "--signed positive" in str(e.value)
    res = af.AttentionFlow()(adapter, shapes2, signed="positive", start_layer=2)
    assert res.layers == [2, 3] and res.approximate
    torch.testing.assert_close(res.arrays["flow"].sum(-1), torch.ones(2, 1), atol=1e-6, rtol=0)
    assert any("positive part" in line for line in af.AttentionFlow().summary_lines(res))


def test_captioners_are_refused_in_one_line_before_weights_load(store_root, capsys, monkeypatch):
    captioner = SimpleNamespace(name="blip", capabilities=registry.model_entry("blip").capabilities)
    why = METHODS["flow"].refusal(captioner)
    assert why is not None and "vision encoders only" in why and "\n" not in why
    with pytest.raises(af.ProbeError, match="use rollout or relevancy for captioners"):
        af.AttentionFlow().resolve(captioner, af.AttentionFlow.Params())

    def no_loading(*args, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(registry, "load_model", no_loading)
    assert main(["run", "attention-flow", "--model", "blip", "--shapes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "attention flow is defined over one self-attention stack; use rollout or relevancy" in err
    assert not store_root.exists() or not RunStore(store_root).list()


def test_cli_end_to_end(store_root, capsys):
    assert main(["run", "attention-flow", "--model", "vit-standard", "--shapes", "2", "--fusion", "max"]) == 0
    out = capsys.readouterr().out
    assert "saved run" in out and "heads fused by max" in out
    (info,) = RunStore(store_root).list()
    run = RunStore(store_root).load(info.id)
    assert run.result.kind == "attention-flow" and run.result.arrays["flow"].shape == (2, 1, 65)
    assert run.manifest["parameters"]["source"] == 0 and run.manifest["parameters"]["signed"] == "refuse"
    assert {f.name for f in run.figures} == {"attention_flow.png"}
    for argv, needle in [(["--start-layer", "4"], "--start-layer 4: vit-standard has 4 vision layers"),
                         (["--source", "65"], "--source 65: vit-standard has 65 tokens")]:
        assert main(["run", "attention-flow", "--model", "vit-standard", "--shapes", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
