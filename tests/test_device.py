"""Device placement without a GPU: every stage's code runs on a model "on CUDA" (tests/device_emulator.py).

The emulator keeps every number on the CPU but tracks which tensors are on the device and raises, as CUDA
would, when a CPU tensor of one or more dimensions meets a device tensor (a ``torch.zeros(d)`` added to an
activation, CPU ``input_ids`` fed to the model, a CPU generator drawing for device tensors) or a device tensor
is converted to numpy; in ``helpers`` it also refuses CPU index tensors for device tensors (legal in PyTorch,
but a host-to-device copy on every call: ``helpers`` makes its index tensors on the device).

On tiny random GPT-2, Llama and Gemma 3 models it runs what the pipeline stages run: the correctness filter,
second moments (computed, cached, read back), context templates, the task construction of every problem,
ROME/MEMIT/FT-1 edits (batched: exact, fast with suffix-only passes, with Fact Forcing noise at subject and
code positions; the one-fact path; logits at every position), edits applied to the weights and per example
(also edits kept on the CPU), evaluation, causal tracing (fast and reference paths, representation zeroing),
the world report's probes and the statistics' stability check. It checks that edits stay on the device, that
results for tables come back to the CPU, and that the numbers equal the plain CPU run: exactly where no
optimiser is involved (the random draws are made on the CPU and moved, so a device run sees the same noise),
to float rounding for edits (Adam takes its multi-tensor path for device tensors).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SAMPLE_COUNTERFACT, tiny_model, tiny_tokenizer  # noqa: E402
from device_emulator import DeviceError, FakeCuda  # noqa: E402

from helpers import editing as E  # noqa: E402
from helpers import corpus, data, evaluation, models, problems, scoring, tracing  # noqa: E402
from helpers.editing import batched as BT  # noqa: E402
from helpers.editing.templates import sample_context_templates  # noqa: E402
from helpers.world import report  # noqa: E402

torch.set_num_threads(1)

HP = {"rome": {"v_num_grad_steps": 3}, "memit": {"v_num_grad_steps": 3, "mom2_update_weight": 5, "window": 3},
      "ft1": {"num_steps": 3, "norm_constraint": 1e-2}}
HELPERS = Path(models.__file__).parent  # CPU index tensors for device tensors are refused in this package


# ------------------------------------------------------------------------------------------ the emulator


def test_emulator_refuses_what_cuda_refuses():
    dev = FakeCuda()
    with dev:
        w = torch.ones(3, 4, device="cuda")
        assert w.device == torch.device("cuda", 0) and w.is_cuda
        y = w * 2
        assert y.device.type == "cuda" and dev.on_device(y)
        assert dev.on_device(torch.zeros(3, device=y.device))
        with pytest.raises(DeviceError):
            y + torch.zeros(3, 4)  # an implicit CPU tensor
        with pytest.raises(DeviceError):
            torch.zeros(4) @ w.T
        with pytest.raises(DeviceError):
            torch.nn.functional.embedding(torch.tensor([[0, 1]]), w)  # CPU ids, device weights
        with pytest.raises(DeviceError):
            y.numpy()
        with pytest.raises(DeviceError):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device="cuda")
        with pytest.raises(DeviceError):
            torch.zeros(5)[torch.tensor([1, 2], device="cuda")]
        assert float((y + torch.tensor(1.0)).sum()) == 36.0  # a CPU scalar is allowed
        assert dev.on_device(y[torch.tensor([0, 2])])  # CPU indices are allowed
        moved = torch.arange(3).to(y.device)
        assert dev.on_device(moved) and not dev.on_device(moved.cpu())
        assert y.cpu().numpy().shape == (3, 4)
        d = torch.zeros(4, device=w.device, requires_grad=True)
        opt = torch.optim.Adam([d], lr=0.1)
        (w @ d + 1).square().sum().backward()
        opt.step()
        assert dev.on_device(d.grad) and float(d.detach().abs().sum()) > 0
        with pytest.raises(DeviceError):
            torch.multinomial(torch.softmax(y[0], -1), 1, generator=torch.Generator().manual_seed(0))


def test_strict_mode_refuses_cpu_index_tensors_in_the_code_under_test():
    dev = FakeCuda(strict_under=Path(__file__).parent)
    with dev:
        y = torch.ones(3, 4, device="cuda")
        with pytest.raises(DeviceError, match="CPU index tensor"):
            y[torch.tensor([0, 2])]
        with pytest.raises(DeviceError, match="CPU index tensor"):
            y[torch.tensor([0, 2]), torch.tensor([1, 1])] = 0.0
        assert dev.on_device(y[torch.tensor([0, 2], device=y.device)])
        assert dev.on_device(y[[0, 2]])  # a list: allowed (as in CUDA)


# ------------------------------------------------------------------------------------------ the workload


def _setup(arch: str):
    tok = tiny_tokenizer(bos=arch == "gemma3")
    model = tiny_model(arch, len(tok), n_layer=4).eval().requires_grad_(False)
    records = json.loads(SAMPLE_COUNTERFACT.read_text())
    docs = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) + " "
            + r["requested_rewrite"]["target_true"]["str"] + ". " + " ".join(r["paraphrase_prompts"])
            for r in records]
    return model, tok, records, docs


def _fact(rec: dict) -> dict:
    rw = rec["requested_rewrite"]
    return {"case_id": rec["case_id"], "prompt": rw["prompt"], "subject": rw["subject"],
            "target_true": rw["target_true"]["str"], "target_new": rw["target_new"]["str"],
            "paraphrase_prompts": rec["paraphrase_prompts"][:2],
            "neighborhood_prompts": rec["neighborhood_prompts"][:2]}


def _check_on_device(dev: FakeCuda | None, edits) -> None:
    """An edit's tensors stay on the device of the model that computed it."""
    for e in edits if dev is not None else ():
        for t in (*e.deltas.values(), *e.bias_deltas.values(), *(x for f in e.factors.values() for x in f)):
            assert dev.on_device(t), f"{e.method}: the edit left the device"


