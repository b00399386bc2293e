"""molm.expert_usage against counts taken straight from the routers, the heat map, and `molm usage`."""

import json
import os

import pytest
import torch

import molm
from molm.cli import main

from test_train import one_thread, tiny_config  # noqa: F401 (autouse fixture)


def reference_usage(model, windows):
    """Walk the blocks by hand: router probabilities and top-k of every layer, counted directly."""
    c = model.config
    counts = {"att": torch.zeros(c.n_layer, c.n_att_experts), "mlp": torch.zeros(c.n_layer, c.n_mlp_experts)}
    probs = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in counts.items()}
    with torch.no_grad():
        x = model.transformer.wte(windows)
        B, T, C = x.shape
        for layer, block in enumerate(model.transformer.h):
            for kind, router, h in (("att", block.attn.q_proj.gate, block.ln_1(x)),):
                p = torch.softmax(router.logits(h.reshape(-1, C)), -1)
                counts[kind][layer] += torch.bincount(
                    p.topk(c.k_att, -1).indices.reshape(-1), minlength=c.n_att_experts
                )
                probs[kind][layer] += p.double().sum(0)
            a, _ = block.attn(block.ln_1(x), None, None, layer, model._ops, False)
            x = x + a
            h = block.ln_2(x).reshape(-1, C)
            p = torch.softmax(block.mlpf.gate.logits(h), -1)
            counts["mlp"][layer] += torch.bincount(p.topk(c.k_mlp, -1).indices.reshape(-1), minlength=c.n_mlp_experts)
            probs["mlp"][layer] += p.double().sum(0)
            m, _ = block.mlpf.mlp(h, model._ops, False)
            x = x + m.view(B, T, C)
    return counts, probs


def test_usage_equals_a_direct_count_from_the_routers():
    model = molm.ModuleFormerForCausalLM(tiny_config(n_layer=2, n_mlp_experts=6, k_mlp=3)).init_weights(0).eval()
    tokens = torch.randint(0, 64, (16 * 9 + 7,), generator=torch.Generator().manual_seed(0))
    usage = molm.expert_usage(model, tokens, seq_len=16, batch_size=4)  # 9 windows, the last batch is short
    counts, probs = reference_usage(model, tokens[: 16 * 9].view(9, 16))
    assert usage.tokens == 144
    assert torch.equal((usage.att_freq * 144).round(), counts["att"].double())
    assert torch.equal((usage.mlp_freq * 144).round(), counts["mlp"].double())
    torch.testing.assert_close(usage.att_prob, probs["att"] / 144)
    torch.testing.assert_close(usage.mlp_prob, probs["mlp"] / 144)
    assert torch.allclose(usage.mlp_freq.sum(1), torch.full((2,), 3.0, dtype=torch.float64))
    assert torch.allclose(usage.att_prob.sum(1), torch.ones(2, dtype=torch.float64))


def test_heat_map_and_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = molm.ModuleFormerForCausalLM(tiny_config(vocab_size=300)).init_weights(0)
    model.save_pretrained(tmp_path / "model")
    usage = molm.expert_usage(model, torch.randint(0, 300, (200,)), seq_len=16)
    assert molm.plot_usage(usage, str(tmp_path / "u.png")) and os.path.getsize(tmp_path / "u.png") > 1000
    text = tmp_path / "corpus.txt"
    text.write_text("It was the best of times, it was the worst of times.\n" * 30)
    tok = os.path.join(os.path.dirname(__file__), "data", "molm-tiny-a")
    assert (
        main(
            [
                "usage",
                str(tmp_path / "model"),
                str(text),
                "--tokenizer",
                tok,
                "--seq-len",
                "16",
                "--png",
                str(tmp_path / "cli.png"),
                "--json",
                str(tmp_path / "u.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mlp" in out and os.path.isfile(tmp_path / "cli.png")
    saved = json.loads((tmp_path / "u.json").read_text())
    assert len(saved["mlp_freq"]) == 1 and len(saved["mlp_freq"][0]) == 4
