"""The memory planner: exact against built tensors and the optimizer's state, against autograd's
saved tensors for activations, against count_parameters for LLaMA-7B; fit(); the `qgl plan` command."""

import json

import pytest
import torch
from _tensors import peak_cpu_allocated

from qgl.callbacks.memory import PARTS, measure
from qgl.cli import main, parse_size
from qgl.config import load_recipe
from qgl.models.llama import LLAMA_CONFIGS, LlamaForCausalLM, causal_lm_loss, count_parameters
from qgl.nn import quantize_model
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.plan import CUDA_CONTEXT_BYTES, PlanError, PlanSettings, plan_memory, predicted_parts
from qgl.plan.activations import activation_bytes

TINY = LLAMA_CONFIGS["tiny"]
GIB = 2**30
EXACT = ("int8_weights", "params", "buffers", "optimizer_moments", "projections")

SETTINGS = [
    PlanSettings(precision="32-true", rank=16),
    # bf16 parameters, asymmetric INT8, float P (bf16), a group size that divides nothing, smaller 8-bit floor
    PlanSettings(precision="bf16-true", rank=16, symmetric=False, group_size=100, proj_quant=False,
                 min_8bit_size=1024),
    PlanSettings(precision="32-true", rank=8, optim_bits=32, proj_group_size=100, layerwise=False),
]


