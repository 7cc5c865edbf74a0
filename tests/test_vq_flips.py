"""Flip-aware parity of VQ outputs (tadsr.parity.vq through tadsr.parity.hops.compare), on the tiny preset.

A codebook is edited so that, at six positions of a latent, a second code is exactly as far from the latent as
the first (the first reflected through the latent): a forced near-tie that rounding decides. A tested side that
picks the other code there differs from the reference by tens of dB in the image, yet is correct; a flip to a
code that is not a near-tie, a perturbed codebook entry, a latent beyond its floor or flips beyond the budget
still fail. Everything runs on one 64 px decoder case (a second or two).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from tadsr.errors import ParityError
from tadsr.formats.graphs import make_graph
from tadsr.parity.hops import (
    ParityCase,
    ParityReport,
    VQCompare,
    VQView,
    compare,
    load_floors,
    reference_view,
    run_cases_vq,
    vq_judge,
)
from tadsr.parity.vq import FlipBudget, code_gaps
from tadsr.formats.torch_ref import TorchRunner

TIED = [(5, 7), (11, 40), (20, 20), (33, 3), (47, 58), (60, 30)]  # latent positions (row, col) with a forced tie


@pytest.fixture(scope="module")
def tied(tiny_models):
    """(models with the edited codebook, decoder case, reference codes, the other code of each tie, positions)."""
    models = copy.deepcopy(tiny_models)
    g = torch.Generator().manual_seed(3)
    book = models.autoencoder.quantize.embedding.weight
    z = (torch.randn(1, 3, 64, 64, generator=g) * book.detach().std(0).view(1, 3, 1, 1)).float()
    with torch.no_grad():
        a = models.autoencoder.quantize.indices(z).reshape(-1)
        flat = [r * 64 + c for r, c in TIED]
        rare = [int(k) for k in np.argsort(np.bincount(a.numpy(), minlength=book.shape[0]), kind="stable")
                if int(k) not in {int(a[p]) for p in flat}][: len(flat)]  # fmt: skip
        for p, k in zip(flat, rare, strict=True):  # reflect the chosen code through the latent: an exact tie
            book[k] = 2 * z[0, :, p // 64, p % 64] - book[a[p]]
    module, spec = make_graph(models, "decoder", 64)
    runner = TorchRunner.from_graph(module, spec)
    zn = z.numpy()
    case = ParityCase("seeded-0", "seeded", {"x0": zn}, runner.run({"x0": zn}), zn)
    ref_codes = reference_view(models, [case]).codes[0].reshape(-1)
    pair = {p: {int(a[p]), k} for p, k in zip(flat, rare, strict=True)}
    flat = [p for p in flat if int(ref_codes[p]) in pair[p]]  # the tie decides between the two codes
    assert len(flat) >= 4
    other = {p: next(iter(pair[p] - {int(ref_codes[p])})) for p in flat}
    return models, case, ref_codes, other, flat


def _judge(models, case, out, codes, latents=None, *, graph="decoder", precision="fp32", floors=None):
    judge = vq_judge(models, graph, precision)
    tested = VQView([latents if latents is not None else case.latent], [codes], "test side")
    vq = VQCompare(judge, tested, reference_view(models, [case]))
    floors = floors or load_floors(precision, graph, models.preset.name)
    return compare("reference torch -> test", [out], [case.reference], [case], floors, {"sr": (-1.0, 1.0)}, vq)


def _flipped(ref_codes: np.ndarray, other: dict[int, int], flat: list[int]) -> np.ndarray:
    """The reference code map with every tied position moved to its partner code, as (1, 64, 64)."""
    codes = ref_codes.copy()
    for p in flat:
        codes[p] = other[p]
    return codes.reshape(1, 64, 64)


def test_forced_near_tie_passes_with_flips_reported(tied) -> None:
    models, case, ref_codes, other, flat = tied
    judge = vq_judge(models, "decoder", "fp32")
    codes = _flipped(ref_codes, other, flat)
    out = {"sr": judge.decode(codes)}
    floors = load_floors("fp32", "decoder", models.preset.name)
    (plain,) = compare("reference torch -> test", [out], [case.reference], [case], floors, {"sr": (-1.0, 1.0)})
    assert not plain.passed and plain.psnr < 80  # without the flip analysis the correct output is refused
    for c in (codes, None):  # codes exposed, and recovered from the image (ExecuTorch / Core ML programs)
        (h,) = _judge(models, case, out, c)
        assert h.passed, h.describe()
        (f,) = h.flips
        assert (f.flipped, f.near_tie, f.positions) == (len(flat), len(flat), 4096)
        assert f.same_codes_psnr is not None and f.same_codes_psnr >= 80
        assert f"{len(flat)} near-tie flips of 4096 positions, max gap" in h.describe()
        assert h.to_dict()["flips"]["cases"][0]["near_tie"] == len(flat)
    gaps = code_gaps(judge.codebook, case.latent, ref_codes, codes)
    assert np.abs(gaps).max() < 1e-5  # the ties are ties


def test_flip_that_is_not_a_near_tie_fails(tied) -> None:
    models, case, ref_codes, other, flat = tied
    judge = vq_judge(models, "decoder", "fp32")
    codes = ref_codes.copy()
    q = 64 * 30 + 10  # no tie here: move it to the partner code of a tie (far from this latent)
    codes[q] = other[flat[0]]
    codes = codes.reshape(1, 64, 64)
    out = {"sr": judge.decode(codes)}
    (h,) = _judge(models, case, out, codes)
    assert not h.passed
    assert h.flips[0].not_near_tie == 1 and "NOT near-ties" in h.describe()
    (h,) = _judge(models, case, out, None)  # unexposed codes: no near-tie reproduces the image
    assert not h.passed
    report = ParityReport("decoder", [h])
    with pytest.raises(ParityError, match="near-tie flips of 4096 positions"):
        report.raise_if_failed("decoder-test")


def test_perturbed_codebook_entry_in_the_artifact_fails(tied) -> None:
    models, case, ref_codes, _, _ = tied
    bad = copy.deepcopy(models)
    used = np.bincount(ref_codes, minlength=bad.preset.vq.n_embed).argmax()
    with torch.no_grad():
        bad.autoencoder.quantize.embedding.weight[used] += 0.3
    module, spec = make_graph(bad, "decoder", 64)
    outs, view = run_cases_vq(TorchRunner.from_graph(module, spec).run, [case], module, bad)
    judge = vq_judge(models, "decoder", "fp32")
    floors = load_floors("fp32", "decoder", models.preset.name)
    ranges = {"sr": (-1.0, 1.0)}
    for tested in (view, VQView(view.latents, [None], "unexposed")):
        (h,) = compare("t", outs, [case.reference], [case], floors, ranges,
                       VQCompare(judge, tested, reference_view(models, [case])))  # fmt: skip
        assert not h.passed, h.describe()


def test_latent_beyond_its_floor_fails_even_with_the_same_codes(tied) -> None:
    models, case, ref_codes, _, _ = tied
    judge = vq_judge(models, "pipeline", "fp32")
    codes = ref_codes.reshape(1, 64, 64)
    out = {"sr": judge.decode(codes)}
    ok = _judge(models, case, out, codes, case.latent + 1e-6, graph="pipeline")[0]
    assert ok.passed, ok.describe()
    (h,) = _judge(models, case, out, codes, case.latent + 0.05, graph="pipeline")  # e.g. a wrong noise scale
    assert not h.passed and "latents disagree" in h.flips[0].note


def test_flips_beyond_the_budget_fail(tied) -> None:
    models, case, ref_codes, other, flat = tied
    judge = vq_judge(models, "decoder", "fp16")
    codes = _flipped(ref_codes, other, flat)
    out = {"sr": judge.decode(codes)}
    floors = load_floors("fp16", "decoder", models.preset.name)
    assert floors["sr"].flips is not None and floors["sr"].flips.why  # budgeted explicitly, with a why
    (h,) = _judge(models, case, out, codes, precision="fp16", floors=floors)
    assert h.passed, h.describe()
    tight = {"sr": replace(floors["sr"], flips=FlipBudget(2 / 4096, floors["sr"].flips.rounding_rel, "test"))}
    (h,) = _judge(models, case, out, codes, precision="fp16", floors=tight)
    assert not h.passed and "exceed the budget" in h.flips[0].note


@pytest.mark.parametrize("graph", ["decoder", "pipeline"])
def test_onnx_artifact_exposes_its_latent_and_codes(tiny_models, tiny_onnx_artifacts, graph: str) -> None:
    from tadsr.parity.hops import make_cases, run_cases
    from tadsr.parity.taps import artifact_view
    from tadsr.runtime.runner import load_runner

    path = tiny_onnx_artifacts / f"{graph}-onnx-fp32-t64"
    runner = load_runner(path)
    module, spec = make_graph(tiny_models, graph, 64)
    cases, _ = make_cases(tiny_models, spec, n_real=0)
    outs = run_cases(runner.run, cases)
    view = artifact_view(path, runner.manifest, cases, outs)
    _, eager = run_cases_vq(TorchRunner.from_graph(module, spec).run, cases, module, tiny_models)
    assert view is not None and "tapped" in view.source and view.codes[0] is not None
    assert view.codes[0].shape == (1, 64, 64)
    assert (view.codes[0] == eager.codes[0]).mean() > 0.99  # the file's own lookup, not a recomputation
    if graph == "pipeline":
        assert view.latents[0] is not None and np.abs(view.latents[0] - eager.latents[0]).max() < 1e-3
    enc = runner.manifest | {"graph": {"name": "encoder"}}
    assert artifact_view(tiny_onnx_artifacts / "encoder-onnx-fp32-t64", enc, cases, outs) is None




def test_outputs_and_view_in_one_tapped_run_per_case(tiny_models, tiny_onnx_artifacts) -> None:
    """``run_cases_viewed``: the plain file runs on the first case only when its tapped run reproduces it; the
    outputs and the view are then what ``run_cases`` and ``artifact_view`` give. A run the tapped one does not
    reproduce (here: offset outputs) runs every case plain, and no codes are taken from the tapped run."""
    from tadsr.parity.hops import make_cases, run_cases
    from tadsr.parity.taps import artifact_view, run_cases_viewed
    from tadsr.runtime.runner import load_runner

    path = tiny_onnx_artifacts / "pipeline-onnx-fp32-t64"
    runner = load_runner(path)
    _, spec = make_graph(tiny_models, "pipeline", 64)
    cases, _ = make_cases(tiny_models, spec, n_real=2)
    calls = []

    def counted(feeds):
        calls.append(1)
        return runner.run(feeds)

    outs, view = run_cases_viewed(counted, path, runner.manifest, cases)
    plain = run_cases(runner.run, cases)
    assert len(calls) == 1 and len(outs) == len(cases) == 3
    for o, p in zip(outs, plain, strict=True):
        assert o.keys() == p.keys() and all(np.array_equal(o[k], p[k]) and o[k].dtype == p[k].dtype for k in o)
    ref = artifact_view(path, runner.manifest, cases, plain)
    assert view.source == ref.source and all(np.array_equal(a, b) for a, b in zip(view.codes, ref.codes, strict=True))
    calls.clear()

    def offset(feeds):
        calls.append(1)
        return {k: v + 1e-3 for k, v in runner.run(feeds).items()}

    outs, view = run_cases_viewed(offset, path, runner.manifest, cases)
    assert len(calls) == 3 and all(c is None for c in view.codes) and "did not reproduce" in view.source
    assert all(np.array_equal(o["sr"], p["sr"] + 1e-3) for o, p in zip(outs, plain, strict=True))
def test_one_flip_among_many_candidates_is_recovered_one_by_one(tied) -> None:
    """An unexposed fused program (ExecuTorch, Core ML) with one true near-tie flip among thousands of candidate
    positions (the latent floor's reach): trying every candidate at once does not find it (each flip's change
    spreads into its neighbours' blocks); one by one, at the centre of the error blob, it is found. A flip at the
    same place to the code farthest from the latent still fails."""
    models, case, ref_codes, other, flat = tied
    judge = replace(vq_judge(models, "pipeline", "fp32"), latent_budget=0.05)
    floors = load_floors("fp32", "pipeline", models.preset.name)
    p = flat[0]

    def judged(code: int):  # noqa: ANN202
        codes = ref_codes.copy()
        codes[p] = code
        out = {"sr": judge.decode(codes.reshape(1, 64, 64))}
        vq = VQCompare(judge, VQView([None], [None], "unexposed"), reference_view(models, [case]))
        (h,) = compare("t", [out], [case.reference], [case], floors, {"sr": (-1.0, 1.0)}, vq)
        return h

    h = judged(other[p])
    assert h.passed, h.describe()
    assert h.flips[0].flipped == h.flips[0].near_tie == 1 and "tried one by one" in h.flips[0].note
    assert "candidate position" in h.flips[0].note and int(h.flips[0].note.split()[0]) > 1000
    z = case.latent[0, :, p // 64, p % 64].astype(np.float64)
    far = int(((judge.codebook.astype(np.float64) - z) ** 2).sum(1).argmax())
    h = judged(far)
    assert not h.passed, h.describe()  # no near-tie code map reproduces it


def test_torch_decoder_keeps_the_last_code_maps_decoded():
    """The judge's decoder answers a code map it decoded recently from memory (read-only, the same image), decodes
    a new one, and forgets the oldest beyond its memo size."""
    from types import SimpleNamespace

    import torch

    from tadsr.parity.vq import torch_decoder

    calls = []

    class Decoder(torch.nn.Module):
        def forward(self, z):
            calls.append(1)
            return z[:, :1].repeat_interleave(4, -1).repeat_interleave(4, -2)

    torch.manual_seed(0)
    ae = SimpleNamespace(quantize=SimpleNamespace(embedding=torch.nn.Embedding(16, 3)), decoder=Decoder())
    decode = torch_decoder(ae, memo=2)
    a, b, c = (np.full((1, 2, 2), k, np.int64) for k in (1, 2, 3))
    first = decode(a)
    again = decode(a.copy())
    assert len(calls) == 1 and again is first and not first.flags.writeable
    decode(b)
    decode(a)  # still kept (most recent of 2)
    assert len(calls) == 2
    decode(c)  # forgets b, the least recently used
    decode(b)
    assert len(calls) == 4
    np.testing.assert_array_equal(decode(a), first)


@pytest.mark.parametrize("graph", ["decoder", "pipeline"])
def test_light_graphs_expose_their_latent_and_codes(graph: str) -> None:
    """The light decoder's lookup is seen too (session 30: it was not, so a light pipeline's near-tie flips were held
    to the plain image floor and failed the export gate at official size)."""
    from tadsr.parity.hops import make_cases
    from tadsr.pipeline import load_models

    models = load_models(preset="tiny", init="random", light_autoencoder=True)
    module, spec = make_graph(models, graph, 64)
    cases, _ = make_cases(models, spec, n_real=0)
    _, view = run_cases_vq(TorchRunner.from_graph(module, spec).run, cases, module, models)
    assert view is not None and view.codes[0] is not None and view.codes[0].shape == (1, 64, 64)
    with torch.no_grad():
        expect = models.light_autoencoder.quantize.indices(torch.from_numpy(view.latents[0])).numpy()
    assert (view.codes[0] == expect).all()


def test_a_judge_decodes_each_held_out_code_map_once_across_two_hops(tiny_models) -> None:
    """An INT8 write judges its held-out cases in two hops (against the fp32 artifact, then the reference) with the
    same tested codes: the judge's decoder keeps them all, so each map is decoded once (session 31: with 8 kept,
    the second hop decoded all 16 again, 4.7 s of the quick path's fused INT8 stage)."""
    from tadsr.quantize.calibration import DEFAULT_HOLDOUT_PATCHES

    judge = vq_judge(tiny_models, "pipeline", "int8")
    calls: list[int] = []
    handle = tiny_models.autoencoder.decoder.register_forward_hook(lambda *_: calls.append(1))
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, judge.codebook.shape[0], (1, 16, 16)) for _ in range(DEFAULT_HOLDOUT_PATCHES)]
    try:
        for _hop in range(2):
            for m in maps:
                judge.decode(m)
    finally:
        handle.remove()
    assert len(calls) == len(maps)