def _edits_as_lists(edits) -> list:
    return [{l: t.cpu().tolist() for l, t in {**e.deltas, **{-1 - l: b for l, b in e.bias_deltas.items()}}.items()}
            for e in edits]


def _editing(model, tok, records, docs, cache: Path, dev: FakeCuda | None) -> dict:
    """What ``03_editing`` runs (statistics, templates, tasks, batched and one-fact edits, evaluation)."""
    out: dict = {}
    stats = E.SecondMoments(model, tok, docs, n_tokens=300, cache_dir=cache, progress=False)
    stats.precompute([1, 2, 3])  # computed, written to the cache ...
    stats = E.SecondMoments(model, tok, docs, n_tokens=300, cache_dir=cache, progress=False)
    stats.precompute([1, 2, 3])  # ... and read back
    out["mom2"] = stats.moment(2).cpu().tolist()
    templates = sample_context_templates(model, tok, rome_length_params=((4, 2), (6, 2)), memit_length=5)
    out["templates"] = [templates.rome, templates.memit]
    facts = [_fact(r) for r in records[:3]]
    sigma = tracing.noise_sigma(model, tok, [f["subject"] for f in facts])
    tasks = [problems.make_task(model, tok, f, p, sigma) for f, p in zip(facts, ["ei", "tr", "ff"])]
    out["targets"] = [(t.target, t.baseline) for t in tasks]
    reqs = [t.request for t in tasks]
    reqs.append(E.EditRequest(facts[0]["prompt"], facts[0]["subject"], facts[0]["target_true"], direction="lower",
                              noise=E.NoiseSpec(0.3, n_samples=2, seed=4, positions="code"), case_id=9))
    essence = ["Danielle is a French actress."]
    # exact: one pass per length; fast: one padded pass, suffix-only passes for clean rows (reqs[:2]) and from the
    # subject on under subject noise (reqs[:3]); code-position noise (reqs[3]) keeps full passes
    runs = {"exact": (reqs, True), "fast_clean": (reqs[:2], False), "fast_subject_noise": (reqs[:3], False),
            "fast_all": (reqs, False)}
    for method in ("rome", "memit", "ft1"):
        for name, (rs, exact) in runs.items():
            if method == "ft1" and name.startswith("fast_") and name != "fast_all":
                continue  # FT has no suffix passes
            edits = BT.edit_many(model, tok, rs, method, 2, HP[method], stats=stats, templates=templates, exact=exact)
            _check_on_device(dev, edits)
            out[f"{method}_{name}"] = _edits_as_lists(edits)
        out[f"measure_many_{method}"] = BT.measure_many(model, tok, tasks, facts, edits[:3], [essence] * 3)
        one = E.edit(model, tok, reqs[2], method, 2, HP[method], stats=stats, templates=templates)
        _check_on_device(dev, [one])
        with E.applied(model, one):
            out[f"measure_{method}"] = evaluation.measure(model, tok, tasks[2], facts[2], essence)
            out[f"top_{method}"] = evaluation.top_predictions(model, tok, "The mother tongue of Danielle is")
        # an edit kept on the CPU (e.g. read from disk) applies to the model on the device too
        on_cpu = E.Edit(one.method, one.layers, {l: t.cpu() for l, t in one.deltas.items()},
                        {l: t.cpu() for l, t in one.bias_deltas.items()},
                        {l: (r.cpu(), a.cpu()) for l, (r, a) in one.factors.items()})
        with E.applied(model, on_cpu):
            out[f"top_cpu_edit_{method}"] = evaluation.top_predictions(model, tok, "The mother tongue of Danielle is")
        out[f"measure_many_cpu_edit_{method}"] = BT.measure_many(model, tok, tasks[2:], facts[2:], [on_cpu], [essence])
    out["templates_cached"] = E.context_templates(model, tok, cache_dir=cache).memit  # keyed by the fingerprint
    with pytest.MonkeyPatch.context() as mp:  # the benchmarks' switch: logits at every position
        mp.setattr(scoring, "SELECT_LOGITS", False)
        out["rome_all_logits"] = _edits_as_lists(BT.edit_many(model, tok, reqs[:2], "rome", 2, HP["rome"], stats=stats,
                                                              templates=templates))
        p = scoring.target_probs(model, tok, ["The mother tongue of Danielle is"], ["French"])
        assert dev is None or not dev.on_device(p), "target_probs returns its results on the CPU"
        out["p_all_logits"] = p.tolist()
    return out