def _built(s: PlanSettings, offload=None, steps: int = 1):
    """The tiny model and its optimizer as a run builds them, after `steps` steps."""
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(TINY), s.target_modules, s.exclude, s.group_size, s.symmetric)
    if s.precision == "bf16-true":
        model = model.bfloat16()
    groups = make_param_groups(model, s.rank, s.target_modules, s.exclude, proj_quant=s.proj_quant,
                               proj_group_size=s.proj_group_size, update_proj_gap=2)
    opt = QGaLoreAdamW(groups, lr=1e-3, optim_bits=s.optim_bits, min_8bit_size=s.min_8bit_size,
                       layerwise=s.layerwise, offload=offload)
    for _ in range(steps):
        x = torch.randint(0, TINY.vocab_size, (2, 16))
        model(x, labels=x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("s", SETTINGS, ids=["fp32", "bf16-asym-fp32P", "32bit-moments"])
def test_weights_and_optimizer_state_are_exact(s, one_thread):
    model, opt = _built(s)
    measured = measure(model, [opt], peak=0)
    plan = plan_memory(TINY, s)
    assert {k: plan.parts[k] for k in EXACT} == {k: measured[k] for k in EXACT}
    assert opt.state_nbytes() == {"moments": plan.parts["optimizer_moments"],
                                  "projections": plan.parts["projections"]}
    monitor = plan.monitor_parts()
    assert set(monitor) == {"peak", *PARTS} and monitor["peak"] == plan.total
    assert sum(monitor[p] for p in PARTS) == plan.total


def test_offloaded_state_is_the_plans_host_part(one_thread):
    s = SETTINGS[0].replace(offload="cpu")
    _, opt = _built(s, offload="cpu", steps=2)
    plan = plan_memory(TINY, s)
    nbytes = opt.state_nbytes()
    assert nbytes["offloaded_moments"] == plan.host["optimizer_moments"]
    assert nbytes["offloaded_projections"] == plan.host["projections"]
    assert nbytes["moments"] == nbytes["projections"] == 0  # nothing stays on the device between updates
    full = plan_memory(TINY, s.replace(offload=None))
    assert plan.parts["optimizer_moments"] < full.parts["optimizer_moments"] and plan.total < full.total


def _saved_bytes(model, input_ids, labels, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        causal_lm_loss(model(input_ids), labels)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_activation_formula_is_what_autograd_saves(precision, one_thread):
    """The per-token block formula, the head and the saved log-probs (4 V of the loss's 12 V) equal the
    tensors autograd keeps (CPU flash attention saves what CUDA's does: q, k, v, out, lse)."""
    s = PlanSettings(precision=precision, batch_size=2, seq_len=64, rank=16)
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(TINY))
    if precision == "bf16-true":
        model = model.bfloat16()
    ids, labels = (torch.randint(0, TINY.vocab_size, (2, 64)) for _ in range(2))
    measured = _saved_bytes(model, ids, labels, autocast=precision == "bf16-mixed")
    plan = plan_memory(TINY, s)
    act = activation_bytes(TINY, s)
    tokens = s.batch_size * s.seq_len
    assert plan.parts["activations"] == act.blocks + act.head + act.norm_copies
    predicted = plan.parts["activations"] + 4 * TINY.vocab_size * tokens + plan.parts["weight_copies"]
    assert 0 <= measured - predicted <= 8, (measured, predicted)  # + the loss's 4-byte total weight


def test_checkpointing_keeps_block_inputs_and_one_block():
    s = PlanSettings(batch_size=4, seq_len=256, precision="bf16-mixed")
    full, ckpt = activation_bytes(LLAMA_CONFIGS["1b"], s), activation_bytes(LLAMA_CONFIGS["1b"], s.replace(
        checkpointing=True))
    h, layers, tokens = 2048, 24, 4 * 256
    assert ckpt.blocks == (layers * 4 * h) * tokens + full.blocks // layers
    assert ckpt.head == full.head and ckpt.logits == full.logits == 12 * 32000 * tokens


def test_llama7b_on_meta_matches_count_parameters():
    cfg = LLAMA_CONFIGS["7b"]
    h, i, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    plan = plan_memory("7b", rank=1024, precision="bf16-mixed")
    n_linear = layers * (4 * h * h + 3 * h * i)  # every matrix is a multiple of the group of 256
    assert plan.parts["int8_weights"] == n_linear + 4 * n_linear // 256
    assert plan.parts["params"] == 4 * (count_parameters(cfg) - n_linear) + 4 * 7 * layers  # + carriers
    eight_bit = lambda n: 2 * (n + 4 * -(-n // 256))  # noqa: E731
    low = [h * 1024] * 4 + [i * 1024] * 3  # q k v o: (h, r); gate up: (i, r); down: (r, i)
    expected = 2 * eight_bit(vocab * h) + (2 * layers + 1) * eight_bit(h) + layers * sum(map(eight_bit, low))
    assert plan.parts["optimizer_moments"] == expected
    assert plan.parts["weight_copies"] == 2 * vocab * h  # lm_head's bf16 copy under autocast
    assert plan.parts["buffers"] == 4 * 2 * cfg.max_seq_len * cfg.head_dim


def test_accumulation_and_non_layerwise_hold_full_gradients():
    one = plan_memory("350m", layerwise=True)
    accumulated, plain = plan_memory("350m", accumulate=4), plan_memory("350m", layerwise=False)
    assert one.parts["gradients"] < accumulated.parts["gradients"] == plain.parts["gradients"]
    assert accumulated.notes and "full gradient" in accumulated.notes[0]
    assert set(plain.phases) == {"loss", "backward", "step"}


def test_fit_prefers_plain_settings_and_falls_back_to_checkpointing_and_offload():
    plan = plan_memory("1b", batch_size=16, seq_len=256, rank=512)
    roomy = plan.fit(80 * GIB)
    best = roomy[0].settings
    assert (best.offload, best.checkpointing, best.batch_size, best.accumulate) == (None, False, 16, 1)
    tight_budget = plan_memory("1b", batch_size=16, seq_len=256, rank=512, checkpointing=True,
                               offload="cpu", accumulate=1).total + CUDA_CONTEXT_BYTES
    tight = plan.fit(tight_budget)
    assert tight and all(f.total + CUDA_CONTEXT_BYTES <= tight_budget for f in tight)
    assert all(f.settings.batch_size * f.settings.accumulate == 16 for f in tight)
    assert all(f.settings.checkpointing or f.settings.offload for f in tight)
    assert tight[0].settings.offload is None or tight[0].settings.checkpointing
    assert plan.fit(GIB) == [] and "none: the smallest needs" in plan.fit_table(GIB)


def test_autocast_copies_are_those_saved_for_backward():
    """Lightning's autocast does not cache: a linear's 16-bit weight copy lives on only if saved for
    backward. With checkpointing that is lm_head's and, in backward, one recomputed block's."""
    cfg = LLAMA_CONFIGS["1b"]
    h, i, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    one_block = 4 * h * h + 3 * h * i
    float_weights = dict(precision="bf16-mixed", rank=512, quantize_weights=False, proj_quant=False)
    ckpt = plan_memory("1b", checkpointing=True, **float_weights)
    plain = plan_memory("1b", checkpointing=False, **float_weights)
    assert ckpt.parts["weight_copies"] == 2 * (vocab * h + one_block)
    assert plain.parts["weight_copies"] == 2 * (vocab * h + cfg.num_layers * one_block)
    assert plan_memory("1b", precision="bf16-true", rank=512).parts["weight_copies"] == 0


def test_the_loss_phase_holds_the_saved_activations_not_the_recomputed_block():
    from qgl.plan.activations import block_bytes_per_token
    from qgl.plan.plan import PERSISTENT

    for ckpt in (True, False):
        plan = plan_memory("1b", batch_size=16, seq_len=256, rank=512, precision="bf16-true",
                           checkpointing=ckpt)
        persistent = sum(plan.parts[k] for k in PERSISTENT)
        block = block_bytes_per_token(plan.config, 2, False) * 16 * 256 if ckpt else 0
        assert plan.phases["loss"] == persistent + plan.parts["activations"] - block + plan.parts["logits"]
        assert plan.phases["backward"] >= persistent + plan.parts["activations"]


def test_when_the_global_batch_fits_nowhere_the_plan_offers_settings_without_accumulation():
    # LLaMA-7B, 16 x 32 accumulated: layer-wise updates hold a full fp32 gradient over the window.
    plan = plan_memory("7b", batch_size=16, accumulate=32, checkpointing=True, rank=1024)
    budget = 16 * GIB
    assert plan.fit(budget) == []
    single = [f for f in plan.single_step_candidates() if f.total + CUDA_CONTEXT_BYTES <= budget]
    assert single and all(f.settings.accumulate == 1 and f.settings.batch_size <= 512 for f in single)
    text = plan.fit_table(budget)
    assert "none: the smallest needs" in text and "without accumulation" in text
    rows = [line for line in text.splitlines() if "GiB  micro-batch" in line]
    assert rows and all("trainer.accumulate_grad_batches=1" in r for r in rows)
    # Each row's overrides are exactly what changed from the recipe's settings.
    for r in rows:
        batch = int(r.split("micro-batch ")[1].split(" ")[0])
        assert ("data.batch_size=" in r) == (batch != 16)
        assert ("qgalore.offload=cpu" in r) == ("offload cpu" in r)
        assert ("model.activation_checkpointing=false" in r) == ("no checkpointing" in r)
    # Nothing to change: no brackets.
    roomy = plan_memory("60m", batch_size=4).fit_table(80 * GIB)
    assert "none" not in roomy and "[" not in roomy.splitlines()[1]


def test_settings_from_recipe_and_errors():
    cfg = load_recipe("pretrain/llama_7b", ["data.source=x", "qgalore.offload=cpu"])
    s = PlanSettings.from_recipe(cfg)
    assert (s.rank, s.batch_size, s.accumulate, s.checkpointing, s.offload) == (1024, 16, 32, True, "cpu")
    assert predicted_parts(load_recipe("tiny"))["peak"] > 0
    galore = PlanSettings.from_recipe(load_recipe("tiny", ["method=galore"]))
    assert galore.qgalore and not galore.quantize_weights and not galore.proj_quant
    assert PlanSettings.from_recipe(load_recipe("tiny", ["method=full"])).optimizer == "adamw"
    assert predicted_parts(load_recipe("tiny", ["method=lora"])) is None  # not plannable (yet): no prediction
    with pytest.raises(PlanError, match="precision"):
        PlanSettings(precision="fp8")
    with pytest.raises(PlanError, match="unknown LLaMA config"):
        plan_memory("13b")
    with pytest.raises(PlanError, match="target_modules"):
        plan_memory("tiny", target_modules=("nothing",))


def test_cli_plan_prints_the_table_and_what_fits(capsys):
    assert main(["plan", "pretrain/llama_7b", "--gpu-mem", "16GiB", "trainer.accumulate_grad_batches=1",
                 "data.batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: LLaMA-7b" in out and "total (peak)" in out and "int8_weights" in out
    assert "settings that fit 16.00 GiB" in out and "offload cpu" in out
    assert main(["plan", "tiny", "method=adamw"]) == 0 and "torch AdamW" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["plan", "tiny", "--gpu-mem", "lots"], "--gpu-mem 'lots'"),
    (["plan", "tiny", "qgalore.rnk=3"], "unknown key 'qgalore.rnk'"),
    (["plan", "finetune/llama_hf_local"], "missing required value for key 'model.hf_path'"),
    (["plan", "tiny", "model.hf_path=/nonexistent"], "cannot read the model's config"),
    (["plan", "tiny", "qgalore.offload=gpu"], "qgalore.offload"),
])
def test_cli_plan_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("qgl: error: ")


def test_cli_plan_reads_a_local_hf_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=2,
        num_attention_heads=16)))
    assert main(["plan", "finetune/llama_hf_local", f"model.hf_path={tmp_path}"]) == 0
    assert "LLaMA shape of its config.json" in capsys.readouterr().out


