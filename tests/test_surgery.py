"""molm.extend / molm.prune: plain checkpoints with updated expert counts, frozen rows stay bitwise, and outputs
equal the original where the raw-probability gating says they must."""

import pytest
import torch

import molm
from molm.cli import model_info
from molm.train import train

from test_train import FAST, memorisable, one_thread, tiny_config  # noqa: F401 (autouse fixture)

SITES = ("attn.q_proj", "mlpf")


def trained_tiny(**changes):
    return molm.ModuleFormerForCausalLM(tiny_config(**changes)).init_weights(0).eval()


def silence_experts(model, layer_experts: dict, site: str) -> None:
    """Make the router give probability exactly 0 to some experts: hidden unit 0 of the router MLP becomes a
    constant 10 (zero weights, bias 10), and the dropped experts' output rows read it with weight -1e4."""
    with torch.no_grad():
        for layer, experts in layer_experts.items():
            w_gate = model.transformer.h[layer].get_submodule(site).gate.w_gate
            w_gate[0].weight[0].zero_()
            w_gate[0].bias[0] = 10.0
            for e in experts:
                w_gate[3].weight[e].zero_()
                w_gate[3].weight[e, 0] = -1e4


def test_extend_keeps_old_tensors_and_equals_the_original_when_new_experts_get_no_probability(tmp_path):
    model = trained_tiny(n_layer=2)
    for site in SITES:  # the same router change on both sides
        silence_experts(model, {0: [], 1: []}, site)
    ext = molm.extend(model, new_att_experts=2, new_mlp_experts=3, seed=1)
    assert (ext.config.n_att_experts, ext.config.n_mlp_experts) == (6, 7)
    for key, old in model.state_dict().items():
        new = ext.state_dict()[key]
        assert torch.equal(new[: old.shape[0]], old), key
    # with raw-probability gates, new experts change old gates unless their probability is 0
    x = memorisable(64).view(4, 16)
    assert not torch.allclose(ext(x).logits, model(x).logits, atol=1e-4)
    silence_experts(ext, {0: [4, 5], 1: [4, 5]}, "attn.q_proj")
    silence_experts(ext, {0: [4, 5, 6], 1: [4, 5, 6]}, "mlpf")
    torch.testing.assert_close(ext(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    ext.save_pretrained(tmp_path)
    back = molm.load(tmp_path, dtype=torch.float32)
    assert (back.config.n_att_experts, back.config.n_mlp_experts) == (6, 7)
    torch.testing.assert_close(back(x).logits, ext(x).logits, rtol=0, atol=0)


def test_extend_freeze_old_trains_only_the_new_rows(tmp_path):
    model = trained_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ext = molm.extend(model, new_att_experts=2, new_mlp_experts=2, freeze_old=True, seed=1)
    train(ext, memorisable(), out_dir=tmp_path, steps=4, lr=1e-2, weight_decay=0.1, aux_loss_weight=0.01, **FAST)
    changed = set()
    for key, old in before.items():
        new = ext.state_dict()[key]
        assert torch.equal(new[: old.shape[0]], old), f"{key}: frozen values moved"
        if new.shape != old.shape:
            fresh = molm.extend(model, 2, 2, seed=1).state_dict()[key][old.shape[0] :]
            if not torch.equal(new[old.shape[0] :], fresh):
                changed.add(key.rsplit(".", 1)[0])
    assert any("experts" in k for k in changed) and any("w_gate" in k for k in changed), changed
    back = molm.load(tmp_path, dtype=torch.float32)  # a plain checkpoint: no freezing state left in it
    assert back.config.n_mlp_experts == 6 and all(p.requires_grad for p in back.parameters())


def test_prune_of_experts_never_selected_leaves_outputs_unchanged(tmp_path):
    model = trained_tiny(n_layer=2, n_att_experts=6, n_mlp_experts=8)
    silence_experts(model, {0: [0, 3], 1: [1, 5]}, "attn.q_proj")
    silence_experts(model, {0: [2, 3, 4, 7], 1: [0, 1, 2, 6]}, "mlpf")
    data = torch.randint(1, 64, (2000,), generator=torch.Generator().manual_seed(0))
    usage = molm.expert_usage(model, data, seq_len=16)
    assert usage.att_freq[0, [0, 3]].sum() == 0 and usage.mlp_freq[1, [0, 1, 2, 6]].sum() == 0
    pruned = molm.prune(model, usage, keep={"att": 4, "mlp": 4})
    assert pruned.expert_edits.kept_experts["att.0"] == [1, 2, 4, 5] and pruned.expert_edits.kept_experts["mlp.1"] == [
        3,
        4,
        5,
        7,
    ]
    x = data[:64].view(4, 16)
    torch.testing.assert_close(pruned(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "full")
    pruned.save_pretrained(tmp_path / "pruned")
    back = molm.load(tmp_path / "pruned", dtype=torch.float32)
    assert (back.config.n_att_experts, back.config.n_mlp_experts) == (4, 4)
    torch.testing.assert_close(back(x).logits, pruned(x).logits, rtol=0, atol=0)
    full, small = model_info(tmp_path / "full"), model_info(tmp_path / "pruned")
    assert small["parameters"] < full["parameters"] and small["file size"] < full["file size"]
    router_rows = 2 * (16 * 2 + 16 * 4)  # 2 layers x gating_size x dropped experts: experts themselves stay k active
    assert small["active parameters per token"] == full["active parameters per token"] - router_rows


def test_prune_in_general_equals_the_original_with_dropped_router_logits_at_minus_infinity():
    model = trained_tiny(n_att_experts=4, n_mlp_experts=6)
    data = torch.randint(1, 64, (2000,), generator=torch.Generator().manual_seed(1))
    usage = molm.expert_usage(model, data, seq_len=16)
    pruned = molm.prune(model, usage, keep=0.5, rescale=False)
    assert (pruned.config.n_att_experts, pruned.config.n_mlp_experts) == (2, 3)
    masked = molm.ModuleFormerForCausalLM(model.config).eval()
    masked.load_state_dict(model.state_dict())
    silence_experts(masked, {0: sorted(set(range(4)) - set(pruned.expert_edits.kept_experts["att.0"]))}, "attn.q_proj")
    silence_experts(masked, {0: sorted(set(range(6)) - set(pruned.expert_edits.kept_experts["mlp.0"]))}, "mlpf")
    for site in SITES:  # the same constant hidden unit on the pruned side
        silence_experts(pruned, {0: []}, site)
    x = data[:64].view(4, 16)
    torch.testing.assert_close(pruned(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)


def test_prune_rescale_undoes_the_gate_inflation_when_the_dropped_mass_is_the_same_for_every_token():
    model = trained_tiny(n_att_experts=4, n_mlp_experts=6)
    with torch.no_grad():  # routers that ignore the token: constant probabilities, some mass on every expert
        for site in SITES:
            w_gate = model.transformer.h[0].get_submodule(site).gate.w_gate
            w_gate[0].weight.zero_()
            w_gate[0].bias.zero_()
            w_gate[0].bias[0] = 1.0
    data = torch.randint(1, 64, (500,), generator=torch.Generator().manual_seed(3))
    usage = molm.expert_usage(model, data, seq_len=16)
    x = data[:64].view(4, 16)
    rescaled, plain = molm.prune(model, usage, keep=2, rescale=True), molm.prune(model, usage, keep=2)
    dropped = 1 - usage.mlp_prob[0][rescaled.expert_edits.kept_experts["mlp.0"]].sum()
    assert 0.05 < dropped < 0.95 and rescaled.expert_edits.output_scale["mlp.0"] == pytest.approx(float(1 - dropped))
    torch.testing.assert_close(rescaled(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain(x).logits, model(x).logits, atol=1e-3)


def test_prune_by_mass_and_bad_arguments():
    model = trained_tiny(n_att_experts=6, n_mlp_experts=8)
    silence_experts(model, {0: [0, 1, 2]}, "attn.q_proj")
    usage = molm.expert_usage(
        model, torch.randint(1, 64, (1000,), generator=torch.Generator().manual_seed(2)), seq_len=16
    )
    pruned = molm.prune(model, usage, mass=1.0)  # keeps exactly the experts ever selected (at least k)
    selected = torch.nonzero(usage.att_freq[0]).flatten().tolist()
    assert len(selected) < 6 and pruned.expert_edits.kept_experts["att.0"] == selected
    assert pruned.expert_edits.kept_experts["mlp.0"] == torch.nonzero(usage.mlp_freq[0]).flatten().tolist()
    with pytest.raises(ValueError, match="exactly one of"):
        molm.prune(model, usage)
    with pytest.raises(ValueError, match="keep 9 att experts: must be between 1 and n_att_experts"):
        molm.prune(model, usage, keep=9)
    with pytest.raises(ValueError, match="usage for att experts has shape"):
        molm.prune(trained_tiny(n_att_experts=5), usage, keep=2)
    with pytest.raises(ValueError, match="new_att_experts"):
        molm.extend(model, new_att_experts=-1)


@pytest.mark.parametrize("surgery", ["prune", "extend"])
def test_saved_surgery_result_keeps_the_tokenizer(tmp_path, capsys, surgery):
    """A pruned or extended model saved on its own works with `molm generate --model` (the tokenizer travels)."""
    import os

    from molm.cli import main

    source = os.path.join(os.path.dirname(__file__), "data", "molm-tiny-a")
    model = molm.load(source, dtype=torch.float32)
    if surgery == "prune":
        usage = molm.expert_usage(model, torch.arange(256) % model.config.vocab_size, seq_len=32)
        new = molm.prune(model, usage, keep=0.5)
    else:
        new = molm.extend(model, new_att_experts=1, new_mlp_experts=1, seed=0)
    new.save_pretrained(tmp_path / "out")
    with open(os.path.join(source, "tokenizer.json"), "rb") as f:
        assert (tmp_path / "out" / "tokenizer.json").read_bytes() == f.read()
    expected = "".join(molm.generate(new, "It was the", max_new_tokens=6, stream=True))
    assert (
        main(
            ["generate", "--model", str(tmp_path / "out"), "It was the", "--max-new-tokens", "6", "--dtype", "float32"]
            + ["--greedy", "--repetition-penalty", "1"]  # what molm.generate does by default
        )
        == 0
    )
    assert capsys.readouterr().out == "It was the" + expected + "\n"


def test_trained_then_extended_model_saves_its_tokenizer(tmp_path):
    """The README's flow: molm.train(config, ..., tokenizer=DIR, out_dir) -> extend -> save_pretrained keeps it."""
    import os

    tokenizer_dir = os.path.join(os.path.dirname(__file__), "data", "molm-tiny-a")
    (tmp_path / "a.txt").write_text("It was the best of times, it was the worst of times.\n" * 40)
    run = train(
        tiny_config(vocab_size=300),
        str(tmp_path / "a.txt"),
        out_dir=tmp_path / "run",
        tokenizer=tokenizer_dir,
        steps=1,
        **FAST,
    )
    molm.extend(run.model, new_mlp_experts=1).save_pretrained(tmp_path / "bigger")
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as f:
        assert (tmp_path / "bigger" / "tokenizer.json").read_bytes() == f.read()