def _tracing(model, tok, records, docs, dev: FakeCuda | None) -> dict:
    """What ``01_data`` and ``02_tracing`` run, and the world report's and corpus checks' probes: no optimiser
    in the loop, so the numbers (random draws included) must equal the CPU run's exactly."""
    facts = [_fact(r) for r in records[:3]]
    sigma = tracing.noise_sigma(model, tok, [f["subject"] for f in facts])
    out: dict = {"sigma": sigma}
    for method in ("fast", "reference"):
        t = tracing.trace_fact(model, tok, facts[0]["prompt"], facts[0]["subject"], facts[0]["target_true"],
                               kinds=("mlp", "attn", "zero"), windows=(1, 3), sigma=sigma, n_samples=3,
                               method=method)
        out[f"trace_{method}"] = t["p_restored"].tolist()
    frame = data.correctness(model, tok, pd.DataFrame(facts), max_new_tokens=4)
    out["correctness"] = frame[["continuation", "p_true"]].values.tolist()
    out["essence"] = evaluation.essence_texts(model, tok, facts[0]["subject"], n=2, max_out_len=12)
    out["world_scores"] = report.target_scores(model, tok, [f["prompt"].format(f["subject"]) for f in facts],
                                               [f["target_true"] for f in facts]).values.tolist()
    out["world_sites"] = report.where_subject_is_read(model, tok, records[:2], sigma, n_samples=2)["frac"].tolist()
    for prompts in (None, ["The mother tongue of Danielle is"]):
        st = corpus.stability(model, tok, docs, layer=1, n_tokens=200, n_probe=2, prompts=prompts)
        out[f"stability_{prompts is None}"] = [st.rel_frobenius, st.cosines]
    return out


def _assert_close(a, b, exact: bool, path: str = "", rel: float = 1e-5, abs_: float = 1e-7) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], exact, f"{path}.{k}", rel, abs_)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, exact, f"{path}[{i}]", rel, abs_)
    elif isinstance(a, float) and exact:
        assert a == b or (math.isnan(a) and math.isnan(b)), (path, a, b)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=abs_, nan_ok=True), path
    else:
        assert a == b, path


def _cpu_then_device(arch, tmp_path, monkeypatch, dev) -> tuple[dict, dict, dict, dict]:
    """The workload on the CPU, then with the model on ``dev`` (the emulator or a real GPU): (CPU edits, CPU traces,
    device edits, device traces)."""
    from helpers.editing import templates as T

    monkeypatch.setattr(T, "_MEMORY", {})
    monkeypatch.setattr(T, "sample_context_templates", lambda m, t, seed=0: sample_context_templates(
        m, t, seed=seed, rome_length_params=((4, 2),), memit_length=5))  # short samples: a fast test
    model, tok, records, docs = _setup(arch)
    ref_edit = _editing(model, tok, records, docs, tmp_path / "cpu", None)
    ref_trace = _tracing(model, tok, records, docs, None)
    T._MEMORY.clear()
    with dev:
        dev.put_model(model)
        assert models.device_of(model).type == "cuda"
        got_edit = _editing(model, tok, records, docs, tmp_path / "device", dev)
        got_trace = _tracing(model, tok, records, docs, dev)
    return ref_edit, ref_trace, got_edit, got_trace


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_every_stage_runs_on_the_device(arch, tmp_path, monkeypatch):
    ref_edit, ref_trace, got_edit, got_trace = _cpu_then_device(arch, tmp_path, monkeypatch,
                                                                FakeCuda(strict_under=HELPERS))
    _assert_close(got_trace, ref_trace, exact=True)
    # the optimisers take another code path for device tensors (foreach Adam): float rounding at most
    _assert_close(got_edit, ref_edit, exact=False)


class RealCuda:
    """The emulator's interface on a real GPU (``torch.cuda``): where one is lent, the same workload runs there."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()

    def put_model(self, model) -> None:
        model.to("cuda")

    @staticmethod
    def on_device(t: torch.Tensor) -> bool:
        return t.is_cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_every_stage_runs_on_a_real_gpu(arch, tmp_path, monkeypatch):
    """The emulator's workload on ``cuda``: the same numbers as the CPU run, to the rounding of the GPU's own
    float32 kernels (other reduction orders; the random draws are the CPU's, moved)."""
    ref_edit, ref_trace, got_edit, got_trace = _cpu_then_device(arch, tmp_path, monkeypatch, RealCuda())
    _assert_close(got_trace, ref_trace, exact=False, rel=1e-4, abs_=1e-6)
    _assert_close(got_edit, ref_edit, exact=False, rel=1e-3, abs_=1e-5)
