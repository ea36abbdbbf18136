#!/usr/bin/python3
"""PyTorch peer benchmark: small CNN on Fashion-MNIST (CPU).

  conv2d(32,3,pad=1) relu maxpool2d(2) conv2d(64,3,pad=1) relu maxpool2d(2)
  flatten linear(128) relu linear(10)          input [N,1,28,28] in [0,1]

Mirrors ../shared/peers/torch_mlp.py (same data loading, preprocessing, seeds,
shuffling, loss, optimizers, timing and output format); only the model differs.
Self-contained: reads the IDX .gz files with gzip+numpy (no torchvision).
Run with Debian's interpreter (/usr/bin/python3), which has python3-torch.

  /usr/bin/python3 bench/torch_cnn.py --batch 64 --epochs 1 [--opt adam] [--threads 1]

Per epoch it prints the training wall time (the loop over minibatches only:
shuffle, gather, forward, loss, backward, optimizer step; data loading and
evaluation are excluded), samples/s, the mean training loss of the epoch and
the test accuracy. Each line prefixed with "JSON " is machine-readable; it has
the same fields as torch_mlp.py plus "model" and "peak_rss_kb"/"peak_rss_mb"
(ru_maxrss of this process so far, evaluation included).
"""
import argparse
import gzip
import json
import os
import platform
import resource
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = "/usr/share/datasets/fashion-mnist"


def load_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    dtype_code = (magic >> 8) & 0xFF
    assert dtype_code == 0x08, "expected unsigned byte IDX data"
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_split(data_dir, prefix):
    x = load_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    y = load_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    # same scaling as torch_mlp.py (uint8 / 255 -> [0,1]), NCHW layout
    x = torch.from_numpy(x.reshape(x.shape[0], 1, 28, 28).astype(np.float32) / 255.0)
    y = torch.from_numpy(y.astype(np.int64))
    return x, y


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


# Chunk 1000 (torch_mlp.py uses 10000): a 10000-image conv forward would need
# ~1 GB per activation and dominate the peak RSS.
@torch.no_grad()
def evaluate(model, x, y, bs=1000):
    correct = 0
    loss_sum = 0.0
    for i in range(0, x.shape[0], bs):
        out = model(x[i:i + bs])
        loss_sum += F.cross_entropy(out, y[i:i + bs], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + bs]).sum().item()
    return correct / x.shape[0], loss_sum / x.shape[0]


def peak_rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def bench_steps(B, steps, threads):
    """Per-step time of forward + backward + SGD update, the counterpart of BM_CnnStep/B."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(B, 1, 28, 28)
    y = torch.randint(0, 10, (B,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(10):  # warm-up
        step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps * 1e3)
    times.sort()
    print(f"torch cnn step B={B} threads={torch.get_num_threads()}: median {times[2]:.2f} ms/step "
          f"(min {times[0]:.2f}, max {times[-1]:.2f}; 5 x {steps} steps)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("batch", nargs="?", type=int, default=None)
    ap.add_argument("--batch", dest="batch_opt", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--opt", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--lr", type=float, default=None,
                    help="default: 0.1 for sgd, 1e-3 for adam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--tag", default="", help="free-form label copied into JSON")
    ap.add_argument("--steps", type=int, default=0,
                    help="instead of epochs: time this many SGD steps on random data of the CNN's "
                         "shape (as chaingrad's BM_CnnStep does), 5 repetitions, print ms/step")
    a = ap.parse_args()
    B = a.batch if a.batch is not None else a.batch_opt
    lr = a.lr if a.lr is not None else (0.1 if a.opt == "sgd" else 1e-3)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.steps > 0:
        return bench_steps(B, a.steps, a.threads)

    t0 = time.perf_counter()
    xtr, ytr = load_split(a.data_dir, "train")
    xte, yte = load_split(a.data_dir, "t10k")
    t_load = time.perf_counter() - t0

    model = make_model()
    if a.opt == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)  # no momentum
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(a.seed)
    N = xtr.shape[0]

    base = dict(impl="pytorch-python", model="cnn", torch=torch.__version__, batch=B,
                opt=a.opt, lr=lr, threads=torch.get_num_threads(),
                openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", "unset"),
                openblas_l2=os.environ.get("OPENBLAS_L2_SIZE", "unset"),
                openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
                aten_cpu_capability=os.environ.get("ATEN_CPU_CAPABILITY", "default"),
                mkldnn=bool(torch.backends.mkldnn.is_available()),
                tag=a.tag)
    print(f"# torch {torch.__version__} python {platform.python_version()} "
          f"threads={torch.get_num_threads()} B={B} opt={a.opt} lr={lr} model=cnn "
          f"data load {t_load:.2f}s (excluded)", flush=True)

    for ep in range(1, a.epochs + 1):
        model.train()
        loss_acc = torch.zeros(())
        nb = 0
        t0 = time.perf_counter()
        perm = torch.randperm(N, generator=gen)
        for i in range(0, N, B):
            idx = perm[i:i + B]
            xb = xtr.index_select(0, idx)
            yb = ytr.index_select(0, idx)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_acc += loss.detach()
            nb += 1
        dt = time.perf_counter() - t0
        train_loss = loss_acc.item() / nb
        acc, test_loss = evaluate(model, xte, yte)
        sps = N / dt
        rss = peak_rss_kb()
        print(f"epoch {ep}: {dt:.3f} s  {sps:,.0f} samples/s  "
              f"train_loss {train_loss:.4f}  test_loss {test_loss:.4f}  "
              f"test_acc {acc * 100:.2f}%  peak_rss {rss / 1024:.0f} MiB", flush=True)
        rec = dict(base, epoch=ep, epoch_s=dt, samples_per_s=sps,
                   train_loss=train_loss, test_loss=test_loss, test_acc=acc,
                   peak_rss_kb=rss, peak_rss_mb=rss / 1024.0)
        print("JSON " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
