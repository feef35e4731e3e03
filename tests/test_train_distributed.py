"""Data-parallel finetuning (train/distributed.py): the rank slices of a global batch, the
kappa projection applied after the all-reduce, and `torchrun --nproc-per-node 2` (gloo on CPU)
training the same adapter as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ntk_attention.ops.state import (
    deferred_nonnegative_projection,
    nonnegative,
    project_nonnegative_grad,
)
from ntk_attention.train.distributed import Distributed

from support import subprocess_env


@pytest.mark.parametrize("batch", [1, 2, 5, 6, 7])
@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_partition_the_global_batch_and_scale_to_its_mean(batch, world_size):
    indices = list(range(100, 100 + batch))
    parts = [Distributed(rank, world_size).shard(indices) for rank in range(world_size)]
    real = [rows for rows, scale in parts if scale > 0]
    assert [i for rows in real for i in rows] == indices  # contiguous, in order, each row once
    # DDP averages: (1/W) sum_r scale_r * mean_r = sum_r n_r/n * mean_r = the global mean
    for rows, scale in parts:
        if scale > 0:
            assert scale / world_size == pytest.approx(len(rows) / batch)
    for rows, scale in parts:
        assert rows and (scale > 0 or rows == indices[:1])  # an empty part runs one row, weight 0


def test_not_distributed_is_a_no_op():
    single = Distributed()
    assert single.shard([3, 1, 2]) == ([3, 1, 2], 1.0)
    model = torch.nn.Linear(2, 2)
    assert single.wrap(model, torch.device("cpu")) is model


def test_kappa_projection_is_applied_to_the_summed_gradient_not_per_rank():
    # theta = 0: the projection keeps a gradient only if it is negative (it raises kappa).
    upstream = [torch.tensor([3.0, -1.0]), torch.tensor([-2.0, -1.0])]  # two ranks' dL/dkappa

    def grad(upstreams, deferred):
        theta = torch.zeros(2, requires_grad=True)
        for up in upstreams:
            if deferred:
                with deferred_nonnegative_projection():
                    (nonnegative(theta) * up).sum().backward()
            else:
                (nonnegative(theta) * up).sum().backward()
        if deferred:
            project_nonnegative_grad(theta)
        return theta.grad

    one_process = grad([upstream[0] + upstream[1]], deferred=False)
    assert torch.equal(one_process, torch.tensor([0.0, -2.0]))  # 3 - 2 > 0: projected away
    assert not torch.equal(grad(upstream, deferred=False), one_process)  # per rank: -2 + -2
    assert torch.equal(grad(upstream, deferred=True), one_process)


# tests/ on PYTHONPATH: the FSDP2 worker below imports support.testing_models
ENV = subprocess_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _tiny_bert(path, tokenizer) -> None:
    """A 2-layer BERT without dropout (so ranks draw no different masks) and MiniLM's tokenizer."""
    import transformers

    tokenizer.save_pretrained(path)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(path)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, minilm_tokenizer):
    _tiny_bert(tmp_path / "model", minilm_tokenizer)
    # 16 rows in batches of 5: ranks take 2 + 3 rows, and the last batch (1 row) is all rank 1's
    args = [
        "-m", "ntk_attention.cli", "finetune", "--task", "bbc-news", "--method", "ntk",
        "--model", str(tmp_path / "model"), "--max-train", "16", "--max-eval", "8",
        "--max-length", "32", "--batch-size", "5", "--max-steps", "5", "--save-every", "2",
        "--threads", "1", "--no-progress",
    ]
    runs = {
        "single": [sys.executable, *args],
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--standalone", *args],
    }
    for name, command in runs.items():
        done = subprocess.run([*command, "--output", str(tmp_path / name)], env=ENV,
                              check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]

    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in runs}
    assert results["ddp"]["history"]["train_loss"] == pytest.approx(
        results["single"]["history"]["train_loss"], rel=1e-5)
    for split in ("validation", "test"):
        assert results["ddp"]["metrics"][split] == pytest.approx(
            results["single"]["metrics"][split], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["adapter", "results.json"]


_FSDP2_WORKER = '''
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from safetensors.torch import save_file
from ntk_attention import NTKConfig, get_ntk_model
from support.testing_models import ARCHITECTURES, randomize_adapter

torch.set_num_threads(1)
dist.init_process_group("gloo")
out = sys.argv[1]
spec = ARCHITECTURES["llama"]
ntk = get_ntk_model(spec.build(), NTKConfig())
randomize_adapter(ntk)
for layer in ntk.base_model.model.layers:
    fully_shard(layer)
fully_shard(ntk)
rank = dist.get_rank()
batch = {k: v[rank : rank + 1] for k, v in spec.inputs(batch=2, length=7, seed=4).items()}
loss = ntk(**batch, labels=batch["input_ids"]).loss
loss.backward()  # FSDP2 averages the gradients over the ranks
grads = {n: p.grad.full_tensor() for n, p in ntk.named_parameters() if p.grad is not None}
ntk.save_pretrained(out + "/adapter", is_main_process=rank == 0)
if rank == 0:
    save_file({n: g.contiguous() for n, g in grads.items()}, out + "/grads.safetensors")
dist.destroy_process_group()
'''


def test_fsdp2_two_processes_train_and_save_like_one(tmp_path):
    """FSDP2 (fully_shard) over 2 CPU processes: the sharded adapter's gradients equal one
    process's on the whole batch, and save_pretrained gathers the sharded state (a collective
    every rank joins; rank 0 writes) into the same files."""
    from ntk_attention import NTKConfig, NTKModel, get_ntk_model

    from support.testing_models import ARCHITECTURES, randomize_adapter

    worker = tmp_path / "worker.py"
    worker.write_text(_FSDP2_WORKER)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(worker), str(tmp_path)], env=ENV, check=False, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    spec = ARCHITECTURES["llama"]
    ntk = NTKModel.from_pretrained(spec.build(), tmp_path / "adapter", is_trainable=True)
    reference = get_ntk_model(spec.build(), NTKConfig())
    randomize_adapter(reference)
    for name, tensor in reference.adapter_state_dict().items():
        torch.testing.assert_close(ntk.adapter_state_dict()[name], tensor, msg=name)
    batch = spec.inputs(batch=2, length=7, seed=4)
    losses = [reference(**{k: v[i : i + 1] for k, v in batch.items()}, labels=batch["input_ids"][i : i + 1]).loss
              for i in range(2)]
    (sum(losses) / 2).backward()
    sharded = load_file(tmp_path / "grads.safetensors")
    for name, param in reference.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(sharded[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
