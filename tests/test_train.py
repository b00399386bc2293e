"""molm.train: learning, resume, bf16, data-parallel equivalence, data errors; the embedded default model."""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import molm
from molm.train import TrainConfig, perplexity, train

train_mod = importlib.import_module("molm.train")  # the module (molm.train is the function)


def tiny_config(**changes):
    base = dict(
        vocab_size=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        att_hidden=16,
        ffd_hidden=32,
        gating_size=16,
        n_att_experts=4,
        k_att=2,
        n_mlp_experts=4,
        k_mlp=2,
        block_size=16,
        history_length=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return molm.ModuleFormerConfig(**{**base, **changes})


def memorisable(n=4000):
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32, 38, 46, 26, 43, 38, 32, 7, 50])
    return pattern.repeat(n // len(pattern) + 1)[:n]


FAST = dict(seq_len=16, batch_size=4, warmup=2, progress=False, eval_every=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (and CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_decreases_on_memorisable_data(tmp_path):
    result = train(
        tiny_config(),
        memorisable(),
        out_dir=tmp_path,
        eval_data=memorisable(400),
        steps=30,
        lr=1e-2,
        aux_loss_weight=0.01,
        **FAST,
    )
    ce = [h["ce"] for h in result.history]
    assert ce[0] > math.log(64) - 0.5  # starts near uniform
    assert sum(ce[-5:]) / 5 < 0.5 * ce[0]
    # the loss logged is CE + w * aux, and the eval perplexity is exp(CE) of the trained model
    last = result.history[-1]
    assert last["loss"] == pytest.approx(last["ce"] + 0.01 * last["aux"], abs=2e-4)
    assert last["eval_ppl"] == pytest.approx(perplexity(result.model, memorisable(400), 16, 4, 8), rel=1e-4)
    reloaded = molm.load(tmp_path, dtype=torch.float32)
    x = memorisable(64).view(4, 16)
    torch.testing.assert_close(reloaded(x).logits, result.model(x).logits, rtol=0, atol=0)
    assert os.path.isfile(tmp_path / "log.jsonl")
    pytest.importorskip("matplotlib")
    assert os.path.getsize(tmp_path / "loss.png") > 1000


def test_perplexity_is_exp_of_mean_cross_entropy():
    model = molm.ModuleFormerForCausalLM(tiny_config()).init_weights(0).eval()
    tokens = torch.randint(0, 64, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    windows = tokens[:48].view(3, 16)
    with torch.no_grad():
        logits = model(windows).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 64), windows[:, 1:].reshape(-1))
    assert perplexity(model, tokens, seq_len=16, batch_size=2) == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=5, save_every=2, lr=3e-3, aux_loss_weight=0.01, sample_topk=1, grad_accum=2, **FAST)
    full = train(tiny_config(), memorisable(), out_dir=tmp_path / "full", config=cfg)

    real_lr_at = train_mod.lr_at

    def crash_at_step_3(step, c):
        if step == 3:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return real_lr_at(step, c)

    monkeypatch.setattr(train_mod, "lr_at", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), memorisable(), out_dir=tmp_path / "cut", config=cfg)
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    resumed = train(tmp_path / "cut", memorisable(), out_dir=tmp_path / "cut", config=cfg, resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_training_learns_and_returns_fp32(tmp_path):
    result = train(tiny_config(), memorisable(), steps=20, lr=2e-2, precision="bfloat16", **FAST)
    ce = [h["ce"] for h in result.history]
    assert sum(ce[-5:]) / 5 < 0.6 * ce[0]
    assert result.model.dtype == torch.float32


def _ddp_worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        result = train(
            tiny_config(), memorisable(), steps=3, lr=1e-2, aux_loss_weight=0.01, **{**FAST, "batch_size": 2}
        )
        if rank == 0:
            torch.save({"state": result.model.state_dict(), "history": result.history}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_data_parallel_equals_one_process_with_the_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = train(tiny_config(), memorisable(), steps=3, lr=1e-2, aux_loss_weight=0.01, **{**FAST, "batch_size": 4})
    assert [h["ce"] for h in ddp["history"]] == pytest.approx([h["ce"] for h in single.history], abs=1e-5)
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_data_errors_name_the_problem(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("some words\n")
    with pytest.raises(ValueError, match="pass a tokenizer"):
        train(tiny_config(), str(text), steps=1, **FAST)
    with pytest.raises(ValueError, match="vocab_size 64"):
        train(tiny_config(), torch.arange(100), steps=1, **FAST)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train(tiny_config(), torch.arange(10), steps=1, **FAST)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train(tiny_config(), str(tmp_path / "missing.txt"), steps=1, **FAST)
    with pytest.raises(ValueError, match="precision"):
        train(tiny_config(), memorisable(), steps=1, precision="fp8", **FAST)


def test_text_files_are_encoded_with_the_tokenizer(tmp_path):
    from molm.generate import load_tokenizer

    data = os.path.join(os.path.dirname(__file__), "data", "molm-tiny-a")
    tok = load_tokenizer(data)
    text = "It was the best of times, it was the worst of times.\n" * 40
    (tmp_path / "a.txt").write_text(text)
    tokens = train_mod.load_tokens(str(tmp_path / "a.txt"), tok)
    assert tokens.tolist() == tok.encode(text).ids
    result = train(
        tiny_config(vocab_size=300), str(tmp_path / "a.txt"), out_dir=tmp_path / "out", tokenizer=data, steps=2, **FAST
    )
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json") and len(result.history) == 2


def test_generate_without_model_uses_the_embedded_default(capsys):
    from molm.cli import DEFAULT_MODEL, main

    assert os.path.isfile(os.path.join(DEFAULT_MODEL, "model.safetensors"))
    assert main(["generate", "ROMEO.", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO.") and len(out.strip()) > len("ROMEO.")


def test_cli_train_from_config_then_extend(tmp_path, capsys):
    from molm.cli import main

    tok = os.path.join(os.path.dirname(__file__), "data", "molm-tiny-a")
    tiny_config(vocab_size=300).save_pretrained(tmp_path / "cfg")
    text = tmp_path / "a.txt"
    text.write_text("It was the best of times, it was the worst of times.\n" * 40)
    common = ["--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1"]
    assert (
        main(
            [
                "train",
                str(text),
                "--config",
                str(tmp_path / "cfg" / "config.json"),
                "--tokenizer",
                tok,
                "--out",
                str(tmp_path / "a"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                str(text),
                "--model",
                str(tmp_path / "a"),
                "--out",
                str(tmp_path / "b"),
                "--new-mlp-experts",
                "2",
                "--freeze-old",
                *common,
            ]
        )
        == 0
    )
    assert "trained 2 steps" in capsys.readouterr().out
    back = molm.load(tmp_path / "b", dtype=torch.float32)
    before = molm.load(tmp_path / "a", dtype=torch.float32)
    assert back.config.n_mlp_experts == 6
    assert torch.equal(back.lm_head.weight, before.lm_head.weight)  # frozen
    assert main(["train", str(text), "--out", str(tmp_path / "c"), *common]) == 1  # neither --model nor --config
