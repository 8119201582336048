"""2-process gloo DDP on CPU gives the weights (and the validation accuracy, each process
evaluating its shard) of 1 process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from vimerge.train import RetrainConfig, retrain
    from vimerge.train.distributed import DistEnv

    sys.path.insert(0, TESTS_DIR)
    from conftest import easy_data             # the tests' shared toy data set

    def data(n=48, seed=0):
        return easy_data(n, seed)

    def config(out, batch):
        return RetrainConfig(
            model="vim_tiny", model_kwargs=dict(depth=2, embed_dim=16, patch_size=4, stride=4,
            in_chans=1), img_size=16, num_classes=3, scan_backend="reference",
            reduce="rmeeto:r=2,interval=1", batch_size=batch, effective_batch=16, epochs=2, lr=2e-3,
            min_lr=1e-4, label_smoothing=0.1, ema=True, crop="pad", workers=0, output=out,
            progress=False, log_every=1)

    if __name__ == "__main__":
        out, batch = sys.argv[1], int(sys.argv[2])
        # 23 validation images: shards of 12 and 11 under 2 processes
        result = retrain(config(out, batch), train_data=data(), val_data=data(23, 1))
        assert result.world_size == int(__import__("os").environ.get("WORLD_SIZE", 1))
        assert result.effective_batch == 16, result
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", **extra)
    return env


def test_two_process_gloo_matches_one_process(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("TESTS_DIR", repr(str(Path(__file__).resolve().parent))))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "ddp"), "4"],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    # the 1-process reference (per-device batch 8 = the global batch of 2 x 4) meanwhile
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8"],
                            env=_env(), capture_output=True, check=False, text=True, timeout=120)
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outputs.append(p.communicate()[0])
    assert single.returncode == 0, single.stdout + single.stderr
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    a = torch.load(tmp_path / "one" / "final.pth", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)
    assert b["config"]["batch_size"] == 4 and a["config"]["batch_size"] == 8
    for key in ("model", "model_ema"):
        worst = max((a[key][k].float() - b[key][k].float()).abs().max().item() for k in a[key])
        print(key, worst)
        assert worst < 1e-5, (key, worst)
    assert a["global_step"] == b["global_step"] == 6
    # validation: every image once over the shards, the counts summed over the processes
    assert a["eval_acc"] is not None and a["eval_acc_ema"] is not None
    assert a["eval_acc"] * 23 == pytest.approx(round(a["eval_acc"] * 23))    # of all 23 images
    assert (b["eval_acc"], b["eval_acc_ema"]) == (a["eval_acc"], a["eval_acc_ema"])
    # one log, written by rank 0, that reports the world size and the effective batch
    with open(tmp_path / "ddp" / "log.jsonl") as f:
        start = json.loads(f.readline())
    assert (start["world_size"], start["per_device_batch"], start["accum_steps"],
            start["effective_batch"]) == (2, 4, 2, 16)