def test_parse_size():
    assert parse_size("16GiB") == parse_size("16g") == 16 * GIB
    assert parse_size("80GB") == 80 * 10**9 and parse_size("12000MiB") == 12000 * 2**20
    assert parse_size("1e9") == 10**9
    for bad in ("", "-1G", "16XB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plain_update_temporaries_are_the_formula(bits, dtype, monkeypatch, one_thread):
    """The chunked plain update's temporaries, measured (CPU: the 8-bit reference), are the formula's:
    exact for fp32 moments; for 8-bit, + a few bytes per 256-element block (absmax, min/max)."""
    import qgl.optim.adam as adam
    from qgl.plan.inventory import ParamInfo, step_temp_nbytes

    monkeypatch.setattr(adam, "PLAIN_CHUNK", 64 * 256)
    emb = torch.nn.Embedding(300, 180).to(dtype)  # 54,000 elements: 3 chunks and a partial one
    opt = QGaLoreAdamW([dict(params=[emb.weight], rank=None)], lr=1e-3, weight_decay=0.1, optim_bits=bits)
    for _ in range(2):  # the first step allocates the moments
        emb.weight.grad = torch.randn_like(emb.weight)
        measured = peak_cpu_allocated(lambda: opt.update_param(emb.weight))
    s = PlanSettings(precision="bf16-true" if dtype == torch.bfloat16 else "32-true", optim_bits=bits,
                     fused_8bit=False)
    info = ParamInfo("embed.weight", (300, 180), False, False, None)
    predicted = step_temp_nbytes(info, s)
    slack = 64 * 64 if bits == 8 else 16  # bytes: 64 a block of the chunk; a scalar or two
    assert 0 <= measured - predicted <= slack, (measured, predicted)
    monkeypatch.setattr(adam, "PLAIN_CHUNK", 1 << 30)  # one chunk: O(numel)
    assert step_temp_nbytes(info, s) > 3 * predicted


def test_update_order_and_offload_window_are_the_runs(monkeypatch, one_thread):
    """The planner's update order is the order the hooks step a built model in, and with CPU offload
    the state prefetched during an update is the next one's in that order."""
    from contextlib import contextmanager
    from dataclasses import replace

    from qgl.optim.offload import StateOffloader
    from qgl.plan.inventory import inventory

    s = PlanSettings(precision="32-true", rank=16, checkpointing=True, offload="cpu")
    model = quantize_model(LlamaForCausalLM(replace(TINY, activation_checkpointing=True)))
    opt = QGaLoreAdamW(make_param_groups(model, s.rank), lr=1e-3, layerwise=True, offload="cpu")
    names = {p: n for n, p in model.named_parameters()}
    seen: list[tuple[str, set[str]]] = []
    real = StateOffloader.resident

    @contextmanager
    def resident(self, p, state):
        with real(self, p, state):
            seen.append((names[p], {names[q] for q in self._pending}))
            yield

    monkeypatch.setattr(StateOffloader, "resident", resident)
    for _ in range(2):
        x = torch.randint(0, TINY.vocab_size, (2, 16))
        model(x, labels=x).backward()
        opt.step()
    order = [p.name for p in inventory(TINY, s).in_update_order()]
    second = seen[len(order):]
    assert [n for n, _ in seen[:len(order)]] == [n for n, _ in second] == order
    assert all(pending == ({order[i + 1]} if i + 1 < len(order) else set())
               for i, (_, pending) in enumerate(second))


def test_llama7b_plain_updates_no_longer_set_the_peak():
    """With chunked plain updates the embedding and head (131M elements each) are not the largest
    update; a bf16 7B with checkpointing at 1 x 256 tokens plans below 12 GiB, and 8 GiB offloaded."""
    kw = dict(rank=1024, precision="bf16-true", checkpointing=True, batch_size=1, seq_len=256)
    plan, offloaded = plan_memory("7b", **kw), plan_memory("7b", offload="cpu", **kw)
    assert "mlp" in plan.how["optimizer_step"] and "mlp" in offloaded.how["optimizer_step"]
    assert plan.total < 12 * GIB and offloaded.total < 8 * GIB
    assert offloaded.phases["loss"] < offloaded.phases["backward"]


def test_graph_buffers_are_one_gradient_per_matrix_shape():
    """The CUDA-graph updates read each gradient from a buffer of its shape (qgl.optim.graphed): one per
    distinct GaLore matrix shape, in the parameters' dtype; none where the graphs are off."""
    cfg = LLAMA_CONFIGS["1b"]
    h, i = cfg.hidden_size, cfg.intermediate_size
    plan = plan_memory("1b", precision="bf16-true", rank=512)
    assert plan.parts["graph_buffers"] == 2 * (h * h + i * h + h * i)  # q/k/v/o, gate/up, down
    mixed = plan_memory("1b", precision="bf16-mixed", rank=512)
    assert mixed.parts["graph_buffers"] == 4 * (h * h + 2 * i * h)  # fp32 carriers, fp32 gradients
    for off in (dict(cuda_graphs=False), dict(offload="cpu"), dict(optim_bits=32), dict(devices=2),
                dict(optimizer="adamw")):
        assert plan_memory("1b", precision="bf16-true", rank=512, **off).parts["graph_buffers"] == 0, off
    without = plan_memory("1b", precision="bf16-true", rank=512, cuda_graphs=False)
    assert plan.total - without.total == plan.parts["graph_buffers"]
